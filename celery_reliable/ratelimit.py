"""Token-bucket specifications: ``"50/s"``, ``"300/m"``, ``"1000/h"`` or ``{"rate", "burst"}``.

The bucket itself is guard ``B`` of ``admit.lua`` (``guards/bucket.lua``): fractional
refill at ``rate`` tokens per second on the Redis server's clock, capped at
``burst``; a take of ``cost`` tokens either succeeds or reports how long until
it would. Idle buckets expire once they would be full again.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigurationError

__all__ = ["BucketSpec", "parse_bucket", "parse_queue_limits"]

_UNITS = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([a-z]+)\s*$")


@dataclass(frozen=True)
class BucketSpec:
    """``rate`` tokens per second refill a bucket holding at most ``burst`` tokens."""

    rate: float
    burst: float

    def __post_init__(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"rate must be > 0 tokens/s, got {self.rate!r}")
        if not (self.burst >= 1 and math.isfinite(self.burst)):
            raise ValueError(f"burst must be >= 1 token, got {self.burst!r}")


def _rate_per_second(raw: Any) -> float:
    if isinstance(raw, bool):
        raise ValueError(f"expected a rate such as '50/s', got {raw!r}")
    if isinstance(raw, (int, float)):
        return float(raw)
    if isinstance(raw, str):
        match = _RATE.match(raw.lower())
        if match and match.group(2) in _UNITS:
            return float(match.group(1)) / _UNITS[match.group(2)]
    raise ValueError(f"expected a rate such as '50/s', '300/m' or '1000/h', got {raw!r}")


def parse_bucket(owner: str, raw: Any) -> BucketSpec:
    """A bucket from ``"50/s"`` or ``{"rate": 25, "burst": 50}`` (rate: per second or a string).

    Raises ConfigurationError whose message starts with ``owner``.
    """
    try:
        if isinstance(raw, Mapping):
            unknown = set(raw) - {"rate", "burst"}
            if unknown:
                raise ValueError(f"unknown keys {sorted(unknown)}; expected 'rate' and 'burst'")
            if "rate" not in raw:
                raise ValueError("missing 'rate'")
            rate = _rate_per_second(raw["rate"])
            burst = raw.get("burst")
        else:
            rate = _rate_per_second(raw)
            burst = None
        if burst is None:
            burst = max(1.0, rate)
        elif isinstance(burst, bool) or not isinstance(burst, (int, float)):
            raise ValueError(f"'burst' must be a number of tokens, got {burst!r}")
        return BucketSpec(rate=rate, burst=float(burst))
    except ValueError as exc:
        raise ConfigurationError(f"{owner}: {exc}") from None


def parse_queue_limits(owner: str, name: str, raw: Any) -> dict[str, BucketSpec]:
    """``reliable_queue_rate_limits``: queue name → bucket."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigurationError(
            f"{owner}: option {name!r} must be a mapping of queue name to rate, got {raw!r}"
        )
    out = {}
    for queue, spec in raw.items():
        if not isinstance(queue, str) or not queue:
            raise ConfigurationError(f"{owner}: option {name!r} has a bad queue name {queue!r}")
        out[queue] = parse_bucket(f"{owner}: option {name!r} queue {queue!r}", spec)
    return out
