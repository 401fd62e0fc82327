"""Guard ``C``: a circuit breaker, passed at admission and told the outcome (``breaker.lua``).

Specs and states: ``celery_reliable.breaker``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Guard, ms

if TYPE_CHECKING:
    from ..admission import Plan, Release
    from ..breaker import BreakerSpec

GUARD = Guard("C", "breaker", admit=(2, 4), complete=(2, 6))


def plan(plan: Plan, keys: tuple[str, str], spec: BreakerSpec, owner: str) -> int:
    """Pass the breaker (``Plan.add_breaker``); a probe while half-open."""
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
