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

from .config import ReliableSettings
from .keys import KeySpace
from .scripts import script

__all__ = ["Heartbeat", "Lease", "Runtime", "runtime_for"]

log = logging.getLogger("celery_reliable")


class Lease:
    """Something this process holds in Redis until it lets go: a lock (kind ``L``).

    ``lost`` turns true when a renewal finds the lease gone or taken over, or
    when renewals kept failing past the lease's own expiry (we can no longer
    claim to hold it).
    """

    __slots__ = ("deadline", "describe", "key", "kind", "lost", "next_due", "ttl", "value")

    def __init__(
        self, kind: str, key: str, value: str, ttl: float, started: float, describe: str
    ) -> None:
        self.kind = kind
        self.key = key
        self.value = value
        self.ttl = ttl
        self.describe = describe
        self.lost = False
        self.deadline = started + ttl
        self.next_due = started + ttl / 3


class Heartbeat:
    """One daemon thread per process renewing every held lease about every ``ttl / 3``.

    Renewals of all due leases go out as one Lua call (``renew.lua``). If the
    process is paused (SIGSTOP, a long GC, a VM freeze) the thread is paused
    too, the lease expires, and the next renewal reports it lost.
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

    def held(self) -> int:
        with self._mutex:
            return len(self._leases)

    def _run(self) -> None:
        while not self._stopped:
            self._wake.clear()  # before reading: an add() from now on interrupts the wait
            with self._mutex:
                leases = list(self._leases)
            now = self._clock()
            due = [lease for lease in leases if lease.next_due <= now]
            if due:
                self.renew(due)
            with self._mutex:
                pending = [lease.next_due for lease in self._leases]
                now = self._clock()
                wait = max(0.01, min((min(pending) - now) if pending else 5.0, 5.0))
                self._wake_at = now + wait
            self._wake.wait(timeout=wait)

    def renew(self, leases: list[Lease]) -> None:
        """Renew ``leases`` now in one round trip; mark the ones that are gone."""
        sent = self._clock()
        plan = "".join(lease.kind for lease in leases)
        args: list[Any] = [plan]
        for lease in leases:
            args += [lease.value, int(lease.ttl * 1000)]
        try:
            results = script("renew")(self._client, [lease.key for lease in leases], args)
        except redis.RedisError as exc:
            for lease in leases:
                lease.next_due = sent + min(1.0, lease.ttl / 10)
                if sent >= lease.deadline and not lease.lost:
                    self._lose(lease, f"renewals failed past its expiry ({exc!r})")
            return
        for lease, ok in zip(leases, results, strict=True):
            with self._mutex:
                if lease not in self._leases:
                    continue  # completed while the renewal was in flight: not lost
            if ok:
                lease.deadline = sent + lease.ttl
                lease.next_due = sent + lease.ttl / 3
            elif not lease.lost:
                self._lose(lease, "it expired or was taken over")

    def _lose(self, lease: Lease, why: str) -> None:
        lease.lost = True
        self.discard(lease)
        log.warning("celery-reliable: %s was lost: %s", lease.describe, why)


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
        self._engine: Any = None
        self._engine_mutex = threading.Lock()

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
