"""Guard ``B``: a token bucket with a queue of the refused tasks (``bucket.lua``).

Specs: ``celery_reliable.ratelimit``. Nothing to complete, roll back or renew.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import metrics
from .base import Guard, Hooks, register

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


# ------------------------------------------------------------- pipeline hooks


class _Hooks(Hooks):
    """Token buckets in the task pipeline: the queue's and the key's; a refusal keeps its slot."""

    order = 50

    def plan(self, call: Any, plan: Plan, execution: Any, arguments: dict[str, Any]) -> None:
        policy, keys = call.policy, call.runtime.keys
        if call.queue_bucket is not None:
            queue, spec = call.queue_bucket
            if policy.rate_cost > spec.burst:
                from ..errors import ConfigurationError

                raise ConfigurationError(
                    f"{call.name}: option 'rate_cost' ({policy.rate_cost}) exceeds the burst "
                    f"of queue {queue!r} ({spec.burst}); the task could never run"
                )
            key = keys.queue_bucket(queue)
            execution.buckets.append((key, spec, f"queue {queue!r}"))
            plan.add_bucket(key, spec, policy.rate_cost, slot=call.bucket_slots().get(key))
        if policy.key_bucket is not None:
            key = keys.key_bucket(policy.key_bucket.key(call.name, arguments))
            execution.buckets.append((key, policy.key_bucket.bucket, "rate_limit_key"))
            plan.add_bucket(key, policy.key_bucket.bucket, policy.rate_cost,
                            slot=call.bucket_slots().get(key))

    def refused(self, call: Any, outcome: Any, plan: Plan, execution: Any) -> Any:
        key, _, what = execution.buckets[plan.kinds[: outcome.index].count(GUARD.letter)]
        metrics.inc("reliable_rate_limited_total", bucket=what)
        if outcome.slot is not None:  # come back with it: keeps the task's place
            call.bucket_slots()[key] = outcome.slot
        call.defer(f"rate limited ({what})", scheduled=outcome.retry_after or 0.0,
                   guard="rate limit")
        return None


register(GUARD, _Hooks())
