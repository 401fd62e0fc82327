"""Guard ``C``: a circuit breaker, passed at admission and told the outcome (``breaker.lua``).

Specs and states: ``celery_reliable.breaker``. The option ``circuit_breaker`` and the
setting ``reliable_circuit_breakers`` (:data:`CONFIG`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..breaker import parse_breakers
from ..errors import ConfigurationError
from ..options import Option, OptionSet, text
from .base import Guard, ms

if TYPE_CHECKING:
    from ..admission import Plan, Release
    from ..breaker import BreakerSpec
    from ..config import ReliableSettings


def policy_part(task_name: str, opts: Mapping[str, Any],
                settings: ReliableSettings | None) -> dict[str, Any]:
    """``TaskPolicy.circuit_breaker`` (its name) and ``breaker`` (its spec, once configured)."""
    breaker = None
    if opts["circuit_breaker"] is not None and settings is not None:
        breaker = settings.circuit_breakers.get(opts["circuit_breaker"])
        if breaker is None:
            raise ConfigurationError(
                f"{task_name}: option 'circuit_breaker' names {opts['circuit_breaker']!r}, "
                "which is not configured in reliable_circuit_breakers "
                f"(configured: {', '.join(sorted(settings.circuit_breakers)) or 'none'})"
            )
    return {"circuit_breaker": opts["circuit_breaker"], "breaker": breaker}


CONFIG = OptionSet(
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
)

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
