"""Leases under a stalled link to Redis: the holder's belief ends by its own clock, in time.

Issue 11, item 2 and the half-open probe bullet of item 6. Redis is real; the
worker's state connection goes through a :class:`TcpProxy` that the test
stalls (connections stay open, nothing is forwarded), as a dropped-packet link.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from celery import Celery
from celery.contrib.testing.worker import start_worker
from celery.exceptions import Retry

from celery_reliable import FencedLock, StaleFenceToken
from celery_reliable.keys import KeySpace
from celery_reliable.runtime import Heartbeat, Lease, runtime_for
from celery_reliable.scripts import script
from celery_reliable.storage import RedisStore

from .conftest import RedisServer, TcpProxy, redis50_client, reliable_task, wait_for

LOCK_TTL = 3.0
RENEW_SHA = script("renew").sha.encode("ascii")


class CountingProxy(TcpProxy):
    """A :class:`TcpProxy` that notes when each renewal (EVALSHA of renew.lua) left a client.

    Counted as the bytes come in from the client, before a stall holds them:
    what the client sent, whether or not the server ever got it.
    """

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.renewals: list[float] = []  # monotonic times
        self._seen: dict[socket.socket, bytes] = {}  # per connection: its last requests' bytes

    def _forward(self, request: bool, data: bytes, src: socket.socket, dst: socket.socket) -> None:
        if request:
            # a command may arrive in pieces: count on the stream, not per chunk
            before = self._seen.get(src, b"")
            seen = self._seen[src] = (before + data)[-4096:]
            self.renewals += [time.monotonic()] * (seen.count(RENEW_SHA) - before.count(RENEW_SHA))
        super()._forward(request, data, src, dst)


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[CountingProxy]:
    p = CountingProxy(redis_server.port)
    p.start()
    yield p
    p.stop()


@pytest.fixture
def direct(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client straight to the server (the test's view, never stalled)."""
    client = redis.Redis(port=redis_server.port)
    yield client
    client.close()


@pytest.fixture
def make_app(redis_server: RedisServer, database_url: str) -> Iterator[Any]:
    """Apps of the test's own: broker and results direct, guard state at ``state_url``."""
    apps: list[Celery] = []

    def make(state_url: str, **conf: Any) -> Celery:
        app = Celery(f"lease-{secrets.token_hex(3)}", set_as_current=False)
        app.conf.update(
            broker_url=f"{redis_server.url}/7",
            result_backend=f"{redis_server.url}/8",
            reliable_redis_url=state_url,
            reliable_database_url=database_url,
            reliable_key_prefix=f"lf{secrets.token_hex(3)}",
            broker_connection_retry_on_startup=True,
            **conf,
        )
        apps.append(app)
        return app

    yield make
    for app in apps:
        runtime_for(app).close()  # its heartbeat thread and connections


def test_stalled_link_ends_the_belief_before_the_server_lease_can_expire(
    make_app: Any, proxy: CountingProxy, engine: sa.Engine, direct: redis.Redis
) -> None:
    """A stalled link: lock_lost turns true before the lock can expire; fence refuses after."""
    app = make_app(f"redis://127.0.0.1:{proxy.port}/0")
    marks: dict[str, Any] = {}
    started, done = threading.Event(), threading.Event()

    @reliable_task(app, name="lf.holder", lock="acct:{k}", lock_ttl=LOCK_TTL)
    def holder(self: Any, k: str) -> None:
        fence = self.fence  # built while the belief holds: it must still refuse later
        marks["fence"] = fence
        marks["lease"] = self.request._reliable_execution.lease  # internal: its belief_ends
        started.set()
        deadline = time.monotonic() + 15  # old code: lock_lost only after ~20-40 s
        while not self.lock_lost and time.monotonic() < deadline:
            time.sleep(0.005)
        marks["lost_at"] = time.monotonic()
        marks["lost"] = self.lock_lost
        for name, write in (
            ("redis", lambda: fence.redis_set(direct, "lf:value", "A")),
            ("redis-new-fence", lambda: self.fence.redis_set(direct, "lf:value", "A")),
            ("postgres", lambda: _pg_write(engine, fence)),
        ):
            try:
                write()
                marks[name] = "written"
            except StaleFenceToken:
                marks[name] = "refused"
        done.set()

    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False):
        holder.delay("1")
        assert started.wait(30), "the task did not start"
        lock_key = KeySpace(app.conf.reliable_key_prefix).lock("acct:1")
        fence = marks["fence"]
        # let the heartbeat renew once (due ttl/3 after admission) and read the reply
        wait_for(lambda: proxy.renewals, 10, "the first renewal")
        time.sleep(0.2)
        proxy.stall()
        stalled_at = time.monotonic()
        assert not fence.lost, "the belief ended before the stall"
        # What the server holds now cannot be extended any more: its expiry is fixed.
        # The earliest it can be (PTTL is read between these two clock readings):
        expires_at = time.monotonic() + direct.pttl(lock_key) / 1000
        # Observed: just before the server can expire the lock, the fence refuses.
        time.sleep(max(0.0, expires_at - 0.04 - time.monotonic()))
        checked_at = time.monotonic()
        lost_then = fence.lost
        assert checked_at < expires_at, "the test thread overslept (machine overloaded)"
        assert lost_then, f"lock_lost false {expires_at - checked_at:.3f}s before expiry"
        # Computed: the belief ends before that (a margin before ttl after the last
        # confirmed send, which came before the server's own clock started the ttl).
        lease = marks["lease"]
        assert lease.belief_ends < expires_at, (lease.belief_ends - stalled_at,
                                                expires_at - stalled_at)
        assert done.wait(30), "the task did not finish"
        lost_at = marks["lost_at"]
        assert marks["lost"], f"lock_lost still false {lost_at - stalled_at:.1f}s into the stall"
        # The task saw it within ttl of its last confirmed renewal (sent before the stall).
        assert stalled_at < lost_at < stalled_at + LOCK_TTL, lost_at - stalled_at
        assert marks["redis"] == marks["redis-new-fence"] == marks["postgres"] == "refused", marks
        # no renewal left the worker after its belief ended (the server lets the lease go)
        assert all(t < lease.belief_ends + 0.05 for t in proxy.renewals), (
            [round(t - lease.belief_ends, 2) for t in proxy.renewals])
        # another holder gets the lock once it expired, while A's link is still stalled
        other = FencedLock(direct, "acct:1", ttl=30, prefix=app.conf.reliable_key_prefix)
        wait_for(lambda: other.acquire() is not None, 10, "the lock to expire")
        other.release()
        proxy.resume()  # let A's completion through before the worker stops


def _pg_write(engine: sa.Engine, fence: Any) -> None:
    with engine.begin() as conn:
        fence.check_postgres(conn)


def test_a_renewal_is_sent_once_and_abandoned_before_ttl_over_3(
    proxy: CountingProxy, prefix: str, direct: redis.Redis
) -> None:
    """A renewal lost in a stalled link is given up in < ttl/3 and never resent."""
    lock = FencedLock(direct, "r", ttl=LOCK_TTL, prefix=prefix)
    sent = time.monotonic()
    token = lock.acquire(owner="me")
    assert token is not None
    value = direct.get(KeySpace(prefix).lock("r"))  # "<token> me\n\n\n<nonce>"
    assert value is not None and value.startswith(f"{token} me".encode())
    lease = Lease("L", KeySpace(prefix).lock("r"), value.decode(), LOCK_TTL, sent, "test lock")
    # the process's client, as the Runtime builds it (10 s socket timeout), through the proxy
    client = redis.Redis.from_url(f"redis://127.0.0.1:{proxy.port}/0", socket_timeout=10)
    heartbeat = Heartbeat(RedisStore(client))
    heartbeat._leases.add(lease)  # held, but no thread: this test makes each call itself
    heartbeat.renew([lease])  # connected and working
    assert len(proxy.renewals) == 1 and not lease.lost
    proxy.stall()
    began = time.monotonic()
    call = threading.Thread(target=heartbeat.renew, args=([lease],), daemon=True)
    call.start()
    call.join(5)
    took = time.monotonic() - began
    try:
        assert not call.is_alive(), "the renewal is still blocked 5 s into the stall"
        assert took < LOCK_TTL / 3, took
        time.sleep(0.5)  # a resend would show up now
        assert len(proxy.renewals) == 2, f"{len(proxy.renewals) - 1} renewals sent for one call"
        # the next attempt is a fresh call on a new connection, and it goes through
        proxy.resume()
        heartbeat.renew([lease])
        assert len(proxy.renewals) == 3 and not lease.lost
        assert lease.confirmed > began
    finally:
        proxy.resume()
        heartbeat.stop()
        client.close()
        lock.release()


class Recorder(logging.Handler):
    """Messages of the library's logger (the embedded worker reconfigures the root logger)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def library_log() -> Iterator[Recorder]:
    recorder = Recorder()
    logger = logging.getLogger("celery_reliable")
    level = logger.level
    logger.setLevel(logging.WARNING)  # the embedded worker sets the root logger to ERROR
    logger.addHandler(recorder)
    yield recorder
    logger.removeHandler(recorder)
    logger.setLevel(level)


def test_slow_half_open_probe_stays_the_probe_and_closes_the_breaker(
    make_app: Any, redis_server: RedisServer, library_log: Recorder, direct: redis.Redis
) -> None:
    """A probe running 2.5x probe_lease keeps its place; its success closes the breaker."""
    breaker = {"failure_threshold": 1, "window": 1, "min_calls": 1, "open_seconds": 0.2,
               "success_threshold": 1, "half_open_max": 1, "probe_lease": 1.0}
    app = make_app(f"{redis_server.url}/0", reliable_circuit_breakers={"slowdep": breaker})
    runs: dict[str, tuple[float, float]] = {}

    @reliable_task(app, name="lf.probe",
                   circuit_breaker="slowdep", defer_delay=0.1, defer_max_delay=0.3)
    def call(self: Any, label: str, seconds: float) -> str:
        began = time.monotonic()
        runs[label] = (began, 0.0)
        time.sleep(seconds)
        runs[label] = (began, time.monotonic())
        return label

    state, probes = KeySpace(app.conf.reliable_key_prefix).breaker("slowdep")
    now_ms = int(direct.time()[0]) * 1000
    direct.hset(state, mapping={"s": 1, "o": now_ms - 10_000})  # open long enough: half-opens
    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False):
        a = call.delay("A", 2.5)
        wait_for(lambda: "A" in runs, 30, "the probe to start")
        time.sleep(1.6)  # past probe_lease: unrenewed, the probe would be swept now
        server_ms = int(direct.time()[0]) * 1000 + int(direct.time()[1]) // 1000
        members = [m.decode() for m in direct.zrange(probes, 0, -1)]
        assert any(m.startswith(f"{a.id}/") for m in members), members
        score = max(direct.zscore(probes, m) or 0 for m in members)
        assert score > server_ms, "the probe's lease was not renewed"
        b = call.delay("B", 0.0)  # must wait: the one probe place is taken
        assert a.get(timeout=30) == "A"
        assert b.get(timeout=30) == "B"
    assert runs["B"][0] >= runs["A"][1], "a second probe ran while the slow one was running"
    assert direct.hget(state, "s") == b"0"
    closed_by = [m for m in library_log.messages if "half-open -> closed" in m]
    assert len(closed_by) == 1 and a.id in closed_by[0], closed_by


def test_body_outliving_its_idempotency_lease_belief_is_reported(
    make_app: Any, proxy: CountingProxy, library_log: Recorder
) -> None:
    """A body that outlives its idempotency lease's belief (stalled link) logs a WARNING."""
    app = make_app(f"redis://127.0.0.1:{proxy.port}/0", reliable_idempotency_store="redis")
    started, go = threading.Event(), threading.Event()

    @reliable_task(app, name="lf.idem", idempotency_key="k:{n}", idempotency_lease=1.5)
    def idem(self: Any, n: int) -> int:
        started.set()
        assert go.wait(30)
        return n

    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False):
        result = idem.delay(1)
        assert started.wait(30), "the task did not start"
        proxy.stall()
        time.sleep(1.5 + 0.5)  # past the lease: no renewal can have been confirmed since
        proxy.resume()
        go.set()
        assert result.get(timeout=30) == 1
    assert any("finished after the belief in its idempotency lease" in m and result.id in m
               for m in library_log.messages), library_log.messages


# ------------------------------------------------------------ a belief after release


@pytest.fixture
def broker_app(private_redis: RedisServer) -> Iterator[Celery]:
    """An app whose broker and guards both live on this test's private Redis."""
    prefix = f"rel{secrets.token_hex(3)}"
    app = Celery("rel", broker=f"{private_redis.url}/3", set_as_current=False)
    app.conf.update(reliable_redis_url=f"{private_redis.url}/0", reliable_key_prefix=prefix,
                    reliable_idempotency_store="redis", task_default_queue=f"q{prefix}")
    yield app
    runtime_for(app).close()


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


def test_released_lock_ends_the_belief(broker_app: Celery) -> None:
    """After ``self.retry(throw=False)`` released the guards, lock_lost is true, fences refuse.

    Celery documents ``throw=False`` (the body goes on after scheduling its
    retry). ``retry()`` releases every guard first, so the retried message (or
    any other worker) takes the lock at once, with a higher token. Releasing
    ends the holder's belief in every lease it let go of (lock, idempotency
    record, bulkhead slot), before the release is sent: ``self.lock_lost`` is
    true and ``self.fence`` refuses locally, also a fence obtained before.
    """
    seen: dict[str, Any] = {}
    store = redis.Redis.from_url(broker_app.conf.reliable_redis_url)
    key = "balance"

    @reliable_task(broker_app, name="rel.release",
                   lock="account:1", lock_ttl=60, idempotency_key="acct:1",
                   idempotency_lease=60, bulkhead="standard")
    def job(self: Any) -> str:
        early = self.fence  # obtained while the lock was held
        early.redis_set(store, key, "written while holding")
        seen["lost_before"] = self.lock_lost
        self.retry(countdown=30, throw=False)  # guards released, retry published
        other = FencedLock(store, "account:1", ttl=60,
                           prefix=broker_app.conf.reliable_key_prefix)
        seen["other_token"] = other.acquire()  # the lock is free: someone else takes it
        seen["lost"] = self.lock_lost
        execution = self.request._reliable_execution
        seen["leases"] = {lease.kind: (lease.lost, getattr(lease, "ended_why", None))
                          for lease in execution.leases}
        for name, fence in (("late", self.fence), ("early", early)):
            try:
                fence.redis_set(store, key, f"written after letting go ({name})")
                seen[name] = True
            except StaleFenceToken as exc:
                seen[name] = exc
        other.release()
        return "done"

    deliver(job)
    assert seen["lost_before"] is False
    assert seen["other_token"] is not None  # another holder has the lock now
    assert seen["lost"] is True, "lock_lost is False after this execution released the lock"
    assert seen["leases"] == {kind: (True, "released") for kind in "LIK"}, seen["leases"]
    for name in ("late", "early"):
        assert isinstance(seen[name], StaleFenceToken), (
            f"self.fence ({name}) wrote after the lock was released: {seen[name]!r}")
        assert seen[name].current is None  # refused locally, before any I/O
    assert store.hget(key, "v") == b"written while holding"
    store.close()


def test_heartbeat_renews_with_the_oldest_supported_redis_py(redis_url: str,
                                                            prefix: str) -> None:
    """With redis-py 5.0's connection keywords the heartbeat renews: a 2 s lease lives past 4 s.

    The heartbeat's own connection is built from the pool's settings, setting
    only keywords the pool already passes: redis-py 7's ``orig_socket_timeout``
    and ``orig_socket_connect_timeout`` made 5.0.8 and 6.4.0 (pyproject:
    ``redis>=5``) raise TypeError, which killed the heartbeat thread, and every
    lock, idempotency lease, bulkhead slot and probe expired at its first TTL.
    """
    client = redis50_client(redis_url)
    key = f"{prefix}:lease"
    client.set(key, "me", px=2000)
    heartbeat = Heartbeat(RedisStore(client))
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


def test_any_error_in_a_renewal_is_a_failed_renewal_and_the_heartbeat_goes_on(
    redis_url: str, prefix: str, library_log: Recorder,
) -> None:
    """A renewal raising something other than a RedisError is retried; the thread never dies.

    The heartbeat's connection class raises RuntimeError the first two times it
    is built (a bug, an incompatible redis-py): each is logged as a failed
    renewal, the next attempt follows ``min(1, ttl / 10)`` later on a new
    connection, and the 3 s lease is still renewed before its belief ends.
    """
    failures: list[Exception] = []

    class FlakyConnection(redis.Connection):
        def __init__(self, **kwargs: Any) -> None:
            if failures:
                raise failures.pop(0)
            super().__init__(**kwargs)

    pool = redis.ConnectionPool.from_url(redis_url, connection_class=FlakyConnection)
    client = redis.Redis(connection_pool=pool)
    key = f"{prefix}:lease"
    client.set(key, "me", px=3000)  # on the pool's connection, built before the failures
    failures += [RuntimeError("first"), RuntimeError("second")]
    heartbeat = Heartbeat(RedisStore(client))
    started = time.monotonic()
    lease = Lease("L", key, "me", 3.0, started, "test lock")
    try:
        heartbeat.add(lease)
        wait_for(lambda: not failures and lease.confirmed > started, timeout=10,
                 what="a renewal after the two failed ones")
        time.sleep(3.5)  # past the first TTL: renewed since
        assert not lease.lost and client.pttl(key) > 0, (
            f"the lease was not renewed (PTTL {client.pttl(key)}, {lease.ended_why})")
        assert heartbeat._thread is not None and heartbeat._thread.is_alive()
        assert sum("lease renewal failed" in m for m in library_log.messages) == 2, (
            library_log.messages)
    finally:
        heartbeat.stop()
        client.delete(key)
        client.close()
