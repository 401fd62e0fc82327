"""Admission and completion of one execution: every guard in ONE Redis round trip each.

A task's guards each contribute a letter, keys and arguments to a
:class:`Plan`; ``admit.lua`` checks all of them first and writes only when
every guard said yes, so a refusal consumes nothing. ``complete.lua``
releases whatever admission took, again in one call. New guards plug in
here: a ``Plan.add_*`` method, a branch in each script, and a line in
:meth:`celery_reliable.task.ReliableTask._plan`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis

from .keys import KeySpace
from .scripts import script

__all__ = ["FENCE_TTL_MIN", "Admitted", "Plan", "Refused"]

#: Fencing counters outlive every lease by far; tokens are floored at the
#: server clock, so even an expired counter never lets tokens go backwards.
FENCE_TTL_MIN = 7 * 24 * 3600.0


@dataclass(frozen=True)
class Refused:
    """Guard ``index`` (0-based, plan order) refused; ``retry_after`` seconds or None."""

    index: int
    kind: str
    retry_after: float | None


@dataclass(frozen=True)
class Admitted:
    """Every guard admitted; ``results[i]`` is guard i's result (lock: its token)."""

    results: tuple[int, ...]


@dataclass
class Plan:
    """The guards of one execution, in order."""

    kinds: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    admit_args: list[Any] = field(default_factory=list)
    release_keys: list[str] = field(default_factory=list)
    release_args: list[Any] = field(default_factory=list)

    def add_lock(self, keys: KeySpace, resource: str, owner: str, ttl: float) -> int:
        """Lock ``resource`` for ``ttl`` seconds, minting a fencing token; returns its index."""
        self.kinds.append("L")
        self.keys += [keys.lock(resource), keys.fence(resource)]
        self.admit_args += [
            owner,
            max(1, int(ttl * 1000)),
            int(max(FENCE_TTL_MIN, 10 * ttl) * 1000),
        ]
        return len(self.kinds) - 1

    def admit(self, client: redis.Redis) -> Admitted | Refused:
        """One round trip: everything admitted, or nothing changed."""
        reply = script("admit")(client, self.keys, ["".join(self.kinds), *self.admit_args])
        if int(reply[0]) == 1:
            return Admitted(tuple(int(r) for r in reply[1:]))
        index = int(reply[1]) - 1
        ms = int(reply[2])
        return Refused(index, self.kinds[index], ms / 1000 if ms > 0 else None)


@dataclass
class Release:
    """What completion gives back, built from what admission took."""

    kinds: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    args: list[Any] = field(default_factory=list)

    def add_lock(self, lock_key: str, lease_value: str) -> None:
        self.kinds.append("L")
        self.keys.append(lock_key)
        self.args.append(lease_value)

    def __bool__(self) -> bool:
        return bool(self.kinds)

    def run(self, client: redis.Redis) -> list[int]:
        """One round trip; safe to repeat (a second run changes nothing)."""
        reply = script("complete")(client, self.keys, ["".join(self.kinds), *self.args])
        return [int(r) for r in reply]
