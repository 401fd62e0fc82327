"""The workloads, one module each, using celery-reliable's public API only.

Each module has NAME, SETTINGS (merged into the app's configuration),
CONFIG (recorded in the ``config`` event), ``register(app)`` (its tasks) and
``produce(producer)`` (submits one unit of work). ``mix`` interleaves them all.
"""

from __future__ import annotations

from types import ModuleType

from faults.workloads import breaker, bucket, bulkhead, locked, payments, window

MODULES: dict[str, ModuleType] = {
    m.NAME: m for m in (locked, payments, bucket, bulkhead, breaker, window)
}
WORKLOADS = (*MODULES, "mix")
#: every queue the fleet consumes
QUEUES = ("fc", bucket.QUEUE, window.QUEUE)


def chosen(workload: str) -> list[ModuleType]:
    """The modules a ``--workload`` runs (``mix``: all of them)."""
    if workload == "mix":
        return list(MODULES.values())
    if workload not in MODULES:
        raise SystemExit(f"unknown workload {workload!r}: one of {', '.join(WORKLOADS)}")
    return [MODULES[workload]]
