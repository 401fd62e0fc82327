"""Adversarial review of issue 11's second-round fixes: each test reproduces a defect."""

from __future__ import annotations

import contextlib
import socket
import sys
import time
from types import FrameType
from typing import Any

import pytest
import redis
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

from celery_reliable import FencedLock, ReliableTask
from celery_reliable.admission import Admitted, Plan
from celery_reliable.keys import KeySpace
from celery_reliable.runtime import Heartbeat, Lease
from celery_reliable.scripts import script

from .conftest import LateProxy, RedisServer, TcpProxy
from .test_countdown_cap import app, deliver

__all__ = ["app"]  # the fixture, re-exported so pytest finds it here


def _interrupt_at(function: str) -> Any:
    """Raise SoftTimeLimitExceeded when ``celery_reliable.task``'s ``function`` is entered.

    Celery's soft time limit is a signal handler raising at whatever bytecode the
    main thread is running; this delivers it at a chosen one, deterministically.
    Returns the trace function it replaced (a coverage tracer), to put back.
    """
    previous = sys.gettrace()

    def tracer(frame: FrameType, event: str, arg: Any) -> None:
        if (event == "call" and frame.f_code.co_name == function
                and frame.f_globals.get("__name__") == "celery_reliable.task"):
            sys.settrace(previous)
            raise SoftTimeLimitExceeded("soft time limit (test)")

    sys.settrace(tracer)
    return previous


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="an interruption after admit.lua's reply and before _hold's leases "
                          "are registered is neither rolled back nor settled: the lock (and "
                          "slot, record, delivery entry) outlive the delivery until their TTL")
def test_interruption_between_admission_and_hold_leaks_nothing(app: Celery,
                                                              prefix: str) -> None:
    """A soft time limit landing just after admission (before _hold) leaks the task's lock.

    _admit rolls back on a BaseException only around plan.admit(), and settles on
    one only after _hold(); in between (health bookkeeping, _hold itself, which
    runs metrics and the breaker's signal handlers: user code) an interruption
    propagates with everything admitted still held. The next delivery of the
    same task is then deferred behind its predecessor's ghost lock for the
    lock's whole TTL (here 300 s).
    """

    @app.task(base=ReliableTask, bind=True, shared=False, name="adv.interrupted",
              lock="adv-interrupted", lock_ttl=300)
    def guarded(self: Any) -> str:
        return "ran"

    queue = f"q{prefix}"
    previous = _interrupt_at("_hold")
    try:
        with pytest.raises(SoftTimeLimitExceeded):
            deliver(guarded, queue=queue)
    finally:
        sys.settrace(previous)
    again = deliver(guarded, queue=queue)
    assert again == "ran", f"the next delivery did not run: {again!r} (the lock leaked)"


#: The keyword arguments redis-py 5.0's ``Connection`` takes (pyproject: ``redis>=5``);
#: 6.4 takes the same that matter here: neither has ``orig_socket_timeout``.
_REDIS_50_CONNECTION_KWARGS = frozenset({
    "client_name", "command_packer", "credential_provider", "db", "decode_responses",
    "encoding", "encoding_errors", "health_check_interval", "host", "lib_name", "lib_version",
    "parser_class", "password", "port", "protocol", "redis_connect_func", "retry",
    "retry_on_error", "retry_on_timeout", "socket_connect_timeout", "socket_keepalive",
    "socket_keepalive_options", "socket_read_size", "socket_timeout", "socket_type",
    "username",
})


def _redis50_client(url: str) -> redis.Redis:
    """A client whose pool and connections take only what redis-py 5.0's take.

    The installed redis-py is newer; this stands in for the oldest version
    pyproject accepts: its pool's connection settings are what a 5.0 pool
    holds (the newer keys it adds itself are left out), and a keyword 5.0's
    ``Connection`` does not know raises TypeError, as it does there.
    """

    class Redis50Connection(redis.Connection):
        def __init__(self, **kwargs: Any) -> None:
            extra = sorted(set(kwargs) - _REDIS_50_CONNECTION_KWARGS)
            if extra:
                raise TypeError("AbstractConnection.__init__() got an unexpected keyword "
                                f"argument {extra[0]!r}")
            super().__init__(**kwargs)

    pool = redis.ConnectionPool.from_url(url, connection_class=Redis50Connection)
    pool.connection_kwargs = {name: value for name, value in pool.connection_kwargs.items()
                              if name in _REDIS_50_CONNECTION_KWARGS}
    client = redis.Redis(connection_pool=pool)
    assert client.ping()  # the pool's own connections work
    return client


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="runtime._Link builds the heartbeat's connection with "
                          "orig_socket_timeout/orig_socket_connect_timeout, which redis-py "
                          "< 7 (5.0.8 and 6.4.0 checked; pyproject says redis>=5) rejects: "
                          "the heartbeat thread dies, no lease is ever renewed")
def test_heartbeat_renews_with_the_oldest_supported_redis_py(redis_url: str,
                                                            prefix: str) -> None:
    """With redis-py 5.0 the heartbeat never renews: a 2 s lease is gone after 4 s.

    ``_Link.call`` passes ``orig_socket_timeout`` and ``orig_socket_connect_timeout``
    (redis-py 7's maintenance-notification parameters) to the pool's connection
    class; redis-py 5.0.8 and 6.4.0 raise TypeError, which is not a RedisError:
    it escapes ``Heartbeat.renew`` and kills the heartbeat thread (each
    ``add()`` starts one that dies again). Every lock, idempotency lease,
    bulkhead slot and probe then expires at its first TTL while its task runs.
    Reproduced for real with ``pip install --target /tmp/r5 redis==5.0.8`` and
    PYTHONPATH=/tmp/r5.
    """
    client = _redis50_client(redis_url)
    key = f"{prefix}:lease"
    client.set(key, "me", px=2000)
    heartbeat = Heartbeat(client)
    lease = Lease("L", key, "me", 2.0, time.monotonic(), "test lock")
    try:
        heartbeat.add(lease)
        time.sleep(4.0)  # two TTLs: a live heartbeat renews at ttl/3
        assert client.pttl(key) > 0 and not lease.lost, (
            f"the lease was not renewed (PTTL {client.pttl(key)}, lost={lease.lost})")
    finally:
        heartbeat.stop()
        client.delete(key)
        client.close()


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="admission._call_within (the interrupted-admission rollback) passes "
                          "orig_socket_timeout to the connection class, which redis-py < 7 "
                          "rejects: an interrupted admission is never rolled back there")
def test_interrupted_rollback_works_with_the_oldest_supported_redis_py(redis_url: str,
                                                                     prefix: str) -> None:
    """With redis-py 5.0 the bounded rollback of an interrupted admission raises TypeError.

    ``Plan.rollback(timeout=...)`` (what ReliableTask._admit and FencedLock.acquire
    run on SoftTimeLimitExceeded/SystemExit) builds its own connection with
    redis-py 7's ``orig_*`` keywords; the callers swallow the TypeError, so the
    lock stays held until its TTL and no marker stops a late request.
    """
    client = _redis50_client(redis_url)
    keys = KeySpace(prefix)
    plan = Plan()
    plan.add_lock(keys, "interrupted", "owner-1", 300)
    try:
        assert isinstance(plan.admit(client), Admitted)  # the lock is taken
        try:
            undone = plan.rollback(client, attempts=2, timeout=1.0)
        except TypeError as exc:
            raise AssertionError(f"the bounded rollback failed: {exc}") from exc
        assert undone == [1]
    finally:
        client.delete(keys.lock("interrupted"), keys.fence("interrupted"))
        client.close()


class _LateAndLostProxy(LateProxy):
    """LateProxy (one request held until release()) that can also lose replies (TcpProxy)."""

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        if src.getsockname()[1] != self.port:  # the server's replies: TcpProxy's, held or not
            TcpProxy._pipe(self, src, dst)
            return
        replies = self._replies[src]
        try:
            while data := src.recv(65536):
                marker = self._marker
                if marker is not None and marker in data:
                    replies.clear()  # this request runs; its reply is lost
                late = self._late
                if late is not None and late in data:
                    self._late = None
                    self._release.wait(30)
                    dst.sendall(data)
                    time.sleep(0.2)
                    self.delivered.set()
                    continue
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="rollback.lua matches a lock by holder only: a rollback request "
                          "delayed in the network deletes the lock a later acquire with the "
                          "same owner took (the marker stops late admissions, not late "
                          "rollbacks)")
def test_late_rollback_never_frees_a_later_acquire_of_the_same_owner(
    private_redis: RedisServer, prefix: str,
) -> None:
    """A delayed first rollback send deletes the lock of the owner's next, successful acquire.

    FencedLock.acquire(owner=...) with a stable owner (a host:pid, as the marker's
    commit intends to support: "a FencedLock retried with the same owner is not
    refused"). Acquire #1 runs but its reply is lost; its rollback's first send
    is delayed (a segment in retransmission), the second gets through and
    undoes #1. The caller retries: acquire #2 (same owner) takes the lock. Then
    the first rollback send arrives: rollback.lua compares only the holder after
    the token, finds its owner, and deletes #2's lock. A third client acquires
    while #2 still holds: two holders.
    """
    direct = redis.Redis(port=private_redis.port)
    for name in ("admit", "rollback", "complete", "renew"):
        direct.script_load(script(name).source)
    proxy = _LateAndLostProxy(private_redis.port)
    proxy.start()
    client = redis.Redis(port=proxy.port, socket_timeout=0.5)
    try:
        lock = FencedLock(client, "account-7", prefix=prefix, ttl=60)
        proxy.lose_replies(script("admit").sha.encode())
        proxy.hold(script("rollback").sha.encode())
        with pytest.raises(redis.TimeoutError):
            lock.acquire(owner="worker-a:4242")  # #1 ran; its first rollback send is late
        proxy.resume()
        token = lock.acquire(owner="worker-a:4242")  # the caller retries: #2 holds the lock
        assert token is not None
        proxy.release()  # the first rollback send of #1 reaches Redis
        assert proxy.delivered.wait(10)
        time.sleep(0.2)
        other = FencedLock(direct, "account-7", prefix=prefix, ttl=60).acquire(owner="worker-b")
        assert other is None, (
            f"a second holder got the lock (token {other}) while acquire #2 (token {token}) "
            "holds it: #1's late rollback deleted it")
    finally:
        proxy.stop()
        client.close()
        direct.close()
