"""stall: the proxy between workers and the plugin's Redis (or PostgreSQL) stops forwarding.

Connections stay open, nothing passes (packets dropped on a live link);
``resume`` delivers what was held and forwards again.
"""

from __future__ import annotations

import random
from typing import Any

from faults.cluster import TcpProxy
from faults.nemesis.base import Context


class Stall:
    name = "stall"

    def plan(self, rng: random.Random) -> dict[str, Any]:
        return {"path": rng.choice(["redis-state", "postgres"])}

    def _proxy(self, ctx: Context, plan: dict[str, Any]) -> TcpProxy:
        proxy = ctx.cluster.state_proxy if plan["path"] == "redis-state" else ctx.cluster.pg_proxy
        assert proxy is not None
        return proxy

    def start(self, ctx: Context, plan: dict[str, Any]) -> str:
        self._proxy(ctx, plan).stall()
        return f"proxy workers->{plan['path']}"

    def stop(self, ctx: Context, plan: dict[str, Any]) -> str:
        self._proxy(ctx, plan).resume()
        return "resumed"
