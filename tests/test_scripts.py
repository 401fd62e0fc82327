"""The scripts' dedicated connection (scripts._Channel) against a real Redis server."""

from __future__ import annotations

import os
import threading
import time

import pytest
import redis

from celery_reliable import scripts
from celery_reliable.scripts import Script, _channel

ECHO = Script("echo", "return {#KEYS, ARGV[1], ARGV[2], ARGV[3], redis.call('INCR', KEYS[1])}")


def _client_id(client: redis.Redis, conn: object) -> int:
    """The server-side id of one connection, from CLIENT LIST by local port."""
    sock = conn._sock  # type: ignore[attr-defined]
    port = sock.getsockname()[1]
    for entry in client.client_list():
        if entry["addr"].endswith(f":{port}"):
            return int(entry["id"])
    raise AssertionError("connection not in CLIENT LIST")


def test_arguments_encode_like_redis_py(redis_client: redis.Redis, prefix: str) -> None:
    """str, bytes, int and float arrive as redis-py would send them; bools are refused."""
    key = f"{prefix}:echo"
    reply = ECHO(redis_client, [key], ["é", 12, 0.25])
    assert reply == [1, "é".encode(), b"12", b"0.25", 1]
    assert ECHO(redis_client, [key], [b"x", -3, 1e-07])[1:4] == [b"x", b"-3", b"1e-07"]
    with pytest.raises(redis.DataError):
        ECHO(redis_client, [key], [True, 1, 2])


def test_runs_on_its_own_connection_not_the_pool(redis_client: redis.Redis, prefix: str) -> None:
    """The hot path does not check a connection out of the pool."""
    ECHO(redis_client, [f"{prefix}:a"], ["a", 1, 2])
    channel = _channel(redis_client)
    assert channel is not None and channel.conn._sock is not None  # type: ignore[attr-defined]
    pool = redis_client.connection_pool
    created = pool._created_connections  # type: ignore[attr-defined]
    for _ in range(20):
        ECHO(redis_client, [f"{prefix}:a"], ["a", 1, 2])
    assert pool._created_connections == created  # type: ignore[attr-defined]
    assert redis_client.get(f"{prefix}:a") == b"21"


def test_reloads_a_flushed_script(redis_client: redis.Redis, prefix: str) -> None:
    """SCRIPT FLUSH (or a restarted server) costs one SCRIPT LOAD, not an error."""
    ECHO(redis_client, [f"{prefix}:b"], ["a", 1, 2])
    redis_client.script_flush()
    assert ECHO(redis_client, [f"{prefix}:b"], ["a", 1, 2])[-1] == 2


def _blind(channel: scripts._Channel) -> None:
    """Make the channel's pre-call poll see nothing, as when a close is still in flight."""
    channel.conn.can_read = lambda timeout=0: False  # type: ignore[method-assign]


def test_a_connection_closed_by_the_server_is_replaced(
    redis_client: redis.Redis, prefix: str
) -> None:
    """The poll before each call finds a connection the server closed and reopens it."""
    key = f"{prefix}:c"
    ECHO(redis_client, [key], ["a", 1, 2])
    channel = _channel(redis_client)
    assert channel is not None
    old_id = _client_id(redis_client, channel.conn)
    assert redis_client.client_kill_filter(_id=old_id) == 1
    time.sleep(0.05)
    assert ECHO(redis_client, [key], ["a", 1, 2])[-1] == 2
    assert _client_id(redis_client, channel.conn) != old_id


def test_a_close_missed_by_the_poll_fails_once_then_reconnects(
    redis_client: redis.Redis, prefix: str
) -> None:
    """A dead connection the poll missed raises ConnectionError once, never a stale reply."""
    key = f"{prefix}:d"
    ECHO(redis_client, [key], ["a", 1, 2])
    channel = _channel(redis_client)
    assert channel is not None
    _blind(channel)
    redis_client.client_kill_filter(_id=_client_id(redis_client, channel.conn))
    with pytest.raises(redis.ConnectionError):
        ECHO(redis_client, [key], ["a", 1, 2])
    assert ECHO(redis_client, [key], ["a", 1, 2])[-1] == 2


def test_an_interrupted_call_never_hands_its_reply_to_the_next(
    redis_client: redis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception between the write and the read (a soft time limit) leaves the reply
    unread; the next call must not take it for its own."""
    key = f"{prefix}:i"
    ECHO(redis_client, [key], ["a", 1, 2])
    channel = _channel(redis_client)
    assert channel is not None
    _blind(channel)  # the poll alone would not see a reply still in flight

    class Interrupted(BaseException):
        pass

    def interrupted(*_args: object, **_kwargs: object) -> object:
        raise Interrupted

    with monkeypatch.context() as patch:
        patch.setattr(channel.conn, "read_response", interrupted)
        with pytest.raises(Interrupted):
            ECHO(redis_client, [key], ["first", 1, 2])  # runs on the server: INCR -> 2
    for expected in (3, 4, 5):
        assert ECHO(redis_client, [key], ["next", 1, 2]) == [1, b"next", b"1", b"2", expected]


def test_an_error_reply_keeps_the_connection(redis_client: redis.Redis, prefix: str) -> None:
    """A script error is read in full: the connection stays in step and is reused."""
    failing = Script("failing", "return redis.error_reply('no: ' .. ARGV[1])")
    ECHO(redis_client, [f"{prefix}:j"], ["a", 1, 2])
    channel = _channel(redis_client)
    assert channel is not None
    before = _client_id(redis_client, channel.conn)
    with pytest.raises(redis.ResponseError, match="no: x"):
        failing(redis_client, [f"{prefix}:j"], ["x"])
    assert ECHO(redis_client, [f"{prefix}:j"], ["a", 1, 2])[-1] == 2
    assert _client_id(redis_client, channel.conn) == before


def test_a_busy_channel_sends_other_threads_through_the_pool(
    redis_client: redis.Redis, prefix: str
) -> None:
    """Threads never share the channel: one holding it makes the others use the pool."""
    key = f"{prefix}:e"
    ECHO(redis_client, [key], ["a", 1, 2])
    channel = _channel(redis_client)
    assert channel is not None
    with channel.busy:  # as if another thread were mid-call
        assert ECHO(redis_client, [key], ["a", 1, 2])[-1] == 2
    results: list[int] = []

    def worker() -> None:
        for _ in range(200):
            results.append(ECHO(redis_client, [key], ["a", 1, 2])[-1])

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == list(range(3, 803))  # every reply belongs to its own call


def test_decoded_responses_and_other_clients(redis_url: str, prefix: str) -> None:
    """decode_responses clients get str back; cluster-like or cached pools use evalsha."""
    decoded = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert ECHO(decoded, [f"{prefix}:f"], ["é", 1, 2])[:2] == [1, "é"]
    finally:
        decoded.close()

    class OtherPool(redis.ConnectionPool):
        pass

    custom = redis.Redis(connection_pool=OtherPool.from_url(redis_url))
    try:
        assert _channel(custom) is None
        assert ECHO(custom, [f"{prefix}:f"], ["a", 1, 2])[-1] == 2
    finally:
        custom.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_opens_its_own_connection(redis_client: redis.Redis, prefix: str) -> None:
    """The child of a fork never writes on the parent's socket (prefork workers)."""
    key = f"{prefix}:g"
    ECHO(redis_client, [key], ["a", 1, 2])
    parent = _channel(redis_client)
    assert parent is not None
    parent_id = _client_id(redis_client, parent.conn)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            ECHO(redis_client, [key], ["a", 1, 2])
            child = _channel(redis_client)
            ok = child is not None and child is not parent
            ok = ok and _client_id(redis_client, child.conn) != parent_id  # type: ignore[union-attr]
            code = 0 if ok else 1
        finally:
            os.write(write, bytes([code]))
            os._exit(0)
    os.close(write)
    status = os.read(read, 1)
    os.waitpid(pid, 0)
    assert status == b"\x00"
    assert ECHO(redis_client, [key], ["a", 1, 2])[-1] == 3  # parent's connection still in sync
    assert _client_id(redis_client, parent.conn) == parent_id


def test_scripts_safe_to_rerun_are_resent_on_a_new_connection(
    redis_client: redis.Redis, prefix: str
) -> None:
    """A completion whose connection died is resent once; admission is not (fail closed)."""
    key = f"{prefix}:h"
    safe = Script("safe", "return redis.call('SET', KEYS[1], ARGV[1]) and 1", idempotent=True)
    unsafe = Script("unsafe", "return redis.call('INCR', KEYS[1])")
    assert scripts.script("complete").idempotent and not scripts.script("admit").idempotent
    for run, expect_error in ((safe, False), (unsafe, True)):
        run(redis_client, [key + run.name], ["v"] if run is safe else [])
        channel = _channel(redis_client)
        assert channel is not None
        _blind(channel)
        redis_client.client_kill_filter(_id=_client_id(redis_client, channel.conn))
        if expect_error:
            with pytest.raises(redis.ConnectionError):
                run(redis_client, [key + run.name], [])
            assert redis_client.get(key + run.name) == b"1"  # not run a second time
        else:
            assert run(redis_client, [key + run.name], ["w"]) == 1
            assert redis_client.get(key + run.name) == b"w"


def test_a_resend_after_a_restart_reloads_the_script(
    redis_client: redis.Redis, prefix: str
) -> None:
    """Redis restarted (connection gone AND scripts gone): the resent completion loads the
    script and succeeds instead of failing with NOSCRIPT."""
    key = f"{prefix}:k"
    safe = Script("safe2", "return redis.call('SET', KEYS[1], ARGV[1]) and 1", idempotent=True)
    safe(redis_client, [key], ["v"])
    channel = _channel(redis_client)
    assert channel is not None
    _blind(channel)
    redis_client.script_flush()
    redis_client.client_kill_filter(_id=_client_id(redis_client, channel.conn))
    assert safe(redis_client, [key], ["w"]) == 1
    assert redis_client.get(key) == b"w"
