"""Guard ``K``: a slot of a bulkhead tier, held as a lease (``bulkhead.lua``).

Tiers and their stats: ``celery_reliable.bulkhead``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Guard, ms

if TYPE_CHECKING:
    from ..admission import Plan, Release
    from ..bulkhead import TierSpec
    from ..keys import KeySpace

GUARD = Guard("K", "bulkhead", admit=(3, 7), complete=(1, 1))


def plan(plan: Plan, keys: KeySpace, tier: str, spec: TierSpec, owner: str,
         waiter: str) -> int:
    """Take a slot of ``tier`` (``Plan.add_bulkhead``); ``waiter`` names the task while it waits."""
    tier_keys = list(keys.bulkhead(tier))
    args = [owner, spec.concurrent, ms(spec.lease), waiter, spec.queue, ms(spec.timeout),
            spec.policy]
    return plan.add(GUARD, tier_keys, args, undo=(tier_keys[0], owner), lease=spec.lease)


def release(release: Release, slots_key: str, owner: str) -> None:
    """Give the slot back."""
    release.add(GUARD, [slots_key], [owner])
