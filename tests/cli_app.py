"""The app of ``celery -A tests.cli_app reliable ...`` in the CLI and Prometheus tests.

Configured from CLI_* environment variables, so each test points it at the
private Redis and PostgreSQL of the run (or at a closed port, to see errors).
``CLI_DATABASE_URL`` empty means no database is configured. With
``CLI_METRICS_PORT`` set, a worker of this app exports Prometheus metrics
(``celery_reliable.prometheus.setup_worker``).
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

from celery_reliable import ReliableTask, metrics


def env(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


#: The guards the CLI shows (tests parse the same values).
RELIABLE_CONF: dict[str, Any] = {
    "reliable_queue_rate_limits": {"emails": {"rate": 0.1, "burst": 10}, "stripe": "25/s"},
    "reliable_bulkheads": {"payments": {"concurrent": 2, "queue": 3, "timeout": 30}},
    "reliable_circuit_breakers": {"partner": {"failure_threshold": 2, "window": 4,
                                              "min_calls": 2, "open_seconds": 300}},
}

app = Celery(
    "cli_app",
    broker=env("CLI_BROKER_URL", "memory://"),
    backend=env("CLI_RESULT_URL", "cache+memory://"),
)
app.conf.update(
    reliable_redis_url=env("CLI_REDIS_URL", "redis://127.0.0.1:6379/0"),
    reliable_database_url=env("CLI_DATABASE_URL") or None,
    reliable_key_prefix=env("CLI_PREFIX", "cli"),
    task_default_queue=env("CLI_QUEUE", "cli"),
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=1,
    worker_hijack_root_logger=False,
    **RELIABLE_CONF,
)


@app.task(base=ReliableTask, bind=True, name="cli.charge")
def charge(self: ReliableTask, order_id: int) -> int:
    return order_id


@app.task(name="cli.count")
def count(name: str, n: int = 1, hold: float = 0.0) -> int:
    """Increments a celery-reliable counter in the worker process that runs it."""
    metrics.inc(name, n, task="cli.count", reason="test")
    time.sleep(hold)
    return os.getpid()


if env("CLI_METRICS_PORT"):
    from celery_reliable.prometheus import setup_worker

    setup_worker(app, port=int(env("CLI_METRICS_PORT")), addr="127.0.0.1")
