"""Retry budgets: how many retries a task name may send fleet-wide (option ``retry_budget``).

Two kinds, chosen by the option's value:

* :class:`RetryBudget` (the default): retries may be a ratio of recent first executions,
  plus a minimum rate, over a ``ttl`` window. This is Finagle's ``RetryBudget`` (its
  defaults: ttl 10 s, 10 retries/s, 20 %): every first execution of the task deposits,
  every retry withdraws, and deposits expire after ``ttl``. gRPC's retry throttling is
  the same idea driven by outcomes (a token bucket of ``maxTokens``; each failure takes
  1, each success gives back ``tokenRatio``); deposits on first executions need no
  outcome, so the budget also holds when the failures are timeouts that never report.
  State: one Redis hash of 10 time slices, ``lua/budget.lua``;
  :class:`WindowedBudget` is the same algorithm in Python (tests hold them equal).
* An absolute token bucket (``"10/s"`` or ``{"rate": 10, "burst": 10}``, a
  :class:`~celery_reliable.ratelimit.BucketSpec`): at most ``rate`` retries per second,
  ``burst`` at once, whatever the traffic (the default before 0.2; the ``B`` guard of
  ``admit.lua`` as a plain take).

Deposits cost a first execution no round trip: each process counts its first executions
(:class:`Deposits`) and sends the count with its next withdrawal, or from a background
thread once a second. Fail-open: with Redis unreachable a
retry is allowed (it still meets the task's guards, which fail closed), and the deposits
counted meanwhile are dropped, so an outage never credits a burst of stale ones.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import redis

from .errors import ConfigurationError
from .ratelimit import BucketSpec, parse_bucket
from .scripts import script

__all__ = ["Deposits", "RetryBudget", "WindowedBudget", "parse_retry_budget", "spend"]

#: Tokens per deposit: a scale that keeps fractional ratios in integers (Finagle's 1000).
log = logging.getLogger("celery_reliable")

SCALE = 1000
#: The flusher thread ends after this many sends with nothing to send (started again by
#: the next count), so an app that stops running tasks leaves no thread behind.
IDLE_LOOPS = 30
#: Slices of the window (Finagle's WindowedAdder): a token expires 0.9 ttl to ttl after.
SLICES = 10


@dataclass(frozen=True)
class RetryBudget:
    """Retries may be ``ratio`` of the task's first executions in the last ``ttl`` seconds,
    plus ``min_per_second`` (the reserve, ``min_per_second * ttl`` retries per window).

    Defaults (Finagle's): ``ratio=0.2``, ``min_per_second=10``, ``ttl=10`` s, per task
    name, fleet-wide. A *burst* of fresh failures is retried: the reserve alone covers
    100 retries at once, and every first execution of the last 10 s adds 0.2. A
    sustained *storm* is cut: over time retries are at most 10/s plus 20 % of the
    task's first executions, so a downstream that is down sees at most about 1.2 times
    its normal traffic plus 10/s, instead of ``max_attempts`` times. Past the budget, a
    failure is dead-lettered with reason "retry budget exhausted".

    ``ratio`` in [0, 1000] (2.0: two retries per first execution); ``min_per_second``
    >= 0; not both 0. ``ttl`` in [1, 60] seconds (Finagle's bounds).
    """

    ratio: float = 0.2
    min_per_second: float = 10.0
    ttl: float = 10.0

    def __post_init__(self) -> None:
        for name in ("ratio", "min_per_second", "ttl"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise ValueError(f"{name!r} must be a finite number, got {value!r}")
        if not 0 <= self.ratio <= SCALE:
            raise ValueError(f"'ratio' must be in [0, {SCALE}], got {self.ratio!r}")
        if self.min_per_second < 0:
            raise ValueError(f"'min_per_second' must be >= 0, got {self.min_per_second!r}")
        if self.ratio == 0 and self.min_per_second == 0:
            raise ValueError("'ratio' and 'min_per_second' are both 0: no retry could ever "
                             "pass (use retry_budget=False to disable the budget instead)")
        if not 1 <= self.ttl <= 60:
            raise ValueError(f"'ttl' must be in [1, 60] seconds, got {self.ttl!r}")

    @property
    def deposit_tokens(self) -> int:
        """Tokens one first execution puts in."""
        return SCALE if self.ratio > 0 else 0

    @property
    def retry_tokens(self) -> int:
        """Tokens one retry takes out."""
        return max(1, int(SCALE / self.ratio)) if self.ratio > 0 else 1

    @property
    def reserve_tokens(self) -> int:
        """Tokens always there on top of the window's sum."""
        return int(self.min_per_second * self.ttl * self.retry_tokens)

    @property
    def ttl_ms(self) -> int:
        return int(self.ttl * 1000)


def parse_retry_budget(owner: str, name: str, raw: Any) -> RetryBudget | BucketSpec | bool | None:
    """``retry_budget`` / ``reliable_retry_budget``: a ratio budget, an absolute bucket, or off.

    ``RetryBudget(...)`` or ``{"ratio", "min_per_second", "ttl"}`` (any subset, ``ttl`` in
    seconds or a timedelta): a ratio budget. ``"10/s"`` or ``{"rate", "burst"}``: an
    absolute bucket. ``None`` (the default elsewhere) and ``False`` (off) pass through.
    """
    if raw is None or raw is False:
        return raw
    where = f"{owner}: option {name!r}"
    if isinstance(raw, RetryBudget):
        return raw
    if isinstance(raw, Mapping) and not {"rate", "burst"} & set(raw):
        unknown = set(raw) - {"ratio", "min_per_second", "ttl"}
        if unknown:
            raise ConfigurationError(
                f"{where}: unknown keys {sorted(unknown)}; a ratio budget takes 'ratio', "
                "'min_per_second' and 'ttl', an absolute one 'rate' and 'burst'")
        values = dict(raw)
        if isinstance(values.get("ttl"), timedelta):
            values["ttl"] = values["ttl"].total_seconds()
        try:
            return RetryBudget(**values)
        except ValueError as exc:
            raise ConfigurationError(f"{where}: {exc}") from None
    return parse_bucket(where, raw)


class WindowedBudget:
    """``lua/budget.lua`` in Python, on a clock the caller drives (tests, benchmarks).

    The same integer arithmetic, slice for slice: a test runs one sequence of calls
    through both and compares every reply.
    """

    def __init__(self, spec: RetryBudget) -> None:
        self.spec = spec
        self.slices: dict[int, int] = {}

    def call(self, now_ms: int, deposits: int, withdraw: bool) -> tuple[bool, int]:
        """Deposit ``deposits`` first executions, then take one retry if ``withdraw``.

        Returns (granted, whole retries left), as the script does.
        """
        spec = self.spec
        slice_ms = max(1, spec.ttl_ms // SLICES)
        current = now_ms // slice_ms
        self.slices = {k: v for k, v in self.slices.items() if k > current - SLICES}
        total = sum(self.slices.values())
        if deposits > 0 and spec.deposit_tokens > 0:
            self.slices[current] = self.slices.get(current, 0) + deposits * spec.deposit_tokens
            total += deposits * spec.deposit_tokens
        granted = False
        if withdraw and total + spec.reserve_tokens >= spec.retry_tokens:
            self.slices[current] = self.slices.get(current, 0) - spec.retry_tokens
            total -= spec.retry_tokens
            granted = True
        return granted, (total + spec.reserve_tokens) // spec.retry_tokens


def spend(client: redis.Redis, key: str, spec: RetryBudget, deposits: int, withdraw: bool,
          now_ms: int | None = None) -> tuple[bool, int]:
    """One round trip of ``lua/budget.lua``: (granted, whole retries left).

    ``now_ms`` replaces the server clock (tests and benchmarks only). Raises
    ``redis.RedisError``; never resent (a lost reply may hide a withdrawal).
    """
    reply = script("budget")(client, [key], _args(spec, deposits, withdraw, now_ms))
    return bool(int(reply[0])), int(reply[1])


def _args(spec: RetryBudget, deposits: int, withdraw: bool, now_ms: int | None) -> list[Any]:
    """budget.lua's ARGV."""
    return [deposits, 1 if withdraw else 0, spec.deposit_tokens, spec.retry_tokens,
            spec.reserve_tokens, spec.ttl_ms, "" if now_ms is None else now_ms]


class Deposits:
    """First executions this process counted and has not sent yet, per budget key.

    :meth:`add` only counts (a lock and a dict: no I/O on the task's path). The count goes
    to Redis with this process's next withdrawal of that budget (:meth:`take`), or from a
    daemon thread that sends whatever is pending once every ``every`` seconds, so a Redis
    that stalls holds up that thread, never a task. Thread-safe; a forked child starts
    empty and with its own thread.
    """

    def __init__(self, client: redis.Redis, every: float = 1.0) -> None:
        self.client = client
        self.every = every
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[RetryBudget, int]] = {}
        self._paused: dict[str, float] = {}  # key -> no send before (monotonic)
        self._pid = os.getpid()
        self._thread: threading.Thread | None = None

    def _fresh(self) -> None:
        if self._pid != os.getpid():  # inherited over fork: the parent's counts are not ours
            self._pending.clear()
            self._paused.clear()
            self._pid = os.getpid()
            self._thread = None

    def add(self, key: str, spec: RetryBudget) -> None:
        """Count one first execution of the budget at ``key``."""
        with self._lock:
            self._fresh()
            _, count = self._pending.get(key, (spec, 0))
            self._pending[key] = (spec, count + 1)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="celery-reliable-retry-budget")
                self._thread.start()

    def take(self, key: str) -> int:
        """The count to send with a withdrawal now (and reset)."""
        with self._lock:
            self._fresh()
            _, count = self._pending.pop(key, (None, 0))
            return count

    def failed(self, key: str, pause: float) -> None:
        """A send failed: what it carried and what is pending are dropped (stale by the
        time Redis is back), and nothing is sent for ``pause`` seconds."""
        with self._lock:
            self._pending.pop(key, None)
            self._paused[key] = time.monotonic() + pause

    def flush(self) -> int:
        """Send every pending count, one round trip per key; returns the keys sent."""
        with self._lock:
            now = time.monotonic()
            due = {key: entry for key, entry in self._pending.items()
                   if self._paused.get(key, 0.0) <= now}
            for key in due:
                del self._pending[key]
        if not due:
            return 0
        # Every task name's count in one round trip (a pipeline of budget.lua calls), so
        # a process costs Redis one call a second however many task names it runs.
        budget = script("budget")
        try:
            for attempt in range(2):
                pipe = self.client.pipeline(transaction=False)
                for key, (spec, count) in due.items():
                    pipe.evalsha(budget.sha, 1, key, *_args(spec, count, False, None))
                try:
                    pipe.execute()
                    break
                except redis.exceptions.NoScriptError:
                    if attempt:
                        raise
                    self.client.script_load(budget.source)  # none ran: send them again
        except redis.RedisError:
            for key, (spec, _) in due.items():
                self.failed(key, spec.ttl)
            return 0
        return len(due)

    def _run(self) -> None:
        me = threading.current_thread()
        idle = 0
        while self._thread is me:
            time.sleep(self.every)
            try:
                idle = 0 if self.flush() else idle + 1
            except Exception:  # never let the thread die: counting goes on
                log.debug("celery-reliable: retry budget deposits not sent", exc_info=True)
            if idle >= IDLE_LOOPS:
                with self._lock:  # nothing to send for a while: end; add() starts another
                    if not self._pending and self._thread is me:
                        self._thread = None
                        return


_per_runtime: weakref.WeakKeyDictionary[Any, Deposits] = weakref.WeakKeyDictionary()
_per_runtime_lock = threading.Lock()


def deposits_for(runtime: Any) -> Deposits:
    """The :class:`Deposits` of one app's runtime in this process."""
    with _per_runtime_lock:
        deposits = _per_runtime.get(runtime)
        if deposits is None:
            deposits = _per_runtime[runtime] = Deposits(runtime.redis)
        return deposits
