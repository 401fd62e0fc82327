"""pause: SIGSTOP a pool child (a GC pause, a frozen VM) past its leases; SIGCONT at stop."""

from __future__ import annotations

import os
import random
import signal
from typing import Any

from faults.nemesis.base import Context, pick_child


class Pause:
    name = "pause"

    def plan(self, rng: random.Random) -> dict[str, Any]:
        return {"child": rng.random()}

    def start(self, ctx: Context, plan: dict[str, Any]) -> str:
        # a child holding a lock or a slot is what a pause is for: its lease expires
        picked = pick_child(ctx, plan["child"], prefer=("locked", "bulkhead", "payments"))
        if picked is None:
            return "no pool child"
        name, pid = picked
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            return f"child of {name} pid {pid} already gone"
        plan["pid"] = pid
        return f"child of {name} pid {pid}"

    def stop(self, ctx: Context, plan: dict[str, Any]) -> str:
        pid = plan.get("pid")
        if pid is None:
            return "nothing paused"
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            return f"pid {pid} gone"
        return f"SIGCONT pid {pid}"
