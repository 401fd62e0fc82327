"""kill: ``kill -9`` a pool child (the worker forks another) or a whole worker (restarted)."""

from __future__ import annotations

import os
import random
import signal
from typing import Any

from faults.nemesis.base import Context, pick_child


class Kill:
    name = "kill"

    def plan(self, rng: random.Random) -> dict[str, Any]:
        return {"what": rng.choice(["child", "child", "worker"]), "worker": rng.random(),
                "child": rng.random()}

    def start(self, ctx: Context, plan: dict[str, Any]) -> str:
        alive = [w for w in ctx.fleet.workers if w.alive]
        if not alive:
            return "no worker alive"
        worker = alive[int(plan["worker"] * len(alive))]
        if plan["what"] == "worker" and ctx.kill_workers:
            pid = worker.pid
            worker.kill()
            return f"worker {worker.name} pid {pid}"
        picked = pick_child(ctx, plan["child"], prefer=("locked", "payments", "bulkhead"))
        if picked is None:
            return "no pool child"
        name, pid = picked
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return f"child of {name} pid {pid} already gone"
        return f"child of {name} pid {pid}"

    def stop(self, ctx: Context, plan: dict[str, Any]) -> str:
        restarted = [w.name for w in ctx.fleet.workers if not w.alive]
        for w in ctx.fleet.workers:
            if not w.alive:
                w.start()
        return f"restarted {', '.join(restarted)}" if restarted else "nothing to restart"
