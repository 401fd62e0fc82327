"""A deferral is logged as one "deferred" line (countdown, reason, guard), never as a retry."""

from __future__ import annotations

import re

import pytest
import redis

from celery_reliable.keys import KeySpace

from .conftest import Fleet, wait_for
from .test_fleet import fleet_app

pytestmark = pytest.mark.slow


def full_logs(fleet: Fleet) -> str:
    """Every worker's whole log (Fleet.logs() keeps only each file's tail)."""
    return "\n".join(p.read_text(errors="replace") for p in sorted(fleet.tmp.glob("*.log")))


def test_a_real_workers_log_says_deferred_not_retry(fleet: Fleet,
                                                   redis_client: redis.Redis) -> None:
    """A task that finds its lock busy: the worker logs "deferred ... guard lock", no "retry:"."""
    _module, app = fleet_app()
    fleet.start(n=1, concurrency=2)
    holder = app.send_task("fleet.exclusive", args=("log-k", 1.5))
    lock = KeySpace(fleet.env["FLEET_PREFIX"]).lock("excl:log-k")
    wait_for(lambda: redis_client.exists(lock), 20, "the holder to take the lock")
    waiter = app.send_task("fleet.exclusive", args=("log-k", 0.0))
    holder.get(timeout=30)
    waiter.get(timeout=30)
    line = re.compile(rf"fleet\.exclusive\[{waiter.id}\] deferred \d+\.\d\ds: lock busy "
                      r"\(guard lock, deferral 1\)")
    wait_for(lambda: line.search(full_logs(fleet)), 20, "the deferred line")
    # Celery's own lines are kept (logged after the result is stored: wait for it)
    wait_for(lambda: f"fleet.exclusive[{waiter.id}] succeeded" in full_logs(fleet), 20,
             "the succeeded line")
    assert f"[{waiter.id}] retry:" not in full_logs(fleet), full_logs(fleet)
