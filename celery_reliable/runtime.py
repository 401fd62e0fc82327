"""Per-process state: Redis client, database engine and the lease heartbeat.

One :class:`Runtime` exists per (app, process). It is created lazily on first
use *in the process that uses it*, so nothing opened before a prefork fork is
shared with the children; ``worker_process_init`` drops whatever a child
inherited. It is never a module global configured by whichever app comes
first: two apps in one process get two runtimes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import redis

from .classify import is_missing_table, sqlstate
from .config import ReliableSettings
from .errors import ConfigurationError
from .health import StoreHealth
from .keys import KeySpace
from .scripts import own_connection, plain_pool, script

__all__ = ["Heartbeat", "Lease", "Runtime", "heartbeat_timeout", "lease_margin", "runtime_for"]

log = logging.getLogger("celery_reliable")


#: Part of a lease's time a holder gives up to clock-rate error: the worker's
#: monotonic clock and the Redis server's clock (which times the key's expiry) are
#: each slewed by NTP at most 500 ppm, so together they disagree on a duration by
#: at most 0.1 %; 1 % leaves a tenfold margin. A clock that *steps* is outside
#: this bound (see the README, "What fencing guarantees").
LEASE_DRIFT = 0.01

#: Seconds a holder gives up to scheduling: between reading ``lost`` and its write
#: leaving the process, a loaded worker spends a GIL switch or two (5 ms each) and
#: a thread wake-up; 50 ms covers that with room to spare. Longer pauses (GC, a
#: frozen VM) are unbounded: that is what the resource's token check is for.
LEASE_SLACK = 0.05


def lease_margin(ttl: float) -> float:
    """Seconds before the server's expiry at which a holder stops believing it holds a lease.

    ``LEASE_DRIFT * ttl + LEASE_SLACK``, at most half the ttl (a belief must
    outlast the first renewal at ``ttl / 3``). E.g. 0.08 s for a 3 s lease,
    0.35 s for 30 s.
    """
    return min(ttl / 2, LEASE_DRIFT * ttl + LEASE_SLACK)


class Lease:
    """Something this process holds in Redis until it lets go.

    Kinds: ``L`` a lock, ``I`` an idempotency record in progress, ``K`` a
    bulkhead slot, ``C`` a half-open breaker probe.

    The holder's *belief* is decided locally, from the monotonic clock: the
    server cannot expire the lease before ``ttl`` has passed since the send
    time of the last call that set it (the admission, then each renewal whose
    reply confirmed it), so the belief ends ``margin`` earlier
    (:func:`lease_margin`, for clock-rate error and scheduling). Once that
    moment passes, or a renewal finds the lease gone or taken over, ``lost``
    is true and stays true: nothing waits for Redis to say so, and a renewal
    that succeeds later does not bring the belief back. Letting go of the
    lease (completion, ``retry()``: :meth:`end`) ends the belief too, before
    the release is sent: from then on another holder may take it.
    """

    __slots__ = ("_ended", "confirmed", "describe", "ended_why", "key", "kind", "margin",
                 "next_due", "ttl", "value")

    def __init__(
        self, kind: str, key: str, value: str, ttl: float, started: float, describe: str
    ) -> None:
        self.kind = kind
        self.key = key
        self.value = value
        self.ttl = ttl
        self.describe = describe
        #: monotonic send time of the last call the server confirmed (first: the admission)
        self.confirmed = started
        self.margin = lease_margin(ttl)
        self.next_due = started + ttl / 3
        self._ended = False
        #: why the belief ended ("released", "expired or taken over", "clock"); None: held
        self.ended_why: str | None = None

    @property
    def belief_ends(self) -> float:
        """Monotonic time at which this process stops believing it holds the lease."""
        return self.confirmed + self.ttl - self.margin

    @property
    def lost(self) -> bool:
        """True once the belief ended (clock) or a renewal found the lease gone; sticky."""
        if not self._ended and time.monotonic() >= self.belief_ends:
            self.lose("clock")
        return self._ended

    def lose(self, why: str = "expired or taken over") -> None:
        """End the belief now (a renewal found the lease expired or taken over); sticky.

        The first reason is kept: a lease released after its belief ended by the
        clock stays ended by the clock.
        """
        if not self._ended:
            self._ended = True
            self.ended_why = why

    def end(self) -> None:
        """This process lets go of the lease (released, or about to be): the belief ends now."""
        self.lose("released")

    def confirm(self, sent: float) -> None:
        """A renewal sent at ``sent`` extended the lease: the belief lasts from there."""
        if not self.lost and sent > self.confirmed:
            self.confirmed = sent


#: Upper bound of the heartbeat's socket timeout, seconds (for long leases).
HEARTBEAT_TIMEOUT_MAX = 5.0


def heartbeat_timeout(shortest_ttl: float) -> float:
    """The heartbeat's socket timeout: a quarter of the shortest held lease, at most 5 s.

    Below ``ttl / 3`` so that a renewal sent at ``ttl / 3`` and lost in a
    stalled link is abandoned early enough for a fresh attempt, on a fresh
    connection, before the belief ends.
    """
    return min(HEARTBEAT_TIMEOUT_MAX, shortest_ttl / 4)


class Heartbeat:
    """One daemon thread per process renewing every held lease about every ``ttl / 3``.

    Renewals of all due leases go out as one Lua call (``renew.lua``) on the
    heartbeat's own connection, whose socket timeout is
    :func:`heartbeat_timeout` of the shortest held lease. A renewal is never
    resent: after a timeout or a connection error the connection is dropped,
    and the next attempt is a fresh call on a fresh connection, scheduled
    again by the loop (at once after a timeout; ``min(1, ttl / 10)`` after a
    fast error). A lease whose belief ended (:class:`Lease`) is dropped and
    logged, never renewed again: the server lets it expire.

    If the process is paused (SIGSTOP, a long GC, a VM freeze) the thread is
    paused too; the lease's belief ends by the clock, whatever Redis says later.
    """

    def __init__(self, client: redis.Redis, clock: Callable[[], float] = time.monotonic) -> None:
        self._client = client
        self._clock = clock
        self._leases: set[Lease] = set()
        self._mutex = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._wake_at = 0.0  # when the thread will next look, if nothing wakes it
        self._link = _link(client)

    @property
    def timeout(self) -> float:
        """The socket timeout of the next renewal, seconds (see :func:`heartbeat_timeout`)."""
        with self._mutex:
            ttls = [lease.ttl for lease in self._leases]
        return heartbeat_timeout(min(ttls)) if ttls else HEARTBEAT_TIMEOUT_MAX

    def add(self, lease: Lease) -> None:
        with self._mutex:
            self._leases.add(lease)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="celery-reliable-heartbeat", daemon=True
                )
                self._thread.start()
            # Wake the thread only if this lease is due before its next wake-up:
            # a wake-up per task would cost a context switch per task.
            wake = lease.next_due < self._wake_at
        if wake:
            self._wake.set()

    def discard(self, lease: Lease) -> None:
        with self._mutex:
            self._leases.discard(lease)

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        if self._link is not None:
            self._link.close()

    def held(self) -> int:
        with self._mutex:
            return len(self._leases)

    def _run(self) -> None:
        while not self._stopped:
            try:
                self._beat()
            except Exception:  # never let the thread die: leases would expire mid-run
                log.exception("celery-reliable: heartbeat error; going on")
                self._wake.wait(timeout=0.1)  # a bug: do not spin

    def _beat(self) -> None:
        """Once: drop leases whose belief ended, renew the due ones, wait for the next."""
        self._wake.clear()  # before reading: an add() from now on interrupts the wait
        with self._mutex:
            leases = list(self._leases)
        for lease in leases:
            if lease.lost:  # the belief ended by the clock: never renew it again
                self._lose(lease, f"no renewal was confirmed within {lease.ttl:g}s "
                                  f"- {lease.margin:g}s")
        now = self._clock()
        due = [lease for lease in leases if not lease.lost and lease.next_due <= now]
        if due:
            self.renew(due)
        with self._mutex:
            # wake for the next renewal, or when a belief ends (to log it)
            pending = [min(lease.next_due, lease.belief_ends) for lease in self._leases]
            now = self._clock()
            wait = max(0.01, min((min(pending) - now) if pending else 5.0, 5.0))
            self._wake_at = now + wait
        self._wake.wait(timeout=wait)

    def renew(self, leases: list[Lease]) -> None:
        """Renew ``leases`` now in one round trip, sent once; mark the ones that are gone."""
        timeout = min(self.timeout, heartbeat_timeout(min(lease.ttl for lease in leases)))
        sent = self._clock()
        plan = "".join(lease.kind for lease in leases)
        args: list[Any] = [plan]
        for lease in leases:
            args += [lease.value, int(lease.ttl * 1000)]
        keys = [lease.key for lease in leases]
        try:
            if self._link is not None:
                results = self._link.call("renew", keys, args, timeout)
            else:  # a client without a plain pool: its own timeouts and retries
                results = script("renew")(self._client, keys, args)
        except Exception as exc:
            # Any error is a failed renewal, not only a RedisError: one escaping here
            # (a TypeError from a redis-py version, a bug) would end the thread and
            # every lease of the process would expire at its first TTL.
            if self._link is not None:
                self._link.close()  # maybe out of step: the next attempt starts afresh
            for lease in leases:
                lease.next_due = sent + min(1.0, lease.ttl / 10)
            if isinstance(exc, redis.RedisError):
                log.info("celery-reliable: lease renewal failed (%r); next attempt on a new "
                         "connection", exc)
            else:
                log.error("celery-reliable: lease renewal failed (%r); next attempt on a new "
                          "connection", exc, exc_info=True)
            return
        for lease, ok in zip(leases, results, strict=True):
            with self._mutex:
                if lease not in self._leases:
                    continue  # completed while the renewal was in flight: not lost
            if ok:
                lease.confirm(sent)
                lease.next_due = sent + lease.ttl / 3
            elif not lease.lost:
                lease.lose()
                self._lose(lease, "it expired or was taken over")

    def _lose(self, lease: Lease, why: str) -> None:
        with self._mutex:
            if lease not in self._leases:
                return  # released meanwhile: nothing to report
            self._leases.discard(lease)
        log.warning("celery-reliable: %s was lost: %s", lease.describe, why)


class _Link:
    """The heartbeat's own connection: the client's server and settings, no retries.

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
        if self._conn is None or not timeout / 2 <= self._timeout <= timeout:
            self.close()
            self._conn = own_connection(self._client, timeout)
            self._timeout = timeout
        return script(name).call_once(self._conn, keys, args)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.disconnect()


def _link(client: redis.Redis) -> _Link | None:
    """A :class:`_Link` for ``client``, or None if it has no plain pool to copy settings from."""
    return _Link(client) if plain_pool(client) is not None else None


class Runtime:
    """Connections and the heartbeat of one app in one process."""

    def __init__(self, app: Any) -> None:
        self.pid = os.getpid()
        self.settings = ReliableSettings.from_conf(app.conf)
        self.keys = KeySpace(self.settings.key_prefix)
        self.redis: redis.Redis = redis.Redis.from_url(
            self.settings.redis_url,
            socket_connect_timeout=5,
            socket_timeout=self.settings.redis_socket_timeout,
            health_check_interval=30,
        )
        self.heartbeat = Heartbeat(self.redis)
        self.health = StoreHealth(self.settings)  # loud, rate-limited store outages
        self._engine: Any = None
        self._engine_mutex = threading.Lock()
        self._tables_ready = False
        self.migrate_command = f"celery -A {getattr(app, 'main', None) or 'proj'} reliable migrate"

    @property
    def engine(self) -> Any:
        """SQLAlchemy engine on ``reliable_database_url``, created on first use."""
        if self._engine is None:
            with self._engine_mutex:
                if self._engine is None:
                    from .schema import make_engine

                    self._engine = make_engine(
                        self.settings.database_url,
                        lock_timeout=self.settings.database_lock_timeout,
                        pool_size=self.settings.database_pool_size,
                        max_overflow=self.settings.database_pool_size,
                    )
        return self._engine

    def task_engine(self) -> Any:
        """:attr:`engine`, with celery-reliable's tables ready: for the task pipeline.

        On first use in this process (and again after :meth:`schema_problem` found one missing),
        ``reliable_create_tables`` (default on) creates the tables that do not
        exist yet (:func:`~celery_reliable.schema.create_tables`: one short
        transaction, serialised across processes by an advisory lock; threads
        racing here are serialised by it too). Raises SQLAlchemy's error while
        PostgreSQL is unreachable (the next use tries again), and
        ``ConfigurationError`` when PostgreSQL refuses to create them (grants).
        The CLI and ``DeadLetters`` use :attr:`engine`: they never create tables.
        """
        engine = self.engine
        if not self._tables_ready:
            if self.settings.create_tables:
                from sqlalchemy.exc import SQLAlchemyError

                from .schema import create_tables

                try:
                    create_tables(engine)
                except SQLAlchemyError as exc:
                    if (sqlstate(exc) or "").startswith("42"):  # permission, schema
                        detail = " ".join(str(getattr(exc, "orig", exc)).split())
                        raise ConfigurationError(
                            f"celery-reliable could not create its PostgreSQL tables ({detail}); "
                            "create them with "
                            f"`{self.migrate_command}` as a user allowed to, or set "
                            "reliable_create_tables=False and manage them yourself"
                        ) from exc
                    raise
            self._tables_ready = True
        return engine

    def schema_problem(self, exc: BaseException) -> bool:
        """Sort an error of the pipeline's own statement: False if it is no schema problem.

        A missing table (dropped, or never created) returns True when
        ``reliable_create_tables`` is on: the next :meth:`task_engine` creates
        it again. Otherwise a missing table, or any other error of class 42
        (permission, undefined column), raises ``ConfigurationError`` naming the
        migrate command: a schema problem is never waited out.
        """
        code = sqlstate(exc) or ""
        if is_missing_table(exc):
            self._tables_ready = False
            if self.settings.create_tables:
                return True
        elif not code.startswith("42"):
            return False
        detail = " ".join(str(getattr(exc, "orig", exc)).split())
        if is_missing_table(exc):
            message = (f"celery-reliable's PostgreSQL tables are missing ({detail}); create them "
                       f"with `{self.migrate_command}` (reliable_create_tables is False)")
        else:
            message = (f"PostgreSQL refused celery-reliable's statement on its tables ({detail}); "
                       f"create them with `{self.migrate_command}` and grant the user of "
                       "reliable_database_url access to them")
        raise ConfigurationError(message) from exc

    def close(self) -> None:
        self.heartbeat.stop()
        if self._engine is not None:
            self._engine.dispose()
        self.redis.close()


_runtimes: weakref.WeakKeyDictionary[Any, Runtime] = weakref.WeakKeyDictionary()
_runtimes_mutex = threading.Lock()


def runtime_for(app: Any) -> Runtime:
    """The runtime of ``app`` in this process, created after any fork."""
    rt = _runtimes.get(app)
    if rt is not None and rt.pid == os.getpid():
        return rt
    with _runtimes_mutex:
        rt = _runtimes.get(app)
        if rt is None or rt.pid != os.getpid():
            rt = Runtime(app)
            _runtimes[app] = rt
        return rt


def forget_inherited() -> None:
    """Drop runtimes inherited through fork without touching their sockets."""
    with _runtimes_mutex:
        for app in list(_runtimes):
            if _runtimes[app].pid != os.getpid():
                del _runtimes[app]


def close_all() -> None:
    with _runtimes_mutex:
        for app in list(_runtimes):
            rt = _runtimes.pop(app)
            if rt.pid == os.getpid():
                rt.close()
