"""Guard ``B``: a token bucket with a queue of the refused tasks (``bucket.lua``).

Specs: ``celery_reliable.ratelimit``. Nothing to complete, roll back or renew.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Guard

if TYPE_CHECKING:
    from ..admission import Plan
    from ..ratelimit import BucketSpec

GUARD = Guard("B", "bucket", admit=(1, 4))


def plan(plan: Plan, key: str, spec: BucketSpec, cost: float, *, slot: int | None = None,
         queue: bool = True) -> int:
    """Take ``cost`` tokens (``Plan.add_bucket``): mode -1 a plain take, 0 a fresh arrival,
    > 0 the slot it was given in the queue before."""
    mode = max(1, int(slot)) if slot is not None and queue else (0 if queue else -1)
    return plan.add(GUARD, [key], [repr(spec.rate), repr(spec.burst), repr(float(cost)), mode])
