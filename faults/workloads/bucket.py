"""Bucketed sends: every task taken from queue ``fc-bucket`` draws from one fleet-wide bucket.

The producer submits faster than the bucket allows; the checker counts
``start`` events per window against rate x window + burst.
"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery

from celery_reliable import ReliableTask
from faults.workloads._common import Producer, recorded

NAME = "bucket"
TASK = "fc.send"
QUEUE = "fc-bucket"
RATE = 4.0  # tokens per second
BURST = 4
SETTINGS: dict[str, Any] = {"reliable_queue_rate_limits": {QUEUE: {"rate": RATE, "burst": BURST}}}
# tolerance: a token is drawn at admission, the ``start`` is recorded a moment later in the body
CONFIG: dict[str, Any] = {"rate": RATE, "burst": BURST, "window_s": 5.0, "tolerance": 1}


def register(app: Celery) -> None:
    @app.task(base=ReliableTask, bind=True, shared=False, name=TASK,
              acks_late=True, reject_on_worker_lost=True)
    def send(self: ReliableTask, n: int) -> int:
        with recorded(self, NAME, bucket=QUEUE):
            time.sleep(0.02)
        return n


_sent = [0]


def produce(p: Producer) -> None:
    _sent[0] += 1
    p.send(NAME, TASK, queue=QUEUE, kwargs={"n": _sent[0]})
