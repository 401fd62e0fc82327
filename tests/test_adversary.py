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
from celery_reliable.admission import Plan
from celery_reliable.keys import KeySpace
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


@defect("a late-delivered admission runs after its rollback: "
        "phantom lock and delivery count")
def test_admission_arriving_after_its_rollback_leaves_nothing_behind(
    private_redis: RedisServer, late_proxy: LateProxy
) -> None:
    """An admission delayed in the network past its timeout runs AFTER its rollback: phantom state.

    The client times out, the rollback (a new connection) finds nothing of the
    owner's and returns; then the delayed admission reaches Redis and takes the
    lock and a delivery-count entry for an owner nobody will ever renew or
    release. The deferred task comes back to find the resource locked by its own
    ghost for ``lock_ttl``, and the ghost entry counts as a lost delivery
    (``max_redeliveries``) for 24 h: the state issue 11 item 3 set out to
    remove. Only the order of arrival changed.
    """
    direct = redis.Redis(port=private_redis.port)
    for name in ("admit", "rollback"):
        direct.script_load(script(name).source)
    client = redis.Redis(port=late_proxy.port, socket_timeout=0.5)
    client.ping()
    keys = KeySpace(f"late{secrets.token_hex(3)}")
    task_id = secrets.token_hex(8)
    owner = f"{task_id}/{secrets.token_hex(4)}"  # as ReliableTask._admit builds it
    plan = Plan()
    plan.add_deliveries(keys.deliveries(task_id), 3, 24 * 3600.0, owner)
    plan.add_lock(keys, "order:1", owner, 30)

    late_proxy.hold(script("admit").sha.encode())
    with pytest.raises(redis.TimeoutError):
        plan.admit(client)
    # What ReliableTask._admit does next: undo by owner (nothing there yet), then defer.
    assert plan.rollback(client) == [0, 0]
    late_proxy.release()  # the network heals: the admission's segment gets through
    assert late_proxy.delivered.wait(10), "the delayed admission never reached the server"

    lock_key = keys.lock("order:1")
    assert direct.get(lock_key) is None, (
        f"phantom lock {direct.get(lock_key)!r} held for {direct.pttl(lock_key)} ms by a "
        "rolled-back owner")
    assert direct.scard(keys.deliveries(task_id)) == 0, "a rolled-back admission counted as a " \
        "lost delivery"
    client.close()
    direct.close()


@defect("FencedLock: a late-delivered acquire runs after its "
        "rollback and holds the lock for its whole ttl")
def test_fenced_lock_acquire_arriving_after_its_rollback_does_not_hold_the_lock(
    private_redis: RedisServer, late_proxy: LateProxy
) -> None:
    """FencedLock.acquire times out, rolls back and raises; its request lands later: a ghost lock.

    The caller was told the acquire failed (and it rolled back), yet the lock
    is taken afterwards and every other acquirer is refused until the ttl.
    """
    direct = redis.Redis(port=private_redis.port)
    for name in ("admit", "rollback"):
        direct.script_load(script(name).source)
    client = redis.Redis(port=late_proxy.port, socket_timeout=0.5)
    client.ping()
    prefix = f"late{secrets.token_hex(3)}"
    late_proxy.hold(script("admit").sha.encode())
    with pytest.raises(redis.TimeoutError):
        FencedLock(client, "invoice:7", ttl=60, prefix=prefix).acquire()  # rolls back, raises
    late_proxy.release()
    assert late_proxy.delivered.wait(10)
    other = FencedLock(direct, "invoice:7", ttl=60, prefix=prefix)
    assert other.acquire() is not None, "locked by an acquire that already failed and rolled back"
    client.close()
    direct.close()


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


# ------------------------------------------------------------ a soft time limit in admission


@pytest.fixture
def proxy(private_redis: RedisServer) -> Iterator[TcpProxy]:
    tcp = TcpProxy(private_redis.port)
    tcp.start()
    yield tcp
    tcp.stop()


@defect("a soft time limit (or SystemExit) raised while admission waits for its reply skips "
        "the rollback: the lock stays with a ghost owner until lock_ttl")
def test_soft_time_limit_during_admission_still_rolls_back(
    private_redis: RedisServer, proxy: TcpProxy
) -> None:
    """Admission ran, its reply is late, and Celery's soft time limit fires meanwhile: ghost lock.

    ``_admit`` undoes a failed admission only on ``redis.RedisError``. Billiard
    raises ``SoftTimeLimitExceeded`` from a signal handler (``SystemExit`` on
    revoke's SIGTERM) in the middle of the blocked read, so the admission, which
    did take the lock, is never rolled back: with ``soft_time_limit`` below
    ``reliable_redis_socket_timeout`` (10 s), a Redis stall leaves the lock, the
    idempotency lease and the delivery-count entry of a task that never ran.
    """
    import signal

    from celery.exceptions import SoftTimeLimitExceeded

    direct = redis.Redis(port=private_redis.port)
    direct.script_load(script("admit").source)
    prefix = f"soft{secrets.token_hex(3)}"
    app = Celery("soft", broker="memory://", set_as_current=False)
    app.conf.update(reliable_redis_url=f"redis://127.0.0.1:{proxy.port}/0",
                    reliable_key_prefix=prefix, reliable_idempotency_store="redis")

    @app.task(base=ReliableTask, bind=True, shared=False, name="adv.soft", lock="report:1",
              lock_ttl=60, soft_time_limit=1)
    def report(self: Any) -> str:
        return "ran"

    def soft_limit(signum: int, frame: Any) -> None:  # as billiard's soft_timeout_sighandler
        raise SoftTimeLimitExceeded()

    previous = signal.signal(signal.SIGALRM, soft_limit)
    proxy.lose_replies(script("admit").sha.encode())  # Redis stalls after running it
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    try:
        with pytest.raises(SoftTimeLimitExceeded):
            deliver(report)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        proxy.resume()
    lock_key = KeySpace(prefix).lock("report:1")
    assert direct.get(lock_key) is None, (
        f"ghost lock held {direct.pttl(lock_key)} ms more by an admission nobody rolled back")
    direct.close()
