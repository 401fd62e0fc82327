"""Prometheus metrics of celery-reliable (``pip install celery-reliable[prometheus]``).

``prometheus_client`` is imported only by the functions of this module.

Counters and the histogram are fed by :mod:`celery_reliable.metrics`:
:func:`install` registers them and becomes that module's sink, so every
``metrics.inc``/``metrics.observe`` of the library reaches Prometheus.
Gauges describe fleet-wide state and are read from Redis when Prometheus
scrapes (:class:`StateCollector`), so any one process can export them.

=====================================  =========  ==============  ==========================
metric                                 type       labels          fed by
=====================================  =========  ==============  ==========================
reliable_lock_acquire_total            counter    result          each lock admission:
                                                                  ``acquired``, or
                                                                  ``busy-<contention>``
reliable_lock_wait_seconds             histogram  (none)          ``metrics.observe`` at each
                                                                  lock acquisition (see
                                                                  below)
reliable_fence_rejections_total        counter    (none)          stale tokens refused
reliable_idempotent_replays_total      counter    (none)          duplicates replayed
reliable_rate_limited_total            counter    queue           deferrals by a bucket
reliable_bulkhead_active               gauge      tier            Redis, on scrape
reliable_bulkhead_rejected_total       counter    tier            drop, fail, timeout, queue
reliable_retries_total                 counter    task, reason    retries published
reliable_dead_letters_total            counter    (none)          tasks dead-lettered
reliable_dead_redeliveries_total       counter    task            redeliveries of a
                                                                  dead-lettered task id,
                                                                  not run
reliable_idempotency_lease_lost_total  counter    task            completions that found the
                                                                  idempotency record no
                                                                  longer theirs
reliable_circuit_state                 gauge      breaker         Redis, on scrape: 0 closed,
                                                                  1 open, 2 half-open
reliable_store_up                      gauge      store           the pipeline's own calls:
                                                                  1 reachable, 0 not (see
                                                                  below)
=====================================  =========  ==============  ==========================

Label names never change; a label the library passes that is not listed
here is summed away (``reliable_dead_letters_total`` has no ``task``: the
dead-letter table has it). ``reason`` of ``reliable_retries_total`` is the
exception's class name. ``queue`` of ``reliable_rate_limited_total`` is the
queue name for a queue's bucket and the constant ``rate_limit_key`` for a
per-key bucket (a key is not a label: unbounded cardinality).

``reliable_lock_wait_seconds`` observes what the library reports through
``metrics.observe("reliable_lock_wait_seconds", seconds)`` at each lock
acquisition: for a task, the time since its message first found the lock
busy (deferrals and queueing included; 0 when the lock was free at the first
try); for ``FencedLock.acquire_blocking``, the time spent in the call. A
deferred task does not block a worker while it waits: this is the delay the
lock added to the task, not time a process spent blocked.

Also exported, under the library's own names and labels:
``reliable_circuit_transitions_total{breaker,state}``,
``reliable_circuit_deferrals_total{breaker}``,
``reliable_bulkhead_waits_total{tier}``, ``reliable_throttles_total{task}``,
``reliable_retry_budget_exhausted_total{task}``, and the gauges
``reliable_bulkhead_waiting{tier}``, ``reliable_bucket_tokens{queue}`` and
``reliable_state_up`` (0 when the last scrape could not read Redis).

``reliable_store_up{store="redis"|"postgres"}`` is set by the task pipeline
itself (and the worker's start-up check), not by the scrape: 0 when a
process's last admission (Redis) or durable claim (PostgreSQL) failed for
want of the store, 1 once one succeeds again. Each process sets it when the
state changes; in multiprocess mode the most recent change among live
processes is exported (``livemostrecent``).

Prefork workers
---------------

Counters live in the process that counts, and prefork tasks run in child
processes, so the children write to prometheus_client's multiprocess files
and the worker's main process serves them merged::

    # proj/celery.py
    from celery_reliable.prometheus import setup_worker
    setup_worker(app, port=9808)

    # shell: a directory of its own per `celery worker`, set BEFORE the worker starts
    PROMETHEUS_MULTIPROC_DIR=/run/proj-worker-1 celery -A proj worker -P prefork -c 8

:func:`setup_worker` connects three signals: ``worker_init`` (main process,
before the pool forks: creates the directory or empties its ``*.db`` files, installs the
metrics and starts :func:`serve` on ``port``), ``worker_process_init``
(each child: installs the metrics; counters write to ``<dir>/counter_<pid>.db``)
and ``worker_process_shutdown`` (``multiprocess.mark_process_dead``). The
merged counters include children that have exited (``max_tasks_per_child``):
counters never go down. Without ``PROMETHEUS_MULTIPROC_DIR`` only the main
process's counters are visible, which is right for ``-P solo``/``threads``
and wrong for prefork (a warning is logged). ``prometheus_client`` reads the
variable when it is first imported, so it must be in the environment, not
set later by code.

Your own exporter instead: ``install()`` in every process, and serve
``registry_for(app)`` (it holds the ``MultiProcessCollector`` in multiprocess
mode, the counters otherwise, and :class:`StateCollector`).
"""

from __future__ import annotations

import ast
import glob
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import metrics
from .errors import ConfigurationError

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

__all__ = [
    "Exporter",
    "StateCollector",
    "install",
    "multiprocess_dir",
    "registry_for",
    "serve",
    "setup_worker",
    "uninstall",
]

log = logging.getLogger("celery_reliable")

#: Buckets of ``reliable_lock_wait_seconds`` (a wait spans deferrals: seconds to minutes).
LOCK_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                     float("inf"))


def _queue(labels: Mapping[str, str]) -> dict[str, str]:
    """``queue`` from the library's ``bucket`` label (``"queue 'emails'"``/``"rate_limit_key"``)."""
    if "queue" in labels:
        return {"queue": str(labels["queue"])}
    bucket = str(labels.get("bucket", ""))
    if bucket.startswith("queue "):
        try:
            return {"queue": str(ast.literal_eval(bucket[len("queue "):]))}
        except (ValueError, SyntaxError):
            return {"queue": bucket[len("queue "):]}
    return {"queue": bucket}


@dataclass(frozen=True)
class _Spec:
    name: str  # exported name (counters end in _total)
    kind: str  # counter | histogram | gauge
    doc: str
    labels: tuple[str, ...] = ()
    relabel: Callable[[Mapping[str, str]], Mapping[str, str]] | None = None


SPECS: tuple[_Spec, ...] = (
    _Spec("reliable_lock_acquire_total", "counter",
          "Lock admissions by result: acquired, or busy-<lock_contention>.", ("result",)),
    _Spec("reliable_lock_wait_seconds", "histogram",
          "Delay a busy lock added before its acquisition (0 if it was free)."),
    _Spec("reliable_fence_rejections_total", "counter",
          "Writes refused because their fencing token was stale (or the lock was lost)."),
    _Spec("reliable_idempotent_replays_total", "counter",
          "Duplicate executions answered from the idempotency record instead of running."),
    _Spec("reliable_rate_limited_total", "counter",
          "Tasks deferred by an empty token bucket (queue, or rate_limit_key).", ("queue",),
          _queue),
    _Spec("reliable_bulkhead_rejected_total", "counter",
          "Tasks a full bulkhead tier turned away for good (drop, fail, timeout, queue full).",
          ("tier",)),
    _Spec("reliable_retries_total", "counter",
          "Retries published, by task and exception class.", ("task", "reason")),
    _Spec("reliable_dead_letters_total", "counter", "Tasks dead-lettered."),
    _Spec("reliable_dead_redeliveries_total", "counter",
          "Redeliveries of a dead-lettered task id (its ack was lost) not run again.",
          ("task",)),
    _Spec("reliable_circuit_transitions_total", "counter",
          "Circuit breaker transitions seen by this process, by new state.",
          ("breaker", "state")),
    _Spec("reliable_circuit_deferrals_total", "counter",
          "Tasks deferred because their circuit breaker was open.", ("breaker",)),
    _Spec("reliable_bulkhead_waits_total", "counter",
          "Tasks deferred to wait for a bulkhead slot.", ("tier",)),
    _Spec("reliable_throttles_total", "counter", "self.throttle() calls.", ("task",)),
    _Spec("reliable_retry_budget_exhausted_total", "counter",
          "Failures dead-lettered because the task's retry budget was spent.", ("task",)),
    _Spec("reliable_idempotency_lease_lost_total", "counter",
          "Executions that finished after their idempotency lease was lost (expired or taken "
          "over): a duplicate may have run too (always, with the Redis-only store).",
          ("task",)),
    _Spec("reliable_store_up", "gauge",
          "1 if this process's last call to the store (redis, postgres) succeeded, 0 if it "
          "could not reach it (tasks are deferred meanwhile).", ("store",)),
)


class Exporter:
    """The counters, histogram and gauge of one registry, fed by :mod:`celery_reliable.metrics`."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.metrics: dict[str, Any] = {}
        self._routes: dict[str, tuple[_Spec, Any]] = {}
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


def _check_multiprocess(*, need_dir: bool = True) -> None:
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

    _check_multiprocess()
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


class StateCollector:
    """Gauges read from Redis on every scrape: bulkhead tiers, breakers, buckets.

    Fleet-wide values (every worker shares them), so exactly one exporter
    needs it. A scrape that cannot reach Redis reports ``reliable_state_up 0``
    and no other gauge, instead of failing the whole scrape.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    def describe(self) -> list[Metric]:
        return []  # no Redis access when registering

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        from .runtime import runtime_for
        from .status import breaker_state, bucket_tokens, bulkhead_stats

        up = GaugeMetricFamily("reliable_state_up",
                               "1 if this scrape read celery-reliable's state from Redis.")
        active = GaugeMetricFamily("reliable_bulkhead_active",
                                   "Tasks holding a slot of the tier now, fleet-wide.",
                                   labels=["tier"])
        waiting = GaugeMetricFamily("reliable_bulkhead_waiting",
                                    "Tasks waiting for a slot of the tier now, fleet-wide.",
                                    labels=["tier"])
        state = GaugeMetricFamily("reliable_circuit_state",
                                  "Circuit breaker state: 0 closed, 1 open, 2 half-open.",
                                  labels=["breaker"])
        tokens = GaugeMetricFamily("reliable_bucket_tokens",
                                   "Tokens left in the queue's bucket now.", labels=["queue"])
        try:
            settings = runtime_for(self.app).settings
            for tier, stats in bulkhead_stats(self.app).items():
                active.add_metric([tier], stats.active)
                waiting.add_metric([tier], stats.waiting)
            for name in settings.circuit_breakers:
                state.add_metric([name], breaker_state(self.app, name))
            for queue in settings.queue_rate_limits:
                left = bucket_tokens(self.app, queue)
                if left is not None:
                    tokens.add_metric([queue], left)
        except Exception:
            log.warning("celery-reliable: could not read state from Redis for Prometheus",
                        exc_info=True)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield from (up, active, waiting, state, tokens)


def registry_for(app: Any = None) -> CollectorRegistry:
    """A registry to serve: every process's counters merged (multiprocess mode) or this
    process's, plus :class:`StateCollector` when ``app`` is given."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    if multiprocess_dir() is not None:
        _check_multiprocess()
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
    """Export the metrics of ``celery worker`` processes of ``app`` on ``port`` (see above).

    Call it where the app is defined. ``clean``: empty ``PROMETHEUS_MULTIPROC_DIR``'s
    ``*.db`` files when the worker starts (the directory must belong to that worker;
    it is created if missing).
    """
    from celery import signals

    # Only the import order here: this also runs in `celery inspect`, beat or the
    # CLI, which import the app but never start the exporter.
    _check_multiprocess(need_dir=False)

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
