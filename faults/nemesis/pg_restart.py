"""pg-restart: ``pg_ctl stop -m fast|immediate`` (immediate: crash recovery); start at stop."""

from __future__ import annotations

import random
from typing import Any

from faults.nemesis.base import Context


class PgRestart:
    name = "pg-restart"

    def plan(self, rng: random.Random) -> dict[str, Any]:
        return {"mode": rng.choice(["fast", "immediate"])}

    def start(self, ctx: Context, plan: dict[str, Any]) -> str:
        ctx.cluster.pg.stop(plan["mode"])
        return f"postgres port {ctx.cluster.pg.port} stop -m {plan['mode']}"

    def stop(self, ctx: Context, plan: dict[str, Any]) -> str:
        if not ctx.cluster.pg.running:
            ctx.cluster.pg.start()
        return "started"
