"""``retry()`` with the task's backoff, retry budget and guards released first; ``throttle()``."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from datetime import datetime
from types import FrameType
from typing import Any, NoReturn

from celery.exceptions import Retry

from .. import metrics
from ..admission import Admitted, Plan
from ..classify import retry_after
from ..declared import from_autoretry
from ..errors import ConfigurationError
from ..guards import bucket
from ..retrybudget import RetryBudget, deposits_for
from ..runtime import runtime_for
from .call import Call, Deferred
from .complete import complete
from .failure import dead_letter
from .headers import (
    BUCKET_SLOT_HEADER,
    DEFER_HEADER,
    FIRST_FAILURE_HEADER,
    LOCK_WAIT_HEADER,
    PREV_DELAY_HEADER,
    header,
    log,
)

__all__ = ["deposit_retry_budget", "retry", "take_retry_budget", "throttle"]


def retry(call: Call, celery_retry: Callable[..., Any], caller: FrameType, args: Any,
          kwargs: Any, exc: Any, throw: bool, eta: Any, countdown: float | None,
          max_retries: int | None, options: dict[str, Any]) -> Any:
    """:meth:`ReliableTask.retry <celery_reliable.task.ReliableTask.retry>`'s work.

    ``celery_retry`` is Celery's own ``Task.retry`` bound to the task; ``caller``
    the frame that called ``retry()`` (to recognise ``autoretry_for``).
    """
    task, request, policy = call.task, call.request, call.policy
    if getattr(request, "_reliable_dead_lettered", False):
        raise exc if isinstance(exc, BaseException) else task.MaxRetriesExceededError(
            f"{task.name}[{request.id}]: dead-lettered, not retried")
    backoff = policy.backoff
    if max_retries is None:
        max_retries = (backoff.max_attempts - 1 if backoff is not None
                       and backoff.max_attempts is not None else task.max_retries)
    headers = dict(options.pop("headers", None) or request.headers or {})
    headers.pop(DEFER_HEADER, None)
    headers.pop(LOCK_WAIT_HEADER, None)
    headers.pop(BUCKET_SLOT_HEADER, None)
    now = time.time()
    first = float(headers.get(FIRST_FAILURE_HEADER) or now)
    headers[FIRST_FAILURE_HEADER] = first
    exhausted = max_retries is not None and request.retries + 1 > max_retries
    reason = "retries exhausted"
    if backoff is not None and now - first > backoff.deadline:
        exhausted, reason = True, "deadline passed"
    if not exhausted and policy.retry_budget is not None and not request.is_eager \
            and not take_retry_budget(call):
        exhausted, reason = True, "retry budget exhausted"
    if exhausted:
        error = exc if isinstance(exc, BaseException) else task.MaxRetriesExceededError(
            f"{task.name}[{request.id}]: {reason}")
        dead_letter(call, error, reason)
        if reason == "retries exhausted":
            return celery_retry(args, kwargs, exc, throw, eta, countdown, max_retries,
                                headers=headers, **options)
        raise error
    if countdown is None and eta is None and backoff is not None:
        previous = headers.get(PREV_DELAY_HEADER)
        countdown = backoff.delay(request.retries, random.Random(),
                                  float(previous) if previous is not None else None)
        floor = retry_after(exc) if isinstance(exc, BaseException) else None
        if floor is not None:
            countdown = max(countdown, floor)
        if policy.defer.cap is not None:  # never past the broker's redelivery window
            countdown = min(countdown, policy.defer.cap)
    elif policy.defer.cap is not None:
        countdown = _retry_countdown(call, policy.defer.cap, countdown, eta, caller)
    if countdown is not None:
        headers[PREV_DELAY_HEADER] = countdown
    metrics.inc("reliable_retries_total", task=task.name,
                reason=type(exc).__name__ if isinstance(exc, BaseException) else "retry")
    execution = getattr(request, "_reliable_execution", None)
    if execution is not None:
        try:
            complete(call, execution, failure=Retry(exc=exc))
        except Exception:  # bookkeeping must never stop the retry from being published
            log.warning("celery-reliable: %s could not release its guards before "
                        "retrying; they expire by their TTL", call.describe, exc_info=True)
    retried = celery_retry(args, kwargs, exc, throw, eta, countdown, max_retries,
                           headers=headers, **options)
    # Only reached with throw=False: the retry is published (not in eager mode,
    # where Celery runs no retry for throw=False), the body goes on.
    if not request.is_eager:
        request._reliable_retried = True
    return retried


def _retry_countdown(call: Call, cap: float, countdown: float | None, eta: Any,
                     caller: FrameType) -> float | None:
    """A retry's countdown inside the broker's redelivery window less its margin (``cap``).

    A delay the caller did not write is the library's to cap: Celery's
    ``default_retry_delay`` (neither countdown nor eta) and the
    ``retry_backoff`` delay that Celery's ``autoretry_for`` wrapper computes
    (found above ``caller``, see :func:`~celery_reliable.declared.from_autoretry`).
    A countdown or eta the caller passed (``retry_kwargs`` included) is kept,
    with a warning if beyond.
    """
    task = call.task
    if countdown is None and not eta:
        default = task.default_retry_delay
        return None if default is None else min(float(default), cap)
    if countdown is not None and getattr(task, "retry_backoff", False) \
            and from_autoretry(task, countdown, caller):
        return min(float(countdown), cap)
    _warn_beyond_window(call, cap, countdown, eta)
    return countdown


def _warn_beyond_window(call: Call, cap: float, countdown: float | None, eta: Any) -> None:
    """The caller's own countdown is kept; say when the broker may redeliver it meanwhile."""
    if countdown is not None:
        wait: float | None = float(countdown)
    elif isinstance(eta, datetime):
        wait = eta.timestamp() - time.time()
    else:
        wait = None
    if wait is not None and wait > cap:
        log.warning(
            "celery-reliable: %s retries in %.0fs, beyond the broker's redelivery "
            "window (countdowns are capped at %.0fs): the broker may deliver it again "
            "meanwhile; raise the window (visibility_timeout / consumer_timeout, and "
            "reliable_redelivery_window) or retry sooner",
            call.describe, wait, cap,
        )


def take_retry_budget(call: Call) -> bool:
    """One retry from the task's fleet-wide retry budget (fail open if the store is down).

    A ratio budget (:class:`RetryBudget`) also credits, in the same round trip, the
    first executions this process counted since it last sent them.
    """
    budget = call.policy.retry_budget
    assert budget is not None
    runtime, store, name = call.runtime, call.store, call.name
    try:
        if isinstance(budget, RetryBudget):
            key = runtime.keys.retry_budget_window(name)
            deposits = deposits_for(runtime)
            try:
                granted = store.spend_retry_budget(key, budget, deposits.take(key))
            except store.errors:
                deposits.failed(key, budget.ttl)
                raise
        else:
            plan = Plan()
            bucket.plan(plan, runtime.keys.retry_budget(name), budget, 1, queue=False)
            granted = isinstance(store.admit(plan), Admitted)
    except store.errors:
        # The budget only limits retries; a retry still goes through the
        # guards, which fail closed on their own.
        log.warning("celery-reliable: retry budget of %s unavailable; retrying", name,
                    exc_info=True)
        return True
    if not granted:
        metrics.inc("reliable_retry_budget_exhausted_total", task=name)
    return granted


def deposit_retry_budget(task: Any, budget: RetryBudget) -> None:
    """Count a first execution for the ratio budget (no I/O here: the count is sent
    with this process's next retry or by a background thread once a second)."""
    request = task.request
    if request.is_eager or request.called_directly or header(request, DEFER_HEADER):
        return  # the budget is not used eagerly; a deferral's redelivery is no new call
    runtime = runtime_for(task.app)
    deposits_for(runtime).add(runtime.keys.retry_budget_window(task.name), budget)


def throttle(call: Call, seconds: float, direct_call: str | None) -> NoReturn:
    """:meth:`ReliableTask.throttle <celery_reliable.task.ReliableTask.throttle>`'s work."""
    name = call.name
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
        raise ConfigurationError(f"{name}: throttle() takes seconds >= 0, got {seconds!r}")
    execution = getattr(call.request, "_reliable_execution", None)
    if execution is None or not execution.buckets:
        raise ConfigurationError(
            direct_call
            or f"{name}: throttle() needs a token bucket (a rate-limited queue in "
            "reliable_queue_rate_limits, or option 'rate_limit_key') and a running task"
        )
    args: list[Any] = [max(1, int(seconds * 1000))]
    for _, spec, _ in execution.buckets:
        args += [repr(spec.burst), repr(spec.rate)]  # throttle.lua's order
    call.store.throttle([key for key, _, _ in execution.buckets], args)
    metrics.inc("reliable_throttles_total", task=name)
    # a deferral (not a run: a sliding window gives its admission back), like defer_outage
    complete(call, execution, failure=Deferred())
    call.defer(f"throttled for {seconds:g}s", not_before=float(seconds), guard="throttle")
    raise AssertionError("unreachable")  # pragma: no cover - defer raises in a worker


