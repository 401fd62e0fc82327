"""clock: skew what one pool child's ``time.monotonic`` says, never the machine's clock.

A lease's expiry is timed by the Redis server's clock; the holder's *belief* in it
(``lock_lost``, the heartbeat's schedule) by its own ``time.monotonic()``. Every worker of a
campaign with this nemesis runs under :mod:`faults.clockskew`, and the nemesis skews one pool
child (preferably one running a locked, bulkhead or payments task) in one of three modes,
drawn from the seed:

- ``suspend``: SIGSTOP the child while its clock counts only ``rate`` (0-0.9) of the stop,
  SIGCONT at the end. ``rate`` 0 is a suspended machine (Linux's ``CLOCK_MONOTONIC``, which
  ``time.monotonic`` reads, does not count a suspend): the holder resumes believing in a lease
  the server expired meanwhile. The clock stays behind by what it missed.
- ``slow``: the clock runs at ``rate`` (0.5-0.9) for the fault's duration, the child running;
  the heartbeat renews every ``ttl / 3`` of the slow clock, i.e. within ``ttl`` of real time
  for any rate above 1/3, so no lease is lost.
- ``jump``: the clock steps ``jump`` seconds (2-6) forward (the safe direction: beliefs end
  early, nothing is renewed late). Nothing to undo at the end.

The start event's ``target`` names the child (``child of w0 pid N``) and its ``detail`` holds
the plan (mode, rate, jump): the checker decides from these which leases the fault can have
cost (``faults.checker``). The control files stay in ``<results>/clock/``.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path
from typing import Any

from faults import clockskew
from faults.nemesis.base import Context, pick_child

MODES = ("suspend", "suspend", "slow", "jump")


def folder(ctx: Context) -> Path:
    """Where the workers look for their control files (see :func:`faults.run.Campaign.setup`)."""
    return ctx.results / "clock"


class Clock:
    name = "clock"

    def plan(self, rng: random.Random) -> dict[str, Any]:
        mode = rng.choice(MODES)
        plan: dict[str, Any] = {"mode": mode, "child": rng.random()}
        if mode == "suspend":
            plan["rate"] = rng.choice([0.0, round(rng.uniform(0.1, 0.9), 2)])
        elif mode == "slow":
            plan["rate"] = round(rng.uniform(0.5, 0.9), 2)
        else:
            plan["jump"] = round(rng.uniform(2.0, 6.0), 2)
        return plan

    def start(self, ctx: Context, plan: dict[str, Any]) -> str:
        if not any(w.env.get(clockskew.ENV) for w in ctx.fleet.workers):
            return "skipped: the workers run without faults.clockskew"
        picked = pick_child(ctx, plan["child"], prefer=("locked", "bulkhead", "payments"))
        if picked is None:
            return "no pool child"
        name, pid = picked
        mode = plan["mode"]
        if mode == "jump":
            clockskew.skew(folder(ctx), pid, jump=plan["jump"])
            how = f"clock stepped {plan['jump']:g} s forward"
        else:
            clockskew.skew(folder(ctx), pid, rate=plan["rate"])
            how = f"clock at rate {plan['rate']:g}"
        if mode == "suspend":
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                return f"child of {name} pid {pid} already gone"
            how += ", stopped"
        plan["pid"] = pid
        return f"child of {name} pid {pid} ({how})"

    def stop(self, ctx: Context, plan: dict[str, Any]) -> str:
        pid = plan.get("pid")
        if pid is None:
            return "nothing skewed"
        if plan["mode"] == "jump":
            return f"pid {pid}: nothing to undo (its clock stays {plan['jump']:g} s ahead)"
        clockskew.skew(folder(ctx), pid, rate=1.0)
        if plan["mode"] == "suspend":
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                return f"pid {pid} gone"
            return f"pid {pid}: clock at rate 1 again, SIGCONT"
        return f"pid {pid}: clock at rate 1 again"
