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
reliable_rate_limited_total            counter    queue           deferrals by a bucket or window
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

One module per job: :mod:`.exporter` (the counters and their sink),
:mod:`.state` (the gauges read on scrape), :mod:`.server` (serving them, and
the prefork worker's signals).
"""

from __future__ import annotations

from .exporter import Exporter, install, multiprocess_dir, uninstall
from .server import registry_for, serve, setup_worker
from .state import StateCollector

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
