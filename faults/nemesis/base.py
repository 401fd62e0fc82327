"""What a nemesis is: a seeded plan, a start and a stop, recorded as ``nemesis`` events."""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from faults.cluster import Cluster
from faults.fleet import Fleet


@dataclass
class Context:
    cluster: Cluster
    fleet: Fleet
    recorder: Any
    results: Path
    #: ``kill`` may take down a whole worker (``--kill-workers``). Off in CI, which runs the
    #: Redis broker: kombu's Redis transport loses a message taken by BRPOP when the main
    #: process dies before recording it as unacked (faults/README.md), an upstream limit that
    #: would make CI flaky. RabbitMQ requeues a dead worker's deliveries (``--broker rabbitmq``).
    kill_workers: bool = True


def running_task(results: Path, pid: int) -> str | None:
    """The workload a pool child is executing now (its last event is a ``start``), or None."""
    path = results / "history" / f"{pid}-worker.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().splitlines()
        event = json.loads(lines[-1])
    except (OSError, IndexError, ValueError):
        return None
    return str(event.get("workload")) if event.get("type") == "start" else None


def pick_child(
    ctx: Context, fraction: float, prefer: tuple[str, ...] = (), wait: float = 5.0
) -> tuple[str, int] | None:
    """A pool child to hit: ``(worker name, pid)``, preferring one mid-task (in ``prefer``).

    A fault that lands on an idle process shows nothing: for up to ``wait`` seconds it
    waits for a child running a ``prefer`` workload, then takes any busy child, then
    any child. ``fraction`` (drawn from the seed) picks among the candidates found.
    """
    deadline = time.monotonic() + wait
    while True:
        children = [(w.name, pid) for w in ctx.fleet.workers for pid in w.children()]
        busy = [(c, running_task(ctx.results, c[1])) for c in children]
        tiers = [[c for c, wl in busy if wl in prefer], [c for c, wl in busy if wl], children]
        if tiers[0] or time.monotonic() > deadline:
            for tier in tiers:
                if tier:
                    return tier[min(int(fraction * len(tier)), len(tier) - 1)]
            return None
        time.sleep(0.02)


class Nemesis(Protocol):
    name: str

    def plan(self, rng: random.Random) -> dict[str, Any]:
        """Targets and modes drawn from ``rng`` only (same seed, same schedule)."""
        ...

    def start(self, ctx: Context, plan: dict[str, Any]) -> str:
        """Inject the fault; returns the target as recorded (e.g. ``worker w1 pid 1234``)."""
        ...

    def stop(self, ctx: Context, plan: dict[str, Any]) -> str:
        """Heal this fault; returns a detail for the ``stop`` event."""
        ...
