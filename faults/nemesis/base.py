"""What a nemesis is: a seeded plan, a start and a stop, recorded as ``nemesis`` events."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Protocol

from faults.cluster import Cluster
from faults.fleet import Fleet


@dataclass
class Context:
    cluster: Cluster
    fleet: Fleet
    recorder: Any


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
