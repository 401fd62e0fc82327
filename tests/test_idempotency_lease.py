"""An execution that outlives its idempotency lease (embedded worker, real Redis)."""

from __future__ import annotations

import logging
import secrets
import threading
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import TestWorkController

from celery_reliable import metrics
from celery_reliable.runtime import runtime_for

from .conftest import reliable_task, wait_for


def test_stalled_execution_losing_its_lease_is_reported(
    celery_app: Celery,
    celery_worker: TestWorkController,
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis-only store: a stalled first run and the duplicate that took over both run and
    both succeed (the documented limit); the first's completion warns and is counted."""
    caplog.set_level(logging.WARNING, logger="celery_reliable")
    celery_app.conf.reliable_idempotency_store = "redis"
    assert runtime_for(celery_app).settings.idempotency_store == "redis"
    name = f"t.lease.{secrets.token_hex(3)}"
    runs: list[int] = []
    held: dict[str, str] = {}
    stalled, release = threading.Event(), threading.Event()

    @reliable_task(celery_app, name=name, idempotency_key="pay:{order_id}", idempotency_lease=1.0,
                   defer_delay=0.05, defer_max_delay=0.2)
    def pay(self: Any, order_id: int) -> int:
        runs.append(order_id)
        if len(runs) == 1:
            # A stalled worker: its heartbeat stops renewing this execution's
            # lease (as if the process were paused), and the body goes on.
            runtime = runtime_for(self.app)
            for lease in self.request._reliable_execution.leases:
                runtime.heartbeat.discard(lease)
                held["key"] = lease.key
            stalled.set()
            assert release.wait(30)
        return len(runs)

    celery_worker.reload()
    before = metrics.value("reliable_idempotency_lease_lost_total", task=name)
    first = pay.delay(7)
    assert stalled.wait(20)

    def expired() -> bool:  # the record's lease deadline ('d', ms) passed on the server clock
        seconds, micros = redis_client.time()
        deadline = redis_client.hget(held["key"], "d")
        return deadline is None or int(deadline) < seconds * 1000 + micros // 1000

    wait_for(expired, 20, "the lease to expire")
    second = pay.delay(7)  # the duplicate takes the expired key over and runs
    assert second.get(timeout=20) == 2
    release.set()
    assert first.get(timeout=20) == 2  # the stalled run also reports SUCCESS
    assert runs == [7, 7]
    assert metrics.value("reliable_idempotency_lease_lost_total", task=name) == before + 1
    lost = [r for r in caplog.records if "idempotency lease was lost" in r.getMessage()]
    assert len(lost) == 1 and lost[0].levelno == logging.WARNING
    assert "a duplicate may have run the task too" in lost[0].getMessage()
    # The duplicate's record stands: a third delivery replays it, it does not run.
    assert pay.delay(7).get(timeout=20) == 2 and runs == [7, 7]
