"""ReliableTask behaviour in an embedded worker (pytest-celery's celery_app/celery_worker)."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import TestWorkController

from celery_reliable import SKIPPED, FencedLock, LockNotAcquired, StaleFenceToken
from celery_reliable.keys import KeySpace

from .conftest import reliable_task, wait_for


def held_lock(app: Celery, resource: str, ttl: float = 30) -> FencedLock:
    client = redis.Redis.from_url(app.conf.reliable_redis_url)
    lock = FencedLock(client, resource, ttl=ttl, prefix=app.conf.reliable_key_prefix)
    assert lock.acquire() is not None
    return lock


def test_deferral_does_not_consume_retries(
    celery_app: Celery, celery_worker: TestWorkController
) -> None:
    """A task with max_retries=0 waits out a busy lock through deferrals, then succeeds."""

    @reliable_task(celery_app, name="t.defer", lock="acct:{n}", max_retries=0, defer_delay=0.1,
                   defer_max_delay=0.2)
    def job(self: Any, n: int) -> dict[str, Any]:
        return {
            "retries": self.request.retries,
            "deferrals": self.request.get("reliable_deferrals"),
        }

    celery_worker.reload()
    lock = held_lock(celery_app, "acct:1")
    result = job.delay(1)
    wait_for(lambda: result.state == "RETRY", 10, "the first deferral")
    time.sleep(0.6)  # several deferrals while the lock is held
    assert not result.ready()
    lock.release()
    value = result.get(timeout=10)
    assert value["retries"] == 0
    assert value["deferrals"] >= 2


def test_skip_drops_the_duplicate_with_a_clear_state(
    celery_app: Celery, celery_worker: TestWorkController
) -> None:
    ran = []

    @reliable_task(celery_app, name="t.skip", lock="report", lock_contention="skip")
    def singleton(self: Any) -> None:
        ran.append(1)

    celery_worker.reload()
    lock = held_lock(celery_app, "report")
    result = singleton.delay()
    wait_for(lambda: result.state == SKIPPED, 10, "state SKIPPED")
    assert result.info["reason"] == "lock busy"
    assert ran == []
    lock.release()
    singleton.delay().get(timeout=10)
    assert ran == [1]


def test_fail_raises_lock_not_acquired(
    celery_app: Celery, celery_worker: TestWorkController
) -> None:
    @reliable_task(celery_app, name="t.fail", lock="x:{k}", lock_contention="fail")
    def strict(self: Any, k: str) -> str:
        return k

    celery_worker.reload()
    lock = held_lock(celery_app, "x:a")
    with pytest.raises(LockNotAcquired, match=r"t\.fail: lock 'x:a' is held"):
        strict.delay("a").get(timeout=10)
    lock.release()
    assert strict.delay("a").get(timeout=10) == "a"


def test_self_retrying_locked_task_completes(
    celery_app: Celery, celery_worker: TestWorkController
) -> None:
    """self.retry() releases the lock first: no deadlock, no deferral on its own lock."""
    attempts: list[int] = []

    @reliable_task(celery_app, name="t.retry", lock="r:{k}", max_retries=3, defer_delay=5,
                   defer_max_delay=5)
    def flaky(self: Any, k: str) -> int:
        attempts.append(self.fence_token)
        if len(attempts) < 3:
            raise self.retry(countdown=0.05)
        return len(attempts)

    celery_worker.reload()
    started = time.monotonic()
    assert flaky.delay("k").get(timeout=10) == 3
    # defer_delay=5 would show up here had any attempt deferred on its own lock.
    assert time.monotonic() - started < 4
    assert attempts == sorted(attempts) and len(set(attempts)) == 3


def test_autoretry_for_releases_the_lock(
    celery_app: Celery, celery_worker: TestWorkController
) -> None:
    calls: list[int] = []

    @reliable_task(celery_app, name="t.auto", lock="auto", autoretry_for=(ConnectionError,),
                   retry_backoff=False, default_retry_delay=0.05, max_retries=2, defer_delay=5,
                   defer_max_delay=5)
    def auto(self: Any) -> int:
        calls.append(1)
        if len(calls) < 2:
            raise ConnectionError("downstream")
        return len(calls)

    celery_worker.reload()
    started = time.monotonic()
    assert auto.delay().get(timeout=10) == 2
    assert time.monotonic() - started < 4


def test_exception_releases_the_lock(celery_app: Celery, celery_worker: TestWorkController) -> None:
    @reliable_task(celery_app, name="t.boom", lock="boom")
    def boom(self: Any) -> None:
        raise ValueError("nope")

    celery_worker.reload()
    with pytest.raises(ValueError):
        boom.delay().get(timeout=10)
    assert held_lock(celery_app, "boom").release()


def test_heartbeat_keeps_the_lock_of_a_long_task(
    celery_app: Celery, celery_worker: TestWorkController
) -> None:
    """A task running 4x its lock_ttl keeps the lock throughout."""

    @reliable_task(celery_app, name="t.long", lock="long", lock_ttl=0.5)
    def long(self: Any) -> bool:
        time.sleep(2.0)
        return bool(self.lock_lost)

    celery_worker.reload()
    result = long.delay()
    client = redis.Redis.from_url(celery_app.conf.reliable_redis_url)
    probe = FencedLock(client, "long", prefix=celery_app.conf.reliable_key_prefix)
    lock_key = KeySpace(celery_app.conf.reliable_key_prefix).lock("long")
    wait_for(
        lambda: result.id.encode() in (client.get(lock_key) or b""), 5, "the task to take the lock"
    )
    for _ in range(15):
        assert probe.acquire() is None
        time.sleep(0.1)
    assert result.get(timeout=10) is False


def test_lost_lock_is_detected_logged_and_fenced(
    celery_app: Celery,
    celery_worker: TestWorkController,
    caplog: pytest.LogCaptureFixture,
    engine: Any,
) -> None:
    """Taking the lock away mid-run: lock_lost turns true, WARNING logged, fenced write refused."""
    caplog.set_level(logging.WARNING, logger="celery_reliable")

    @reliable_task(celery_app, name="t.lost", lock="lost:{k}", lock_ttl=0.6)
    def victim(self: Any, k: str) -> str:
        deadline = time.monotonic() + 5
        while not self.lock_lost and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            with engine.begin() as conn:
                self.fence.check_postgres(conn)
        except StaleFenceToken:
            return "refused"
        return "written"

    celery_worker.reload()
    result = victim.delay("a")
    client = redis.Redis.from_url(celery_app.conf.reliable_redis_url)
    keys = wait_for(
        lambda: list(client.scan_iter(match=f"{{{celery_app.conf.reliable_key_prefix}}}:lock:*")),
        5,
        "the lock",
    )
    client.delete(*keys)  # the lease vanishes (expiry, failover, an operator)
    assert result.get(timeout=10) == "refused"
    assert any("was lost" in r.getMessage() and "t.lost" in r.getMessage() for r in caplog.records)


def test_eager_apply_runs_guards(celery_app: Celery) -> None:
    """task.apply() goes through the same pipeline (tokens minted, lock released)."""

    @reliable_task(celery_app, name="t.eager", lock="e:{k}")
    def eager(self: Any, k: str) -> int:
        return self.fence_token

    first = eager.apply(args=("a",)).get()
    second = eager.apply(args=("a",)).get()
    assert second > first
    with pytest.raises(RuntimeError, match="not available in a direct call"):
        eager("a")  # a plain function call takes no guards, so there is no token
