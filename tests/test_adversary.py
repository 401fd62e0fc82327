"""Adversarial review of the issue-11 fixes: each test shows a defect that still breaks a guarantee.

Every test here is ``xfail(strict=True)``: it fails on today's code, and turns
the suite red (XPASS) once the defect is fixed, so whoever fixes it removes
the mark.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.exceptions import Retry

from celery_reliable import FencedLock, RedisFence, ReliableTask
from celery_reliable.admission import Admitted, Plan, Refused
from celery_reliable.keys import KeySpace
from celery_reliable.ratelimit import BucketSpec
from celery_reliable.scripts import script

from .conftest import RedisServer, TcpProxy


def defect(reason: str) -> pytest.MarkDecorator:
    """A reproduced defect: the test must fail on an assertion (any other error is not it)."""
    return pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)


# ------------------------------------------------------------ a late request


class LateProxy(TcpProxy):
    """A TcpProxy that delivers one request late, on its own connection only.

    ``hold(marker)``: the next request containing ``marker`` is kept until
    ``release()``, then reaches the server even if its client has given up and
    closed the connection meanwhile; every other connection flows. This is a
    lost TCP segment in retransmission backoff (RTO doubles: 0.2, 0.4, ...,
    3.2 s): data already written to the socket is still delivered after the
    client's ``close()``, followed by the FIN, while a new connection made after
    the network healed gets through at once.
    """

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self._late: bytes | None = None
        self._release = threading.Event()
        self.delivered = threading.Event()

    def hold(self, marker: bytes) -> None:
        self._release.clear()
        self.delivered.clear()
        self._late = marker

    def release(self) -> None:
        self._release.set()

    def stop(self) -> None:
        self._release.set()
        super().stop()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        if src.getsockname()[1] != self.port:  # the server's replies: as usual
            super()._pipe(src, dst)
            return
        try:
            while data := src.recv(65536):
                late = self._late
                if late is not None and late in data:
                    self._late = None
                    self._release.wait(30)
                    dst.sendall(data)
                    time.sleep(0.2)  # let the server read it before the FIN follows
                    self.delivered.set()
                    continue
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def late_proxy(private_redis: RedisServer) -> Iterator[LateProxy]:
    tcp = LateProxy(private_redis.port)
    tcp.start()
    yield tcp
    tcp.stop()


# ------------------------------------------------------------ @shared_task

_ROOT = Path(__file__).resolve().parent.parent


def run_clean(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (no app of the test session is finalized there)."""
    env = {**os.environ, "PYTHONPATH": str(_ROOT)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


_PROJ = """
    from celery import Celery, shared_task
    from celery_reliable import ConfigurationError, ReliableTask
    def make(main, **conf):
        app = Celery(main, broker="memory://", backend="cache+memory://")
        app.conf.update(reliable_redis_url="redis://127.0.0.1:1/0",
                        reliable_idempotency_store="redis", **conf)
        return app
"""


@defect("@shared_task: a bad option no longer fails at bind in the "
        "app that runs it, only when the task is sent or run")
def test_shared_task_with_a_bad_option_fails_when_its_app_finalizes() -> None:
    """``@shared_task(base=ReliableTask, bulkhead="nope")``: its app finalizes without an error.

    ``celery.shared_task`` (the usual way in Django projects) has no declaring
    app, so ``_shared_into`` calls every app that receives it a foreign copy,
    and the ConfigurationError becomes a WARNING at bind; it is raised at the
    first ``apply_async`` or, in the worker, at every run of the task. Before
    the shared-app change it failed at bind (bad configuration fails at import,
    not at 3 a.m.).
    """
    done = run_clean(_PROJ + """
    proj = make("proj")
    @shared_task(base=ReliableTask, bind=True, bulkhead="no-such-tier")
    def job(self, n):
        return n
    try:
        proj.finalize()
    except ConfigurationError as exc:
        print("raised at bind:", exc)
    else:
        print("finalized without error")
    """)
    assert done.returncode == 0, done.stderr
    assert "raised at bind" in done.stdout, done.stdout + done.stderr


@defect("@shared_task declared while another app is finalized "
        "raises ConfigurationError about that other app's settings")
def test_shared_task_declaration_is_not_broken_by_another_finalized_app() -> None:
    """A finalized app without tier "gold" makes ``@shared_task(bulkhead="gold")`` raise at import.

    ``shared_task`` binds the new task into every app already finalized, from
    its decorator (outside ``_announce_app_finalized``), and ``_shared_into``
    takes that for the declaring app: the declaration fails with a
    ConfigurationError about an app that never declared the task (a test app,
    a second broker's app), the very case issue 11 item 6 was about.
    """
    done = run_clean(_PROJ + """
    other = make("other")
    other.finalize()  # e.g. a test app, or a second broker's app, already in use
    proj = make("proj", reliable_bulkheads={"gold": {"concurrent": 2, "queue": 4, "timeout": 30}})
    try:
        @shared_task(base=ReliableTask, bind=True, bulkhead="gold")
        def job(self, n):
            return n
    except ConfigurationError as exc:
        print("declaration raised:", exc)
    else:
        proj.finalize()
        print("declared and finalized")
    """)
    assert done.returncode == 0, done.stderr
    assert "declared and finalized" in done.stdout, done.stdout + done.stderr


# ------------------------------------------------------------ a belief after release


@pytest.fixture
def broker_app(private_redis: RedisServer) -> Iterator[Celery]:
    """An app whose broker and guards both live on this test's private Redis."""
    prefix = f"adv{secrets.token_hex(3)}"
    app = Celery("adv", broker=f"{private_redis.url}/3", set_as_current=False)
    app.conf.update(reliable_redis_url=f"{private_redis.url}/0", reliable_key_prefix=prefix,
                    reliable_idempotency_store="redis", task_default_queue=f"q{prefix}")
    yield app


def deliver(task: Any, task_id: str | None = None) -> Any:
    """Run ``task`` as a worker would for one delivery; returns the outcome (or the Retry)."""
    task.push_request(id=task_id or secrets.token_hex(8), args=[], kwargs={},
                      called_directly=False, is_eager=False, retries=0,
                      delivery_info={"exchange": "",
                                     "routing_key": task.app.conf.task_default_queue},
                      headers={})
    try:
        return task()
    except Retry as retry:
        return retry
    finally:
        task.pop_request()


@defect("after retry(throw=False) released the lock, lock_lost is "
        "False and self.fence still writes")
def test_released_lock_ends_the_belief(broker_app: Celery) -> None:
    """``self.retry(throw=False)`` releases the lock, yet the body still believes it holds it.

    Celery documents ``throw=False`` (the body goes on after scheduling its
    retry). ``retry()`` releases every guard first, so the retried message (or
    any other worker) takes the lock at once, with a higher token; but the
    release does not end the holder's Lease, so ``self.lock_lost`` stays False
    and ``self.fence`` keeps writing until the clock-based belief would have
    ended (``lock_ttl`` later). A holder that let go of a lock must not believe
    it holds it.
    """
    seen: dict[str, Any] = {}
    store = redis.Redis.from_url(broker_app.conf.reliable_redis_url)

    @broker_app.task(base=ReliableTask, bind=True, shared=False, name="adv.release",
                     lock="account:1", lock_ttl=60)
    def job(self: Any) -> str:
        self.retry(countdown=30, throw=False)  # guards released, retry published
        other = FencedLock(store, "account:1", ttl=60,
                           prefix=broker_app.conf.reliable_key_prefix)
        seen["other_token"] = other.acquire()  # the lock is free: someone else takes it
        seen["lost"] = self.lock_lost
        try:
            self.fence.redis_set(store, "balance", "written after letting go")
            seen["written"] = True
        except Exception as exc:  # StaleFenceToken expected
            seen["written"] = exc
        return "done"

    deliver(job)
    assert seen["other_token"] is not None  # another holder has the lock now
    assert seen["lost"] is True, "lock_lost is False after this execution released the lock"
    assert seen["written"] is not True, "self.fence wrote after the lock was released"
    store.close()


# ------------------------------------------------------------ a bucket's virtual queue


def bucket_take(client: redis.Redis, key: str, spec: BucketSpec,
                slot: int | None = None) -> Admitted | Refused:
    """One arrival at a queue bucket (cost 1), as ReliableTask._plan adds it."""
    plan = Plan()
    plan.add_bucket(key, spec, 1, slot=slot)
    outcome = plan.admit(client)
    assert isinstance(outcome, (Admitted, Refused))
    return outcome


@defect("slots lost with their tasks (purge, revoke, expires) stall "
        "the bucket: an idle full bucket admits nobody until the ghost tail passes")
def test_idle_bucket_with_tokens_admits_after_its_queue_was_purged(
    private_redis: RedisServer,
) -> None:
    """A purged backlog of 50 at 10/s leaves a ghost queue: a full, idle bucket refuses for 5 s.

    Every refused arrival was given a slot and the tail ``q`` moved on; none of
    them comes back (queue purged, tasks revoked or expired, messages lost). The
    README says such a slot costs "that token's time" and later tasks "wait one
    token's time longer each"; in fact a fresh arrival waits for the whole ghost
    queue: nothing runs until ``q``, while the bucket sits full. A 1000/h bucket
    with the 1,200-task backlog of issue 11 would admit nothing for 72 minutes
    after a purge.
    """
    client = redis.Redis(port=private_redis.port)
    key = KeySpace(f"ghost{secrets.token_hex(3)}").queue_bucket("emails")
    spec = BucketSpec(rate=10, burst=10)
    for _ in range(10):
        assert isinstance(bucket_take(client, key, spec), Admitted)
    backlog = [bucket_take(client, key, spec) for _ in range(50)]
    assert all(isinstance(r, Refused) for r in backlog)
    # The backlog is purged: none of the 50 ever comes back. One second later
    # the bucket is full again (10 tokens) and nobody is queued for them.
    time.sleep(1.2)
    fresh = bucket_take(client, key, spec)
    assert isinstance(fresh, Admitted), (
        f"an idle bucket with {spec.burst:g} tokens deferred a fresh arrival by "
        f"{fresh.retry_after:.1f}s behind a queue of ghosts")
    client.close()


@defect("a raised rate does not reach a queued backlog: slots keep "
        "the old rate's schedule, fresh arrivals queue behind it")
def test_raising_the_rate_speeds_up_the_queued_backlog(private_redis: RedisServer) -> None:
    """1/s with 20 queued, then the rate is raised to 100/s: the backlog still waits up to 20 s.

    Slots are absolute times computed at the rate in force when each task was
    refused, and fresh arrivals queue behind the old tail, so raising a rate to
    drain a backlog (the usual operator response) has no effect until the old
    schedule has run out: the bucket refuses at 1/s while it holds 100 tokens.
    """
    client = redis.Redis(port=private_redis.port)
    key = KeySpace(f"rate{secrets.token_hex(3)}").queue_bucket("sync")
    slow, fast = BucketSpec(rate=1, burst=1), BucketSpec(rate=100, burst=100)
    assert isinstance(bucket_take(client, key, slow), Admitted)
    queued = [bucket_take(client, key, slow) for _ in range(20)]
    assert all(isinstance(r, Refused) and r.slot is not None for r in queued)
    last = queued[-1]
    assert isinstance(last, Refused) and last.slot is not None
    # Workers redeployed with 100/s; the last queued task comes back (at the cap).
    time.sleep(1.0)  # a whole 100 tokens' time at the new rate
    again = bucket_take(client, key, fast, slot=last.slot)
    waits = 0.0 if isinstance(again, Admitted) else (again.retry_after or 0.0)
    assert waits <= 1.0, f"at 100/s the 20th queued task still waits {waits:.1f}s (1/s schedule)"
    client.close()


# ------------------------------------------------------------ countdowns and the window


@defect("retry() with no countdown and no backoff uses Celery's "
        "default_retry_delay (180 s) past the redelivery window, uncapped")
def test_plain_retry_without_countdown_stays_inside_the_window(broker_app: Celery) -> None:
    """``self.retry(exc=...)`` on a Redis broker with visibility_timeout=60: it retries in 180 s.

    The caller chose no delay: the 180 s is Celery's ``default_retry_delay``,
    applied by ``Task.retry`` under ReliableTask's own ``retry()``, which only
    logs a warning (as for an explicit countdown). The broker redelivers the
    held ETA message after 60 s while the first worker still holds it: the task
    runs twice. Issue 11 item 4: no countdown this library sets exceeds the
    window; here the library set it (nobody else did).
    """
    broker_app.conf.broker_transport_options = {"visibility_timeout": 60}  # cap 54 s

    @broker_app.task(base=ReliableTask, bind=True, shared=False, name="adv.plain_retry")
    def job(self: Any) -> str:
        raise self.retry(exc=ValueError("the partner said no"))

    retry = deliver(job)
    assert isinstance(retry, Retry)
    assert float(retry.when) <= 54, f"retry countdown {retry.when}s > the 54 s cap (window 60 s)"


# ------------------------------------------------------------ dead letters


@defect("DeadLetters.replay() of a task with "
        "idempotency_keep_failures replays the kept failure, never runs the task")
def test_replay_of_a_dead_letter_runs_the_task_even_with_kept_failures(
    celery_app: Celery, celery_worker: Any
) -> None:
    """``DeadLetters.replay(id)`` with ``idempotency_keep_failures=True``: ReplayedFailure, no run.

    The README: "only ``.replay(id)`` runs the task again". Replay re-publishes
    the same arguments, so the same idempotency key finds the kept failure and
    raises ``ReplayedFailure`` without running; the letter is still marked
    ``replayed_as`` the new id, so the operator believes it ran.
    """
    from celery_reliable import DeadLetters

    calls: list[int] = []
    name = f"adv.kept.{secrets.token_hex(3)}"

    @celery_app.task(base=ReliableTask, bind=True, shared=False, name=name,
                     idempotency_key=True, idempotency_keep_failures=True)
    def charge(self: Any, n: int) -> int:
        calls.append(n)
        if len(calls) == 1:
            raise ValueError("card declined")  # not retryable: dead-lettered
        return n * 2

    celery_worker.reload()
    with pytest.raises(ValueError):
        charge.delay(21).get(timeout=10)
    dead = DeadLetters(celery_app)
    [letter] = dead.list(task_name=name)
    new_id = dead.replay(letter.id)
    assert dead.get(letter.id).replayed_as == new_id
    assert celery_app.AsyncResult(new_id).get(timeout=10, propagate=False) == 42, (
        "the replay raised the kept failure instead of running")
    assert calls == [21, 21]


@defect("DeadLetters.replay() drops the producer's idempotency_key "
        "header: the replayed run records nothing, the producer's resend runs again")
def test_replay_keeps_the_producer_idempotency_key(
    celery_app: Celery, celery_worker: Any
) -> None:
    """A task keyed by the producer's ``idempotency_key`` header, dead-lettered then replayed.

    The letter keeps the arguments but not the headers, so the replay runs
    without the key: its success is recorded under no key, and the producer's
    own resend of key K (at-least-once publishing) runs the effect a second time.
    """
    from celery_reliable import DeadLetters

    calls: list[int] = []
    name = f"adv.header.{secrets.token_hex(3)}"
    key = f"payment-{secrets.token_hex(4)}"

    @celery_app.task(base=ReliableTask, bind=True, shared=False, name=name)
    def pay(self: Any, n: int) -> int:
        calls.append(n)
        if len(calls) == 1:
            raise ValueError("issuer unavailable, not retryable")
        return n

    celery_worker.reload()
    with pytest.raises(ValueError):
        pay.apply_async(args=(5,), headers={"idempotency_key": key}).get(timeout=10)
    dead = DeadLetters(celery_app)
    [letter] = dead.list(task_name=name)
    assert celery_app.AsyncResult(dead.replay(letter.id)).get(timeout=10) == 5
    # The producer, unsure its first publish went through, sends key K again.
    assert pay.apply_async(args=(5,), headers={"idempotency_key": key}).get(timeout=10) == 5
    assert calls == [5, 5], f"the effect ran {len(calls) - 1} times after the failure"


# ------------------------------------------------------------ a late fenced write


@defect("a fenced write delivered late is accepted again (equal token, same holder) and "
        "overwrites the holder's later write")
def test_late_duplicate_of_a_fenced_write_does_not_undo_a_later_write(
    private_redis: RedisServer, late_proxy: LateProxy
) -> None:
    """One holder writes "v1" then "v2"; a late copy of the "v1" request lands last: value "v1".

    ``fenced_set`` is resent after a timeout (it is in ``_IDEMPOTENT``: "writes
    once and accepts twice"), and the first copy, delayed in the network, still
    arrives. The fence accepts an equal token from the same holder whatever its
    order, so the stale copy of the holder's first write overwrites its second:
    a lost update inside one acquisition, with no StaleFenceToken anywhere. The
    fence orders holders, not one holder's writes.
    """
    direct = redis.Redis(port=private_redis.port)
    direct.script_load(script("fenced_set").source)
    client = redis.Redis(port=late_proxy.port, socket_timeout=0.5)
    client.ping()
    key, token, holder = f"late:{secrets.token_hex(3)}", 1_000_000, "task-1/abcd"
    fence = RedisFence(client)
    late_proxy.hold(b"status-v1")
    fence.set(key, "status-v1", token, holder=holder)  # timed out, resent on a new connection
    fence.set(key, "status-v2", token, holder=holder)  # the holder moves on
    assert direct.hget(key, "v") == b"status-v2"
    late_proxy.release()  # the first copy of "v1" gets through at last
    assert late_proxy.delivered.wait(10)
    assert direct.hget(key, "v") == b"status-v2", "a stale copy of an earlier write won"
    client.close()
    direct.close()
