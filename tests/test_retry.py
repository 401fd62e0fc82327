"""Retries with backoff, budgets, dead letters and replay (embedded worker, real servers)."""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from celery import Celery
from celery.contrib.testing.worker import TestWorkController

from celery_reliable import Backoff, DeadLetters, ReliableTask, metrics
from celery_reliable.pipeline.call import Call
from celery_reliable.pipeline.retrying import take_retry_budget

from .conftest import create_tables_at_once, reliable_task, wait_for


def letters(app: Celery, name: str) -> list[Any]:
    return DeadLetters(app).list(task_name=name)


def test_flaky_task_succeeds_after_k_failures(
    celery_app: Celery, celery_worker: TestWorkController
) -> None:
    """Retryable errors are retried automatically with backoff delays (no countdown given)."""
    seen: list[float] = []

    @reliable_task(celery_app, name="r.flaky",
                   backoff=Backoff.exponential(0.05, 0.2, max_attempts=5))
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

    @reliable_task(celery_app, name="r.bad", backoff=Backoff.exponential(0.05, 0.2, max_attempts=5))
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
    @reliable_task(celery_app, name="r.down",
                   backoff=Backoff.exponential(0.02, 0.05, max_attempts=3))
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

    @reliable_task(celery_app, name="r.storm",
                   backoff=Backoff.exponential(0.02, 0.05, max_attempts=3),
                   retry_budget={"rate": 0.001, "burst": 1})
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

    @reliable_task(celery_app, name="r.429",
                   backoff=Backoff.exponential(0.01, 0.02, max_attempts=3))
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

    @reliable_task(celery_app, name="r.explicit",
                   backoff=Backoff.exponential(0.3, 0.3, jitter="none", max_attempts=3))
    def explicit(self: Any) -> int:
        seen.append(time.monotonic())
        if len(seen) < 2:
            raise self.retry()
        return len(seen)

    auto_calls: list[int] = []

    @reliable_task(celery_app, name="r.auto", autoretry_for=(KeyError,),
                   backoff=Backoff.exponential(0.05, 0.05, jitter="none", max_attempts=3))
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
    @reliable_task(celery_app, name="r.deadline",
                   backoff=Backoff.exponential(0.2, 0.2, jitter="none", deadline=0.3),
                   max_retries=50)
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
    """With reliable_dead_letter_queue, the dead-lettered task is also published there, with
    the call's own headers (its idempotency key)."""
    import redis as redis_lib

    celery_app.conf.reliable_dead_letter_queue = "dead-letters-test"

    @reliable_task(celery_app, name="r.dlq")
    def broken(self: Any, n: int) -> None:
        raise ValueError("bad")

    celery_worker.reload()
    with pytest.raises(ValueError):
        broken.apply_async(args=(5,), headers={"idempotency_key": "dlq-5"}).get(timeout=10)
    broker = redis_lib.Redis.from_url(celery_app.conf.broker_url)
    raw = broker.lpop("dead-letters-test")
    assert raw is not None
    import json

    message = json.loads(raw)
    assert message["headers"]["task"] == "r.dlq"
    assert message["headers"]["reliable_dead_letter"] == "failed"
    assert message["headers"]["idempotency_key"] == "dlq-5"


def test_fence_and_lock_metrics(celery_app: Celery, celery_worker: TestWorkController,
                                redis_client: Any) -> None:
    from celery_reliable import FencedLock, RedisFence, StaleFenceToken

    before = metrics.value("reliable_fence_rejections_total", store="redis")
    RedisFence(redis_client).set("metric-fence", "a", 10)
    with pytest.raises(StaleFenceToken):
        RedisFence(redis_client).set("metric-fence", "b", 9)
    assert metrics.value("reliable_fence_rejections_total", store="redis") == before + 1

    @reliable_task(celery_app, name="r.skip", lock="m", lock_contention="skip")
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

    @reliable_task(celery_app, name="r.never",
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

    @reliable_task(celery_app, name="r.dead_is_done", autoretry_for=(ConnectionError,),
                   backoff=Backoff.exponential(0.02, 0.05, max_attempts=5),
                   retry_budget={"rate": 0.001, "burst": 1})
    def once(self: Any, n: int) -> int:
        calls.append(n)
        if len(calls) == 1:
            raise ConnectionError("partner reset the connection")
        return n * 2

    celery_worker.reload()
    runtime = runtime_for(celery_app)
    budget_key = runtime.keys.retry_budget("r.dead_is_done")
    assert take_retry_budget(Call(once, once._policy()))  # spend the only token

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


# ------------------------------------------------------------ replay: the same call again


def test_replay_of_a_dead_letter_runs_the_task_even_with_kept_failures(
    celery_app: Celery, celery_worker: TestWorkController
) -> None:
    """``DeadLetters.replay(id)`` runs a task whose failure was kept (keep_failures).

    Replay re-publishes the same arguments, so the same idempotency key: it
    takes the kept failure out (PostgreSQL and Redis) first, so the replay
    runs instead of raising ``ReplayedFailure``; the letter is marked
    ``replayed_as`` the new id. Before the replay a duplicate of the original
    replays the failure; after it, one replays the replay's result.
    """
    from celery_reliable import ReplayedFailure
    from celery_reliable.schema import idempotency

    calls: list[int] = []
    name = f"r.kept.{secrets.token_hex(3)}"

    @reliable_task(celery_app, name=name, idempotency_key=True, idempotency_keep_failures=True)
    def charge(self: Any, n: int) -> int:
        calls.append(n)
        if len(calls) == 1:
            raise ValueError("card declined")  # not retryable: dead-lettered
        return n * 2

    celery_worker.reload()
    with pytest.raises(ValueError):
        charge.delay(21).get(timeout=10)
    with pytest.raises(ReplayedFailure):  # a duplicate of the original: the kept failure
        charge.delay(21).get(timeout=10)
    dead = DeadLetters(celery_app)
    [letter] = dead.list(task_name=name)
    assert letter.idempotency_digest is not None
    new_id = dead.replay(letter.id)
    assert dead.get(letter.id).replayed_as == new_id
    assert celery_app.AsyncResult(new_id).get(timeout=10, propagate=False) == 42, (
        "the replay raised the kept failure instead of running")
    assert calls == [21, 21]
    assert charge.delay(21).get(timeout=10) == 42  # a later duplicate replays the replay
    assert calls == [21, 21]
    with dead.engine.connect() as conn:
        state = conn.execute(sa.select(idempotency.c.state).where(
            idempotency.c.task == name)).scalar_one()
    assert state == "S"


def test_replay_the_broker_refuses_keeps_the_failure(
    celery_app: Celery, celery_worker: TestWorkController
) -> None:
    """A replay the broker refuses raises, leaves the letter unreplayed and the kept failure in
    place (PostgreSQL and Redis): duplicates of the original still replay it, and a later
    replay runs the task."""
    from kombu.exceptions import OperationalError

    from celery_reliable import ReplayedFailure
    from celery_reliable.keys import idempotency_digest
    from celery_reliable.runtime import runtime_for
    from celery_reliable.schema import idempotency

    from .conftest import free_port

    calls: list[int] = []
    name = f"r.refused.{secrets.token_hex(3)}"

    @reliable_task(celery_app, name=name,
                   idempotency_key="order:{n}", idempotency_keep_failures=True)
    def charge(self: Any, n: int) -> int:
        calls.append(n)
        if len(calls) == 1:
            raise ValueError("card declined")
        return n * 2

    celery_worker.reload()
    with pytest.raises(ValueError):
        charge.delay(4).get(timeout=10)
    [letter] = letters(celery_app, name)
    # The same guards' stores, and a broker nobody listens on.
    refusing = Celery("refusing", broker=f"redis://127.0.0.1:{free_port()}/0")
    refusing.conf.update({k: v for k, v in celery_app.conf.items() if k.startswith("reliable_")})
    refusing.conf.update(task_publish_retry=False, broker_connection_timeout=1,
                         broker_connection_retry=False, broker_connection_max_retries=0)
    with pytest.raises(OperationalError, match="Connection refused"):
        DeadLetters(refusing).replay(letter.id)  # took the failure out, then the publish failed
    refusing.close()
    assert letters(celery_app, name)[0].replayed_as is None
    runtime = runtime_for(celery_app)
    digest = idempotency_digest(name, "order:4")
    assert runtime.redis.hget(runtime.keys.idempotency_record(digest), "s") == b"F"
    with runtime.engine.connect() as conn:
        state = conn.execute(sa.select(idempotency.c.state).where(
            idempotency.c.key_digest == digest)).scalar_one()
    assert state == "F"
    with pytest.raises(ReplayedFailure):
        charge.delay(4).get(timeout=10)
    assert calls == [4]
    new_id = DeadLetters(celery_app).replay(letter.id)
    assert celery_app.AsyncResult(new_id).get(timeout=10) == 8
    assert calls == [4, 4]


def test_replay_keeps_the_producer_idempotency_key(
    celery_app: Celery, celery_worker: TestWorkController
) -> None:
    """A replay carries the producer's ``idempotency_key`` header (and its other headers): the
    producer's own resend of that key replays the replay's result instead of running again.

    The letter keeps the call's headers, without celery-reliable's bookkeeping
    of the failed delivery (retry count, first failure, previous delay).
    """
    calls: list[int] = []
    seen: list[dict[str, Any]] = []
    name = f"r.header.{secrets.token_hex(3)}"
    key = f"payment-{secrets.token_hex(4)}"

    @reliable_task(celery_app, name=name, backoff=Backoff.exponential(0.02, 0.05, max_attempts=2))
    def pay(self: Any, n: int) -> int:
        calls.append(n)
        seen.append(dict(self.request.headers or {}))
        if len(calls) <= 2:
            raise ConnectionError("issuer unavailable")  # retried once, then dead-lettered
        return n

    celery_worker.reload()
    headers = {"idempotency_key": key, "trace_id": "t-1"}
    with pytest.raises(ConnectionError):
        pay.apply_async(args=(5,), headers=headers).get(timeout=10)
    assert "reliable_first_failure" in seen[1]  # the retried delivery had bookkeeping
    dead = DeadLetters(celery_app)
    [letter] = dead.list(task_name=name)
    assert (letter.reason, letter.headers) == ("retries exhausted", headers)
    assert celery_app.AsyncResult(dead.replay(letter.id)).get(timeout=10) == 5
    assert seen[2] == headers
    # The producer, unsure its first publish went through, sends key K again.
    assert pay.apply_async(args=(5,), headers=headers).get(timeout=10) == 5
    assert calls == [5, 5, 5], f"the effect ran {len(calls) - 2} times after the failure"


def test_call_headers_leave_out_the_bookkeeping() -> None:
    """Only the producer's headers with a JSON form go with a letter; ``reliable_*`` never."""
    from celery_reliable.deadletter import call_headers

    assert call_headers({"idempotency_key": "k", "trace_id": "t", "reliable_deferrals": 3,
                         "reliable_first_failure": 1.5, "reliable_dead_letter": "failed",
                         "blob": object()}) == {"idempotency_key": "k", "trace_id": "t"}
    assert call_headers(None) == {}


OLD_DEAD_LETTERS = """
CREATE TABLE reliable_dead_letters (
    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    task_name text NOT NULL, task_id text NOT NULL, args_json text NOT NULL,
    kwargs_json text NOT NULL, replayable boolean NOT NULL, exc_type text NOT NULL,
    exc_message text NOT NULL, traceback text NOT NULL, attempts integer NOT NULL,
    reason text NOT NULL, queue text, first_failure_at timestamptz NOT NULL,
    last_failure_at timestamptz NOT NULL DEFAULT now(), replayed_as text,
    replayed_at timestamptz
)
"""


def test_create_tables_upgrades_an_old_dead_letters_table(
    celery_app: Celery, schema_engine: sa.Engine
) -> None:
    """create_tables adds the headers and key columns to an existing dead-letter table (4
    threads at once); before that a letter is still recorded, without them; old letters
    read back without them, new ones keep them."""
    from celery_reliable import deadletter

    old = schema_engine
    with old.begin() as conn:
        conn.execute(sa.text(OLD_DEAD_LETTERS))
        conn.execute(sa.text(
            "INSERT INTO reliable_dead_letters (task_name, task_id, args_json, kwargs_json,"
            " replayable, exc_type, exc_message, traceback, attempts, reason,"
            " first_failure_at) VALUES ('r.old', 'id-1', '[1]', '{}', true, 'ValueError',"
            " 'bad', '', 1, 'failed', now())"))
    # Not migrated yet (reliable_create_tables off): the letter is kept, without them.
    deadletter.record(old, task_name="r.early", task_id="id-0", args=[0], kwargs={},
                      exc=ValueError("bad"), attempts=1, reason="failed", queue=None,
                      first_failure_at=None, headers={"idempotency_key": "k0"},
                      idempotency_digest="e" * 32)
    assert create_tables_at_once(old) == []
    with old.connect() as conn:
        columns = [c["name"] for c in sa.inspect(conn).get_columns("reliable_dead_letters")]
    assert columns.count("headers_json") == 1 and columns.count("idempotency_digest") == 1
    deadletter.record(old, task_name="r.new", task_id="id-2", args=[2], kwargs={},
                      exc=ValueError("bad"), attempts=1, reason="failed", queue=None,
                      first_failure_at=None, headers={"idempotency_key": "k"},
                      idempotency_digest="d" * 32)
    found = {letter.task_name: letter for letter in DeadLetters(celery_app, old).list()}
    assert (found["r.old"].headers, found["r.old"].idempotency_digest) == ({}, None)
    assert (found["r.early"].headers, found["r.early"].idempotency_digest) == ({}, None)
    assert found["r.new"].headers == {"idempotency_key": "k"}
    assert found["r.new"].idempotency_digest == "d" * 32


# ------------------------------------------- a redelivery of a dead-lettered task id


def _redelivered(app: Celery, task: Any, task_id: str, *args: Any, retries: int = 0) -> None:
    """The broker delivers ``task_id`` again: the same id, arguments and retry count.

    What a broker does when the last delivery's ack never reached it (it was
    killed right after the task finished, or the connection broke): the
    message comes back, byte for byte (Redis after its visibility timeout,
    RabbitMQ when the connection closes). Waits until the worker took it.
    """
    before = metrics.value("reliable_dead_redeliveries_total", task=task.name)
    task.apply_async(args, task_id=task_id, retries=retries)
    deadline = time.monotonic() + 15
    while metrics.value("reliable_dead_redeliveries_total", task=task.name) == before:
        assert time.monotonic() < deadline, "the redelivery was not taken in 15 s"
        time.sleep(0.05)


def test_a_redelivery_of_a_dead_lettered_task_does_not_run(
    celery_app: Celery, celery_worker: TestWorkController
) -> None:
    """Dead-lettered is done, also when the broker delivers the message again.

    Found by the fault campaign (24-minute soak, seed 7): a task dead-lettered
    ("retries exhausted") 30 ms after the broker was killed; its ack was lost,
    the broker put the message back, and the same delivery ran again and
    succeeded. The dead letter now marks the task id in Redis (admit.lua, the
    deliveries guard); admission ignores a redelivery of it. Only
    ``DeadLetters.replay`` (a new task id) runs it again.
    """
    from celery_reliable.runtime import runtime_for

    calls: list[str] = []

    @reliable_task(celery_app, name="r.dead_redelivered",
                   acks_late=True, backoff=Backoff.exponential(0.02, 0.05, max_attempts=2))
    def down(self: Any, n: int) -> int:
        calls.append(self.request.id)
        if n < 0:
            raise TimeoutError("partner timed out")
        return n

    celery_worker.reload()
    first = down.delay(-7)
    with pytest.raises(TimeoutError):
        first.get(timeout=10)
    assert calls == [first.id, first.id]  # the first delivery and its retry
    [letter] = letters(celery_app, "r.dead_redelivered")
    runtime = runtime_for(celery_app)
    mark = runtime.keys.deliveries(first.id)
    assert runtime.redis.smembers(mark) == {b"!dead"}
    assert 0 < runtime.redis.ttl(mark) <= 24 * 3600

    _redelivered(celery_app, down, first.id, -7, retries=1)
    assert calls == [first.id, first.id], "a dead-lettered delivery ran again"
    assert celery_app.AsyncResult(first.id).state == "FAILURE"
    assert [d.id for d in letters(celery_app, "r.dead_redelivered")] == [letter.id]
    # Only that task id: the same call under another id runs (a replay is one).
    new_id = DeadLetters(celery_app).replay(letter.id)
    with pytest.raises(TimeoutError):
        celery_app.AsyncResult(new_id).get(timeout=10)
    assert calls.count(new_id) == 2
    assert down.delay(5).get(timeout=10) == 5


def test_a_redelivery_after_a_poison_dead_letter_does_not_run_or_letter_again(
    celery_app: Celery, celery_worker: TestWorkController
) -> None:
    """A task id dead-lettered as poison ("worker lost") comes back: no run, no second letter."""
    from celery_reliable.runtime import runtime_for

    calls: list[str] = []

    @reliable_task(celery_app, name="r.poison_redelivered", acks_late=True, max_redeliveries=1)
    def crashy(self: Any) -> None:
        calls.append(self.request.id)

    celery_worker.reload()
    runtime = runtime_for(celery_app)
    task_id = secrets.token_hex(8)
    # two earlier deliveries whose workers died mid-task (never finished)
    runtime.redis.sadd(runtime.keys.deliveries(task_id), "dead-worker-1", "dead-worker-2")
    with pytest.raises(Exception, match="worker lost"):
        crashy.apply_async(task_id=task_id).get(timeout=10)
    assert calls == []
    [letter] = letters(celery_app, "r.poison_redelivered")
    assert letter.reason == "worker lost"
    _redelivered(celery_app, crashy, task_id)
    assert calls == []
    assert len(letters(celery_app, "r.poison_redelivered")) == 1


@pytest.mark.parametrize("how", ["track_started", "result_lost"])
def test_an_ignored_redelivery_leaves_a_final_failure(
    celery_app: Celery, celery_worker: TestWorkController, how: str
) -> None:
    """The result of a dead-lettered task id ends FAILURE, also when its failure was not there.

    ``track_started``: Celery stores STARTED as the redelivery begins, over the
    stored FAILURE, before admission ignores it; it stayed STARTED for good.
    ``result_lost``: the final delivery's FAILURE never reached the backend (its
    worker was killed after the letter was recorded, or the backend, which the
    fault campaign keeps on the broker's server, was down); it stayed PENDING.
    Either way the caller's ``.get()`` waited forever. The redelivery now stores
    FAILURE (``ReplayedFailure``) when the backend holds no final state.
    """
    from celery_reliable import ReplayedFailure

    calls: list[str] = []

    @reliable_task(celery_app, name=f"r.dead_final.{how}",
                   acks_late=True, track_started=how == "track_started")
    def bad(self: Any) -> None:
        calls.append(self.request.id)
        raise ValueError("invalid card number")

    celery_worker.reload()
    first = bad.delay()
    with pytest.raises(ValueError):
        first.get(timeout=10)
    if how == "result_lost":
        celery_app.backend.forget(first.id)
    _redelivered(celery_app, bad, first.id)
    with pytest.raises(ReplayedFailure, match="dead-lettered"):
        celery_app.AsyncResult(first.id).get(timeout=10)
    assert calls == [first.id]
    assert len(letters(celery_app, f"r.dead_final.{how}")) == 1


def test_a_delivery_running_alongside_does_not_wipe_the_mark(
    celery_app: Celery, celery_worker: TestWorkController
) -> None:
    """Two deliveries of one task id run at once (the broker gave the message out again,
    e.g. RabbitMQ requeues it when the connection closes while the first still runs).

    The first fails for good and marks the task id dead; the second then finished
    and its completion deleted the deliveries set, mark and all: the next
    redelivery ran, after the dead letter. Completion now keeps a mark it finds.
    """
    from celery_reliable.runtime import runtime_for

    calls: list[int] = []
    release = [threading.Event(), threading.Event()]

    @reliable_task(celery_app, name="r.dead_alongside", acks_late=True)
    def both(self: Any) -> str:
        calls.append(len(calls))
        me = calls[-1]
        if me < 2:
            assert release[me].wait(10)
        if me == 0:
            raise ValueError("the first delivery fails for good")
        return f"delivery {me}"

    celery_worker.reload()
    runtime = runtime_for(celery_app)
    task_id = secrets.token_hex(8)
    key = runtime.keys.deliveries(task_id)
    both.apply_async(task_id=task_id)
    wait_for(lambda: calls == [0], 10, "the first delivery to start")
    both.apply_async(task_id=task_id)  # the broker delivers it again meanwhile
    wait_for(lambda: calls == [0, 1], 10, "the second delivery to start")
    release[0].set()
    wait_for(lambda: letters(celery_app, "r.dead_alongside"), 10, "the dead letter")
    wait_for(lambda: runtime.redis.smembers(key) == {b"!dead"}, 10, "the mark")
    release[1].set()
    wait_for(lambda: celery_app.AsyncResult(task_id).state == "SUCCESS", 10, "the second")
    assert runtime.redis.smembers(key) == {b"!dead"}
    _redelivered(celery_app, both, task_id)
    assert calls == [0, 1], "a delivery started after the dead letter"


@pytest.mark.parametrize("error", [ValueError, ConnectionError])
def test_a_failure_after_retry_throw_false_lets_that_retry_run(
    celery_app: Celery, celery_worker: TestWorkController, error: type[Exception]
) -> None:
    """``self.retry(throw=False)`` published the retry; the body then raised.

    Celery's contract: the task is marked failed now and the retry runs later.
    The failure was dead-lettered regardless (a letter for a task with a retry
    in flight: a replay would run it twice), and the dead-letter mark of the
    task id then made admission ignore the retry the body had asked for. A
    failure after a published retry is now neither dead-lettered nor retried
    again (a retryable error, ConnectionError, published a second retry of it).
    """
    calls: list[int] = []
    name = f"r.throw_false.{error.__name__}"

    @reliable_task(celery_app, name=name,
                   acks_late=True, backoff=Backoff.exponential(0.02, 0.05, max_attempts=3))
    def later(self: Any) -> str:
        calls.append(self.request.retries)
        if self.request.retries == 0:
            self.retry(countdown=0.2, throw=False)
            raise error("reported after scheduling the retry")
        return "ran on retry"

    celery_worker.reload()
    result = later.delay()
    # a fresh AsyncResult each time: one caches the FAILURE it saw first
    wait_for(lambda: celery_app.AsyncResult(result.id).state == "SUCCESS", 10,
             "the retry to run")
    assert celery_app.AsyncResult(result.id).get(timeout=1) == "ran on retry"
    time.sleep(0.3)  # a second retry (from the backoff) would have come by now
    assert calls == [0, 1]
    assert letters(celery_app, name) == []
