"""The storage seam of the task pipeline: :class:`Store`, and :class:`RedisStore`.

Everything the pipeline (:mod:`celery_reliable.pipeline`) asks of the guards' shared
state goes through one small interface, shaped after the storage classes of
``limits`` and the rate-limit backends of Dramatiq: admit a plan, roll it back,
complete a release, renew held leases, mark a task id dead, throttle buckets, spend a
retry budget.
The pipeline's signatures carry no client type; a store says which exceptions
mean "unreachable" (:attr:`Store.errors`), which the pipeline fails closed on.
The CLI, the Prometheus scrape and the start-up check read status through it too
(the methods at the end: locks held, bucket levels, bulkhead slots, breaker
states, ping); the guard modules say which fields to read and how they decode.

:class:`RedisStore` is today's implementation: the composed Lua scripts on the
process's dedicated script connection (``scripts.script``: EVALSHA, cached), one
round trip per admission and per completion, an admission never resent (its
rollback, bounded and resent, undoes it instead). The process heartbeat
(``leases.Heartbeat``) renews every due lease in one round trip, sent once, on a
connection of the renewals' own (:class:`_Link`), so a stalled renewal and the
task's own calls never hold each other up.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import redis

from .guards.deliveries import mark_dead
from .scripts import own_connection, plain_pool, script

if TYPE_CHECKING:
    from .admission import Outcome, Plan, Release
    from .breaker import BreakerSpec
    from .bulkhead import TierStats
    from .guards.lock import LockInfo
    from .keys import KeySpace
    from .leases import Lease
    from .ratelimit import BucketSpec
    from .retrybudget import RetryBudget
    from .runtime import Runtime

__all__ = ["RedisStore", "Store", "store_for"]


class Store(Protocol):
    """Where the guards' state lives, as the pipeline uses it."""

    #: The exceptions meaning the store is unreachable or its reply was lost.
    errors: tuple[type[BaseException], ...]

    def admit(self, plan: Plan) -> Outcome:
        """Decide every guard of ``plan`` at once: all admitted, or nothing changed."""

    def rollback(self, plan: Plan, *, timeout: float | None = None) -> list[int]:
        """Undo what a failed :meth:`admit` of ``plan`` may have taken (by owner)."""

    def complete(self, release: Release) -> list[int]:
        """Settle what admission took; one result per entry of ``release``."""

    def renew(self, leases: Sequence[Lease], timeout: float) -> list[int]:
        """Extend each of ``leases`` by its ttl if its value still holds it: 1, else 0.

        All in one round trip, sent once and never resent, each socket wait at
        most ``timeout`` seconds; after any error the next call starts on a fresh
        connection (the last one may be out of step).
        """

    def interrupt(self) -> None:
        """Make a :meth:`renew` in flight in another thread fail now (best effort).

        For the heartbeat, when a lease comes whose timeout is shorter than the
        call's: a call stuck on a dead connection would hold the heartbeat's one
        thread past that lease's belief. The next call starts on a fresh connection.
        """

    def close(self) -> None:
        """Close the connections the store opened itself (its client stays open)."""

    def mark_dead(self, key: str, ttl: float) -> None:
        """Mark a task id's deliveries set dead-lettered for ``ttl`` seconds."""

    def throttle(self, keys: list[str], args: list[Any]) -> None:
        """Empty the buckets ``keys`` for a while (``throttle.lua``'s arguments)."""

    def spend_retry_budget(self, key: str, budget: RetryBudget, deposits: int) -> bool:
        """Credit ``deposits`` first executions and take one retry; False if spent."""

    # ---------------------------------------------- status reads (read-only)
    # For the CLI, the Prometheus scrape and the start-up check; what a key holds
    # and how it decodes is its guard module's (guards/<name>.py).

    def ping(self) -> None:
        """Return if the store answers; raise one of :attr:`errors` if not."""

    def held_locks(self, keys: KeySpace) -> list[LockInfo]:
        """Every lock lease of ``keys`` held now, in no particular order."""

    def bucket_tokens(self, key: str, spec: BucketSpec) -> float:
        """Tokens in the bucket ``key`` now (refilled to the store's clock)."""

    def bulkhead_stats(self, tiers: Mapping[str, tuple[str, str, str]]) -> dict[str, TierStats]:
        """Each tier's slots in use and tasks waiting now, and its counters, by its keys."""

    def breaker_state(self, key: str, spec: BreakerSpec) -> int:
        """The breaker ``key``'s state now: 0 closed, 1 open, 2 half-open."""


class _Link:
    """The renewals' own connection: the client's server and settings, no retries.

    Separate from the process's script channel, so the task's own calls keep
    their fast path and a stalled renewal never holds them up (nor they it).
    Its socket timeouts (connect and read) follow the shortest held lease; a
    changed timeout takes effect on a new connection (:func:`own_connection`).
    """

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._conn: Any = None
        self._timeout = -1.0

    def call(self, name: str, keys: list[str], args: list[Any], timeout: float) -> Any:
        """Run script ``name`` once, with socket timeouts of at most ``timeout`` seconds."""
        # A shorter timeout than asked is harmless: keep the connection unless the
        # timeout must shrink, or could grow more than twofold (leases come and go).
        conn = self._conn
        if conn is None or not timeout / 2 <= self._timeout <= timeout:
            self.close()
            conn = self._conn = own_connection(self._client, timeout)
            self._timeout = timeout
        # ``conn``, not ``self._conn``: close() from another thread (the heartbeat's
        # stop) may clear the attribute meanwhile; this call then still runs on the
        # connection it took (never on None: an AttributeError logged as an ERROR),
        # which nothing keeps afterwards.
        return script(name).call_once(conn, keys, args)

    def interrupt(self) -> None:
        """Shut the connection down under a call in flight in another thread: it fails now.

        Only the socket is shut down (the calling thread disconnects and drops the
        connection itself). A call still connecting is not interrupted.
        """
        sock = getattr(self._conn, "_sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):  # closed meanwhile: nothing to interrupt
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.disconnect()


class RedisStore:
    """:class:`Store` in Redis, through the composed Lua scripts (one round trip each)."""

    errors: tuple[type[BaseException], ...] = (redis.RedisError,)

    __slots__ = ("_renewals", "client")

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        #: the renewals' own connection (None: a client without a plain pool)
        self._renewals = _Link(client) if plain_pool(client) is not None else None

    def admit(self, plan: Plan) -> Outcome:
        return plan.admit(self.client)

    def rollback(self, plan: Plan, *, timeout: float | None = None) -> list[int]:
        if timeout is None:
            return plan.rollback(self.client)
        return plan.rollback(self.client, attempts=2, timeout=timeout)

    def complete(self, release: Release) -> list[int]:
        return release.run(self.client)

    def renew(self, leases: Sequence[Lease], timeout: float) -> list[int]:
        keys = [lease.key for lease in leases]
        args: list[Any] = ["".join(lease.kind for lease in leases)]
        for lease in leases:
            args += [lease.value, int(lease.ttl * 1000)]
        link = self._renewals
        if link is None:  # a client without a plain pool: its own timeouts and retries
            return [int(r) for r in script("renew")(self.client, keys, args)]
        try:
            return [int(r) for r in link.call("renew", keys, args, timeout)]
        except Exception:
            link.close()  # maybe out of step: the next attempt starts afresh
            raise

    def interrupt(self) -> None:
        if self._renewals is not None:
            self._renewals.interrupt()

    def close(self) -> None:
        if self._renewals is not None:
            self._renewals.close()

    def mark_dead(self, key: str, ttl: float) -> None:
        mark_dead(self.client, key, ttl)

    def throttle(self, keys: list[str], args: list[Any]) -> None:
        script("throttle")(self.client, keys, args)

    def spend_retry_budget(self, key: str, budget: RetryBudget, deposits: int) -> bool:
        from .retrybudget import spend

        granted, _ = spend(self.client, key, budget, deposits, True)
        return bool(granted)

    # ---------------------------------------------- status reads (read-only)

    def ping(self) -> None:
        self.client.ping()

    def held_locks(self, keys: KeySpace) -> list[LockInfo]:
        from .guards.lock import LockInfo, lease_prefix

        client = self.client
        pattern = _glob_escape(lease_prefix(keys)) + "*"
        names = [k.decode() if isinstance(k, bytes) else str(k)
                 for k in client.scan_iter(match=pattern, count=1000)]  # SCAN, never KEYS
        found: list[LockInfo] = []
        for start in range(0, len(names), 500):
            chunk = names[start:start + 500]
            pipe = client.pipeline(transaction=False)
            for key in chunk:
                pipe.get(key)
                pipe.pttl(key)
            replies = pipe.execute()
            for i, key in enumerate(chunk):
                value, ttl = replies[2 * i], replies[2 * i + 1]
                if value is None:
                    continue  # released or expired since the SCAN
                text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
                found.append(LockInfo.parse(key, text, int(ttl)))
        return found

    def bucket_tokens(self, key: str, spec: BucketSpec) -> float:
        from .guards.bucket import LEVEL_FIELDS, level

        fields = self.client.hmget(key, list(LEVEL_FIELDS))
        now_ms = 0 if fields[0] is None else _now_ms(self.client)  # a full bucket needs no clock
        return level(spec, fields, now_ms)

    def bulkhead_stats(self, tiers: Mapping[str, tuple[str, str, str]]) -> dict[str, TierStats]:
        from .guards.bulkhead import STATS_FIELDS, stats

        now_ms = _now_ms(self.client)
        out = {}
        for tier, (slots, waiting, counters) in tiers.items():
            pipe = self.client.pipeline(transaction=False)
            pipe.zcount(slots, now_ms, "+inf")  # scored by expiry
            pipe.zcount(waiting, now_ms, "+inf")
            pipe.hmget(counters, list(STATS_FIELDS))
            active, waiters, values = pipe.execute()
            out[tier] = stats(active, waiters, values)
        return out

    def breaker_state(self, key: str, spec: BreakerSpec) -> int:
        from .breaker import OPEN
        from .guards.breaker import STATE_FIELDS, state

        fields = self.client.hmget(key, list(STATE_FIELDS))
        # Only an open breaker's state depends on the clock.
        now_ms = _now_ms(self.client) if int(fields[0] or 0) == OPEN else 0
        return state(spec, fields, now_ms)


def store_for(runtime: Runtime) -> Store:
    """The store of ``runtime`` (its Redis client), made once."""
    store: Store | None = runtime.__dict__.get("_store")
    if store is None:
        store = runtime.__dict__["_store"] = RedisStore(runtime.redis)
    return store


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _now_ms(client: redis.Redis) -> int:
    """The server's clock, in ms (every guard's script uses it)."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000

