"""A bulkhead tier: at most SLOTS holders fleet-wide; the checker counts concurrent starts."""

from __future__ import annotations

import time
from typing import Any

from celery import Celery

from celery_reliable import ReliableTask
from faults.workloads._common import Producer, recorded

NAME = "bulkhead"
TASK = "fc.tier"
TIER = "fc-tier"
SLOTS = 2
LEASE = 3.0  # seconds a slot lives without its holder's heartbeat
SETTINGS: dict[str, Any] = {
    "reliable_bulkheads": {TIER: {"concurrent": SLOTS, "queue": 10000, "timeout": 600,
                                  "lease": LEASE}},
}
CONFIG: dict[str, Any] = {"slots": SLOTS, "tier": TIER, "slot_lease": LEASE}


def register(app: Celery) -> None:
    @app.task(base=ReliableTask, bind=True, shared=False, name=TASK, bulkhead=TIER,
              acks_late=True, reject_on_worker_lost=True,
              defer_delay=0.1, defer_max_delay=0.5)
    def tier(self: ReliableTask, hold: float) -> float:
        with recorded(self, NAME, tier=TIER):
            time.sleep(hold)
        return hold


def produce(p: Producer) -> None:
    p.send(NAME, TASK, kwargs={"hold": round(p.rng.uniform(0.2, 1.0), 3)}, tier=TIER)
