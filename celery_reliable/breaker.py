"""Circuit breakers shared by every worker (state in Redis, guard ``C`` of the scripts).

Closed: calls run; each finished call appends its outcome to a sliding window
of the last ``window`` calls; once at least ``min_calls`` are in the window
and ``failure_threshold`` of them failed, the breaker opens. Only classified
failures count (``celery_reliable.classify``; a 404 does not), and a call
slower than ``slow_call_seconds`` counts as a failure.
Open: tasks are deferred until ``open_seconds`` have passed (not run, not
failed, no retry consumed). Then half-open: at most ``half_open_max`` trial
executions run at once, fleet-wide (each a lease renewed by the heartbeat, so a
slow probe keeps its place and a dead one frees it after ``probe_lease``);
``success_threshold`` successes close it, one failure re-opens it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .errors import ConfigurationError

__all__ = ["CLOSED", "DEFAULT_BREAKER", "HALF_OPEN", "OPEN", "BreakerSpec", "parse_breakers"]

CLOSED, OPEN, HALF_OPEN = 0, 1, 2
STATE_NAMES = {CLOSED: "closed", OPEN: "open", HALF_OPEN: "half-open"}


@dataclass(frozen=True)
class BreakerSpec:
    """Thresholds of one breaker; seconds for times."""

    failure_threshold: int = 5
    window: int = 10
    min_calls: int = 5
    open_seconds: float = 30.0
    success_threshold: int = 2
    half_open_max: int = 2
    slow_call_seconds: float | None = None
    probe_lease: float = 60.0


#: Seed defaults: 5 failures in a window of 10, 30 s open, 2 successes to close.
DEFAULT_BREAKER = BreakerSpec()

_INT = ("failure_threshold", "window", "min_calls", "success_threshold", "half_open_max")
_FLOAT = ("open_seconds", "slow_call_seconds", "probe_lease")


def parse_breakers(owner: str, name: str, raw: Any) -> dict[str, BreakerSpec]:
    """``reliable_circuit_breakers``: breaker name → thresholds over the defaults."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigurationError(f"{owner}: option {name!r} must be a mapping of breaker name "
                                 f"to settings, got {raw!r}")
    out = {}
    for breaker, spec in raw.items():
        where = f"{owner}: option {name!r} breaker {breaker!r}"
        if not isinstance(breaker, str) or not breaker:
            raise ConfigurationError(f"{where}: a breaker name must be a non-empty string")
        spec = spec or {}
        if not isinstance(spec, Mapping):
            raise ConfigurationError(f"{where} must be a mapping, got {spec!r}")
        unknown = set(spec) - set(_INT) - set(_FLOAT)
        if unknown:
            raise ConfigurationError(f"{where}: unknown keys {sorted(unknown)}")
        values: dict[str, Any] = {}
        for key, value in spec.items():
            if key == "slow_call_seconds" and value is None:
                values[key] = None
                continue
            ok = (not isinstance(value, bool) and isinstance(value, (int, float))
                  and math.isfinite(value) and value > 0)
            if key in _INT:
                ok = ok and float(value).is_integer()
            if not ok:
                raise ConfigurationError(f"{where}: {key!r} must be a positive "
                                         f"{'integer' if key in _INT else 'number'}, "
                                         f"got {value!r}")
            values[key] = int(value) if key in _INT else float(value)
        merged = replace(DEFAULT_BREAKER, **values)
        if merged.failure_threshold > merged.window or merged.min_calls > merged.window:
            raise ConfigurationError(f"{where}: 'failure_threshold' and 'min_calls' must be "
                                     f"<= 'window' ({merged.window})")
        out[breaker] = merged
    return out
