"""Serving the metrics: :func:`registry_for`, :func:`serve`, and :func:`setup_worker`
(the exporter of a prefork ``celery worker``: see the package's "Prefork workers")."""

from __future__ import annotations

import glob
import logging
import os
from typing import TYPE_CHECKING, Any

from .exporter import check_multiprocess, install, multiprocess_dir
from .state import StateCollector

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

__all__ = ["registry_for", "serve", "setup_worker"]

log = logging.getLogger("celery_reliable")


def registry_for(app: Any = None) -> CollectorRegistry:
    """A registry to serve: every process's counters merged (multiprocess mode) or this
    process's, plus :class:`StateCollector` when ``app`` is given."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    if multiprocess_dir() is not None:
        check_multiprocess()
        from prometheus_client import multiprocess

        mp: Any = multiprocess  # untyped functions
        mp.MultiProcessCollector(registry)
    else:
        for metric in install().metrics.values():
            registry.register(metric)
    if app is not None:
        registry.register(StateCollector(app))
    return registry


def serve(port: int, app: Any = None, *, addr: str = "0.0.0.0") -> Any:
    """Install the metrics and serve :func:`registry_for` over HTTP on ``port`` (a daemon
    thread); returns what ``prometheus_client.start_http_server`` returns."""
    from prometheus_client import start_http_server

    install()
    return start_http_server(port, addr, registry=registry_for(app))


def setup_worker(app: Any, port: int, *, addr: str = "0.0.0.0", clean: bool = True) -> None:
    """Export the metrics of ``celery worker`` processes of ``app`` on ``port``
    (see "Prefork workers" in :mod:`celery_reliable.prometheus`).

    Call it where the app is defined. ``clean``: empty ``PROMETHEUS_MULTIPROC_DIR``'s
    ``*.db`` files when the worker starts (the directory must belong to that worker;
    it is created if missing).
    """
    from celery import signals

    # Only the import order here: this also runs in `celery inspect`, beat or the
    # CLI, which import the app but never start the exporter.
    check_multiprocess(need_dir=False)

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", app) is not app:
            return
        path = multiprocess_dir()
        if path is None:
            log.warning("celery-reliable: PROMETHEUS_MULTIPROC_DIR is not set: only the main "
                        "process's counters are exported (prefork children's are not)")
        else:
            os.makedirs(path, exist_ok=True)
            if clean:
                for stale in glob.glob(os.path.join(path, "*.db")):
                    os.remove(stale)
        try:
            serve(port, app, addr=addr)
        except OSError as exc:  # the port is taken: the worker runs, without /metrics
            log.error("celery-reliable: cannot serve Prometheus metrics on %s:%d: %s",
                      addr, port, exc)
            return
        log.info("celery-reliable: Prometheus metrics on http://%s:%d/metrics", addr, port)

    def on_process_init(**_: Any) -> None:
        install()

    def on_process_shutdown(**_: Any) -> None:
        if multiprocess_dir() is not None:
            from prometheus_client import multiprocess

            mp: Any = multiprocess  # untyped functions
            mp.mark_process_dead(os.getpid())

    uid = f"celery_reliable.prometheus.{id(app)}"
    signals.worker_init.connect(on_worker_init, weak=False, dispatch_uid=f"{uid}.init")
    signals.worker_process_init.connect(on_process_init, weak=False,
                                        dispatch_uid=f"{uid}.process_init")
    signals.worker_process_shutdown.connect(on_process_shutdown, weak=False,
                                            dispatch_uid=f"{uid}.process_shutdown")
