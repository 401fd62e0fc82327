"""The counters, histogram and gauge fed by :mod:`celery_reliable.metrics`: :func:`install`.

:data:`SPECS` lists them (name, type, labels): the shared ones (:data:`SHARED`) and each
guard's (``METRICS`` in ``celery_reliable/guards/<name>.py``); :class:`Exporter` registers them
in a registry and is the sink that forwards every ``metrics.inc``/``observe``.
Multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) is checked here: the variable
must be set before ``prometheus_client`` is first imported.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .. import metrics
from ..errors import ConfigurationError
from ..guards import metric_specs
from ..metrics import MetricSpec

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

__all__ = ["LOCK_WAIT_BUCKETS", "SHARED", "SPECS", "Exporter", "check_multiprocess", "install",
           "multiprocess_dir", "uninstall"]

#: Buckets of ``reliable_lock_wait_seconds`` (a wait spans deferrals: seconds to minutes).
LOCK_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                     float("inf"))


#: The metrics no one guard owns; each guard's are ``METRICS`` in its module.
SHARED: tuple[MetricSpec, ...] = (
    MetricSpec("reliable_fence_rejections_total", "counter",
               "Writes refused because their fencing token was stale (or the lock was lost)."),
    MetricSpec("reliable_retries_total", "counter",
               "Retries published, by task and exception class.", ("task", "reason")),
    MetricSpec("reliable_dead_letters_total", "counter", "Tasks dead-lettered."),
    MetricSpec("reliable_throttles_total", "counter", "self.throttle() calls.", ("task",)),
    MetricSpec("reliable_retry_budget_exhausted_total", "counter",
               "Failures dead-lettered because the task's retry budget was spent.", ("task",)),
    MetricSpec("reliable_store_up", "gauge",
               "1 if this process's last call to the store (redis, postgres) succeeded, 0 if it "
               "could not reach it (tasks are deferred meanwhile).", ("store",)),
)

#: Every exported metric: :data:`SHARED`, then each guard's (``guards.metric_specs``);
#: a name declared twice is refused at import.
SPECS: tuple[MetricSpec, ...] = metrics.collect((*SHARED, *metric_specs()))


class Exporter:
    """The counters, histogram and gauge of one registry, fed by :mod:`celery_reliable.metrics`."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.metrics: dict[str, Any] = {}
        self._routes: dict[str, tuple[MetricSpec, Any]] = {}
        for spec in SPECS:
            metric: Any
            if spec.kind == "counter":
                metric = Counter(spec.name.removesuffix("_total"), spec.doc, spec.labels,
                                 registry=registry)
            elif spec.kind == "gauge":
                metric = Gauge(spec.name, spec.doc, spec.labels, registry=registry,
                               multiprocess_mode="livemostrecent")
            else:
                metric = Histogram(spec.name, spec.doc, spec.labels, registry=registry,
                                   buckets=LOCK_WAIT_BUCKETS)
            self.metrics[spec.name] = metric
            self._routes[spec.name] = (spec, metric)

    def __call__(self, name: str, value: float, labels: Mapping[str, str]) -> None:
        """The :func:`celery_reliable.metrics.set_sink` callback."""
        route = self._routes.get(name)
        if route is None:
            return
        spec, metric = route
        if spec.labels:
            given = spec.relabel(labels) if spec.relabel is not None else labels
            metric = metric.labels(*(str(given.get(label, "")) for label in spec.labels))
        if spec.kind == "counter":
            metric.inc(value)
        elif spec.kind == "gauge":
            metric.set(value)
        else:
            metric.observe(value)


_exporters: weakref.WeakKeyDictionary[Any, Exporter] = weakref.WeakKeyDictionary()
_install_mutex = threading.Lock()


def multiprocess_dir() -> str | None:
    """``PROMETHEUS_MULTIPROC_DIR`` (or its old lower-case spelling), if set."""
    legacy = "prometheus_multiproc_dir"  # what prometheus_client < 0.10 read
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get(legacy) or None


def check_multiprocess(*, need_dir: bool = True) -> None:
    path = multiprocess_dir()
    if path is None:
        return
    if need_dir and not os.path.isdir(path):
        raise ConfigurationError(f"PROMETHEUS_MULTIPROC_DIR {path!r} is not a directory; "
                                 "create it before the worker starts")
    from prometheus_client import values

    if values.ValueClass is values.MutexValue:
        raise ConfigurationError(
            "prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was set, so it "
            "counts in memory only; set the variable in the environment of the process")


def install(registry: CollectorRegistry | None = None) -> Exporter:
    """Register the counters (once per registry; default: prometheus_client's REGISTRY) and
    forward every ``celery_reliable.metrics`` increment to them from now on.

    Counts made before the first call are not exported (``metrics.snapshot()``
    has them). Safe to call again, also in a forked child (the multiprocess
    values notice the new pid and open their own file).
    """
    from prometheus_client import REGISTRY

    check_multiprocess()
    target = REGISTRY if registry is None else registry
    with _install_mutex:
        exporter = _exporters.get(target)
        if exporter is None:
            exporter = _exporters[target] = Exporter(target)
        metrics.set_sink(exporter)
    return exporter


def uninstall() -> None:
    """Stop forwarding increments (the registered metrics stay)."""
    metrics.set_sink(None)
