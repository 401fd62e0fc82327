"""Sliding windows (exact mode): per key, and one per queue; the checker counts ``start`` events.

Every task ``fc.window`` is taken from queue ``fc-window`` (fleet-wide window
:data:`QUEUE_LIMIT`) and names one of :data:`KEYS` (a window per key,
:data:`KEY_LIMIT`, ``rate_limit_window_key="wk:{key}"``). Each ``start`` lists
the windows it counted in (``windows``), so the checker counts starts per
window in every interval of the window's length, from the history alone.

The producer offers about :data:`OFFERED_RATE` tasks per second in bursts to one
key (skewed: :data:`WEIGHTS`), whatever share of the producer's calls this workload
gets (alone or in ``mix``): below the queue window's limit on average, so the
backlog drains, but each burst fills a key's window and defers the rest.
"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery

from celery_reliable import ReliableTask
from faults.workloads._common import Producer, recorded

NAME = "window"
TASK = "fc.window"
QUEUE = "fc-window"
KEYS = ("a", "b", "c")
WEIGHTS = (0.5, 0.3, 0.2)
WINDOW_S = 5  # seconds, every window's length
KEY_N = 6  # per key: at most 6 starts in any 5 s
QUEUE_N = 10  # the queue: at most 10 starts in any 5 s, whatever the key
KEY_LIMIT = f"{KEY_N}/{WINDOW_S}s"
QUEUE_LIMIT = f"{QUEUE_N}/{WINDOW_S}s"
OFFERED_RATE = 1.0  # tasks per second, on average (the queue window admits 2/s)
BURST = (2.0, 10.0)  # a burst goes out once this many (uniform) tasks are owed
SETTINGS: dict[str, Any] = {"reliable_queue_window_limits": {QUEUE: QUEUE_LIMIT}}
# latency_s: admission (Redis server time) happens a moment before the body records
# ``start``; the checker counts starts in intervals this much shorter than the window
CONFIG: dict[str, Any] = {
    "windows": {
        **{f"wk:{key}": {"limit": KEY_N, "seconds": float(WINDOW_S)} for key in KEYS},
        f"q:{QUEUE}": {"limit": QUEUE_N, "seconds": float(WINDOW_S)},
    },
    "window_mode": "exact",
    "window_latency_s": 0.5,
}


def windows(key: str) -> list[str]:
    """The windows one start of ``key`` counts in (the names CONFIG's ``windows`` uses)."""
    return [f"wk:{key}", f"q:{QUEUE}"]


def register(app: Celery) -> None:
    @app.task(base=ReliableTask, bind=True, shared=False, name=TASK,
              acks_late=True, reject_on_worker_lost=True,
              rate_limit_window=KEY_LIMIT, rate_limit_window_key="wk:{key}",
              rate_limit_window_mode="exact")
    def windowed(self: ReliableTask, key: str, n: int) -> int:
        with recorded(self, NAME, windows=windows(key)):
            time.sleep(0.02)
        return n


class _Pace:
    """Tasks owed since the last burst (OFFERED_RATE x elapsed), and the next burst's size."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.owed = 0.0
        self.threshold: float | None = None
        self.sent = 0


_pace = _Pace()


def produce(p: Producer) -> None:
    now = time.monotonic()
    if _pace.last is None:  # the first call: one burst to start with
        _pace.owed = BURST[1]
    else:
        _pace.owed += OFFERED_RATE * (now - _pace.last)
    _pace.last = now
    if _pace.threshold is None:
        _pace.threshold = p.rng.uniform(*BURST)
    if _pace.owed < _pace.threshold:
        return
    burst = int(_pace.owed)
    _pace.owed -= burst
    _pace.threshold = None
    key = p.rng.choices(KEYS, weights=WEIGHTS)[0]
    for _ in range(burst):
        _pace.sent += 1
        p.send(NAME, TASK, queue=QUEUE, kwargs={"key": key, "n": _pace.sent})
