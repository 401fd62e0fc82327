"""Backoff policies with jitter: pure, float seconds, given their randomness.

Formulas (AWS Architecture Blog, "Exponential Backoff and Jitter"), for the
n-th retry (n = 0 for the first), ``exp = min(cap, base * 2**n)``:

* ``full``         uniform(0, exp)                      (default; fewest calls under contention)
* ``equal``        exp/2 + uniform(0, exp/2)            (never shorter than half)
* ``decorrelated`` min(cap, uniform(base, 3 * previous)) (previous = the last delay, base at first)
* ``none``         exp                                  (no jitter: unsuitable under contention,
                                                         every client retries in lockstep)

``max_attempts`` counts executions (first run included); ``deadline`` bounds
the time from the first failure to the last retry.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

__all__ = ["JITTERS", "Backoff"]

Jitter = Literal["full", "equal", "decorrelated", "none"]
JITTERS: tuple[str, ...] = ("full", "equal", "decorrelated", "none")


def _seconds(name: str, value: float | timedelta | None, *, allow_none: bool = False) -> float:
    if value is None and allow_none:
        return math.inf
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"Backoff: {name} must be > 0 seconds, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Backoff:
    """A retry delay policy. Build it with :meth:`exponential` or a preset."""

    base: float
    cap: float
    jitter: Jitter = "full"
    max_attempts: int | None = None
    deadline: float = math.inf

    @classmethod
    def exponential(cls, base: float | timedelta = 1.0, cap: float | timedelta = 60.0,
                    jitter: Jitter = "full", *, max_attempts: int | None = None,
                    deadline: float | timedelta | None = None) -> Backoff:
        """``base`` and ``cap`` in seconds (or timedelta); see the module docstring."""
        b = _seconds("base", base)
        c = _seconds("cap", cap)
        if c < b:
            raise ValueError(f"Backoff: cap ({c}) must be >= base ({b})")
        if jitter not in JITTERS:
            raise ValueError(f"Backoff: jitter must be one of {JITTERS}, got {jitter!r}")
        if max_attempts is not None and (isinstance(max_attempts, bool)
                                         or not isinstance(max_attempts, int) or max_attempts < 1):
            raise ValueError(f"Backoff: max_attempts must be an int >= 1, got {max_attempts!r}")
        return cls(b, c, jitter, max_attempts, _seconds("deadline", deadline, allow_none=True))

    # Presets from the project's seed.
    @classmethod
    def user_facing(cls) -> Backoff:
        """2 attempts, 0.5 s base, 2 s cap: a person is waiting."""
        return cls.exponential(0.5, 2.0, max_attempts=2)

    @classmethod
    def background(cls) -> Backoff:
        """5 attempts, 2 s base, 60 s cap."""
        return cls.exponential(2.0, 60.0, max_attempts=5)

    @classmethod
    def rate_limited_api(cls) -> Backoff:
        """3 attempts, 2 s base, 120 s cap (honour ``Retry-After`` on top)."""
        return cls.exponential(2.0, 120.0, max_attempts=3)

    def delay(self, retry: int, rng: random.Random | None = None,
              previous: float | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (0-based).

        ``previous`` is the last delay (decorrelated jitter only).
        """
        rng = rng or random.Random()
        exp = min(self.cap, self.base * (2.0 ** min(retry, 64)))
        if self.jitter == "full":
            return rng.uniform(0, exp)
        if self.jitter == "equal":
            return exp / 2 + rng.uniform(0, exp / 2)
        if self.jitter == "decorrelated":
            prev = self.base if previous is None else max(previous, self.base)
            return min(self.cap, rng.uniform(self.base, prev * 3))
        return exp
