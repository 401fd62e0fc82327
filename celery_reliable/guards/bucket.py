"""Guard ``B``: a token bucket with a queue of the refused tasks (``bucket.lua``).

Specs: ``celery_reliable.ratelimit``. Nothing to complete, roll back or renew. Options
``rate_limit_key``, ``rate_limit_key_spec``, ``rate_cost`` and the setting
``reliable_queue_rate_limits`` (:data:`CONFIG`); its part of a task's policy,
``policy.part(CONFIG)``, is a :class:`BucketPart`.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import metrics
from ..errors import ConfigurationError
from ..options import Option, OptionSet, render, seconds, template_spec
from ..ratelimit import BucketSpec, parse_bucket, parse_queue_limits
from .base import Guard, Hooks, register

if TYPE_CHECKING:
    from ..admission import Plan
    from ..config import ReliableSettings


@dataclass(frozen=True)
class KeyBucketPolicy:
    """A per-key token bucket (``rate_limit_key`` + ``rate_limit_key_spec``)."""

    spec: Any  # template str or callable
    bucket: BucketSpec

    def key(self, task_name: str, arguments: Mapping[str, Any]) -> str:
        return render(self.spec, task_name, "rate_limit_key", arguments)


@dataclass(frozen=True)
class BucketPart:
    """The bucket guard's part of a task's policy (``policy.part(CONFIG)``)."""

    #: The per-key bucket (``rate_limit_key``), or None.
    key_bucket: KeyBucketPolicy | None
    #: Tokens one execution takes from each bucket (``rate_cost``).
    rate_cost: float


def policy_part(task_name: str, opts: Mapping[str, Any],
                settings: ReliableSettings | None) -> BucketPart:
    """The per-key bucket (None without ``rate_limit_key``) and ``rate_cost``."""
    key_bucket = None
    if opts["rate_limit_key"] is not None:
        if opts["rate_limit_key_spec"] is None:
            raise ConfigurationError(
                f"{task_name}: option 'rate_limit_key' needs 'rate_limit_key_spec' (e.g. \"10/s\")"
            )
        bucket = parse_bucket(
            f"{task_name}: option 'rate_limit_key_spec'", opts["rate_limit_key_spec"]
        )
        if opts["rate_cost"] > bucket.burst:
            raise ConfigurationError(
                f"{task_name}: option 'rate_cost' ({opts['rate_cost']}) exceeds the "
                f"'rate_limit_key_spec' burst ({bucket.burst}); the task could never run"
            )
        key_bucket = KeyBucketPolicy(spec=opts["rate_limit_key"], bucket=bucket)
    elif opts["rate_limit_key_spec"] is not None:
        raise ConfigurationError(
            f"{task_name}: option 'rate_limit_key_spec' is set but 'rate_limit_key' is not"
        )
    return BucketPart(key_bucket, opts["rate_cost"])


CONFIG = OptionSet(
    name="bucket",
    options=(
        Option(
            "rate_limit_key",
            None,
            "template or callable",
            "A token bucket per key on top of the queue's (per-tenant quotas): a format "
            'template over the bound arguments (``"tenant:{tenant_id}"``) or a callable '
            "receiving them as one mapping. Needs ``rate_limit_key_spec``. Buckets are shared "
            "by every task that uses the same key.",
            template_spec,
            template=True,
        ),
        Option(
            "rate_limit_key_spec",
            None,
            'rate such as "10/s", or {rate, burst}',
            'The bucket of ``rate_limit_key``: ``"10/s"``, ``"300/m"``, ``"1000/h"``, or '
            '``{"rate": 25, "burst": 50}`` (rate in tokens per second); burst defaults to '
            "max(1, rate per second).",
            lambda owner, name, raw: raw,  # parsed with the key in policy_part
        ),
        Option(
            "rate_cost",
            1.0,
            "tokens",
            "Tokens one execution takes from each of its buckets (queue and key).",
            seconds(),
        ),
    ),
    settings=(
        Option(
            "reliable_queue_rate_limits",
            None,
            "queue → rate",
            'Fleet-wide token bucket per queue: ``{"emails": "50/s", "stripe": '
            '{"rate": 25, "burst": 50}}``. Every ReliableTask taken from the queue (by '
            "its message's routing key) draws ``rate_cost`` tokens; a denied task is deferred "
            "by the bucket's retry-after plus jitter, without consuming a retry.",
            parse_queue_limits,
        ),
    ),
    build=policy_part,
    prefixes=("rate_cost", "rate_limit_key"),
    guards=lambda part: part.key_bucket is not None,
)

GUARD = Guard("B", "bucket", admit=(1, 4))


def queue_label(labels: Mapping[str, str]) -> dict[str, str]:
    """``queue`` from the library's ``bucket`` label (``"queue 'emails'"``/``"rate_limit_key"``)."""
    if "queue" in labels:
        return {"queue": str(labels["queue"])}
    bucket = str(labels.get("bucket", ""))
    if bucket.startswith("queue "):
        try:
            return {"queue": str(ast.literal_eval(bucket[len("queue "):]))}
        except (ValueError, SyntaxError):
            return {"queue": bucket[len("queue "):]}
    return {"queue": bucket}


#: This guard's metrics (exported by ``celery_reliable.prometheus``). The window guard
#: (``window.py``) counts its deferrals under the same name, with the same ``bucket`` label.
METRICS: tuple[metrics.MetricSpec, ...] = (
    metrics.MetricSpec("reliable_rate_limited_total", "counter",
                       "Tasks deferred by an empty token bucket (queue, or rate_limit_key) "
                       "or a full sliding window (queue, or rate_limit_window).",
                       ("queue",), queue_label),
)


def plan(plan: Plan, key: str, spec: BucketSpec, cost: float, *, slot: int | None = None,
         queue: bool = True) -> int:
    """Take ``cost`` tokens from the bucket at ``key``; returns its index in ``plan``.

    A refused task is given a slot in the bucket's queue (``Refused.slot``);
    passing it back as ``slot`` keeps its place however often it comes back
    before its turn, and a fresh arrival (no slot) queues behind the queue
    instead of taking the tokens meant for it. ``queue=False``: a plain take
    that neither queues nor waits behind a queue (the retry budget). The
    script's mode: -1 a plain take, 0 a fresh arrival, > 0 the slot it was given.
    """
    mode = max(1, int(slot)) if slot is not None and queue else (0 if queue else -1)
    return plan.add(GUARD, [key], [repr(spec.rate), repr(spec.burst), repr(float(cost)), mode])


# ------------------------------------------------------------- status (read-only)


#: The bucket hash's fields read for its level (``bucket.lua``): tokens left when last
#: taken from, and when that was (server clock, ms).
LEVEL_FIELDS = ("t", "ts")


def level(spec: BucketSpec, fields: Sequence[Any], now_ms: int) -> float:
    """Tokens in a bucket at ``now_ms``: its :data:`LEVEL_FIELDS` refilled since; a bucket
    never taken from (or expired: full again) has its burst."""
    tokens, ts = fields
    if tokens is None:
        return spec.burst
    elapsed = max(0, now_ms - int(float(ts or 0)))
    return float(min(spec.burst, float(tokens) + elapsed * spec.rate / 1000))


# ------------------------------------------------------------- pipeline hooks


class _Hooks(Hooks):
    """Token buckets in the task pipeline: the queue's and the key's; a refusal keeps its slot."""

    order = 50

    def plan(self, call: Any, plan_: Plan, execution: Any, arguments: dict[str, Any]) -> None:
        policy, keys = call.policy.part(CONFIG), call.runtime.keys
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
            plan(plan_, key, spec, policy.rate_cost, slot=call.bucket_slots().get(key))
        if policy.key_bucket is not None:
            key = keys.key_bucket(policy.key_bucket.key(call.name, arguments))
            execution.buckets.append((key, policy.key_bucket.bucket, "rate_limit_key"))
            plan(plan_, key, policy.key_bucket.bucket, policy.rate_cost,
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
