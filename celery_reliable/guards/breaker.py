"""Guard ``C``: a circuit breaker, passed at admission and told the outcome (``breaker.lua``).

Specs and states: ``celery_reliable.breaker``. The option ``circuit_breaker`` and the
setting ``reliable_circuit_breakers`` (:data:`CONFIG`); its part of a task's policy,
``policy.part(CONFIG)``, is a :class:`BreakerPart`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery.exceptions import Retry

from .. import metrics
from ..breaker import HALF_OPEN, OPEN, parse_breakers
from ..errors import ConfigurationError
from ..options import Option, OptionSet, text
from .base import Guard, Hooks, ms, register

if TYPE_CHECKING:
    from ..admission import Plan, Release
    from ..breaker import BreakerSpec
    from ..config import ReliableSettings


@dataclass(frozen=True)
class BreakerPart:
    """The breaker guard's part of a task's policy (``policy.part(CONFIG)``)."""

    #: The breaker's name (``circuit_breaker``), or None.
    circuit_breaker: str | None
    #: Its spec, once the app is configured (None before).
    breaker: BreakerSpec | None


def policy_part(task_name: str, opts: Mapping[str, Any],
                settings: ReliableSettings | None) -> BreakerPart:
    """The breaker's name (``circuit_breaker``) and its spec (once configured)."""
    breaker = None
    if opts["circuit_breaker"] is not None and settings is not None:
        breaker = settings.circuit_breakers.get(opts["circuit_breaker"])
        if breaker is None:
            raise ConfigurationError(
                f"{task_name}: option 'circuit_breaker' names {opts['circuit_breaker']!r}, "
                "which is not configured in reliable_circuit_breakers "
                f"(configured: {', '.join(sorted(settings.circuit_breakers)) or 'none'})"
            )
    return BreakerPart(opts["circuit_breaker"], breaker)


CONFIG = OptionSet(
    name="breaker",
    options=(
        Option(
            "circuit_breaker",
            None,
            "breaker name",
            "Circuit breaker shared by every worker (configured in "
            "``reliable_circuit_breakers``). While open, the task is deferred, not run.",
            text(optional=True),
        ),
    ),
    settings=(
        Option(
            "reliable_circuit_breakers",
            None,
            "name → thresholds",
            "Circuit breakers: ``{\"payments-api\": {\"failure_threshold\": 5, \"window\": 10, "
            "\"min_calls\": 5, \"open_seconds\": 30, \"success_threshold\": 2, "
            "\"half_open_max\": 2, \"slow_call_seconds\": None, \"probe_lease\": 60}}`` "
            "(these are the defaults).",
            parse_breakers,
        ),
    ),
    build=policy_part,
    prefixes=("circuit",),
    guards=lambda part: part.circuit_breaker is not None,
)

GUARD = Guard("C", "breaker", admit=(2, 4), complete=(2, 6))

#: This guard's metrics (exported by ``celery_reliable.prometheus``); transitions are
#: counted by the pipeline (``pipeline.call``).
METRICS: tuple[metrics.MetricSpec, ...] = (
    metrics.MetricSpec("reliable_circuit_transitions_total", "counter",
                       "Circuit breaker transitions seen by this process, by new state.",
                       ("breaker", "state")),
    metrics.MetricSpec("reliable_circuit_deferrals_total", "counter",
                       "Tasks deferred because their circuit breaker was open.", ("breaker",)),
)


def plan(plan: Plan, keys: tuple[str, str], spec: BreakerSpec, owner: str) -> int:
    """Pass the breaker: refused while open or while half-open probes are all taken."""
    args = [ms(spec.open_seconds), spec.half_open_max, owner, ms(spec.probe_lease)]
    return plan.add(GUARD, list(keys), args, undo=(keys[1], owner), lease=spec.probe_lease)


def release(release: Release, keys: tuple[str, str], spec: BreakerSpec, owner: str) -> None:
    """Report the outcome to the breaker; neutral unless :func:`settle` says."""
    release.add(GUARD, list(keys), [owner, "n", spec.window, spec.failure_threshold,
                                    spec.min_calls, spec.success_threshold])


def settle(release: Release, outcome: str) -> None:
    """``s`` success, ``f`` a classified failure, ``n`` neutral."""
    for args in release.entries(GUARD):
        args[1] = outcome


# ------------------------------------------------------------- status (read-only)


#: The breaker hash's fields read for its state (``breaker.lua``): the state, and when
#: it opened (server clock, ms).
STATE_FIELDS = ("s", "o")


def state(spec: BreakerSpec, fields: Sequence[Any], now_ms: int) -> int:
    """0 closed, 1 open, 2 half-open, from :data:`STATE_FIELDS` at ``now_ms`` (an open
    breaker past its open time reads 2: its next call is a probe)."""
    raw, opened = fields
    value = int(raw or 0)
    if value == OPEN and now_ms >= int(opened or 0) + spec.open_seconds * 1000:
        return HALF_OPEN
    return value


# ------------------------------------------------------------- pipeline hooks


class _Hooks(Hooks):
    """A circuit breaker in the task pipeline: a probe lease while half-open, the outcome."""

    order = 40

    def plan(self, call: Any, plan_: Plan, execution: Any, arguments: dict[str, Any]) -> None:
        policy = call.policy.part(CONFIG)
        if policy.breaker is not None and policy.circuit_breaker is not None:
            plan(plan_, call.runtime.keys.breaker(policy.circuit_breaker), policy.breaker,
                 execution.owner)

    def hold(self, call: Any, plan: Plan, index: int, result: int, execution: Any,
             started: float) -> None:
        policy = call.policy.part(CONFIG)
        release(execution.release, call.runtime.keys.breaker(policy.circuit_breaker),
                policy.breaker, execution.owner)
        if result == 2:
            call.breaker_changed(policy.circuit_breaker, OPEN, HALF_OPEN)
        if result in (1, 2):
            # A half-open probe: renewed like any lease, so a probe slower than
            # probe_lease stays the probe and its outcome still counts.
            execution.leases.append(call.lease(
                "C", plan.keys[plan.offsets[index] + 1], execution.owner,
                policy.breaker.probe_lease, started, "breaker probe"))

    def refused(self, call: Any, outcome: Any, plan: Plan, execution: Any) -> Any:
        name = call.policy.part(CONFIG).circuit_breaker
        metrics.inc("reliable_circuit_deferrals_total", breaker=str(name))
        call.defer(f"circuit {name!r} open", due=outcome.retry_after or 1.0,
                   guard="circuit_breaker")
        return None

    def completing(self, call: Any, execution: Any, failure: BaseException | None) -> None:
        settle(execution.release, _outcome(call, execution, failure))

    def settled(self, call: Any, execution: Any, result: int) -> bool:
        old, new = divmod(result, 10)
        if old != new:
            call.breaker_changed(str(call.policy.part(CONFIG).circuit_breaker), old, new)
        return False


def _outcome(call: Any, execution: Any, failure: BaseException | None) -> str:
    """``s``, ``f`` (a classified failure, or a slow call) or ``n`` (does not count)."""
    if failure is None:
        slow = call.policy.part(CONFIG).breaker.slow_call_seconds
        if slow is not None and time.monotonic() - execution.started > slow:
            return "f"
        return "s"
    from ..pipeline.call import Deferred

    if isinstance(failure, Deferred):
        return "n"
    if isinstance(failure, Retry):
        failure = failure.exc if isinstance(failure.exc, BaseException) else None
        if failure is None:
            return "n"
    return "f" if call.retryable(failure) else "n"


register(GUARD, _Hooks())
