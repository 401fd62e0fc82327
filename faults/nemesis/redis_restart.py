"""redis-restart: kill -9 the plugin's Redis (the primary); at stop, start it from its last
RDB snapshot (older state) or empty."""

from __future__ import annotations

import random
from typing import Any

from faults.nemesis.base import Context


class RedisRestart:
    name = "redis-restart"

    def plan(self, rng: random.Random) -> dict[str, Any]:
        return {"mode": rng.choice(["snapshot", "snapshot", "empty"])}

    def start(self, ctx: Context, plan: dict[str, Any]) -> str:
        server = ctx.cluster.state
        pid = server.pid
        server.kill()
        return f"redis-state {server.name} pid {pid}"

    def stop(self, ctx: Context, plan: dict[str, Any]) -> str:
        server = ctx.cluster.state
        server.restart(empty=plan["mode"] == "empty")
        # the replica resynchronises from the restarted primary (takes its older state)
        return f"restarted {server.name} from {plan['mode']}"
