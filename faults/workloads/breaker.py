"""A flaky downstream behind a circuit breaker, retried with backoff under a retry budget.

The downstream is down one period in three (by wall clock) and fails one call
in ten otherwise: the breaker opens, defers, probes; retries are bounded by
the backoff's attempts and the fleet-wide retry budget (past it, a failure is
dead-lettered).
"""

from __future__ import annotations

import random
import time
from typing import Any

from celery import Celery

from celery_reliable import Backoff, ReliableTask
from faults.workloads._common import Producer, recorded

NAME = "breaker"
TASK = "fc.call"
BREAKER = "fc-downstream"
PERIOD = 8.0  # seconds: the downstream is down during the first third of every 3 periods
SETTINGS: dict[str, Any] = {
    "reliable_circuit_breakers": {BREAKER: {
        "failure_threshold": 3, "window": 10, "min_calls": 3, "open_seconds": 2.0,
        "success_threshold": 1, "half_open_max": 1, "probe_lease": 10,
    }},
}
CONFIG: dict[str, Any] = {"breaker": BREAKER, "retry_budget": "3/s"}


def downstream_up() -> bool:
    return int(time.time() // PERIOD) % 3 != 0 and random.random() > 0.1


def register(app: Celery) -> None:
    @app.task(base=ReliableTask, bind=True, shared=False, name=TASK,
              circuit_breaker=BREAKER, backoff=Backoff.exponential(0.2, 1.0, max_attempts=4),
              retry_budget="3/s", acks_late=True, reject_on_worker_lost=True,
              defer_delay=0.3, defer_max_delay=1.0)
    def call(self: ReliableTask, n: int) -> int:
        with recorded(self, NAME):
            time.sleep(0.05)
            if not downstream_up():
                raise ConnectionError("downstream unreachable")
        return n


_calls = [0]


def produce(p: Producer) -> None:
    _calls[0] += 1
    p.send(NAME, TASK, kwargs={"n": _calls[0]})
