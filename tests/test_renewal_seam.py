"""Lease renewal behind the storage seam (``Store.renew``): the wiring production uses.

Since 5a28143 the process heartbeat renews through the runtime's store, the same
:class:`~celery_reliable.storage.RedisStore` the pipeline admits through
(``store_for(runtime)``). These tests pin what the move must keep: renewals on a
connection of their own, per process (a prefork child opens its own), a lease the
server no longer holds lost at the next renewal, a restarted server's missing
script loaded again, and ``Heartbeat.stop()`` closing nothing the pipeline uses.
Redis is a private server; stalls go through a :class:`LateProxy`.
"""

from __future__ import annotations

import os
import secrets
import threading
import time

import redis
from celery import Celery

from celery_reliable.leases import Heartbeat, Lease
from celery_reliable.runtime import runtime_for
from celery_reliable.scripts import _channel, script
from celery_reliable.storage import RedisStore, store_for

from .conftest import LateProxy, RedisServer, wait_for


def _app(url: str) -> Celery:
    app = Celery(f"seam-{secrets.token_hex(3)}", set_as_current=False)
    app.conf.update(reliable_redis_url=url, reliable_key_prefix=f"rs{secrets.token_hex(3)}",
                    reliable_idempotency_store="redis")
    return app


def _fenced_set(client: redis.Redis, key: str, errors: list[BaseException]) -> None:
    try:
        script("fenced_set")(client, [key], [1, "v", "h", 1])
    except Exception as exc:  # the stalled call may end either way: not what is tested
        errors.append(exc)


def test_a_stalled_pipeline_call_never_holds_up_the_runtimes_renewals(
    late_proxy: LateProxy, private_redis: RedisServer
) -> None:
    """A script call stuck on the runtime's channel; the runtime's heartbeat renews regardless."""
    rt = runtime_for(_app(f"redis://127.0.0.1:{late_proxy.port}/0"))
    direct = redis.Redis(port=private_redis.port)
    errors: list[BaseException] = []
    try:
        assert rt.heartbeat._store is store_for(rt)  # one store: pipeline and heartbeat
        direct.set("rs:lease", "me", px=1500)
        lease = Lease("L", "rs:lease", "me", 1.5, time.monotonic(), "test lock")
        late_proxy.hold(b"rs:STALLED")  # that request, on its connection only, is held
        stalled = threading.Thread(target=_fenced_set, args=(rt.redis, "rs:STALLED", errors))
        stalled.start()
        channel = _channel(rt.redis)
        assert channel is not None
        wait_for(channel.busy.locked, timeout=5, what="the channel call in flight")
        rt.heartbeat.add(lease)
        time.sleep(4.0)  # over two TTLs, while the channel's call stays stuck
        assert channel.busy.locked() and not late_proxy.delivered.is_set()
        link = store_for(rt)._renewals  # type: ignore[attr-defined]
        assert link._conn is not None and link._conn is not channel.conn
        assert not lease.lost and direct.pttl("rs:lease") > 0, lease.ended_why
    finally:
        late_proxy.release()
        rt.close()
        direct.close()


def _renewed_lease(server: RedisServer) -> tuple[redis.Redis, Heartbeat, Lease]:
    """A 6 s lease on ``server``'s key ``rs:lease``, held by a heartbeat that renewed it once."""
    client = redis.Redis(port=server.port)
    client.set("rs:lease", "me", px=6000)
    heartbeat = Heartbeat(RedisStore(client))
    lease = Lease("L", "rs:lease", "me", 6.0, time.monotonic(), "test lock")
    heartbeat.add(lease)
    first = lease.confirmed
    wait_for(lambda: lease.confirmed > first, timeout=5, what="a first renewal")
    return client, heartbeat, lease


def test_a_lease_gone_after_an_empty_restart_is_lost_at_the_next_renewal(
    private_redis: RedisServer,
) -> None:
    """Redis restarted without the key: the next renewal says so; lost then, not by the clock."""
    client, heartbeat, lease = _renewed_lease(private_redis)
    try:
        private_redis.restart(empty=True)
        wait_for(lambda: lease.lost, timeout=6, what="the lease lost")
        assert lease.ended_why == "expired or taken over"
        assert time.monotonic() < lease.belief_ends  # the server's word, before the clock's
    finally:
        heartbeat.stop()
        client.close()


def test_a_restarted_servers_missing_script_is_loaded_and_the_lease_renewed(
    private_redis: RedisServer,
) -> None:
    """Restarted from a snapshot (key kept, scripts gone): NOSCRIPT, load, renewed."""
    client, heartbeat, lease = _renewed_lease(private_redis)
    try:
        client.save()
        private_redis.restart()
        assert client.exists("rs:lease") and not client.script_exists(script("renew").sha)[0]
        before = lease.confirmed
        wait_for(lambda: lease.confirmed > before, timeout=5, what="a renewal after the restart")
        assert not lease.lost and client.pttl("rs:lease") > 0
    finally:
        heartbeat.stop()
        client.close()


def test_stop_closes_only_the_renewals_connection(redis_url: str) -> None:
    """After ``stop()`` the pipeline's channel is untouched; a new heartbeat on the store renews."""
    client = redis.Redis.from_url(redis_url)
    store = RedisStore(client)
    key = f"rs{secrets.token_hex(3)}:lease"
    client.set(key, "me", px=1500)
    script("fenced_set")(client, [f"{key}:v"], [1, "v", "h", 1])  # opens the channel
    channel = _channel(client)
    assert channel is not None and channel.conn._sock is not None
    heartbeat = Heartbeat(store)
    lease = Lease("L", key, "me", 1.5, time.monotonic(), "test lock")
    heartbeat.add(lease)
    wait_for(lambda: store._renewals._conn is not None, timeout=5,  # type: ignore[attr-defined]
             what="the renewals' connection")
    heartbeat.stop()
    assert store._renewals._conn is None  # type: ignore[attr-defined]
    assert channel.conn._sock is not None and _channel(client) is channel
    again = Heartbeat(store)
    second = Lease("L", key, "me", 1.5, lease.confirmed, "test lock")
    try:
        again.add(second)
        time.sleep(3.0)  # two TTLs
        assert not second.lost and client.pttl(key) > 0, second.ended_why
    finally:
        again.stop()
        client.delete(key, f"{key}:v")
        client.close()


def test_a_forked_child_renews_on_its_own_connection(redis_url: str) -> None:
    """A prefork child gets its own runtime, store and renewals' connection; both renew."""
    app = _app(redis_url)
    rt = runtime_for(app)
    client = redis.Redis.from_url(redis_url)
    key = f"rs{secrets.token_hex(3)}"
    client.set(f"{key}:parent", "me", px=1500)
    lease = Lease("L", f"{key}:parent", "me", 1.5, time.monotonic(), "parent's lock")
    rt.heartbeat.add(lease)
    link = store_for(rt)._renewals  # type: ignore[attr-defined]
    wait_for(lambda: link._conn is not None, timeout=5, what="the parent's renewals connected")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report 1 if it renewed on a connection of its own
        ok = b"0"
        try:
            child = runtime_for(app)
            own = child is not rt and store_for(child) is not store_for(rt)
            child_client = redis.Redis.from_url(redis_url)
            child_client.set(f"{key}:child", "me", px=1500)
            held = Lease("L", f"{key}:child", "me", 1.5, time.monotonic(), "child's lock")
            child.heartbeat.add(held)
            time.sleep(3.0)
            child_link = store_for(child)._renewals  # type: ignore[attr-defined]
            renewed = not held.lost and child_client.pttl(f"{key}:child") > 0
            if own and renewed and child_link._conn is not link._conn:
                ok = b"1"
        finally:
            os.write(write, ok)
            os._exit(0)
    os.close(write)
    try:
        got = os.read(read, 1)
        os.waitpid(pid, 0)
        assert got == b"1", "the child did not renew on a connection of its own"
        assert not lease.lost and client.pttl(f"{key}:parent") > 0, lease.ended_why
    finally:
        os.close(read)
        rt.close()
        client.delete(f"{key}:parent", f"{key}:child")
        client.close()


def test_a_shorter_lease_taken_during_a_stuck_renewal_is_renewed_in_time(
    late_proxy: LateProxy, private_redis: RedisServer
) -> None:
    """A 3 s lock taken while a 60 s lease's renewal hangs on a dead connection is still renewed.

    The heartbeat has one thread: a renewal sent with the 60 s lease's timeout
    (5 s) on a connection whose request never arrives blocks it for 5 s. A 3 s
    lock taken meanwhile is due at 1 s and its belief ends at 2.92 s: unless the
    stuck call is abandoned when a lease with a shorter timeout comes, the lock
    is lost by the clock though the server answers on a fresh connection.
    """
    client = redis.Redis(port=late_proxy.port)
    direct = redis.Redis(port=private_redis.port)
    direct.set("rs:long", "me", px=60000)
    heartbeat = Heartbeat(RedisStore(client))
    now = time.monotonic()
    long = Lease("L", "rs:long", "me", 60.0, now - 20.0, "idempotency lease")  # due now
    long.confirmed = now
    try:
        late_proxy.hold(b"rs:long")  # its renewal's request is held: a dead connection
        heartbeat.add(long)
        time.sleep(0.3)  # the renewal is sent, and stuck
        direct.set("rs:short", "me", px=3000)
        short = Lease("L", "rs:short", "me", 3.0, time.monotonic(), "test lock")
        heartbeat.add(short)
        time.sleep(3.5)  # past the short lease's TTL
        assert not short.lost and direct.pttl("rs:short") > 0, short.ended_why
        assert not long.lost
    finally:
        late_proxy.release()
        heartbeat.stop()
        client.close()
        direct.close()
