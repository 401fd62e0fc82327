"""The Celery app every worker of the campaign runs (``celery -A faults.app worker``).

Configured from environment variables set by :mod:`faults.fleet`:
FAULTS_BROKER_URL, FAULTS_RESULT_URL, FAULTS_STATE_URL (the plugin's Redis,
through a proxy), FAULTS_DATABASE_URL (PostgreSQL, through a proxy),
FAULTS_PREFIX (reliable_key_prefix), FAULTS_RESULTS (the results folder the
history goes to). Every workload module registers its tasks and merges its
settings (bulkhead tiers, breakers, queue buckets) here.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from faults import workloads

#: the broker's visibility timeout (s): an unacked message of a dead worker is redelivered after it
VISIBILITY_TIMEOUT = 30


def env(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def build_app() -> Celery:
    app = Celery(
        "faults",
        broker=env("FAULTS_BROKER_URL", "memory://"),
        backend=env("FAULTS_RESULT_URL", "cache+memory://"),
    )
    settings: dict[str, Any] = {
        "reliable_redis_url": env("FAULTS_STATE_URL", "redis://127.0.0.1:6379/0"),
        "reliable_database_url": env("FAULTS_DATABASE_URL") or None,
        "reliable_key_prefix": env("FAULTS_PREFIX", "faults"),
        "task_default_queue": "fc",
        # a message is acknowledged after its task ran; a lost worker's message is redelivered
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_transport_options": {"visibility_timeout": VISIBILITY_TIMEOUT},
        "result_expires": None,
        "worker_hijack_root_logger": False,
        "reliable_bulkheads": {},
        "reliable_circuit_breakers": {},
        "reliable_queue_rate_limits": {},
    }
    for module in workloads.MODULES.values():
        for name, value in module.SETTINGS.items():
            if isinstance(value, dict):
                settings[name].update(value)
            else:
                settings[name] = value
    app.conf.update(settings)
    for module in workloads.MODULES.values():
        module.register(app)
    return app


app = build_app()
