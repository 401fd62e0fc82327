"""Lua scripts shipped as package data, registered once per client, run by SHA.

Every guard decision is one of these scripts, so their client-side cost is the
library's overhead per task. A plain ``client.evalsha`` pays for redis-py's
pool checkout, command dispatch and instrumentation on every call (about a
third of a loopback round trip's client CPU, measured in
``benchmarks/locks.py``). So, for a ``redis.Redis`` on a plain connection
pool, each process keeps one dedicated connection per client (a
:class:`_Channel`, built from the pool's own connection class and settings:
host, TLS, auth, database, timeouts, RESP version) and writes the packed
``EVALSHA`` on it directly. A thread that finds the channel busy, any other
client type (cluster, sentinel, client-side caching) and any pool that is not
a plain one take the pool path (see below for which scripts may be resent
there).

Before each call the channel polls its socket (as redis-py's pool does at
checkout), so a connection the server closed is replaced before it is used. A
connection error during a call is raised to the caller, with one exception:
scripts that are safe to run twice (completion, fenced writes, throttling;
never a lease renewal: see :meth:`Script.call_once`) are sent once more on a
new connection. Every other script (admission, rollback, renewal) is sent
exactly once per call, on every path: an admission's reply may have been lost
after it took a lock or a token, and only its caller knows how to undo that
(``Plan.rollback``). So those never take ``client.evalsha``, whose redis-py
``retry`` (by default 10 resends on a connection error or a timeout) would
run admission again behind its caller's back; they go through
:meth:`Script.call_once` on a pool connection, and the client's ``retry``
setting stays as the user set it for every other command.
"""

from __future__ import annotations

import hashlib
import os
import threading
import weakref
from functools import cache
from importlib import resources
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.connection import BlockingConnectionPool, ConnectionPool
from redis.retry import Retry

from . import guards

__all__ = ["Script", "own_connection", "plain_pool", "script"]

_PLAIN_POOLS = (ConnectionPool, BlockingConnectionPool)


def _arg(value: Any) -> bytes:
    """One argument as redis-py's encoder would send it."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bool):  # bool is an int; redis-py refuses it too
        raise redis.DataError(f"invalid script argument {value!r}: convert booleans first")
    if isinstance(value, int):
        return b"%d" % value
    if isinstance(value, float):
        return repr(value).encode("ascii")
    raise redis.DataError(f"invalid script argument of type {type(value).__name__}")


class _Channel:
    """One process's dedicated connection to one client's server, used by one thread at a time."""

    __slots__ = ("busy", "conn", "pending", "pid")

    def __init__(self, pool: ConnectionPool) -> None:
        self.conn = pool.connection_class(**pool.connection_kwargs)
        self.busy = threading.Lock()
        self.pid = os.getpid()
        #: a request was written and its reply not read (an exception came in between,
        #: e.g. Celery's SoftTimeLimitExceeded): the connection is out of step
        self.pending = False

    def call(self, packed: bytes) -> Any:
        conn = self.conn
        if getattr(conn, "_sock", None) is not None:
            # As redis-py's pool does at every checkout (about 2 us): a connection with
            # something to read before we asked (closed by the server, or an unread
            # reply) is replaced, never reused.
            try:
                stale = self.pending or conn.can_read()
            except redis.ConnectionError:
                stale = True  # can_read() has disconnected it
            if stale:
                conn.disconnect()
        self.pending = True
        try:
            conn.send_packed_command([packed], check_health=False)
        except BaseException:
            conn.disconnect()  # maybe half-written: never reuse it
            raise
        try:
            reply = conn.read_response()  # disconnects itself on any I/O error
        except redis.ResponseError:
            self.pending = False  # an error reply, read in full: still in step
            raise
        self.pending = False
        return reply


def plain_pool(client: Any) -> ConnectionPool | None:
    """``client``'s connection pool if it is a ``redis.Redis`` on a plain (blocking) pool."""
    pool = getattr(client, "connection_pool", None)
    if isinstance(client, redis.Redis) and type(pool) in _PLAIN_POOLS:
        return pool
    return None


def own_connection(client: redis.Redis, timeout: float) -> Any:
    """A new connection to ``client``'s server; its connect and each read take <= ``timeout`` s.

    Built from the pool's own connection class and settings (host, TLS, auth,
    database, RESP version), for a caller that must bound its wait below the
    client's socket timeout (the heartbeat, an interrupted admission's
    rollback); with no retries, not even of a connect: the caller decides what
    to resend. Only keywords the pool already passes are set: each redis-py
    version takes its own (redis-py 7's ``orig_socket_timeout``, which a
    relaxed-timeout maintenance notification restores, is refused by 5 and 6).
    None for a client that is not a ``redis.Redis`` on a plain pool (cluster,
    sentinel): it keeps its own timeouts.
    """
    pool = plain_pool(client)
    if pool is None:
        return None
    kwargs = dict(pool.connection_kwargs)
    # Only the pool's own connections answer to its maintenance handler.
    kwargs.pop("maint_notifications_pool_handler", None)
    kwargs.pop("retry_on_timeout", None)
    kwargs["retry"] = Retry(NoBackoff(), 0)
    kwargs["socket_timeout"] = kwargs["socket_connect_timeout"] = timeout
    for name in ("orig_socket_timeout", "orig_socket_connect_timeout"):
        if name in kwargs:
            kwargs[name] = timeout
    return pool.connection_class(**kwargs)


_channels: weakref.WeakKeyDictionary[redis.Redis, _Channel] = weakref.WeakKeyDictionary()
_channels_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # A fork while another thread held the lock would leave it held forever in the
    # child. Inherited channels are replaced on first use (their pid differs).
    global _channels_lock
    _channels_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _channel(client: redis.Redis) -> _Channel | None:
    channel = _channels.get(client)
    if channel is not None and channel.pid == os.getpid():
        return channel
    if not isinstance(client, redis.Redis):
        return None
    pool = client.connection_pool
    if type(pool) not in _PLAIN_POOLS or getattr(pool, "cache", None) is not None:
        return None
    with _channels_lock:
        channel = _channels.get(client)
        if channel is None or channel.pid != os.getpid():  # new, or inherited over fork
            channel = _Channel(pool)
            _channels[client] = channel
    return channel


class Script:
    """One Lua script: EVALSHA, with a single SCRIPT LOAD if the server lost it."""

    __slots__ = ("_head", "idempotent", "name", "sha", "source")

    def __init__(self, name: str, source: str, *, idempotent: bool = False) -> None:
        self.name = name
        self.source = source
        #: Safe to run twice: a call whose connection failed is sent once more on a new
        #: connection. Never for admission (a lost reply may hide a taken lock or token):
        #: other scripts are sent exactly once per call, on every path.
        self.idempotent = idempotent
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()
        self._head = b"$7\r\nEVALSHA\r\n$40\r\n" + self.sha.encode("ascii") + b"\r\n"

    def _pack(self, keys: list[str], args: list[Any]) -> bytes:
        parts = [b"*%d\r\n" % (len(keys) + len(args) + 3), self._head]
        append = parts.append
        for item in (len(keys), *keys, *args):
            kind = type(item)  # exact types first: this runs for every guard call
            if kind is str:
                data = item.encode("utf-8")
            elif kind is int:
                data = b"%d" % item
            else:
                data = _arg(item)
            append(b"$%d\r\n" % len(data))
            append(data)
            append(b"\r\n")
        return b"".join(parts)

    def __call__(self, client: redis.Redis, keys: list[str], args: list[Any]) -> Any:
        channel = _channel(client)
        if channel is not None and channel.busy.acquire(blocking=False):
            try:
                packed = self._pack(keys, args)
                loaded = resent = False
                while True:
                    try:
                        return channel.call(packed)
                    except redis.exceptions.NoScriptError:
                        if loaded:
                            raise
                        loaded = True
                        client.script_load(self.source)  # e.g. Redis restarted
                    except (redis.ConnectionError, redis.TimeoutError):
                        if resent or not self.idempotent:
                            raise
                        resent = True  # the channel reconnects
            finally:
                channel.busy.release()
        if not self.idempotent:
            return self._call_pooled_once(client, keys, args)
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            client.script_load(self.source)
            return client.evalsha(self.sha, len(keys), *keys, *args)

    def _call_pooled_once(self, client: Any, keys: list[str], args: list[Any]) -> Any:
        """:meth:`call_once` on a connection of ``client``'s pool, whatever its ``retry`` says.

        redis-py's ``execute_command`` resends a command after a connection error or
        a timeout (``Retry``, 10 times by default): harmless for a read, wrong for a
        script whose first run may have taken a lock. This is its checkout, send and
        read without that loop.
        """
        if isinstance(client, redis.Redis):
            if client.connection is not None:  # single_connection_client=True
                with client.single_connection_lock:
                    return self.call_once(client.connection, keys, args)
            pool = client.connection_pool
            conn = pool.get_connection()
            try:
                return self.call_once(conn, keys, args)
            finally:
                pool.release(conn)
        node_of = getattr(client, "get_node_from_key", None)
        if node_of is not None:  # RedisCluster: every key of a plan shares one hash tag
            node = node_of(keys[0] if keys else "")
            return self._call_pooled_once(client.get_redis_connection(node), keys, args)
        # Another client type: nothing to bypass that we know of.
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            client.script_load(self.source)
            return client.evalsha(self.sha, len(keys), *keys, *args)

    def call_once(self, conn: Any, keys: list[str], args: list[Any]) -> Any:
        """Run on the redis-py connection ``conn``, sent once: never resent after an error.

        For callers that own a connection and must not act on a reply that
        arrives late (the lease heartbeat): a timeout or connection error drops
        the connection and is raised. Only a NOSCRIPT reply (the script did not
        run) loads the script and sends the call again.
        """
        if getattr(conn, "_sock", None) is not None:
            try:
                stale = conn.can_read()  # an unread reply or a closed connection
            except redis.ConnectionError:
                stale = True
            if stale:
                conn.disconnect()
        packed = self._pack(keys, args)
        for attempt in range(2):
            try:
                conn.send_packed_command([packed], check_health=False)
                return conn.read_response()  # disconnects itself on any I/O error
            except redis.exceptions.NoScriptError:
                if attempt:
                    raise
            except BaseException:
                conn.disconnect()
                raise
            conn.send_command("SCRIPT", "LOAD", self.source, check_health=False)
            conn.read_response()
        raise AssertionError("unreachable")  # pragma: no cover


#: Scripts whose second run changes nothing the first did not (see each script's header).
#: Nearly: a resent completion whose first run did execute reports its lock as "not ours"
#: (logged as a lost lock) and counts a closed breaker's outcome twice. Both are better
#: than what not resending costs: leases held to their TTL and, with Redis-only
#: idempotency records, a result that is never recorded. Not renewal: a renewal
#: resent after a timeout could extend a lease its holder already stopped believing
#: in (and blocks the heartbeat twice as long); the next one is a fresh call.
#: (``rollback`` is safe to run twice too; ``Plan.rollback`` resends it itself, with a
#: pause between sends.)
_IDEMPOTENT = frozenset({"complete", "fenced_set", "throttle"})


@cache
def script(name: str) -> Script:
    """The packaged script ``celery_reliable/lua/<name>.lua``.

    Admission, completion, rollback and renewal are frames: the guards' Lua
    fragments (``celery_reliable/guards/``) are composed into them here, once per
    process (:func:`celery_reliable.guards.compose`).
    """
    source = resources.files("celery_reliable").joinpath(f"lua/{name}.lua").read_text("utf-8")
    if name in guards.COMPOSED:
        source = guards.compose(source)
    return Script(name, source, idempotent=name in _IDEMPOTENT)
