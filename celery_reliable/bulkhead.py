"""Bulkhead tiers: fleet-wide concurrency slots, leased so a dead worker cannot leak them.

A tier has ``concurrent`` slots. A running task holds one as a lease in a
Redis sorted set (member = the execution, score = lease expiry on the server
clock), renewed by the worker's heartbeat; expired members are swept by every
acquire, so a killed worker's slot frees within the lease. When the tier is
full, ``policy`` decides: ``wait`` defers the task (at most ``queue`` tasks
wait at once, each at most ``timeout`` seconds, then ``BulkheadFull``),
``drop`` ignores it (state ``DROPPED``), ``fail`` raises ``BulkheadFull``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .errors import ConfigurationError

__all__ = ["DEFAULT_TIERS", "TierSpec", "TierStats", "parse_bulkheads"]

POLICIES = ("wait", "drop", "fail")


@dataclass(frozen=True)
class TierSpec:
    """One tier: ``concurrent`` slots, ``queue`` waiters, ``timeout`` and ``lease`` in seconds."""

    concurrent: int
    queue: int
    timeout: float
    policy: str
    lease: float = 30.0


@dataclass(frozen=True)
class TierStats:
    """A tier as seen now, fleet-wide: tasks running, waiting, and counters since creation."""

    active: int
    waiting: int
    rejected: int
    timed_out: int
    dropped: int


#: Seed defaults; override in ``reliable_bulkheads`` or with environment variables.
DEFAULT_TIERS: dict[str, TierSpec] = {
    "critical": TierSpec(concurrent=5, queue=10, timeout=180.0, policy="wait"),
    "standard": TierSpec(concurrent=8, queue=12, timeout=120.0, policy="wait"),
    "optional": TierSpec(concurrent=4, queue=6, timeout=60.0, policy="drop"),
}

_FIELDS = {"concurrent": int, "queue": int, "timeout": float, "policy": str, "lease": float}


def _field(owner: str, field: str, raw: Any) -> Any:
    kind = _FIELDS[field]
    if kind is str:
        if raw not in POLICIES:
            raise ConfigurationError(
                f"{owner} {field!r} must be one of {', '.join(map(repr, POLICIES))}, got {raw!r}"
            )
        return raw
    if isinstance(raw, str):
        try:
            raw = kind(raw)
        except ValueError:
            raise ConfigurationError(f"{owner} {field!r} must be a number, got {raw!r}") from None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
        raise ConfigurationError(f"{owner} {field!r} must be a number, got {raw!r}")
    if kind is int and raw != int(raw):
        raise ConfigurationError(f"{owner} {field!r} must be a whole number, got {raw!r}")
    minimum = 1 if field == "concurrent" else 0
    if raw < minimum or (field in ("timeout", "lease") and raw <= 0):
        raise ConfigurationError(f"{owner} {field!r} is out of range: {raw!r}")
    return kind(raw)


def parse_bulkheads(
    owner: str, name: str, raw: Any, environ: Mapping[str, str] | None = None
) -> dict[str, TierSpec]:
    """``reliable_bulkheads`` merged over the defaults, then environment overrides.

    Environment: ``RELIABLE_BULKHEAD_<TIER>_CONCURRENT``, ``_QUEUE``, ``_TIMEOUT``
    (tier upper-cased, ``-`` as ``_``).
    """
    environ = os.environ if environ is None else environ
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigurationError(
            f"{owner}: option {name!r} must be a mapping of tier name to settings, got {raw!r}"
        )
    tiers = dict(DEFAULT_TIERS)
    for tier, spec in raw.items():
        where = f"{owner}: option {name!r} tier {tier!r}"
        if not isinstance(tier, str) or not tier or not tier.replace("-", "_").isidentifier():
            raise ConfigurationError(f"{where}: a tier name must be a word")
        if not isinstance(spec, Mapping):
            raise ConfigurationError(f"{where} must be a mapping, got {spec!r}")
        unknown = set(spec) - set(_FIELDS)
        if unknown:
            raise ConfigurationError(
                f"{where}: unknown keys {sorted(unknown)} (known: {', '.join(_FIELDS)})"
            )
        base = tiers.get(tier)
        if base is None:
            missing = {"concurrent"} - set(spec)
            if missing:
                raise ConfigurationError(f"{where}: a new tier needs 'concurrent'")
            base = TierSpec(concurrent=1, queue=0, timeout=60.0, policy="wait")
        tiers[tier] = replace(base, **{k: _field(where, k, v) for k, v in spec.items()})
    for tier in list(tiers):
        env_name = tier.upper().replace("-", "_")
        changes = {}
        for field in ("concurrent", "queue", "timeout"):
            var = f"RELIABLE_BULKHEAD_{env_name}_{field.upper()}"
            if var in environ:
                changes[field] = _field(f"environment variable {var}:", field, environ[var])
        if changes:
            tiers[tier] = replace(tiers[tier], **changes)
    return tiers
