"""clock: not injected.

The machine's clock is never touched, and celery-reliable takes no injected
clock in a worker (leases are decided on the Redis server's TIME and each
process's time.monotonic()), so a worker-side skew cannot be simulated without
patching the library. Recorded as skipped: "not protected: clock steps"
(a step of the Redis server's clock moves every lease; see faults/README.md).
"""

from __future__ import annotations

import random
from typing import Any

from faults.nemesis.base import Context

NOTE = "skipped: not protected: clock steps (no clock is injectable without patching)"


class Clock:
    name = "clock"

    def plan(self, rng: random.Random) -> dict[str, Any]:
        return {}

    def start(self, ctx: Context, plan: dict[str, Any]) -> str:
        return "none (" + NOTE + ")"

    def stop(self, ctx: Context, plan: dict[str, Any]) -> str:
        return NOTE
