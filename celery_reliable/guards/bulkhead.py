"""Guard ``K``: a slot of a bulkhead tier, held as a lease (``bulkhead.lua``).

Tiers and their stats: ``celery_reliable.bulkhead``. The option ``bulkhead`` and the
setting ``reliable_bulkheads`` (:data:`CONFIG`); its part of a task's policy,
``policy.part(CONFIG)``, is a :class:`BulkheadPart`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import metrics
from ..bulkhead import parse_bulkheads
from ..errors import ConfigurationError
from ..options import Option, OptionSet, text
from .base import Guard, Hooks, ms, register

if TYPE_CHECKING:
    from ..admission import Outcome, Plan, Release
    from ..bulkhead import TierSpec, TierStats
    from ..config import ReliableSettings
    from ..keys import KeySpace


@dataclass(frozen=True)
class BulkheadPart:
    """The bulkhead guard's part of a task's policy (``policy.part(CONFIG)``)."""

    #: The tier's name (``bulkhead``), or None.
    bulkhead: str | None
    #: Its spec, once the app is configured (None before).
    tier: TierSpec | None


def policy_part(task_name: str, opts: Mapping[str, Any],
                settings: ReliableSettings | None) -> BulkheadPart:
    """The tier's name (``bulkhead``) and its spec (once configured)."""
    tier = None
    if opts["bulkhead"] is not None and settings is not None:
        tier = settings.bulkheads.get(opts["bulkhead"])
        if tier is None:
            raise ConfigurationError(
                f"{task_name}: option 'bulkhead' names tier {opts['bulkhead']!r}, which is not "
                f"configured (tiers: {', '.join(sorted(settings.bulkheads))}; define it in "
                "reliable_bulkheads)"
            )
    return BulkheadPart(opts["bulkhead"], tier)


CONFIG = OptionSet(
    name="bulkhead",
    options=(
        Option(
            "bulkhead",
            None,
            "tier name",
            'Bulkhead tier whose fleet-wide slot the task holds while it runs (``"critical"``, '
            '``"standard"``, ``"optional"`` or one defined in ``reliable_bulkheads``).',
            text(optional=True),
        ),
    ),
    settings=(
        Option(
            "reliable_bulkheads",
            None,
            "tier → {concurrent, queue, timeout, policy, lease}",
            "Bulkhead tiers, merged over the defaults critical 5/10/180 s (wait), standard "
            "8/12/120 s (wait), optional 4/6/60 s (drop); lease 30 s. ``concurrent`` slots "
            "fleet-wide, ``queue`` tasks waiting at most, each for ``timeout`` seconds; "
            "``policy`` wait|drop|fail. Environment variables "
            "``RELIABLE_BULKHEAD_<TIER>_CONCURRENT``/``_QUEUE``/``_TIMEOUT`` override.",
            parse_bulkheads,
        ),
    ),
    build=policy_part,
    prefixes=("bulkhead",),
    guards=lambda part: part.bulkhead is not None,
)

GUARD = Guard("K", "bulkhead", admit=(3, 7), complete=(1, 1))

#: This guard's metrics (exported by ``celery_reliable.prometheus``).
METRICS: tuple[metrics.MetricSpec, ...] = (
    metrics.MetricSpec("reliable_bulkhead_rejected_total", "counter",
                       "Tasks a full bulkhead tier turned away for good (drop, fail, timeout, "
                       "queue full).", ("tier",)),
    metrics.MetricSpec("reliable_bulkhead_waits_total", "counter",
                       "Tasks deferred to wait for a bulkhead slot.", ("tier",)),
)


def plan(plan: Plan, keys: KeySpace, tier: str, spec: TierSpec, owner: str,
         waiter: str) -> int:
    """Take a slot of ``tier`` as a lease; ``waiter`` names the task while it waits."""
    tier_keys = list(keys.bulkhead(tier))
    args = [owner, spec.concurrent, ms(spec.lease), waiter, spec.queue, ms(spec.timeout),
            spec.policy]
    return plan.add(GUARD, tier_keys, args, undo=(tier_keys[0], owner), lease=spec.lease)


def release(release: Release, slots_key: str, owner: str) -> None:
    """Give the slot back."""
    release.add(GUARD, [slots_key], [owner])


# ------------------------------------------------------------- status (read-only)


#: The tier's counters hash fields (``bulkhead.lua``), in :class:`TierStats` order.
STATS_FIELDS = ("rejected", "timed_out", "dropped")


def stats(active: int, waiting: int, counters: Sequence[Any]) -> TierStats:
    """A tier's :class:`TierStats`: slots and waiters unexpired now (both sorted sets are
    scored by expiry, server clock in ms), and its :data:`STATS_FIELDS` values."""
    from ..bulkhead import TierStats

    rejected, timed_out, dropped = counters
    return TierStats(active=int(active), waiting=int(waiting), rejected=int(rejected or 0),
                     timed_out=int(timed_out or 0), dropped=int(dropped or 0))


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

    def plan(self, call: Any, plan_: Plan, execution: Any, arguments: dict[str, Any]) -> None:
        policy = call.policy.part(CONFIG)
        if policy.bulkhead is not None and policy.tier is not None:
            plan(plan_, call.runtime.keys, policy.bulkhead, policy.tier, execution.owner,
                 str(call.request.id))

    def hold(self, call: Any, plan: Plan, index: int, result: int, execution: Any,
             started: float) -> None:
        key = plan.keys[plan.offsets[index]]
        execution.leases.append(call.lease("K", key, execution.owner,
                                           call.policy.part(CONFIG).tier.lease,
                                           started, "bulkhead slot"))
        release(execution.release, key, execution.owner)

    def refused(self, call: Any, outcome: Any, plan: Plan, execution: Any) -> Any:
        from celery.exceptions import Ignore

        from ..admission import Rejected
        from ..errors import BulkheadFull
        from ..pipeline.headers import DROPPED, log

        tier = str(call.policy.part(CONFIG).bulkhead)
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
