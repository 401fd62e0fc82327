"""The demo's verdicts: recorded observations in, one table row per guarantee out.

Pure functions only (no Redis, no PostgreSQL, no clock), so every verdict the
demo prints can be unit-tested with fabricated observations
(``tests/test_demo.py``). The runner (``demo_project.__main__``) records what
happened into the dataclasses below; ``check_*`` decide PASS or FAIL.
"""

from __future__ import annotations

import bisect
import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BucketRun",
    "Duplicates",
    "KilledPayment",
    "PartnerCall",
    "PartnerOutage",
    "PausedHolder",
    "ReportFlood",
    "Singleton",
    "Verdict",
    "breaker_call_bound",
    "check_breaker",
    "check_bucket",
    "check_duplicates",
    "check_killed_payment",
    "check_paused_holder",
    "check_report_flood",
    "check_retry_jitter",
    "check_singleton",
    "error_verdict",
    "exit_code",
    "max_in_window",
    "state_counts",
    "steady_rate",
]

SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
DROPPED = "DROPPED"
SKIPPED = "SKIPPED"


@dataclass(frozen=True)
class Verdict:
    """One row of the final table."""

    guarantee: str
    configured: str
    observed: str
    passed: bool


def error_verdict(guarantee: str, exc: BaseException) -> Verdict:
    """A scenario that could not finish is a FAIL with the error as its observation."""
    return Verdict(guarantee, "-", f"error: {type(exc).__name__}: {exc}"[:160], False)


def exit_code(verdicts: Sequence[Verdict]) -> int:
    """0 if there are verdicts and all passed, else 1."""
    return 0 if verdicts and all(v.passed for v in verdicts) else 1


def state_counts(states: Iterable[str]) -> str:
    counts = Counter(states)
    return ", ".join(f"{n} {state}" for state, n in counts.most_common()) or "none"


# ------------------------------------------------------------ payments


@dataclass(frozen=True)
class Duplicates:
    """N submissions of one payment capture (same order, same arguments)."""

    submissions: int
    states: Sequence[str]
    results: Sequence[Any]
    executions: int  # task bodies that started
    effect_rows: int  # rows in demo_payments for the order


def check_duplicates(o: Duplicates) -> Verdict:
    distinct = len({json.dumps(r, sort_keys=True, default=str) for r in o.results})
    succeeded = sum(s == SUCCESS for s in o.states)
    passed = (o.submissions > 1 and len(o.states) == o.submissions
              and succeeded == o.submissions and len(o.results) == o.submissions
              and distinct == 1 and o.executions == 1 and o.effect_rows == 1)
    return Verdict(
        "duplicate submissions -> 1 effect",
        f"idempotency_key capture:{{order_id}}; {o.submissions} submissions of one payment",
        f"{o.effect_rows} payment row(s), body ran {o.executions}x, "
        f"{succeeded}/{o.submissions} SUCCESS, {distinct} distinct result(s)",
        passed,
    )


@dataclass(frozen=True)
class KilledPayment:
    """A capture whose worker process was SIGKILLed after its write, before its commit."""

    killed_pid: int | None  # None: the runner never got to kill it
    rows_at_kill: int  # committed payment rows when it was killed
    executions: int  # task bodies that started (the killed one included)
    final_state: str
    result_pid: int | None
    effect_rows: int  # payment rows once the redelivery finished


def check_killed_payment(o: KilledPayment) -> Verdict:
    passed = (o.killed_pid is not None and o.rows_at_kill == 0 and o.executions >= 2
              and o.final_state == SUCCESS and o.effect_rows == 1
              and o.result_pid is not None and o.result_pid != o.killed_pid)
    killed = f"pid {o.killed_pid} killed" if o.killed_pid is not None else "not killed"
    return Verdict(
        "kill -9 mid-payment -> exactly once",
        "acks_late + reject_on_worker_lost; write in idempotent_transaction()",
        f"{killed} ({o.rows_at_kill} rows committed then); body ran {o.executions}x; "
        f"{o.final_state} in pid {o.result_pid}; {o.effect_rows} payment row(s)",
        passed,
    )


@dataclass(frozen=True)
class PausedHolder:
    """A capture paused (SIGSTOP) past its lock TTL while a cancellation took the lock."""

    lock_ttl: float
    paused_for: float
    expired_while_paused: bool  # the runner saw the holder's lock expire during the pause
    holder_token: int | None
    holder_state: str
    holder_error: str | None  # exception type name of the paused task's failure
    holder_rows: int  # payment rows the paused capture left
    taker_token: int | None
    taker_state: str
    order_status: tuple[str, int] | None  # (status, token) in demo_order_status
    fence_token: int | None  # reliable_fences token of the order


def check_paused_holder(o: PausedHolder) -> Verdict:
    newer = (o.taker_token is not None and o.holder_token is not None
             and o.taker_token > o.holder_token)
    passed = (o.paused_for > o.lock_ttl and o.expired_while_paused and newer
              and o.taker_state == SUCCESS
              and o.holder_state == FAILURE and o.holder_error == "StaleFenceToken"
              and o.holder_rows == 0 and o.order_status == ("cancelled", o.taker_token)
              and o.fence_token == o.taker_token)
    status = f"{o.order_status[0]}@{o.order_status[1]}" if o.order_status else "none"
    return Verdict(
        "paused lock holder -> write fenced off",
        f"lock order:{{order_id}} ttl {o.lock_ttl:g}s; self.fence.check_postgres()",
        f"paused {o.paused_for:.1f}s, lock {'expired' if o.expired_while_paused else 'kept'}; "
        f"new token {'>' if newer else 'NOT >'} old; "
        f"stale write {o.holder_error or 'not refused'}, {o.holder_rows} rows; order {status}",
        passed,
    )


# ------------------------------------------------------------- partner


@dataclass(frozen=True)
class PartnerCall:
    """One execution of the partner task's body."""

    at: float
    ok: bool  # False: the partner was down and the call failed
    retries: int  # request.retries of this execution
    prev_delay: float | None  # the backoff delay that preceded this retry


@dataclass(frozen=True)
class PartnerOutage:
    tasks: int
    states: Sequence[str]
    outage: float  # seconds the partner was down
    opened_while_down: bool  # the breaker was seen open during the outage
    final_breaker: int  # 0 closed, 1 open, 2 half-open, at the end
    deferred_tasks: int  # tasks whose successful execution had been deferred
    calls: Sequence[PartnerCall]
    bound: int  # most calls that may reach the partner while it is down
    failure_threshold: int
    open_seconds: float
    backoff: tuple[float, float, str] = (0.0, 0.0, "full")  # base, cap, jitter


def breaker_call_bound(processes: int, failure_threshold: int, half_open_max: int,
                       outage: float, open_seconds: float) -> int:
    """Most calls a shared breaker lets through to a partner that is down.

    Until it opens: ``failure_threshold - 1`` finished failures plus one call
    in flight per worker process; then ``half_open_max`` probes per open
    period of the outage (the first probe period starts ``open_seconds``
    after opening).
    """
    periods = max(0, math.ceil(outage / open_seconds))
    return max(0, failure_threshold - 1) + processes + half_open_max * periods


def check_breaker(o: PartnerOutage) -> Verdict:
    failed_calls = sum(not c.ok for c in o.calls)
    succeeded = sum(s == SUCCESS for s in o.states)
    passed = (o.opened_while_down and o.final_breaker == 0 and o.tasks > 0
              and len(o.states) == o.tasks and succeeded == o.tasks and o.deferred_tasks >= 1
              and 0 < failed_calls <= o.bound)
    return Verdict(
        "partner outage -> breaker opens, tasks defer",
        f"breaker 'partner': {o.failure_threshold} failures open it for {o.open_seconds:g}s; "
        f"{o.tasks} tasks, {o.outage:.0f}s outage",
        f"{'opened' if o.opened_while_down else 'never opened'}, "
        f"{['closed', 'open', 'half-open'][o.final_breaker]} at end; "
        f"{failed_calls} calls reached it while down (<= {o.bound}); "
        f"{o.deferred_tasks} deferred; {succeeded}/{o.tasks} SUCCESS",
        passed,
    )


def check_retry_jitter(o: PartnerOutage) -> Verdict:
    """Every retry waited a delay within its backoff bound, and no two the same."""
    base, cap, jitter = o.backoff
    delays = [(c.retries, c.prev_delay) for c in o.calls if c.retries > 0]
    known = [(n, d) for n, d in delays if d is not None]
    within = all(0 <= d <= min(cap, base * 2 ** (n - 1)) + 1e-6 for n, d in known)
    distinct = len({round(d, 6) for _, d in known}) == len(known)
    failures = sum(s == FAILURE for s in o.states)
    passed = bool(known) and len(known) == len(delays) and within and distinct and failures == 0
    span = (f"{min(d for _, d in known):.2f}-{max(d for _, d in known):.2f}s"
            if known else "none")
    return Verdict(
        "retry with jitter",
        f"Backoff.exponential(base={base:g}, cap={cap:g}, jitter={jitter!r})",
        f"{len(delays)} retries, delays {span}, "
        f"{'all within' if within else 'NOT within'} base*2^n, "
        f"{'all distinct' if distinct else 'repeated'}; {failures} FAILURE",
        passed,
    )


# -------------------------------------------------------------- emails


def steady_rate(starts: Sequence[float], burst: float, tail: float = 0.1) -> float | None:
    """Starts per second while a backlog waited on the bucket.

    Skips the first ``burst`` starts (the bucket's initial burst) and the last
    ``tail`` fraction (the backlog is nearly gone, so the bucket is no longer
    the bottleneck). None if too few starts remain to measure.
    """
    ordered = sorted(starts)
    first = int(burst)
    last = len(ordered) - 1 - max(1, int(len(ordered) * tail))
    if last - first < 4:
        return None
    span = ordered[last] - ordered[first]
    if span <= 0:
        return math.inf
    return (last - first) / span


def max_in_window(starts: Sequence[float], window: float) -> int:
    """The most starts inside any half-open interval of ``window`` seconds."""
    ordered = sorted(starts)
    best = 0
    for i, t in enumerate(ordered):
        best = max(best, bisect.bisect_left(ordered, t + window) - i)
    return best


@dataclass(frozen=True)
class BucketRun:
    """Emails sent at once through the fleet-wide ``emails`` bucket."""

    sent: int
    starts: Sequence[float]  # when each email task's body started (epoch seconds)
    recipients: int  # distinct recipients that got an email
    rate: float
    burst: float
    tolerance: float = 0.15


def check_bucket(o: BucketRun) -> Verdict:
    rate = steady_rate(o.starts, o.burst)
    peak = max_in_window(o.starts, 1.0)
    # Starts are stamped by the workers, admission by Redis' clock: one of slack.
    ceiling = math.floor(o.rate + o.burst) + 1
    within = rate is not None and abs(rate - o.rate) <= o.tolerance * o.rate
    passed = (within and peak <= ceiling and len(o.starts) == o.sent
              and o.recipients == o.sent)
    shown = "n/a" if rate is None else f"{rate:.1f}/s"
    return Verdict(
        "email bucket, fleet-wide",
        f"emails {o.rate:g}/s burst {o.burst:g} (+-{o.tolerance:.0%}); {o.sent} emails at once",
        f"{shown} measured, peak {peak} in 1s (<= {ceiling}); "
        f"{len(o.starts)} sent to {o.recipients} recipients",
        passed,
    )


# ------------------------------------------------------------- reports


@dataclass(frozen=True)
class ReportFlood:
    """Reports flooding the ``optional`` tier (policy drop)."""

    sent: int
    states: Sequence[str]
    limit: int  # the tier's concurrent slots
    max_concurrent: int  # most report bodies seen running at once, fleet-wide
    dropped_counter: int | None = None  # bulkhead_stats() dropped, delta over the flood
    ran: int | None = None  # report bodies that ran


def check_report_flood(o: ReportFlood) -> Verdict:
    dropped = sum(s == DROPPED for s in o.states)
    succeeded = sum(s == SUCCESS for s in o.states)
    ran = succeeded if o.ran is None else o.ran
    passed = (len(o.states) == o.sent and dropped >= 1 and succeeded >= 1
              and dropped + succeeded == o.sent and ran == succeeded
              and 1 <= o.max_concurrent <= o.limit
              and (o.dropped_counter is None or o.dropped_counter == dropped))
    return Verdict(
        "report flood on optional tier",
        f"bulkhead 'optional': {o.limit} at once, drop when full; {o.sent} reports",
        f"{succeeded} ran, {dropped} DROPPED ({state_counts(o.states)}); "
        f"at most {o.max_concurrent} at once",
        passed,
    )


@dataclass(frozen=True)
class Singleton:
    """A daily report rebuild, and duplicates sent while it runs."""

    first_state: str
    duplicate_states: Sequence[str]
    runs: int  # bodies that ran


def check_singleton(o: Singleton) -> Verdict:
    n = len(o.duplicate_states)
    skipped = sum(s == SKIPPED for s in o.duplicate_states)
    passed = o.first_state == SUCCESS and n > 0 and skipped == n and o.runs == 1
    return Verdict(
        "singleton report -> duplicates skipped",
        f"lock report:{{day}}, lock_contention='skip'; {n} duplicates while it runs",
        f"{skipped}/{n} SKIPPED, body ran {o.runs}x, first {o.first_state}",
        passed,
    )
