"""pause: SIGSTOP a pool child (a GC pause, a frozen VM) past its leases; SIGCONT at stop."""

from __future__ import annotations

import os
import random
import signal
from typing import Any

from faults.nemesis.base import Context


class Pause:
    name = "pause"

    def plan(self, rng: random.Random) -> dict[str, Any]:
        return {"worker": rng.random(), "child": rng.random()}

    def start(self, ctx: Context, plan: dict[str, Any]) -> str:
        alive = [w for w in ctx.fleet.workers if w.alive]
        if not alive:
            return "no worker alive"
        worker = alive[int(plan["worker"] * len(alive))]
        children = worker.children()
        if not children:
            return f"worker {worker.name}: no pool child"
        pid = children[int(plan["child"] * len(children))]
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            return f"child of {worker.name} pid {pid} already gone"
        plan["pid"] = pid
        return f"child of {worker.name} pid {pid}"

    def stop(self, ctx: Context, plan: dict[str, Any]) -> str:
        pid = plan.get("pid")
        if pid is None:
            return "nothing paused"
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            return f"pid {pid} gone"
        return f"SIGCONT pid {pid}"
