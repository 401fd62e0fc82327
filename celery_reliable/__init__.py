"""celery-reliable: fleet-wide reliability guards for Celery tasks.

Subclass :class:`ReliableTask` (``@app.task(base=ReliableTask, ...)``) and set
options; see the README for each guard's guarantee and its limits.
"""

from __future__ import annotations

from . import metrics
from . import signals as _signals
from .errors import (
    ArgumentsNotCanonical,
    BulkheadFull,
    ConfigurationError,
    IdempotencyKeyMismatch,
    LockNotAcquired,
    Refusal,
    ReliableError,
    ReliableFault,
    ReplayedFailure,
    ResultNotSerializable,
    StaleFenceToken,
    StorageError,
)
from .fencing import Fence, RedisFence, check_postgres
from .idempotency import purge_expired
from .locks import FencedLock
from .schema import create_tables, metadata
from .status import bucket_tokens, bulkhead_stats
from .task import DROPPED, SKIPPED, Deferred, ReliableTask

__all__ = [
    "DROPPED",
    "SKIPPED",
    "ArgumentsNotCanonical",
    "BulkheadFull",
    "ConfigurationError",
    "Deferred",
    "Fence",
    "FencedLock",
    "IdempotencyKeyMismatch",
    "LockNotAcquired",
    "RedisFence",
    "Refusal",
    "ReliableError",
    "ReliableFault",
    "ReliableTask",
    "ReplayedFailure",
    "ResultNotSerializable",
    "StaleFenceToken",
    "StorageError",
    "bucket_tokens",
    "bulkhead_stats",
    "check_postgres",
    "create_tables",
    "metadata",
    "metrics",
    "purge_expired",
]

__version__ = "0.1.0"

_signals.connect()
