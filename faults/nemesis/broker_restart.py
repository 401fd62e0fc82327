"""broker-restart: kill -9 the broker's redis-server; at stop, start it again.

Its append-only file is fsynced on every write, so no queued message is lost:
what is exercised is the workers' and the producer's reconnection.
"""

from __future__ import annotations

import random
from typing import Any

from faults.nemesis.base import Context


class BrokerRestart:
    name = "broker-restart"

    def plan(self, rng: random.Random) -> dict[str, Any]:
        return {}

    def start(self, ctx: Context, plan: dict[str, Any]) -> str:
        pid = ctx.cluster.broker.pid
        ctx.cluster.broker.kill()
        return f"broker pid {pid}"

    def stop(self, ctx: Context, plan: dict[str, Any]) -> str:
        if not ctx.cluster.broker.running:
            ctx.cluster.broker.start()
        return "started"
