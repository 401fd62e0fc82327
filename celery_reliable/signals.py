"""Per-process setup and cleanup, through Celery's signals.

Signals only observe and clean up: ``Signal.send`` swallows what a receiver
raises, so no guard is ever enforced here (that is ``ReliableTask.__call__``).
"""

from __future__ import annotations

from typing import Any

from celery import signals

from .health import report_startup
from .runtime import close_all, forget_inherited

__all__ = ["connect"]


def _after_fork(**_: Any) -> None:
    # The child inherited the parent's runtimes (sockets, a dead heartbeat
    # thread); drop them so the child opens its own on first use.
    forget_inherited()


def _shutdown(**_: Any) -> None:
    close_all()


def _worker_ready(sender: Any = None, **_: Any) -> None:
    # Once per worker, in its main process, after logging is set up and just before
    # "ready.": a store that cannot be used is said here, with its URL and the fix,
    # not discovered later from tasks sitting in RETRY. Throwaway connections only:
    # nothing is opened that a prefork child could inherit.
    app = getattr(sender, "app", None)
    if app is not None:
        report_startup(app)


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
    signals.worker_ready.connect(
        _worker_ready, weak=False, dispatch_uid="celery_reliable.worker_ready"
    )
