"""Leases this process holds, and the heartbeat that renews them.

A :class:`Lease` is something a process holds in the store until it lets go (a
lock, an idempotency record in progress, a bulkhead slot, a half-open breaker
probe), with the holder's belief in it decided from the local monotonic clock. The
:class:`Heartbeat` renews every held lease in the background through the store
(:meth:`celery_reliable.storage.Store.renew`: one round trip per beat, on a
connection of its own).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .storage import Store

__all__ = ["Heartbeat", "Lease", "heartbeat_timeout", "lease_margin"]

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

    Renewals of all due leases go out as one call to the store
    (:meth:`~celery_reliable.storage.Store.renew`; in Redis one Lua call,
    ``renew.lua``, on a connection of the renewals' own), whose socket timeout is
    :func:`heartbeat_timeout` of the shortest held lease. A renewal is never
    resent: after a timeout or a connection error the store drops that connection,
    and the next attempt is a fresh call on a fresh connection, scheduled
    again by the loop (at once after a timeout; ``min(1, ttl / 10)`` after a
    fast error). A lease taken while a call with a longer timeout than its own
    is in flight interrupts that call (:meth:`~celery_reliable.storage.Store.interrupt`):
    stuck on a dead connection, it would hold the one thread past the new lease's
    belief. A lease whose belief ended (:class:`Lease`) is dropped and
    logged, never renewed again: the server lets it expire.

    If the process is paused (SIGSTOP, a long GC, a VM freeze) the thread is
    paused too; the lease's belief ends by the clock, whatever Redis says later.
    """

    def __init__(self, store: Store, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._clock = clock
        self._leases: set[Lease] = set()
        self._mutex = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._wake_at = 0.0  # when the thread will next look, if nothing wakes it
        #: the socket timeout of the renewal in flight (None: none is)
        self._inflight: float | None = None

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
            # A renewal in flight with a longer timeout than this lease's may keep the
            # one thread stuck past this lease's belief (a dead connection): abandon it,
            # the next call starts afresh with the shorter timeout. Under the mutex, so
            # only the call that was in flight when the lease came is interrupted.
            if self._inflight is not None and heartbeat_timeout(lease.ttl) < self._inflight:
                self._store.interrupt()
        if wake:
            self._wake.set()

    def discard(self, lease: Lease) -> None:
        with self._mutex:
            self._leases.discard(lease)

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        self._store.close()

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
        with self._mutex:  # the timeout and "in flight" at once: see add()
            held = [lease.ttl for lease in self._leases]
            timeout = heartbeat_timeout(min([*held, *(lease.ttl for lease in leases)]))
            self._inflight = timeout
        sent = self._clock()
        try:
            try:
                results = self._store.renew(leases, timeout)
            finally:
                with self._mutex:
                    self._inflight = None
        except Exception as exc:
            # Any error is a failed renewal, not only the store's: one escaping here
            # (a TypeError from a redis-py version, a bug) would end the thread and
            # every lease of the process would expire at its first TTL.
            for lease in leases:
                lease.next_due = sent + min(1.0, lease.ttl / 10)
            if isinstance(exc, self._store.errors):
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
