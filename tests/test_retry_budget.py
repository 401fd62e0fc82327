"""The retry budget: a ratio of recent first executions plus a minimum rate (Finagle's), and
the absolute bucket kept as an option (real Redis, embedded worker)."""

from __future__ import annotations

import contextlib
import random
import threading
from datetime import timedelta
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import TestWorkController

from celery_reliable import Backoff, ConfigurationError, DeadLetters, ReliableTask, RetryBudget
from celery_reliable.pipeline.call import Call
from celery_reliable.pipeline.retrying import take_retry_budget
from celery_reliable.ratelimit import BucketSpec
from celery_reliable.retrybudget import (
    Deposits,
    WindowedBudget,
    deposits_for,
    parse_retry_budget,
    spend,
)
from celery_reliable.runtime import runtime_for

from .conftest import RedisServer, wait_for


def test_lua_and_python_model_agree(redis_client: redis.Redis, prefix: str) -> None:
    """budget.lua and WindowedBudget give the same reply to every call of a random sequence."""
    rng = random.Random(7)
    for spec in (RetryBudget(), RetryBudget(ratio=0.5, min_per_second=0, ttl=1),
                 RetryBudget(ratio=3.0, min_per_second=2.5, ttl=7.3),
                 RetryBudget(ratio=0, min_per_second=1, ttl=2)):
        key = f"{prefix}:budget:model:{spec.ratio}"
        model = WindowedBudget(spec)
        now = 1_700_000_000_000
        for _ in range(600):
            now += rng.choice((0, 1, 7, 50, 180, 900, 3000))
            deposits = rng.choice((0, 0, 1, 3, 40))
            withdraw = rng.random() < 0.6
            assert spend(redis_client, key, spec, deposits, withdraw, now_ms=now) == \
                model.call(now, deposits, withdraw), (spec, now)


def test_a_burst_is_retried_and_a_storm_is_cut(redis_client: redis.Redis, prefix: str) -> None:
    """Defaults: 100 retries at once, +20 % of first executions, the reserve back after ttl."""
    key = f"{prefix}:budget:defaults"
    spec = RetryBudget()
    now = 1_700_000_000_000
    granted = [spend(redis_client, key, spec, 1, True, now_ms=now)[0] for _ in range(40)]
    assert all(granted)  # the issue's burst: 40 fresh failures, all retried
    for _ in range(70):
        spend(redis_client, key, spec, 0, True, now_ms=now)
    # 100 (reserve) + 40 * 0.2 = 108 retries in the window: 40 + 68 granted, then refused
    assert spend(redis_client, key, spec, 0, True, now_ms=now) == (False, 0)
    # 500 more first executions earn 100 retries, no more
    assert spend(redis_client, key, spec, 500, False, now_ms=now) == (False, 100)
    # 10 s later everything has expired: the reserve is whole again, the deposits gone
    assert spend(redis_client, key, spec, 0, False, now_ms=now + 10_000) == (False, 100)


def test_deposits_ride_with_a_withdrawal_or_the_background_flush(
    redis_client: redis.Redis, prefix: str
) -> None:
    """Counting a first execution does no I/O; the counts reach Redis with a retry or a flush."""
    spec = RetryBudget(ratio=1.0, min_per_second=0.1, ttl=10)  # reserve: 1 retry
    key = f"{prefix}:budget:deposits"
    deposits = Deposits(redis_client, every=3600)  # the thread stays asleep: flush by hand
    for _ in range(3):
        deposits.add(key, spec)
    assert not redis_client.exists(key)  # counted, not sent
    assert spend(redis_client, key, spec, deposits.take(key), True) == (True, 3)
    deposits.add(key, spec)
    deposits.add(key, spec)
    deposits.add(f"{key}:other", spec)
    redis_client.script_flush()  # a restarted Redis: the flush loads the script again
    assert deposits.flush() == 2  # both task names in one round trip
    assert spend(redis_client, key, spec, 0, False) == (False, 5)
    assert spend(redis_client, f"{key}:other", spec, 0, False) == (False, 2)
    deposits.add(key, spec)
    deposits.failed(key, 3600)  # Redis was down: the pending count is dropped, sends pause
    deposits.add(key, spec)
    assert deposits.flush() == 0 and deposits.take(key) == 1


def test_budget_forms_and_errors() -> None:
    """A rate stays the absolute bucket; a ratio form is validated, naming the task."""
    assert parse_retry_budget("t", "retry_budget", "10/s") == BucketSpec(rate=10.0, burst=10.0)
    assert parse_retry_budget("t", "retry_budget", {"rate": 1, "burst": 5}) == \
        BucketSpec(rate=1.0, burst=5.0)
    assert parse_retry_budget("t", "retry_budget", {"ratio": 0.1, "ttl": timedelta(seconds=30)}) \
        == RetryBudget(ratio=0.1, min_per_second=10.0, ttl=30.0)
    assert parse_retry_budget("t", "retry_budget", False) is False
    for bad, message in (({"ratio": -1}, "'ratio' must be in"),
                         ({"ratio": 0, "min_per_second": 0}, "both 0"),
                         ({"ttl": 0.5}, "'ttl' must be in"),
                         ({"ratoi": 0.2}, "unknown keys"),
                         ({"ratio": "lots"}, "finite number")):
        with pytest.raises(ConfigurationError, match=f"t: option 'retry_budget'.*{message}"):
            parse_retry_budget("t", "retry_budget", bad)
    with pytest.raises(ValueError, match="'ttl' must be in"):
        RetryBudget(ttl=120)


def _flaky(app: Celery, name: str, budget: Any) -> Any:
    """A task failing once per argument, then succeeding (the issue's burst)."""
    failed: set[int] = set()
    lock = threading.Lock()

    @app.task(base=ReliableTask, bind=True, shared=False, name=name,
              backoff=Backoff.exponential(0.05, 0.2, max_attempts=3), retry_budget=budget)
    def flaky(self: Any, n: int) -> int:
        with lock:
            first = n not in failed
            failed.add(n)
        if first:
            raise ConnectionError("partner reset the connection")
        return n

    return flaky


def _burst(app: Celery, task: Any) -> tuple[int, int]:
    """40 tasks at once: (succeeded, dead-lettered)."""
    results = [task.delay(n) for n in range(40)]
    ok = 0
    for result in results:
        with contextlib.suppress(ConnectionError):
            ok += result.get(timeout=60) is not None
    return ok, len(DeadLetters(app).list(task_name=task.name))


def test_the_issues_burst_is_retried_under_the_default_budget(
    celery_app: Celery, celery_worker: TestWorkController
) -> None:
    """40 tasks failing once: none dead-lettered by default; an absolute bucket still cuts."""
    default = _flaky(celery_app, "rb.burst_default", None)
    bucket = _flaky(celery_app, "rb.burst_bucket", {"rate": 1, "burst": 10})
    celery_worker.reload()
    assert _burst(celery_app, default) == (40, 0)
    ok, dead = _burst(celery_app, bucket)
    assert ok + dead == 40 and dead >= 20  # 10 at once, then one a second


def test_a_storm_is_held_to_the_ratio(celery_app: Celery,
                                      celery_worker: TestWorkController) -> None:
    """A downstream that stays down: retries stay within ratio * first executions."""
    calls: list[int] = []

    @celery_app.task(base=ReliableTask, bind=True, shared=False, name="rb.storm",
                     backoff=Backoff.exponential(0.02, 0.05, max_attempts=5),
                     retry_budget=RetryBudget(ratio=0.5, min_per_second=0, ttl=60))
    def down(self: Any, n: int) -> None:
        calls.append(n)
        raise ConnectionError("partner down")

    celery_worker.reload()
    for result in [down.delay(n) for n in range(8)]:
        with pytest.raises(ConnectionError):
            result.get(timeout=60)
    # without the budget: 8 * 5 = 40 calls; with it: 8 first executions earn 4 retries
    assert 8 < len(calls) <= 8 + 4
    letters = DeadLetters(celery_app).list(task_name="rb.storm")
    assert len(letters) == 8
    assert sum(letter.reason == "retry budget exhausted" for letter in letters) >= 4


def test_the_budget_fails_open_when_redis_is_down(private_redis: RedisServer) -> None:
    """Redis unreachable: the retry is allowed, and the counted first executions are dropped."""
    app = Celery("rb-down", broker="memory://", backend="cache+memory://")
    app.conf.update(reliable_redis_url=f"{private_redis.url}/0", reliable_key_prefix="rbdown")

    @app.task(base=ReliableTask, bind=True, shared=False, name="rb.down")
    def task(self: Any) -> None:
        return None

    task = task._get_current_object()
    runtime = runtime_for(app)
    key = runtime.keys.retry_budget_window("rb.down")
    deposits = deposits_for(runtime)
    deposits.add(key, RetryBudget())
    private_redis.kill()
    assert take_retry_budget(Call(task, task._policy())) is True
    private_redis.start()
    assert deposits.take(key) == 0  # dropped, not credited late
    assert take_retry_budget(Call(task, task._policy())) is True  # and back to normal
    assert redis.Redis.from_url(private_redis.url).exists(key)


def test_the_flusher_thread_sends_then_ends_when_idle(redis_client: redis.Redis,
                                                      prefix: str) -> None:
    """The background thread credits a count on its own, and ends once idle (no leak)."""
    spec = RetryBudget(ratio=1.0, min_per_second=0.1, ttl=10)
    key = f"{prefix}:budget:thread"
    deposits = Deposits(redis_client, every=0.01)
    deposits.add(key, spec)
    thread = deposits._thread
    assert thread is not None
    wait_for(lambda: spend(redis_client, key, spec, 0, False) == (False, 2), 10, "the flush")
    thread.join(timeout=10)
    assert not thread.is_alive() and deposits._thread is None
    deposits.add(key, spec)  # a new count starts a new thread
    assert deposits._thread is not None and deposits._thread is not thread
