"""Every exception celery-reliable raises, rooted at :class:`ReliableError`.

::

    ReliableError
    ├── Refusal                     a guard said "not now" (control flow, never a fault)
    │   ├── LockNotAcquired         lock busy and ``lock_contention="fail"``
    │   └── BulkheadFull            a full tier whose policy fails, or a wait past its bounds
    └── ReliableFault               something is wrong (chained ``from`` the cause)
        ├── ConfigurationError      a bad task option or ``reliable_*`` setting
        │   └── ArgumentsNotCanonical   an idempotent call's arguments have no canonical form
        ├── StorageError            Redis or PostgreSQL could not be reached or answered oddly
        ├── StaleFenceToken         a fenced write's token was lower, or equal but another holder's
        │   └── SupersededWrite     the same holder's later write was accepted first
        ├── IdempotencyKeyMismatch  an idempotency key reused with other arguments
        ├── ResultNotSerializable   an idempotent task returned a value JSON cannot store
        ├── ReplayedFailure         a kept terminal failure, replayed to a duplicate (or a
        │                           dead-lettered task id's, to a redelivery)
        └── PoisonMessage           its workers died running it more than max_redeliveries times

Refusals are translated into Celery's ``Retry``/``Ignore`` in one place
(:meth:`celery_reliable.task.ReliableTask.__call__`); faults propagate.
Every exception keeps its constructor arguments in ``args``, so it pickles
and Celery's JSON result backend rebuilds it with its type and fields.
"""

from __future__ import annotations

__all__ = [
    "ArgumentsNotCanonical",
    "BulkheadFull",
    "ConfigurationError",
    "IdempotencyKeyMismatch",
    "LockNotAcquired",
    "PoisonMessage",
    "Refusal",
    "ReliableError",
    "ReliableFault",
    "ReplayedFailure",
    "ResultNotSerializable",
    "StaleFenceToken",
    "StorageError",
    "SupersededWrite",
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


class BulkheadFull(Refusal):
    """A bulkhead tier was full: policy ``fail``, too many waiting, or waited too long."""

    def __init__(self, task_name: str, tier: str, reason: str) -> None:
        super().__init__(task_name, tier, reason)
        self.task_name = task_name
        self.tier = tier
        self.reason = reason

    def __str__(self) -> str:
        why = {
            "fail": "the tier is full and its policy is 'fail'",
            "queue": "the tier is full and its waiting queue too",
            "timeout": "the task waited longer than the tier's timeout",
        }.get(self.reason, self.reason)
        return f"{self.task_name}: bulkhead {self.tier!r} refused the task: {why}"


class ReliableFault(ReliableError):
    """Something is misconfigured or broken; never a normal outcome."""


class ConfigurationError(ReliableFault, ValueError):
    """A task option or ``reliable_*`` setting is invalid.

    The message always names the task (or setting) and the option.
    """


class StorageError(ReliableFault):
    """Redis or PostgreSQL failed; the original exception is ``__cause__``."""


class StaleFenceToken(ReliableFault):
    """A write carried a fencing token lower than one the resource already accepted,
    or equal to it but from another (or an unknown) holder.

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
        elif self.current == self.token:
            detail = "another holder (or one unknown) has already written with that token"
        else:
            detail = f"the resource has already accepted token {self.current}"
        return f"stale fencing token {self.token} for {self.resource!r}: {detail}"


class SupersededWrite(StaleFenceToken):
    """A holder's fenced write reached the resource after a later write of that same holder.

    Each fenced write carries the holder's write number ``seq`` (strictly
    increasing per holder); the resource keeps the last accepted one and refuses
    an older one, so a write that arrives out of order never undoes a later
    write. Not a lost lock: the holder still holds its token (``current`` equals
    ``token``), its write numbered ``current_seq`` stands. Seen by a holder whose
    threads write concurrently (the lower number lost the race), or who passes
    ``seq`` out of order; a delayed copy of a resent write is refused the same
    way, but nobody is waiting for that reply. Also raised for a write that
    carries the number of the accepted one with another value (``seq`` equals
    ``current_seq``: two processes or callers drew one number, the first to
    arrive keeps it).
    """

    def __init__(self, resource: str, token: int, seq: int, current_seq: int) -> None:
        super().__init__(resource, token, token)
        self.args = (resource, token, seq, current_seq)
        self.seq = seq
        self.current_seq = current_seq

    def __str__(self) -> str:
        return (f"fenced write #{self.seq} with token {self.token} for {self.resource!r} "
                f"arrived after the same holder's write #{self.current_seq}: refused, the "
                "later write stands")


class ArgumentsNotCanonical(ConfigurationError):
    """An idempotent task was called with an argument that has no canonical JSON form."""

    def __init__(self, task_name: str, detail: str) -> None:
        super().__init__(task_name, detail)
        self.task_name = task_name
        self.detail = detail

    def __str__(self) -> str:
        return (
            f"{self.task_name}: option 'idempotency_key' needs canonical arguments: {self.detail}"
        )


class IdempotencyKeyMismatch(ReliableFault):
    """The idempotency key was used before with different arguments; the task did not run."""

    def __init__(self, task_name: str, key_digest: str) -> None:
        super().__init__(task_name, key_digest)
        self.task_name = task_name
        self.key_digest = key_digest

    def __str__(self) -> str:
        return (
            f"{self.task_name}: idempotency key {self.key_digest[:12]}… was already used "
            "with different arguments"
        )


class ResultNotSerializable(ReliableFault):
    """An idempotent task's result cannot be stored as JSON; nothing was recorded."""

    def __init__(self, task_name: str, detail: str) -> None:
        super().__init__(task_name, detail)
        self.task_name = task_name
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.task_name}: result is not JSON-serialisable ({self.detail})"


class ReplayedFailure(ReliableFault):
    """A duplicate of a task whose terminal failure was kept (``idempotency_keep_failures``).

    Also the failure stored for a redelivery of a dead-lettered task id when the
    result backend no longer held that task id's final state (``exc_type``
    ``"DeadLettered"``; the letter in ``reliable_dead_letters`` has the original).
    """

    def __init__(self, task_name: str, exc_type: str, message: str) -> None:
        super().__init__(task_name, exc_type, message)
        self.task_name = task_name
        self.exc_type = exc_type
        self.message = message

    def __str__(self) -> str:
        return f"{self.task_name}: replayed failure {self.exc_type}: {self.message}"


class PoisonMessage(ReliableFault):
    """A task whose workers kept dying while running it; dead-lettered, not run again."""

    def __init__(self, task_name: str, deliveries: int) -> None:
        super().__init__(task_name, deliveries)
        self.task_name = task_name
        self.deliveries = deliveries

    def __str__(self) -> str:
        return (f"{self.task_name}: delivered {self.deliveries} times without finishing "
                "(worker lost each time); dead-lettered as a poison message")
