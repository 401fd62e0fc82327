"""celery-reliable: fleet-wide reliability guards for Celery tasks.

Subclass :class:`ReliableTask` (``@app.task(base=ReliableTask, ...)``) and set
options; see the README for each guard's guarantee and its limits.
"""

from __future__ import annotations

from . import signals as _signals
from .errors import (
    ConfigurationError,
    LockNotAcquired,
    Refusal,
    ReliableError,
    ReliableFault,
    StaleFenceToken,
    StorageError,
)
from .fencing import Fence, RedisFence, check_postgres
from .locks import FencedLock
from .schema import create_tables, metadata
from .task import SKIPPED, Deferred, ReliableTask

__all__ = [
    "SKIPPED",
    "ConfigurationError",
    "Deferred",
    "Fence",
    "FencedLock",
    "LockNotAcquired",
    "RedisFence",
    "Refusal",
    "ReliableError",
    "ReliableFault",
    "ReliableTask",
    "StaleFenceToken",
    "StorageError",
    "check_postgres",
    "create_tables",
    "metadata",
]

__version__ = "0.1.0"

_signals.connect()
