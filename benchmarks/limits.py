#!/usr/bin/env python
"""Rate-limit throughput: celery_reliable's token bucket and bulkhead vs dramatiq and limits.

The issue's targets, checked in one run, with every contender on the SAME throwaway
Redis, through the SAME ``redis.Redis`` client (one pooled connection; celery_reliable adds its
own dedicated script connection, see celery_reliable/scripts.py), sequentially:

* a bucket take   >= ``limits``' moving-window hit rate
* a bucket take   >= 3x dramatiq's ``BucketRateLimiter`` take
* a bulkhead acquire+release >= 3x dramatiq's ``ConcurrentRateLimiter`` acquire+release

Contenders (configuration is built once, like a worker does at start; what a real call
builds is built per iteration):

take, admitted (1,000,000 per second, so every take succeeds):

* ``celery_reliable bucket``  per take: ``Plan()``, ``guards.bucket.plan(plan, KeySpace(prefix)
  .queue_bucket("q"), BucketSpec(rate=1e6, burst=1e6), 1)``, ``plan.admit(client)``
  (one EVALSHA of ``admit.lua``, guard ``B``; the spec is built once)
* ``limits moving window``    ``MovingWindowRateLimiter(RedisStorage(url,
  connection_pool=<the shared client's pool>))``, ``limits.parse("1000000/second")``
  once; per take ``limiter.hit(item, "k")``
* ``dramatiq BucketRateLimiter`` ``RedisBackend(client=<shared client>)`` once; per
  take ``BucketRateLimiter(backend, key, limit=1_000_000, bucket=1000)`` and
  ``with limiter.acquire(raise_on_failure=False) as acquired``

take, refused (1 per hour, the bucket emptied during warm-up; every take must be
refused): the same three with ``BucketSpec(rate=1/3600, burst=1)``, ``"1/hour"`` and
``limit=1, bucket=3_600_000``.

bulkhead acquire+release (the task body would run in between):

* ``celery_reliable bulkhead`` per cycle, like ``ReliableTask``: owner
  ``"<task id>/<8 hex>"``, ``Plan()``, ``guards.bulkhead.plan(plan, keys, "tier",
  TierSpec(concurrent=1000, queue=100, timeout=60, policy="wait"), owner, task_id)``,
  ``plan.admit(client)``, then ``Release()``, ``guards.bulkhead.release(release,
  keys.bulkhead("tier")[0], owner)``, ``release.run(client)``
  (two EVALSHA: ``admit.lua`` + ``complete.lua``, guard ``K``)
* ``dramatiq ConcurrentRateLimiter`` per cycle ``ConcurrentRateLimiter(backend, key,
  limit=1_000_000)`` and ``with limiter.acquire(raise_on_failure=False) as acquired``

Every call's outcome is checked (admitted / refused as the contender expects; our
release must find its slot); after each round the bulkheads must be empty again. A
contender that misbehaves stops the run: its numbers would lie.

After a warm-up, R rounds run; in a round every contender makes N calls, interleaved
call by call (call i of each contender in turn, the order rotating each round), each
call timed on its own, so a burst of load from elsewhere on a busy machine lands on
every contender alike (``--interleave block`` runs each contender's N calls back to
back instead, like ``locks.py``). The median ops/s over rounds is reported. A target
is checked two ways: median / median, and the median over rounds of the ratio within the
same round (robust when the machine's load changes during the run). ``met`` is "yes"
when both reach the target, "borderline" when one does, "no" when neither does.

Measured, never assumed, in one dedicated untimed pass per contender (the same calls
through a client whose connection class counts):

* round trips / op: ``send_packed_command`` calls (a request written and waited on; a
  MULTI..EXEC pipeline counts once);
* server cmds / op: ``INFO commandstats`` delta (sum of ``calls``, without ``info``),
  read through a separate uncounted client; commands run by Lua count too;
* client CPU µs / op: ``time.process_time()`` of this process over the pass;
* server CPU µs / op: ``INFO cpu`` delta (``used_cpu_user + used_cpu_sys``) of the
  throwaway redis-server, which serves nothing else.

The redis-server is started by this script on a free port (``--save "" --appendonly
no``, a temp dir) and stopped at the end; no other Redis is touched.

Run ``python benchmarks/limits.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import secrets
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import redis
from _redis_server import (
    counting_connection_class,
    server_calls,
    throwaway_redis,
)

# This file has the name of a library it measures: with its own directory first on
# sys.path (``python benchmarks/limits.py``), ``import limits`` would import this script.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

# 400 x 18 rounds: about 30 s on a 2-core VM, under 50 s when it is busy.
DEFAULT_ITERATIONS = 400
DEFAULT_ROUNDS = 18
HIGH_RATE = 1_000_000  # per second: far above any offered rate, every take succeeds
TIER = "tier"

#: One operation; its argument is a fresh task id; returns True if admitted/acquired.
Cycle = Callable[[str], bool]
#: Given the shared client and the server's port, returns the bound cycle.
Binder = Callable[[redis.Redis, int], Cycle]


class BenchmarkError(RuntimeError):
    """A contender misbehaved (wrong outcome, lost slot): the numbers would lie."""


# --------------------------------------------------------------------------- counting




def server_cpu(admin: redis.Redis) -> float:
    """CPU seconds the redis-server process used so far (user + system)."""
    cpu: dict[str, Any] = admin.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


# --------------------------------------------------------------------------- contenders


@dataclass(frozen=True)
class Contender:
    name: str
    slug: str
    group: str  # "take" or "bulkhead"
    admits: bool  # the outcome every call must have
    note: str
    bind: Binder
    #: calls per pass allowed the other outcome (a fixed window may roll over mid-pass)
    tolerance: int = 0
    #: after a pass: raises if the contender left state behind (a slot not released)
    check: Callable[[redis.Redis], None] | None = None


def ours_bucket(rate: float, burst: float, prefix: str) -> Binder:
    def bind(client: redis.Redis, port: int) -> Cycle:
        from celery_reliable import guards
        from celery_reliable.admission import Admitted, Plan, Refused
        from celery_reliable.keys import KeySpace
        from celery_reliable.ratelimit import BucketSpec

        spec = BucketSpec(rate=rate, burst=burst)  # settings: parsed once per worker

        def take(task_id: str) -> bool:
            plan = Plan()
            guards.bucket.plan(plan, KeySpace(prefix).queue_bucket("q"), spec, 1)
            outcome = plan.admit(client)
            if isinstance(outcome, Admitted):
                return True
            if isinstance(outcome, Refused):
                return False
            raise BenchmarkError(f"celery_reliable bucket: unexpected {outcome!r}")

        return take

    return bind


def ours_bulkhead(prefix: str) -> Binder:
    def bind(client: redis.Redis, port: int) -> Cycle:
        from celery_reliable import guards
        from celery_reliable.admission import Admitted, Plan, Release
        from celery_reliable.bulkhead import TierSpec
        from celery_reliable.keys import KeySpace

        keys = KeySpace(prefix)  # the runtime's, built once per worker process
        spec = TierSpec(concurrent=1000, queue=100, timeout=60.0, policy="wait")

        def cycle(task_id: str) -> bool:
            owner = f"{task_id}/{secrets.token_hex(4)}"  # as pipeline.admit
            plan = Plan()
            guards.bulkhead.plan(plan, keys, TIER, spec, owner, task_id)
            outcome = plan.admit(client)
            if not isinstance(outcome, Admitted):
                return False  # counted as a wrong outcome: nothing to release
            release = Release()
            guards.bulkhead.release(release, keys.bulkhead(TIER)[0], owner)
            if release.run(client) != [1]:
                raise BenchmarkError(f"celery_reliable bulkhead: slot of {owner} was not ours")
            return True

        return cycle

    return bind


def ours_bulkhead_empty(prefix: str) -> Callable[[redis.Redis], None]:
    def check(admin: redis.Redis) -> None:
        from celery_reliable.keys import KeySpace

        slots, waiting, _stats = KeySpace(prefix).bulkhead(TIER)
        held, queued = admin.zcard(slots), admin.zcard(waiting)
        if held or queued:
            raise BenchmarkError(f"celery_reliable bulkhead left {held} slots, {queued} waiters")

    return check


def dramatiq_bucket(key: str, limit: int, bucket_ms: int) -> Binder:
    def bind(client: redis.Redis, port: int) -> Cycle:
        from dramatiq.rate_limits import BucketRateLimiter
        from dramatiq.rate_limits.backends import RedisBackend

        backend = RedisBackend(client=client)

        def take(task_id: str) -> bool:
            limiter = BucketRateLimiter(backend, key, limit=limit, bucket=bucket_ms)
            with limiter.acquire(raise_on_failure=False) as acquired:
                return bool(acquired)

        return take

    return bind


def dramatiq_concurrent(key: str) -> Binder:
    def bind(client: redis.Redis, port: int) -> Cycle:
        from dramatiq.rate_limits import ConcurrentRateLimiter
        from dramatiq.rate_limits.backends import RedisBackend

        backend = RedisBackend(client=client)

        def cycle(task_id: str) -> bool:
            limiter = ConcurrentRateLimiter(backend, key, limit=HIGH_RATE)
            with limiter.acquire(raise_on_failure=False) as acquired:
                return bool(acquired)  # released when the with block exits

        return cycle

    return bind


def dramatiq_concurrent_empty(key: str) -> Callable[[redis.Redis], None]:
    def check(admin: redis.Redis) -> None:
        value = int(admin.get(key) or 0)
        if value:
            raise BenchmarkError(f"dramatiq ConcurrentRateLimiter left {value} slots taken")

    return check


def limits_moving_window(rate: str) -> Binder:
    def bind(client: redis.Redis, port: int) -> Cycle:
        import limits
        from limits.storage import RedisStorage
        from limits.strategies import MovingWindowRateLimiter

        # The URL names the same server; connection_pool makes it the same client pool.
        storage = RedisStorage(f"redis://127.0.0.1:{port}",
                               connection_pool=client.connection_pool)
        limiter = MovingWindowRateLimiter(storage)
        item = limits.parse(rate)

        def take(task_id: str) -> bool:
            return limiter.hit(item, "k")

        return take

    return bind


OURS_TAKE = "celery_reliable bucket"
OURS_REFUSED = "celery_reliable bucket (refused)"
OURS_BULKHEAD = "celery_reliable bulkhead"
LIMITS_TAKE = "limits moving window"
LIMITS_REFUSED = "limits moving window (refused)"
DRAMATIQ_TAKE = "dramatiq BucketRateLimiter"
DRAMATIQ_REFUSED = "dramatiq BucketRateLimiter (refused)"
DRAMATIQ_CONCURRENT = "dramatiq ConcurrentRateLimiter"

CONTENDERS = (
    Contender(OURS_TAKE, "ours-take", "take", True,
              "guards.bucket.plan(Plan(), KeySpace(p).queue_bucket('q'), BucketSpec(1e6, 1e6), 1)",
              ours_bucket(HIGH_RATE, HIGH_RATE, "bench-take")),
    Contender(LIMITS_TAKE, "limits-take", "take", True,
              "MovingWindowRateLimiter.hit(parse('1000000/second'), 'k')",
              limits_moving_window(f"{HIGH_RATE}/second")),
    Contender(DRAMATIQ_TAKE, "dramatiq-take", "take", True,
              "BucketRateLimiter(backend, key, limit=1_000_000, bucket=1000)",
              dramatiq_bucket("bench:dramatiq:take", HIGH_RATE, 1000)),
    Contender(OURS_REFUSED, "ours-refused", "take", False,
              "BucketSpec(rate=1/3600, burst=1), emptied in warm-up",
              ours_bucket(1 / 3600, 1, "bench-refused")),
    Contender(LIMITS_REFUSED, "limits-refused", "take", False,
              "parse('1/hour'), used up in warm-up", limits_moving_window("1/hour")),
    Contender(DRAMATIQ_REFUSED, "dramatiq-refused", "take", False,
              "BucketRateLimiter(limit=1, bucket=3_600_000), used up in warm-up",
              dramatiq_bucket("bench:dramatiq:refused", 1, 3_600_000), tolerance=1),
    Contender(OURS_BULKHEAD, "ours-bulkhead", "bulkhead", True,
              "admit TierSpec(concurrent=1000, queue=100, timeout=60, 'wait') + Release",
              ours_bulkhead("bench-bulkhead"), check=ours_bulkhead_empty("bench-bulkhead")),
    Contender(DRAMATIQ_CONCURRENT, "dramatiq-concurrent", "bulkhead", True,
              "ConcurrentRateLimiter(backend, key, limit=1_000_000)",
              dramatiq_concurrent("bench:dramatiq:concurrent"),
              check=dramatiq_concurrent_empty("bench:dramatiq:concurrent")),
)


@dataclass(frozen=True)
class Target:
    what: str
    ours: str
    peer: str
    needed: float  # ours / peer must be >= this; 0: reported, no target


TARGETS = (
    Target("take >= limits' moving-window hit", OURS_TAKE, LIMITS_TAKE, 1.0),
    Target("take >= 3x dramatiq bucket", OURS_TAKE, DRAMATIQ_TAKE, 3.0),
    Target("bulkhead acquire+release >= 3x dramatiq concurrent", OURS_BULKHEAD,
           DRAMATIQ_CONCURRENT, 3.0),
    Target("refused take vs limits (no target)", OURS_REFUSED, LIMITS_REFUSED, 0.0),
    Target("refused take vs dramatiq (no target)", OURS_REFUSED, DRAMATIQ_REFUSED, 0.0),
)


# --------------------------------------------------------------------------- server


# --------------------------------------------------------------------------- running


@dataclass
class Result:
    name: str
    group: str
    outcome: str
    construction: str
    rounds_ops_per_s: list[float] = field(default_factory=list)
    median_ops_per_s: float = 0.0
    client_round_trips_per_op: float = 0.0
    server_commands_per_op: float = 0.0
    server_commands_breakdown_per_op: dict[str, float] = field(default_factory=dict)
    client_cpu_us_per_op: float = 0.0
    server_cpu_us_per_op: float = 0.0
    wrong_outcomes: int = 0


@dataclass
class TargetResult:
    what: str
    ours: str
    peer: str
    needed: float
    ratio: float  # median(ours) / median(peer)
    per_round_ratios: list[float]
    same_round_median: float  # median over rounds of ours / peer in the same round
    verdict: str  # "yes" (both ratios >= needed), "borderline" (one), "no" (neither), "-"


def task_ids(n: int) -> list[str]:
    """Celery task ids (uuid4 strings), made before the clock starts."""
    return [str(uuid.uuid4()) for _ in range(n)]


def timed_round(order: list[Contender], cycles: dict[str, Cycle], n: int, interleave: str,
                admin: redis.Redis) -> dict[str, tuple[float, int]]:
    """{name: (seconds over n calls, calls with the other outcome)} for one round.

    ``call``: call i of every contender, then call i + 1 of every contender, ...; each
    call is timed on its own (two ``perf_counter()`` reads, ~0.1 µs) and a contender's
    time is the sum of its calls, so a burst of load from elsewhere lands on every
    contender alike. ``block``: each contender's n calls back to back, one timing each.
    The garbage collector is off during the round and run between rounds (as timeit).
    """
    ids = {c.name: task_ids(n) for c in order}
    elapsed = dict.fromkeys(ids, 0.0)
    wrong = dict.fromkeys(ids, 0)
    clock = time.perf_counter
    gc.collect()
    gc.disable()
    try:
        if interleave == "call":
            lanes = [(c.name, cycles[c.name], c.admits, ids[c.name]) for c in order]
            for i in range(n):
                for name, cycle, expect, lane_ids in lanes:
                    t0 = clock()
                    got = cycle(lane_ids[i])
                    elapsed[name] += clock() - t0
                    if got is not expect:
                        wrong[name] += 1
        else:
            for c in order:
                cycle, expect = cycles[c.name], c.admits
                t0 = clock()
                for task_id in ids[c.name]:
                    if cycle(task_id) is not expect:
                        wrong[c.name] += 1
                elapsed[c.name] = clock() - t0
    finally:
        gc.enable()
    for c in order:
        if wrong[c.name] > c.tolerance:
            raise BenchmarkError(
                f"{c.name}: {wrong[c.name]} of {n} calls were "
                f"{'refused' if c.admits else 'admitted'}; every call must be "
                f"{'admitted' if c.admits else 'refused'}")
        if c.check is not None:
            c.check(admin)
    return {name: (elapsed[name], wrong[name]) for name in ids}


def count_pass(contender: Contender, port: int, admin: redis.Redis, n: int,
               warmup: int, result: Result) -> None:
    """One extra pass through a counting client: round trips, server commands, CPU."""
    conn_class = counting_connection_class()
    pool = redis.ConnectionPool(host="127.0.0.1", port=port, connection_class=conn_class)
    client = redis.Redis(connection_pool=pool)
    try:
        cycle = contender.bind(client, port)
        for task_id in task_ids(max(warmup, 1)):
            cycle(task_id)  # connects, loads scripts if needed: not measured
        ids = task_ids(n)
        gc.collect()
        conn_class.sends = conn_class.connects = 0
        before, cpu_before = server_calls(admin), server_cpu(admin)
        t0 = time.process_time()
        wrong = sum(cycle(task_id) is not contender.admits for task_id in ids)
        client_cpu = time.process_time() - t0
        cpu_after = server_cpu(admin)  # first: serving INFO commandstats is not the op
        after = server_calls(admin)
        if conn_class.connects:
            raise BenchmarkError(f"{contender.name}: reconnected during the counted pass")
        if wrong > contender.tolerance:
            raise BenchmarkError(f"{contender.name}: {wrong} wrong outcomes in the counted pass")
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        delta = {k: v for k, v in sorted(delta.items()) if v}
        result.client_round_trips_per_op = conn_class.sends / n
        result.server_commands_per_op = sum(delta.values()) / n
        result.server_commands_breakdown_per_op = {k: v / n for k, v in delta.items()}
        result.client_cpu_us_per_op = client_cpu / n * 1e6
        result.server_cpu_us_per_op = (cpu_after - cpu_before) / n * 1e6
    finally:
        client.close()
        pool.disconnect()


def run(args: argparse.Namespace, port: int) -> tuple[list[Result], list[TargetResult]]:
    n, rounds = args.iterations, args.rounds
    warmup = args.warmup if args.warmup is not None else max(200, n // 5)
    admin = redis.Redis(host="127.0.0.1", port=port)
    client = redis.Redis(host="127.0.0.1", port=port)  # the one client every contender uses
    cycles = {c.name: c.bind(client, port) for c in CONTENDERS}
    results = {c.name: Result(c.name, c.group, "admitted" if c.admits else "refused", c.note)
               for c in CONTENDERS}

    progress(f"warm-up: {warmup} calls each (empties the 'refused' limits)")
    for c in CONTENDERS:
        for task_id in task_ids(warmup):
            cycles[c.name](task_id)
        if c.check is not None:
            c.check(admin)

    for r in range(rounds):
        shift = r % len(CONTENDERS)
        order = CONTENDERS[shift:] + CONTENDERS[:shift]
        line = []
        timings = timed_round(list(order), cycles, n, args.interleave, admin)
        for c in order:
            elapsed, wrong = timings[c.name]
            ops = n / elapsed
            results[c.name].rounds_ops_per_s.append(ops)
            results[c.name].wrong_outcomes += wrong
            line.append(f"{c.slug} {ops:,.0f}/s")
        progress(f"round {r + 1}/{rounds}: " + ", ".join(line))

    # one pooled connection shared by every contender, plus the dedicated connection
    # celery_reliable's scripts keep per client and process (celery_reliable/scripts.py)
    connections = int(admin.info("clients")["connected_clients"]) - 1  # without admin
    if connections != 2:
        raise BenchmarkError(f"the contenders used {connections} connections, not 1 + 1")

    count_n = args.count_iterations or 1000
    progress(f"counting pass: {count_n} calls each")
    for c in CONTENDERS:
        count_pass(c, port, admin, count_n, warmup=50, result=results[c.name])

    for res in results.values():
        res.median_ops_per_s = statistics.median(res.rounds_ops_per_s)
    targets = []
    for t in TARGETS:
        ours, peer = results[t.ours], results[t.peer]
        ratio = ours.median_ops_per_s / peer.median_ops_per_s
        same = [a / b for a, b in zip(ours.rounds_ops_per_s, peer.rounds_ops_per_s,
                                      strict=True)]
        same_median = statistics.median(same)
        passed = (ratio >= t.needed) + (same_median >= t.needed)
        verdict = "-" if not t.needed else ("no", "borderline", "yes")[passed]
        targets.append(TargetResult(t.what, t.ours, t.peer, t.needed, ratio, same,
                                    same_median, verdict))
    client.close()
    admin.close()
    return list(results.values()), targets


def progress(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- output


def versions(server_version: str) -> dict[str, str]:
    def v(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "python": platform.python_version(),
        "redis-py": v("redis"),
        "hiredis": v("hiredis"),
        "dramatiq": v("dramatiq"),
        "limits": v("limits"),
        "celery-reliable": v("celery-reliable"),
        "redis-server": server_version,
    }


def markdown(rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def fmt(row: list[str]) -> str:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "| " + " | ".join(cells) + " |"

    sep = ["-" * (w - 1) + ":" if i in right else "-" * w for i, w in enumerate(widths)]
    return "\n".join([fmt(rows[0]), fmt(sep), *(fmt(row) for row in rows[1:])])


def _num(value: float) -> str:
    """3.998 -> '4', 2.5 -> '2.5': counts per op, two decimals at most."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def table(results: list[Result]) -> str:
    rows = [["operation", "implementation", "ops/s (median)", "round trips / op",
             "server cmds / op (incl. Lua)", "client CPU µs / op", "server CPU µs / op",
             "rounds min..max /s"]]
    for r in results:
        op = "take" if r.group == "take" else "acquire+release"
        rows.append([
            f"{op}, {r.outcome}",
            r.name.removesuffix(" (refused)"),
            f"{r.median_ops_per_s:,.0f}",
            _num(r.client_round_trips_per_op),
            _num(r.server_commands_per_op),
            f"{r.client_cpu_us_per_op:.0f}",
            f"{r.server_cpu_us_per_op:.0f}",
            f"{min(r.rounds_ops_per_s):,.0f}..{max(r.rounds_ops_per_s):,.0f}",
        ])
    return markdown(rows, {2, 3, 4, 5, 6, 7})


def target_table(targets: list[TargetResult]) -> str:
    rows = [["issue target", "needed", "measured (median / median)",
             "same-round ratio min / median / max", "met"]]
    for t in targets:
        q = t.per_round_ratios
        rows.append([
            t.what,
            f">= {t.needed:g}x" if t.needed else "-",
            f"{t.ratio:.2f}x",
            f"{min(q):.2f} / {t.same_round_median:.2f} / {max(q):.2f}",
            t.verdict if t.verdict in ("yes", "-") else f"**{t.verdict}**",
        ])
    return markdown(rows, {1, 2, 3})


def break_even(target: TargetResult, by_name: dict[str, Result]) -> str:
    """The extra latency per round trip (a network instead of loopback) that meets the target.

    A model, not a measurement: every round trip costs ``r`` more, nothing else changes, so
    the ratio becomes (T_peer + k_peer r) / (T_ours + k_ours r) with T = 1 / median ops/s
    and k = measured round trips per op.
    """
    ours, peer = by_name[target.ours], by_name[target.peer]
    t_ours, t_peer = 1e6 / ours.median_ops_per_s, 1e6 / peer.median_ops_per_s
    k_ours, k_peer = ours.client_round_trips_per_op, peer.client_round_trips_per_op
    x = target.needed
    if t_peer >= x * t_ours:
        return "already met on loopback"
    if k_peer <= x * k_ours:
        return (f"never: the ratio tends to {k_peer:g}/{k_ours:g} = {k_peer / k_ours:.2f}x "
                "as round trips get dearer")
    r = (x * t_ours - t_peer) / (k_peer - x * k_ours)
    return f"met once a round trip costs {r:,.0f} µs more than here"


def breakdown(results: list[Result], targets: list[TargetResult]) -> str:
    by_name = {r.name: r for r in results}
    lines = ["If Redis were across a network (a model, not measured: each round trip costs r "
             "more, nothing else changes):"]
    for t in targets:
        if t.needed:
            lines.append(f"  {t.what}: {break_even(t, by_name)}")
    lines.append("Server commands per operation (INFO commandstats delta / calls):")
    for r in results:
        parts = ", ".join(f"{k} {_num(v)}" for k, v in r.server_commands_breakdown_per_op.items())
        lines.append(f"  {r.name}: {parts}")
    tolerated = [r for r in results if r.wrong_outcomes]
    for r in tolerated:
        lines.append(f"  note: {r.name} had {r.wrong_outcomes} call(s) with the other outcome "
                     "(a fixed window rolled over mid-pass)")
    return "\n".join(lines)


def reproduce_command(args: argparse.Namespace) -> str:
    cmd = f"python benchmarks/limits.py --iterations {args.iterations} --rounds {args.rounds}"
    if args.warmup is not None:
        cmd += f" --warmup {args.warmup}"
    if args.count_iterations is not None:
        cmd += f" --count-iterations {args.count_iterations}"
    if args.interleave != "call":
        cmd += f" --interleave {args.interleave}"
    return cmd


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Bucket take and bulkhead acquire+release per second: celery_reliable vs "
                    "dramatiq's BucketRateLimiter / ConcurrentRateLimiter and limits' moving "
                    "window, on one throwaway redis-server, one client.")
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS,
                        help=f"calls per contender per round (default {DEFAULT_ITERATIONS})")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                        help=f"interleaved rounds; the median is reported "
                             f"(default {DEFAULT_ROUNDS})")
    parser.add_argument("--warmup", type=int, default=None,
                        help="warm-up calls per contender (default max(200, iterations/5))")
    parser.add_argument("--count-iterations", type=int, default=None, metavar="N",
                        help="calls in the (untimed) counting pass (default 1000)")
    parser.add_argument("--interleave", choices=("call", "block"), default="call",
                        help="within a round: 'call' alternates the contenders call by call "
                             "(default; robust on a busy machine), 'block' runs each "
                             "contender's calls back to back")
    parser.add_argument("--json", metavar="PATH", type=Path,
                        help="also write the results as JSON to PATH")
    parser.add_argument("--redis-server", default="redis-server", metavar="BINARY",
                        help="redis-server binary to start (default: from PATH)")
    args = parser.parse_args(argv)
    if (args.iterations < 1 or args.rounds < 1 or (args.warmup or 0) < 0
            or (args.count_iterations is not None and args.count_iterations < 1)):
        parser.error("--iterations, --rounds, --count-iterations must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    binary = shutil.which(args.redis_server)
    if binary is None:
        print(f"error: redis-server is not installed ({args.redis_server!r} not found); "
              "install Redis (e.g. apt-get install redis-server) or pass --redis-server PATH",
              file=sys.stderr)
        return 2
    missing = []
    for module, dist in (("dramatiq", "dramatiq[redis]"), ("limits", "limits[redis]"),
                         ("celery_reliable", "celery-reliable")):
        try:
            __import__(module)
        except ImportError:
            missing.append(dist)
    if missing:
        print(f"error: missing {', '.join(missing)}; run: pip install -e '.[bench]'",
              file=sys.stderr)
        return 2

    started = dt.datetime.now(dt.timezone.utc)
    print(f"# reproduce: {reproduce_command(args)}"
          + (f" --json {args.json}" if args.json else ""))
    with throwaway_redis(binary, "bench-limits-") as (port, server_version):
        vers = versions(server_version)
        print("# " + ", ".join(f"{k} {v}" for k, v in vers.items()))
        print(f"# {os.cpu_count()} CPUs, {platform.platform()}, throwaway redis-server on "
              f"127.0.0.1:{port}, one client; {args.iterations} calls x {args.rounds} "
              f"rounds interleaved by {args.interleave}, median; "
              f"started {started:%Y-%m-%d %H:%M} UTC", flush=True)
        t0 = time.monotonic()
        results, targets = run(args, port)
        wall = time.monotonic() - t0
    print()
    print(table(results))
    print()
    print(target_table(targets))
    print()
    print(breakdown(results, targets))
    print(f"\n(wall time {wall:.1f} s; 'round trips' = requests the client wrote, "
          "'server cmds' = INFO commandstats delta, Lua-internal calls included; CPU from "
          "the counting pass: process_time() here, INFO cpu on the server)")

    if args.json:
        payload = {
            "benchmark": "limits",
            "reproduce": reproduce_command(args),
            "started_utc": started.isoformat(timespec="seconds"),
            "wall_seconds": round(wall, 2),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "machine": platform.machine()},
            "versions": vers,
            "iterations": args.iterations,
            "rounds": args.rounds,
            "interleave": args.interleave,
            "results": [asdict(r) for r in results],
            "targets": [asdict(t) for t in targets],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
