"""Real ``celery worker`` processes: mutual exclusion, a paused holder, a killed holder."""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from celery_reliable.keys import KeySpace

from .conftest import Fleet, wait_for

pytestmark = pytest.mark.slow


def fleet_app() -> Any:
    from tests import fleet_app as module

    return module, module.build_app()


def records(client: redis.Redis, key: str) -> list[dict[str, Any]]:
    return [json.loads(r) for r in client.lrange(key, 0, -1)]


def test_mutual_exclusion_across_processes(fleet: Fleet, redis_client: redis.Redis) -> None:
    """24 tasks on one key over 2 workers x 2 processes never overlap; tokens follow order."""
    fleet.start(n=2, concurrency=2)
    module, app = fleet_app()
    results = [app.send_task("fleet.exclusive", args=("k", 0.05)) for _ in range(24)]
    tokens = [r.get(timeout=120) for r in results]
    runs = sorted(records(redis_client, module.rkey("records", "k")), key=lambda r: r["start"])
    assert len(runs) == 24 and sorted(tokens) == sorted(r["token"] for r in runs)
    for before, after in itertools.pairwise(runs):
        assert before["end"] <= after["start"], f"overlap: {before} {after}"
        assert before["token"] < after["token"], "tokens must increase in acquisition order"
    assert len({r["pid"] for r in runs}) >= 2, "work should have spread over processes"


def test_paused_holder_is_fenced_out(
    fleet: Fleet, redis_client: redis.Redis, engine: sa.Engine
) -> None:
    """A holder paused past its TTL loses to a newer holder; its writes are refused."""
    module, app = fleet_app()
    module.accounts.metadata.create_all(engine)
    fleet.start(n=2, concurrency=1)
    a = app.send_task("fleet.fenced_writer", args=("acct1", "A"))
    pid_a = int(wait_for(lambda: redis_client.get(module.rkey("pid", "A")), 30, "A to start"))
    os.kill(pid_a, signal.SIGSTOP)
    try:
        time.sleep(2.0 + 1.0)  # past A's lock_ttl of 2 s: its lease expires
        redis_client.set(module.rkey("gate", "B"), 1)
        b = app.send_task("fleet.fenced_writer", args=("acct1", "B"))
        out_b = b.get(timeout=60)
        redis_client.set(module.rkey("gate", "A"), 1)
    finally:
        os.kill(pid_a, signal.SIGCONT)
    out_a = a.get(timeout=60)
    assert out_b["token"] > out_a["token"]
    assert out_b["redis"] == "written" and out_b["postgres"] == "written"
    assert out_a["redis"] == f"stale:{out_b['token']}"
    assert out_a["postgres"] == f"stale:{out_b['token']}"
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(module.accounts).where(module.accounts.c.account == "acct1")
        ).one()
    assert (row.value, row.token) == ("B", out_b["token"])
    assert redis_client.hget(module.rkey("acct", "acct1"), "v") == b"B"


def test_killed_holder_frees_its_lock_and_the_task_is_redelivered(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    """kill -9 of the process holding the lock: it frees within its TTL; acks_late redelivers."""
    module, app = fleet_app()
    fleet.start(n=1, concurrency=2)
    result = app.send_task("fleet.crashy", args=("c1",))
    key = module.rkey("attempts", "c1")
    first = wait_for(lambda: records(redis_client, key), 30, "the first attempt")[0]
    lock_key = KeySpace(os.environ["FLEET_PREFIX"]).lock("crash:c1")
    assert redis_client.exists(lock_key)
    os.kill(first["pid"], signal.SIGKILL)
    killed = time.monotonic()
    # Nobody releases it: the lease runs out within lock_ttl (3 s) of the last renewal.
    wait_for(lambda: not redis_client.exists(lock_key), 3.0 + 0.5, "the dead holder's lock")
    freed_after = time.monotonic() - killed
    assert result.get(timeout=60) == "done"
    attempts = records(redis_client, key)
    last = attempts[-1]
    assert len(attempts) >= 2 and last["token"] > first["token"]
    assert last["pid"] != first["pid"]
    assert last["retries"] == 0  # redelivery and deferrals consumed no retry
    assert freed_after <= 3.5
    assert not redis_client.exists(lock_key)


def test_revoke_terminate_releases_the_lock(fleet: Fleet, redis_client: redis.Redis) -> None:
    """revoke(terminate=True) of a running locked task frees its lock at once, not at its TTL.

    The prefork child's SIGTERM handler (billiard's) raises SystemExit inside
    the body; ReliableTask's completion runs on the way out, like any failure.
    """
    module, app = fleet_app()
    fleet.start(n=1, concurrency=1)
    keys = KeySpace(os.environ["FLEET_PREFIX"])
    lock_key = keys.lock("long:r1")
    record_key = keys.idempotency("fleet.long_holder", "long:r1")
    result = app.send_task("fleet.long_holder", args=("r1", 300.0))
    pid = int(wait_for(lambda: redis_client.get(module.rkey("pid", "r1")), 30, "task to start"))
    assert redis_client.exists(lock_key) and redis_client.exists(record_key)
    revoked_at = time.monotonic()
    app.control.revoke(result.id, terminate=True)
    # Lock and idempotency lease last 60 s; the terminated child releases them at once
    # (the record is forgotten: the revoked task did not finish).
    wait_for(lambda: not redis_client.exists(lock_key), 20, "the lock to be released")
    assert not redis_client.exists(record_key)
    assert time.monotonic() - revoked_at < 20
    wait_for(lambda: not _alive(pid), 20, "the terminated child to exit")
    # The worker replaced its child and still runs locked tasks on that resource.
    again = app.send_task("fleet.exclusive", args=("r1-after", 0.01))
    assert isinstance(again.get(timeout=60), int)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
