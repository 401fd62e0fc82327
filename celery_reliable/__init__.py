"""celery-reliable: fleet-wide reliability guards for Celery tasks.

Subclass :class:`ReliableTask` (``@app.task(base=ReliableTask, ...)``) and set
options; see the README for each guard's guarantee and its limits.
"""

from __future__ import annotations

from . import metrics
from . import signals as _signals
from .backoff import Backoff
from .classify import http_status, is_retryable, retry_after
from .deadletter import DeadLetter, DeadLetters
from .errors import (
    ArgumentsNotCanonical,
    BulkheadFull,
    ConfigurationError,
    IdempotencyKeyMismatch,
    LockNotAcquired,
    PoisonMessage,
    Refusal,
    ReliableError,
    ReliableFault,
    ReplayedFailure,
    ResultNotSerializable,
    StaleFenceToken,
    StorageError,
    SupersededWrite,
)
from .fencing import Fence, RedisFence, check_postgres
from .idempotency import purge_expired
from .locks import FencedLock
from .schema import create_tables, metadata
from .status import breaker_state, bucket_tokens, bulkhead_stats
from .task import DROPPED, SKIPPED, Deferred, ReliableTask

__all__ = [
    "DROPPED",
    "SKIPPED",
    "ArgumentsNotCanonical",
    "Backoff",
    "BulkheadFull",
    "ConfigurationError",
    "DeadLetter",
    "DeadLetters",
    "Deferred",
    "Fence",
    "FencedLock",
    "IdempotencyKeyMismatch",
    "LockNotAcquired",
    "PoisonMessage",
    "RedisFence",
    "Refusal",
    "ReliableError",
    "ReliableFault",
    "ReliableTask",
    "ReplayedFailure",
    "ResultNotSerializable",
    "StaleFenceToken",
    "StorageError",
    "SupersededWrite",
    "breaker_state",
    "bucket_tokens",
    "bulkhead_stats",
    "check_postgres",
    "create_tables",
    "http_status",
    "is_retryable",
    "metadata",
    "metrics",
    "purge_expired",
    "retry_after",
]

__version__ = "0.1.0"

_signals.connect()
