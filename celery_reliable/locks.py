"""Fencing-token locks usable outside tasks (the task pipeline uses the same scripts).

>>> lock = FencedLock(redis.Redis(), "order:42", ttl=30)
>>> token = lock.acquire()      # int fencing token, or None if held elsewhere
>>> ...                         # pass `token` (and `holder=lock.holder`) to every write
>>> lock.release()              # True if it was still ours

Acquire is one round trip (``admit.lua``), release is one (``complete.lua``).
"""

from __future__ import annotations

import contextlib
import secrets
import time
from types import TracebackType

import redis

from . import metrics
from .admission import INTERRUPTED_ROLLBACK_TIMEOUT, Admitted, Plan, Release
from .errors import LockNotAcquired
from .guards import lock as lock_guard
from .keys import KeySpace
from .scripts import script

__all__ = ["FencedLock"]


class FencedLock:
    """A lease on ``resource`` with a fencing token; not re-entrant, not thread-shared.

    Args:
        client: a redis-py client.
        resource: the resource name (hashed before it becomes a key).
        ttl: lease time in seconds; call :meth:`extend` to keep it longer.
        prefix: the ``reliable_key_prefix`` shared with the tasks.
        label: what ``celery reliable locks`` shows for this lock (at most 60
            characters are kept). Not derived from ``resource``, which may
            carry user data: without a label the command shows only the
            resource's digest.
    """

    def __init__(
        self, client: redis.Redis, resource: str, *, ttl: float = 30.0, prefix: str = "reliable",
        label: str | None = None,
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"FencedLock: ttl must be > 0 seconds, got {ttl!r}")
        self.client = client
        self.resource = resource
        self.ttl = float(ttl)
        self.label = label
        self._keys = KeySpace(prefix)
        self._lock_key = self._keys.lock(resource)
        self._fence_key = self._keys.fence(resource)  # hashed once per lock object
        self._value: str | None = None
        self.token: int | None = None
        #: this acquisition's identity (its owner): pass it to the fences as ``holder=``,
        #: so that they accept an equal token from this acquisition only
        self.holder: str | None = None

    def acquire(self, owner: str | None = None) -> int | None:
        """Try once; return the fencing token, or None if someone else holds the lock.

        A Redis error is raised, after undoing what the attempt may have taken
        (the request is never resent: its reply may be lost after it ran, or the
        request may reach Redis only later, when the undo makes it do nothing).
        The same undo, bounded to about two seconds, runs when the wait is
        interrupted (KeyboardInterrupt, a soft time limit), which then propagates.

        ``owner``: who holds it (``celery reliable locks`` shows it; a ``/``
        separates a task id from the rest), random by default; :attr:`holder`
        is set to it. The lease also records a nonce of this call (not shown):
        the undo compares the whole holder, so the undo of an earlier acquire
        with the same owner, reaching Redis only after this one (every send of
        it delayed in the network), leaves this one's lock alone.
        """
        owner = owner or secrets.token_hex(8)
        plan = Plan()
        index = lock_guard.plan(plan, self._lock_key, self._fence_key, owner, self.ttl,
                                label=self.label or "", nonce=secrets.token_hex(4))
        try:
            result = plan.admit(self.client)
        except redis.RedisError:
            # Its reply may be lost after it took the lock: release it (if it is ours).
            with contextlib.suppress(redis.RedisError):
                plan.rollback(self.client)
            raise
        except BaseException:
            with contextlib.suppress(Exception):
                plan.rollback(self.client, attempts=2, timeout=INTERRUPTED_ROLLBACK_TIMEOUT)
            raise
        if not isinstance(result, Admitted):
            return None
        self.token = result.results[index]
        self.holder = owner
        self._value = lock_guard.lease_value(plan, index, self.token)
        return self.token

    def acquire_blocking(self, timeout: float, poll: float = 0.05) -> int:
        """Retry until ``timeout`` seconds have passed; raise LockNotAcquired then."""
        started = time.monotonic()
        deadline = started + timeout
        while True:
            token = self.acquire()
            if token is not None:
                metrics.observe("reliable_lock_wait_seconds", time.monotonic() - started)
                return token
            if time.monotonic() >= deadline:
                raise LockNotAcquired("FencedLock", self.resource)
            time.sleep(poll)

    def release(self) -> bool:
        """Release if still ours; True if released. Safe to call twice."""
        if self._value is None:
            return False
        release = Release()
        lock_guard.release(release, self._lock_key, self._value)
        self._value = None
        return release.run(self.client)[0] == 1

    def extend(self, ttl: float | None = None) -> bool:
        """Reset the lease to ``ttl`` (default: the lock's ttl) if still ours."""
        if self._value is None:
            return False
        ms = int((ttl or self.ttl) * 1000)
        return bool(script("renew")(self.client, [self._lock_key], ["L", self._value, ms])[0])

    def __enter__(self) -> int:
        token = self.acquire()
        if token is None:
            raise LockNotAcquired("FencedLock", self.resource)
        return token

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
