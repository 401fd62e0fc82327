#!/usr/bin/env python
"""Retry budgets side by side: the absolute ``"10/s"`` bucket against the ratio budget.

Two experiments, both on a throwaway ``redis-server`` this script starts (never another):

(a) **The burst of issue 12**: 40 tasks whose first execution fails once, all at once.
    Each failure asks the budget for a retry through the library's own scripts, in real
    time: the old default is ``admit.lua``'s plain bucket take (``guards.bucket.plan(plan,
    ..., queue=False)``, ``BucketSpec(10, 10)``), the new one ``budget.lua`` with the 40 first
    executions deposited first, as a worker does. Reported: retried and dead-lettered.
    (``tests/test_retry_budget.py`` runs the same burst through a real worker.)

(b) **A 10-minute outage**: a task with ``Backoff.background()`` (full jitter, 2 s base,
    60 s cap, 5 attempts) receives ``--rate`` first executions per second, evenly spaced,
    and its downstream fails every call for 600 s. A discrete-event simulation in
    simulated time: each failure asks the budget; granted, the retry runs after the
    backoff delay, refused, the task is dead-lettered. The ratio budget is the real
    ``budget.lua``, its clock driven through its test-mode ``now_ms`` argument (the tests
    hold it equal to ``WindowedBudget``); deposits are batched as a worker process does
    (sent with a withdrawal, or once a simulated second). The absolute bucket is the
    textbook token bucket (refill ``rate``/s up to ``burst``, take 1), which is what the
    ``B`` guard computes. Reported: retries per second sent to the downstream during the
    outage (mean, and the busiest second), all calls per second, and dead letters.

Run ``python benchmarks/retry_budget.py`` (about a minute); ``--rate`` repeats.
"""

from __future__ import annotations

import argparse
import heapq
import random
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import redis
from _redis_server import throwaway_redis

from celery_reliable import Backoff, RetryBudget, guards
from celery_reliable.admission import Admitted, Plan
from celery_reliable.ratelimit import BucketSpec
from celery_reliable.retrybudget import spend

OUTAGE = 600.0
BURST = 40


def burst(client: redis.Redis) -> dict[str, tuple[int, int]]:
    """(retried, dead-lettered) of the issue's burst under each budget, in real time."""
    out = {}
    old = BucketSpec(rate=10.0, burst=10.0)
    granted = 0
    for _ in range(BURST):
        plan = Plan()
        guards.bucket.plan(plan, "bench:burst:old", old, 1, queue=False)
        granted += isinstance(plan.admit(client), Admitted)
    out['"10/s" (old default)'] = (granted, BURST - granted)
    new = RetryBudget()
    spend(client, "bench:burst:new", new, BURST, False)  # the 40 first executions
    granted = sum(spend(client, "bench:burst:new", new, 0, True)[0] for _ in range(BURST))
    out["RetryBudget() (new default)"] = (granted, BURST - granted)
    return out


class TokenBucket:
    """The absolute budget on a simulated clock: ``rate``/s up to ``burst``, take 1."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst, self.tokens, self.ts = rate, burst, burst, 0.0

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.ts) * self.rate)
        self.ts = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class LuaRatio:
    """The ratio budget: the real budget.lua on a driven clock, deposits batched per second."""

    def __init__(self, client: redis.Redis, key: str, spec: RetryBudget) -> None:
        self.client, self.key, self.spec = client, key, spec
        self.pending, self.sent = 0, -1.0
        client.delete(key)

    def deposit(self, now: float) -> None:
        self.pending += 1
        if now - self.sent >= 1.0:
            spend(self.client, self.key, self.spec, self.pending, False, now_ms=self._ms(now))
            self.pending, self.sent = 0, now

    def take(self, now: float) -> bool:
        granted, _ = spend(self.client, self.key, self.spec, self.pending, True,
                           now_ms=self._ms(now))
        self.pending, self.sent = 0, now
        return granted

    @staticmethod
    def _ms(now: float) -> int:
        return 1_700_000_000_000 + int(now * 1000)


@dataclass
class Outcome:
    retries_per_s: float
    busiest_retry_second: int
    calls_per_s: float
    dead_lettered: int
    first_executions: int


def outage(rate: float, take: Callable[[float], bool] | None,
           deposit: Callable[[float], None] | None, seed: int = 1) -> Outcome:
    """Every call fails for OUTAGE seconds; count what reaches the downstream."""
    backoff = Backoff.background()
    assert backoff.max_attempts is not None
    rng = random.Random(seed)
    events: list[tuple[float, int, int, float | None]] = []  # (at, task, retries, previous)
    n = int(OUTAGE * rate)
    for i in range(n):
        heapq.heappush(events, (i / rate, i, 0, None))
    retries: Counter[int] = Counter()
    calls = dead = 0
    while events:
        now, task, done, previous = heapq.heappop(events)
        if now >= OUTAGE:
            break
        calls += 1
        if done == 0:
            if deposit is not None:
                deposit(now)
        else:
            retries[int(now)] += 1
        # the call fails (the downstream is down): retry if attempts and the budget allow
        if done + 1 >= backoff.max_attempts or (take is not None and not take(now)):
            dead += 1
            continue
        delay = backoff.delay(done, rng, previous)
        heapq.heappush(events, (now + delay, task, done + 1, delay))
    return Outcome(sum(retries.values()) / OUTAGE, max(retries.values(), default=0),
                   calls / OUTAGE, dead, n)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, action="append",
                        help="first executions per second (repeatable; default 20 and 200)")
    parser.add_argument("--redis-server", default="redis-server")
    args = parser.parse_args()
    binary = shutil.which(args.redis_server)
    if binary is None:
        print(f"error: {args.redis_server!r} not found; install Redis or pass --redis-server",
              file=sys.stderr)
        return 2
    with throwaway_redis(binary) as (port, version):
        client = redis.Redis(port=port)
        print(f"redis-server {version}\n")
        print(f"(a) burst: {BURST} tasks failing once, at once")
        print("| budget | retried | dead-lettered |\n|---|---|---|")
        for name, (ok, dead) in burst(client).items():
            print(f"| {name} | {ok} | {dead} |")
        print(f"\n(b) outage: every call fails for {OUTAGE:.0f} s, Backoff.background() "
              "(5 attempts)")
        print("| first executions/s | budget | retries/s to the downstream (mean) | "
              "busiest second | all calls/s | dead-lettered |\n|---|---|---|---|---|---|")
        for rate in args.rate or [20.0, 200.0]:
            old = TokenBucket(10.0, 10.0)
            new = LuaRatio(client, f"bench:outage:{rate}", RetryBudget())
            rows = {
                "none": outage(rate, None, None),
                '"10/s"': outage(rate, old.take, None),
                "RetryBudget()": outage(rate, new.take, new.deposit),
            }
            for name, o in rows.items():
                print(f"| {rate:g} | {name} | {o.retries_per_s:.1f} | {o.busiest_retry_second} "
                      f"| {o.calls_per_s:.1f} | {o.dead_lettered} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
