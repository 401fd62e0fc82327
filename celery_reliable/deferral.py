"""Deferral: how long a task a guard refused ("not now") waits before it comes back.

Shared by every guard that defers (lock contention, a held idempotency record, a
bucket, a full bulkhead, an open breaker): the options ``defer_delay`` and
``defer_max_delay``, and :class:`DeferPolicy`, which turns them (and what the guard
asked) into a countdown, capped below the broker's redelivery window.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError
from .options import Option, OptionSet, seconds

if TYPE_CHECKING:
    from .config import ReliableSettings

__all__ = ["CONFIG", "DeferPolicy"]


@dataclass(frozen=True)
class DeferPolicy:
    """Countdown of deferrals (a guard said "not now")."""

    delay: float
    max_delay: float
    #: No countdown exceeds this (the broker's redelivery window less a margin), seconds.
    cap: float | None = None

    def countdown(
        self,
        deferrals: int,
        rand: float,
        *,
        not_after: float | None = None,
        not_before: float | None = None,
        scheduled: float | None = None,
        due: float | None = None,
    ) -> float:
        """Seconds until the next attempt after ``deferrals`` earlier deferrals.

        ``rand`` is uniform in [0, 1). The base is equal jitter,
        ``d/2 + rand * d/2`` with ``d = min(max_delay, delay * 2**deferrals)``;
        ``not_after`` (e.g. when the blocking lock expires) caps it, and
        ``not_before`` (e.g. a bucket's retry-after) floors it, jittered by up to
        20% so deferred tasks do not return in lockstep. ``scheduled`` (a token
        bucket's place in its queue of refused tasks) replaces all of that: the
        task comes back then, up to 5% (at most 1 s) later. Whatever the
        guard asked, the result never exceeds ``cap``: a task whose turn is
        further away comes back at the cap and is deferred again.
        ``due`` (a circuit breaker's own time: when it half-opens, or when its
        probes are worth asking again) also replaces the deferral growth: the
        task comes back ``due`` to ``1.2 * due`` seconds later, however often
        it was deferred before.
        """
        if due is not None:
            wait: float = max(0.0, due) * (1 + 0.2 * rand)
        elif scheduled is not None:
            wait = max(0.0, scheduled)
            wait += min(0.05 * wait, 1.0) * rand
        else:
            d = min(self.max_delay, self.delay * (2.0 ** min(deferrals, 30)))
            wait = d / 2 + rand * d / 2
            if not_after is not None and not_after >= 0:
                wait = min(wait, not_after + 0.05 * rand)
            if not_before is not None and not_before > 0:
                wait = max(wait, not_before * (1 + 0.2 * rand))
        return wait if self.cap is None else min(wait, self.cap)


def policy_part(task_name: str, opts: Mapping[str, Any],
                settings: ReliableSettings | None) -> dict[str, Any]:
    """``TaskPolicy.defer``, capped by the settings' redelivery window."""
    if opts["defer_max_delay"] < opts["defer_delay"]:
        raise ConfigurationError(
            f"{task_name}: option 'defer_max_delay' ({opts['defer_max_delay']}) must be >= "
            f"'defer_delay' ({opts['defer_delay']})"
        )
    return {"defer": DeferPolicy(delay=opts["defer_delay"], max_delay=opts["defer_max_delay"],
                                 cap=settings.countdown_cap if settings is not None else None)}


CONFIG = OptionSet(
    name="deferral",
    options=(
        Option(
            "defer_delay",
            1.0,
            "seconds",
            "Base countdown of a deferral. The n-th consecutive deferral of one task waits a "
            "random time in ``[d/2, d]`` with ``d = min(defer_max_delay, defer_delay * 2**n)``, "
            "or the guard's own retry-after when that is sooner. A circuit breaker's refusal "
            "uses the breaker's own time instead (when it half-opens, or after as long as its "
            "probes have been out), never this growth.",
            seconds(),
        ),
        Option(
            "defer_max_delay",
            30.0,
            "seconds",
            "Cap on a single deferral's countdown.",
            seconds(),
        ),
    ),
    build=policy_part,
    prefixes=("defer",),
    fields=True,
)
