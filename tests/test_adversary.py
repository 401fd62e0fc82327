"""Adversarial review of the issue-11 fixes: each test shows a defect that still breaks a guarantee.

Every test here is ``xfail(strict=True)``: it fails on today's code, and turns
the suite red (XPASS) once the defect is fixed, so whoever fixes it removes
the mark.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from celery.exceptions import Retry

from celery_reliable import FencedLock, ReliableTask
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


# ------------------------------------------------------------ delivering a task in-process


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
