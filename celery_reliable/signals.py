"""Per-process setup and cleanup, through Celery's signals.

Signals only observe and clean up: ``Signal.send`` swallows what a receiver
raises, so no guard is ever enforced here (that is ``ReliableTask.__call__``).
"""

from __future__ import annotations

from typing import Any

from celery import signals

from .runtime import close_all, forget_inherited

__all__ = ["connect"]


def _after_fork(**_: Any) -> None:
    # The child inherited the parent's runtimes (sockets, a dead heartbeat
    # thread); drop them so the child opens its own on first use.
    forget_inherited()


def _shutdown(**_: Any) -> None:
    close_all()


def connect() -> None:
    """Connect the receivers once (idempotent through ``dispatch_uid``)."""
    signals.worker_process_init.connect(
        _after_fork, weak=False, dispatch_uid="celery_reliable.after_fork"
    )
    signals.worker_process_shutdown.connect(
        _shutdown, weak=False, dispatch_uid="celery_reliable.process_shutdown"
    )
    signals.worker_shutdown.connect(
        _shutdown, weak=False, dispatch_uid="celery_reliable.worker_shutdown"
    )
