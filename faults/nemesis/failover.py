"""failover: replication lags (its link stalled 0-3 s), the primary dies, the
replica is promoted with REPLICAOF NO ONE and the workers' proxy is pointed at
it; at stop, the old primary comes back, empty, as the new primary's replica."""

from __future__ import annotations

import random
from typing import Any

from faults.nemesis.base import Context


class Failover:
    name = "failover"

    def plan(self, rng: random.Random) -> dict[str, Any]:
        return {"lag": round(rng.uniform(0.0, 3.0), 2)}

    def start(self, ctx: Context, plan: dict[str, Any]) -> str:
        if ctx.cluster.replica is None or not ctx.cluster.replica.running:
            return "no replica running: skipped"
        return ctx.cluster.failover(lag=plan["lag"])

    def stop(self, ctx: Context, plan: dict[str, Any]) -> str:
        ctx.cluster.rejoin()
        return "old primary rejoined as replica"
