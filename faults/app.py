"""The Celery app every worker of the campaign runs (``celery -A faults.app worker``).

Configured from environment variables set by :mod:`faults.fleet`:
FAULTS_BROKER_URL (``redis://`` or ``amqp://``: see :func:`broker_settings`),
FAULTS_RESULT_URL, FAULTS_STATE_URL (the plugin's Redis, through a proxy),
FAULTS_DATABASE_URL (PostgreSQL, through a proxy), FAULTS_PREFIX
(reliable_key_prefix), FAULTS_RESULTS (the results folder the history goes to).
Every workload module registers its tasks and merges its settings (bulkhead
tiers, breakers, queue buckets) here.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from faults import workloads
from faults.cluster import RABBITMQ_CONSUMER_TIMEOUT

#: the Redis broker's visibility timeout (s): an unacked message of a dead worker is
#: redelivered after it
VISIBILITY_TIMEOUT = 30


def env(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def broker_settings(url: str) -> dict[str, Any]:
    """What depends on the broker: Redis's visibility timeout, or RabbitMQ's confirms and window.

    RabbitMQ (``amqp://``): publisher confirms, so that a publish (the producer's,
    or celery-reliable's re-published deferral before it acknowledges the
    original) returns only once the node has the persistent message on disk, and
    a ``kill -9`` of the node (``broker-restart``) loses nothing it confirmed;
    the redelivery window is the node's ``consumer_timeout``. Queues are durable
    and messages persistent: Celery's defaults. Any other URL (Redis, and
    ``memory://`` outside a campaign): ``visibility_timeout``
    (:data:`VISIBILITY_TIMEOUT`), from which celery-reliable derives the window.
    """
    if url.split("://", 1)[0] in ("amqp", "pyamqp"):
        return {"broker_transport_options": {"confirm_publish": True},
                "reliable_redelivery_window": RABBITMQ_CONSUMER_TIMEOUT}
    return {"broker_transport_options": {"visibility_timeout": VISIBILITY_TIMEOUT}}


def build_app() -> Celery:
    broker = env("FAULTS_BROKER_URL", "memory://")
    app = Celery("faults", broker=broker, backend=env("FAULTS_RESULT_URL", "cache+memory://"))
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
        **broker_settings(broker),
        "result_expires": None,
        "worker_hijack_root_logger": False,
        "reliable_bulkheads": {},
        "reliable_circuit_breakers": {},
        "reliable_queue_rate_limits": {},
        "reliable_queue_window_limits": {},
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
