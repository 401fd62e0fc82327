"""Every exception celery-reliable raises, rooted at :class:`ReliableError`.

::

    ReliableError
    ├── Refusal                 a guard said "not now" (control flow, never a fault)
    │   └── LockNotAcquired     lock busy and ``lock_contention="fail"``
    └── ReliableFault           something is wrong (chained ``from`` the cause)
        ├── ConfigurationError  a bad task option or ``reliable_*`` setting
        ├── StorageError        Redis or PostgreSQL could not be reached or answered oddly
        └── StaleFenceToken     a fenced write carried a token lower than one already accepted

Refusals are translated into Celery's ``Retry``/``Ignore`` in one place
(:meth:`celery_reliable.task.ReliableTask.__call__`); faults propagate.
Every exception keeps its constructor arguments in ``args``, so it pickles
and Celery's JSON result backend rebuilds it with its type and fields.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "LockNotAcquired",
    "Refusal",
    "ReliableError",
    "ReliableFault",
    "StaleFenceToken",
    "StorageError",
]


class ReliableError(Exception):
    """Root of every celery-reliable exception."""


class Refusal(ReliableError):
    """A guard refused admission; the task did not run."""


class LockNotAcquired(Refusal):
    """The task's lock was held by someone else and ``lock_contention="fail"``."""

    def __init__(self, task_name: str, resource: str) -> None:
        super().__init__(task_name, resource)
        self.task_name = task_name
        self.resource = resource

    def __str__(self) -> str:
        return f"{self.task_name}: lock {self.resource!r} is held by another execution"


class ReliableFault(ReliableError):
    """Something is misconfigured or broken; never a normal outcome."""


class ConfigurationError(ReliableFault, ValueError):
    """A task option or ``reliable_*`` setting is invalid.

    The message always names the task (or setting) and the option.
    """


class StorageError(ReliableFault):
    """Redis or PostgreSQL failed; the original exception is ``__cause__``."""


class StaleFenceToken(ReliableFault):
    """A write carried a fencing token lower than one the resource already accepted.

    The writer lost its lock (paused, partitioned, expired) and a newer holder
    has written since; the write was refused and nothing was changed.
    """

    def __init__(self, resource: str, token: int, current: int | None) -> None:
        super().__init__(resource, token, current)
        self.resource = resource
        self.token = token
        self.current = current

    def __str__(self) -> str:
        if self.current is None:
            detail = "the lock was lost before the write"
        else:
            detail = f"the resource has already accepted token {self.current}"
        return f"stale fencing token {self.token} for {self.resource!r}: {detail}"
