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
Every exception pickles, so it survives the result backend and prefork pipes.
"""

from __future__ import annotations

from typing import Any

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

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions with keyword-only constructor arguments do not pickle
        # by default; rebuild from the message, keep the attributes.
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls: type[ReliableError], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    exc = Exception.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class Refusal(ReliableError):
    """A guard refused admission; the task did not run."""


class LockNotAcquired(Refusal):
    """The task's lock was held by someone else and ``lock_contention="fail"``."""

    def __init__(self, task_name: str, resource: str) -> None:
        super().__init__(f"{task_name}: lock {resource!r} is held by another execution")
        self.task_name = task_name
        self.resource = resource


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
        if current is None:
            detail = "the lock was lost before the write"
        else:
            detail = f"the resource has already accepted token {current}"
        super().__init__(f"stale fencing token {token} for {resource!r}: {detail}")
        self.resource = resource
        self.token = token
        self.current = current
