"""Guard ``K``: a slot of a bulkhead tier, held as a lease (``bulkhead.lua``).

Tiers and their stats: ``celery_reliable.bulkhead``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import metrics
from .base import Guard, Hooks, ms, register

if TYPE_CHECKING:
    from ..admission import Outcome, Plan, Release
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


# ------------------------------------------------------------- pipeline hooks


class _Hooks(Hooks):
    """A bulkhead slot in the task pipeline: a lease; a full tier defers, drops or fails."""

    order = 30
    reports_overrun = True

    def outcome(self, code: int, index: int, kind: str, reply: list[Any]) -> Outcome:
        from ..admission import Rejected, text

        if code == 4:  # full for good: the tier's policy (drop, fail, queue, timeout)
            return Rejected(index, kind, text(reply[2]))
        return super().outcome(code, index, kind, reply)

    def plan(self, call: Any, plan: Plan, execution: Any, arguments: dict[str, Any]) -> None:
        policy = call.policy
        if policy.bulkhead is not None and policy.tier is not None:
            plan.add_bulkhead(call.runtime.keys, policy.bulkhead, policy.tier, execution.owner,
                              str(call.request.id))

    def hold(self, call: Any, plan: Plan, index: int, result: int, execution: Any,
             started: float) -> None:
        key = plan.keys[plan.offsets[index]]
        execution.leases.append(call.lease("K", key, execution.owner, call.policy.tier.lease,
                                           started, "bulkhead slot"))
        release(execution.release, key, execution.owner)

    def refused(self, call: Any, outcome: Any, plan: Plan, execution: Any) -> Any:
        from celery.exceptions import Ignore

        from ..admission import Rejected
        from ..errors import BulkheadFull
        from ..pipeline.headers import DROPPED, log

        tier = str(call.policy.bulkhead)
        if not isinstance(outcome, Rejected):
            metrics.inc("reliable_bulkhead_waits_total", tier=tier)
            call.defer(f"bulkhead {tier!r} full", guard="bulkhead")
            return None
        # A full bulkhead said no for good: drop (Ignore) or raise BulkheadFull.
        if outcome.reason == "drop":
            metrics.inc("reliable_bulkhead_rejected_total", tier=tier, reason="drop")
            log.info("celery-reliable: %s dropped: bulkhead %r is full", call.describe, tier)
            call.store_state(DROPPED, {"reason": "bulkhead full", "tier": tier})
            raise Ignore()
        metrics.inc("reliable_bulkhead_rejected_total", tier=tier, reason=outcome.reason)
        raise BulkheadFull(call.name, tier, outcome.reason)


register(GUARD, _Hooks())
