"""Retries with backoff, budgets, dead letters and replay (embedded worker, real servers)."""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest
import requests
from celery import Celery
from celery.contrib.testing.worker import TestWorkController

from celery_reliable import Backoff, DeadLetters, ReliableTask, metrics


def letters(app: Celery, name: str) -> list[Any]:
    return DeadLetters(app).list(task_name=name)


def test_flaky_task_succeeds_after_k_failures(
    celery_app: Celery, celery_worker: TestWorkController
) -> None:
    """Retryable errors are retried automatically with backoff delays (no countdown given)."""
    seen: list[float] = []

    @celery_app.task(
        base=ReliableTask,
        bind=True,
        shared=False,
        name="r.flaky",
        backoff=Backoff.exponential(0.05, 0.2, max_attempts=5),
    )
    def flaky(self: Any) -> int:
        seen.append(time.monotonic())
        if len(seen) <= 3:
            raise ConnectionError("partner reset the connection")
        return self.request.retries

    celery_worker.reload()
    assert flaky.delay().get(timeout=20) == 3
    gaps = [b - a for a, b in itertools.pairwise(seen)]
    assert len(gaps) == 3 and all(g <= 0.2 + 0.5 for g in gaps)
    assert letters(celery_app, "r.flaky") == []


def test_not_retryable_is_dead_lettered_and_replay_runs_again(
    celery_app: Celery, celery_worker: TestWorkController
) -> None:
    calls: list[int] = []

    @celery_app.task(
        base=ReliableTask,
        bind=True,
        shared=False,
        name="r.bad",
        backoff=Backoff.exponential(0.05, 0.2, max_attempts=5),
    )
    def bad(self: Any, n: int, note: str = "") -> int:
        calls.append(n)
        if len(calls) == 1:
            raise ValueError("invalid card number")
        return n * 2

    celery_worker.reload()
    with pytest.raises(ValueError):
        bad.delay(21, note="x").get(timeout=10)
    [letter] = letters(celery_app, "r.bad")
    assert (letter.reason, letter.exc_type, letter.attempts) == ("not retryable", "ValueError", 1)
    assert letter.args == [21] and letter.kwargs == {"note": "x"}
    assert "invalid card number" in letter.exc_message and "Traceback" in letter.traceback
    dead = DeadLetters(celery_app)
    new_id = dead.replay(letter.id)
    assert celery_app.AsyncResult(new_id).get(timeout=10) == 42
    assert calls == [21, 21]
    assert dead.get(letter.id).replayed_as == new_id
    assert dead.purge(ids=[letter.id]) == 1 and letters(celery_app, "r.bad") == []


def test_exhausted_retries_are_dead_lettered(
    celery_app: Celery, celery_worker: TestWorkController
) -> None:
    @celery_app.task(
        base=ReliableTask,
        bind=True,
        shared=False,
        name="r.down",
        backoff=Backoff.exponential(0.02, 0.05, max_attempts=3),
    )
    def down(self: Any) -> None:
        raise TimeoutError("partner timed out")

    celery_worker.reload()
    with pytest.raises(TimeoutError):
        down.delay().get(timeout=10)
    [letter] = letters(celery_app, "r.down")
    assert (letter.reason, letter.attempts) == ("retries exhausted", 3)


def test_retry_budget_stops_a_storm(celery_app: Celery, celery_worker: TestWorkController) -> None:
    """Budget of 1 retry (refilling very slowly): the second failing task is not retried."""
    before = metrics.value("reliable_retry_budget_exhausted_total", task="r.storm")

    @celery_app.task(
        base=ReliableTask,
        bind=True,
        shared=False,
        name="r.storm",
        backoff=Backoff.exponential(0.02, 0.05, max_attempts=3),
        retry_budget={"rate": 0.001, "burst": 1},
    )
    def storm(self: Any, n: int) -> None:
        raise ConnectionError("partner down")

    celery_worker.reload()
    for n in range(2):
        with pytest.raises(ConnectionError):
            storm.delay(n).get(timeout=10)
    # n=0 spent the only token on its first retry; its second failure and n=1's
    # first find the budget empty and are dead-lettered instead of retried.
    found = sorted(
        (letter.args[0], letter.reason, letter.attempts)
        for letter in letters(celery_app, "r.storm")
    )
    assert found == [(0, "retry budget exhausted", 2), (1, "retry budget exhausted", 1)]
    assert metrics.value("reliable_retry_budget_exhausted_total", task="r.storm") >= before + 1


def test_retry_after_is_the_floor_of_the_next_delay(
    celery_app: Celery, celery_worker: TestWorkController
) -> None:
    seen: list[float] = []

    @celery_app.task(
        base=ReliableTask,
        bind=True,
        shared=False,
        name="r.429",
        backoff=Backoff.exponential(0.01, 0.02, max_attempts=3),
    )
    def limited(self: Any) -> str:
        seen.append(time.monotonic())
        if len(seen) == 1:
            response = requests.Response()
            response.status_code = 429
            response.headers["Retry-After"] = "1"
            raise requests.HTTPError("429", response=response)
        return "ok"

    celery_worker.reload()
    assert limited.delay().get(timeout=10) == "ok"
    assert seen[1] - seen[0] >= 0.95


def test_explicit_retry_and_autoretry_use_the_backoff(
    celery_app: Celery, celery_worker: TestWorkController
) -> None:
    seen: list[float] = []

    @celery_app.task(
        base=ReliableTask,
        bind=True,
        shared=False,
        name="r.explicit",
        backoff=Backoff.exponential(0.3, 0.3, jitter="none", max_attempts=3),
    )
    def explicit(self: Any) -> int:
        seen.append(time.monotonic())
        if len(seen) < 2:
            raise self.retry()
        return len(seen)

    auto_calls: list[int] = []

    @celery_app.task(
        base=ReliableTask,
        bind=True,
        shared=False,
        name="r.auto",
        autoretry_for=(KeyError,),
        backoff=Backoff.exponential(0.05, 0.05, jitter="none", max_attempts=3),
    )
    def auto(self: Any) -> int:
        auto_calls.append(1)
        if len(auto_calls) < 3:
            raise KeyError("listed through autoretry_for")
        return len(auto_calls)

    celery_worker.reload()
    assert explicit.delay().get(timeout=10) == 2
    assert seen[1] - seen[0] >= 0.28  # "none" jitter: exactly base
    assert auto.delay().get(timeout=10) == 3


def test_deadline_ends_retrying(celery_app: Celery, celery_worker: TestWorkController) -> None:
    @celery_app.task(
        base=ReliableTask,
        bind=True,
        shared=False,
        name="r.deadline",
        backoff=Backoff.exponential(0.2, 0.2, jitter="none", deadline=0.3),
        max_retries=50,
    )
    def slow(self: Any) -> None:
        raise ConnectionError("down")

    celery_worker.reload()
    with pytest.raises(ConnectionError):
        slow.delay().get(timeout=10)
    [letter] = letters(celery_app, "r.deadline")
    assert letter.reason == "deadline passed" and 2 <= letter.attempts <= 4


def test_bad_backoff_option_fails_at_bind(celery_app: Celery) -> None:
    from celery_reliable import ConfigurationError

    def f() -> None:
        return None

    with pytest.raises(ConfigurationError, match=r"^r\.bad_backoff: option 'backoff' must be"):
        celery_app.task(base=ReliableTask, shared=False, name="r.bad_backoff", backoff={"base": 1})(
            f
        )._get_current_object()


def test_dead_letter_queue_gets_a_copy(celery_app: Celery,
                                       celery_worker: TestWorkController) -> None:
    """With reliable_dead_letter_queue, the dead-lettered task is also published there."""
    import redis as redis_lib

    celery_app.conf.reliable_dead_letter_queue = "dead-letters-test"

    @celery_app.task(base=ReliableTask, bind=True, shared=False, name="r.dlq")
    def broken(self: Any, n: int) -> None:
        raise ValueError("bad")

    celery_worker.reload()
    with pytest.raises(ValueError):
        broken.delay(5).get(timeout=10)
    broker = redis_lib.Redis.from_url(celery_app.conf.broker_url)
    raw = broker.lpop("dead-letters-test")
    assert raw is not None
    import json

    message = json.loads(raw)
    assert message["headers"]["task"] == "r.dlq"
    assert message["headers"]["reliable_dead_letter"] == "failed"


def test_fence_and_lock_metrics(celery_app: Celery, celery_worker: TestWorkController,
                                redis_client: Any) -> None:
    from celery_reliable import FencedLock, RedisFence, StaleFenceToken

    before = metrics.value("reliable_fence_rejections_total", store="redis")
    RedisFence(redis_client).set("metric-fence", "a", 10)
    with pytest.raises(StaleFenceToken):
        RedisFence(redis_client).set("metric-fence", "b", 9)
    assert metrics.value("reliable_fence_rejections_total", store="redis") == before + 1

    @celery_app.task(base=ReliableTask, bind=True, shared=False, name="r.skip", lock="m",
                     lock_contention="skip")
    def skip(self: Any) -> None:
        return None

    celery_worker.reload()
    acquired = metrics.value("reliable_lock_acquire_total", result="acquired")
    skip.delay().get(timeout=10)
    assert metrics.value("reliable_lock_acquire_total", result="acquired") == acquired + 1
    held = FencedLock(redis_client.__class__.from_url(celery_app.conf.reliable_redis_url), "m",
                      prefix=celery_app.conf.reliable_key_prefix)
    assert held.acquire() is not None
    busy = metrics.value("reliable_lock_acquire_total", result="busy-skip")
    skip.delay()
    from .conftest import wait_for

    wait_for(lambda: metrics.value("reliable_lock_acquire_total", result="busy-skip") == busy + 1,
             10, "the skip")
    held.release()


def test_dont_autoretry_for_wins(celery_app: Celery, celery_worker: TestWorkController) -> None:
    """A transient-looking error listed in dont_autoretry_for is not retried."""
    calls: list[int] = []

    class Refused(ConnectionRefusedError):
        pass

    @celery_app.task(base=ReliableTask, bind=True, shared=False, name="r.never",
                     dont_autoretry_for=(Refused,),
                     backoff=Backoff.exponential(0.02, 0.05, max_attempts=4))
    def never(self: Any) -> None:
        calls.append(1)
        raise Refused("the partner said no")

    celery_worker.reload()
    with pytest.raises(ConnectionRefusedError):  # the backend rebuilds a local class as its base
        never.delay().get(timeout=10)
    assert calls == [1]
    [letter] = letters(celery_app, "r.never")
    assert letter.reason == "not retryable"


def test_purge_older_than(celery_app: Celery, celery_worker: TestWorkController) -> None:
    from celery_reliable import deadletter
    from celery_reliable.runtime import runtime_for

    engine = runtime_for(celery_app).engine
    old = deadletter.record(engine, task_name="r.purge", task_id="t1", args=[1], kwargs={},
                            exc=ValueError("x"), attempts=1, reason="failed", queue=None,
                            first_failure_at=None)
    with engine.begin() as conn:
        import sqlalchemy as sa

        from celery_reliable.schema import dead_letters

        conn.execute(sa.update(dead_letters).where(dead_letters.c.id == old)
                     .values(last_failure_at=sa.func.now() - sa.text("interval '3 days'")))
    fresh = deadletter.record(engine, task_name="r.purge", task_id="t2", args=[2], kwargs={},
                              exc=ValueError("y"), attempts=1, reason="failed", queue=None,
                              first_failure_at=None)
    dead = DeadLetters(celery_app)
    assert dead.purge(older_than_days=2) == 1
    assert [letter.id for letter in dead.list(task_name="r.purge")] == [fresh]
    with pytest.raises(KeyError, match=f"no dead letter with id {old}"):
        dead.get(old)


def test_dead_lettered_delivery_is_never_retried(
    celery_app: Celery, celery_worker: TestWorkController
) -> None:
    """Once a failure is dead-lettered, that delivery does not retry, even if budget comes back.

    ``autoretry_for`` calls ``retry()``, which finds the budget spent and
    dead-letters; the budget refills at that very moment (a metric sink does
    it, deterministically), and the failure then passes through the task's
    own retry path: it must stay dead. Only ``DeadLetters.replay`` runs it again.
    """
    from celery_reliable.runtime import runtime_for

    calls: list[int] = []

    @celery_app.task(
        base=ReliableTask,
        bind=True,
        shared=False,
        name="r.dead_is_done",
        autoretry_for=(ConnectionError,),
        backoff=Backoff.exponential(0.02, 0.05, max_attempts=5),
        retry_budget={"rate": 0.001, "burst": 1},
    )
    def once(self: Any, n: int) -> int:
        calls.append(n)
        if len(calls) == 1:
            raise ConnectionError("partner reset the connection")
        return n * 2

    celery_worker.reload()
    runtime = runtime_for(celery_app)
    budget_key = runtime.keys.retry_budget("r.dead_is_done")
    assert once._take_retry_budget(once._policy())  # spend the only token

    def refill(name: str, amount: float, labels: Any) -> None:
        if name == "reliable_dead_letters_total" and labels.get("task") == "r.dead_is_done":
            runtime.redis.delete(budget_key)  # a fresh, full bucket
        if previous is not None:
            previous(name, amount, labels)

    previous = metrics.set_sink(refill)
    try:
        with pytest.raises(ConnectionError):
            once.delay(21).get(timeout=10)
    finally:
        metrics.set_sink(previous)
    assert calls == [21], "the dead-lettered delivery ran again"
    [letter] = letters(celery_app, "r.dead_is_done")
    assert letter.reason == "retry budget exhausted"
    new_id = DeadLetters(celery_app).replay(letter.id)
    assert celery_app.AsyncResult(new_id).get(timeout=10) == 42
    assert calls == [21, 21]
