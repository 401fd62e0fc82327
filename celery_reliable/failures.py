"""What a failure leads to: a retry (``backoff``, ``retry_for``, the retry budget) or the
dead-letter table. Their task options and app settings, and their part of a task's policy.

Not a guard of the admission plan (no letter, no Lua fragment): these options act after
the task ran, when it failed. Delays: ``celery_reliable.backoff``; the budget:
``celery_reliable.retrybudget``; the table: ``celery_reliable.deadletter``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .backoff import Backoff
from .options import Option, OptionSet, err, optional_flag, text
from .retrybudget import RetryBudget, parse_retry_budget

if TYPE_CHECKING:
    from .config import ReliableSettings

__all__ = ["CONFIG"]


def _backoff(owner: str, name: str, raw: Any) -> Any:
    if raw is None or isinstance(raw, Backoff):
        return raw
    raise err(owner, name, f"must be a Backoff (e.g. Backoff.exponential(base=2, cap=60)) "
                           f"or None, got {raw!r}")


def _exception_types(owner: str, name: str, raw: Any) -> tuple[type[BaseException], ...]:
    if raw is None:
        return ()
    items = raw if isinstance(raw, (tuple, list)) else (raw,)
    for item in items:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise err(owner, name, f"must be exception classes, got {item!r}")
    return tuple(items)


def _budget(owner: str, name: str, raw: Any) -> Any:
    return parse_retry_budget(owner, name, raw)


def policy_part(task_name: str, opts: Mapping[str, Any],
                settings: ReliableSettings | None) -> dict[str, Any]:
    """``TaskPolicy.backoff``, ``retry_for``, ``retry_budget`` and ``dead_letter``.

    Without their options, the budget is ``reliable_retry_budget`` and dead letters are
    on when ``reliable_database_url`` is set.
    """
    budget = opts["retry_budget"]
    if budget is None and settings is not None:
        budget = settings.retry_budget
    dead_letter = opts["dead_letter"]
    if dead_letter is None:
        dead_letter = bool(settings is not None and settings.database_url)
    return {"backoff": opts["backoff"], "retry_for": opts["retry_for"],
            "retry_budget": budget or None, "dead_letter": dead_letter}


CONFIG = OptionSet(
    name="failures",
    options=(
        Option(
            "backoff",
            None,
            "Backoff policy",
            "Retry delays: ``Backoff.exponential(base=2, cap=60, jitter=\"full\")`` or a preset "
            "(``Backoff.user_facing()``, ``.background()``, ``.rate_limited_api()``). With it, "
            "retryable failures (connection errors, timeouts, HTTP 408/429/5xx, plus "
            "``retry_for`` and ``autoretry_for``) are retried automatically, and every "
            "``self.retry()`` without a countdown waits the policy's delay (floored by a "
            "``Retry-After`` header). ``max_attempts`` and ``deadline`` bound the retries.",
            _backoff,
        ),
        Option(
            "retry_for",
            (),
            "exception classes",
            "Exceptions retried besides the transient ones (with ``backoff``).",
            _exception_types,
        ),
        Option(
            "retry_budget",
            None,
            "RetryBudget, rate, False or None",
            "Fleet-wide retry budget of this task: past it, a failure is dead-lettered "
            "instead of retried (this stops retry storms). ``RetryBudget(ratio=0.2, "
            "min_per_second=10, ttl=10)`` or ``{\"ratio\": 0.2, \"min_per_second\": 10, "
            "\"ttl\": 10}``: retries may be ``ratio`` of the task's first executions in the "
            "last ``ttl`` seconds plus ``min_per_second`` (Finagle's retry budget). A rate "
            "(``\"10/s\"`` or ``{\"rate\": 10, \"burst\": 10}``): an absolute token bucket of "
            "retries. ``None`` uses ``reliable_retry_budget``; ``False`` disables the budget.",
            _budget,
        ),
        Option(
            "dead_letter",
            None,
            "bool or None",
            "Record terminal failures in the PostgreSQL dead-letter table. ``None``: when "
            "``reliable_database_url`` is set.",
            optional_flag,
        ),
    ),
    settings=(
        Option(
            "reliable_retry_budget",
            RetryBudget(),
            "RetryBudget, rate or None",
            "Default fleet-wide retry budget per task name (see the task option "
            "``retry_budget``): 20 % of the task's first executions in the last 10 s plus "
            "10 retries/s, so a burst of fresh failures is retried (100 at once, more with "
            "traffic) and a sustained storm is held to about 1.2 times the traffic plus 10/s. "
            "The absolute ``\"10/s\"`` of earlier versions is still accepted. ``None`` "
            "disables it.",
            _budget,
        ),
        Option(
            "reliable_dead_letter_queue",
            None,
            "queue name",
            "Also publish each dead-lettered task to this queue (same task name, arguments "
            "and headers, plus a ``reliable_dead_letter`` header), for consumers of your own.",
            text(optional=True),
        ),
    ),
    build=policy_part,
    prefixes=("backoff", "retry_budget"),
    fields=True,
)
