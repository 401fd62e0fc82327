#!/usr/bin/env python
"""Fenced-lock acquire+release throughput: celery_reliable.FencedLock vs other Redis locks.

Contenders, all against ONE throwaway ``redis-server`` this script starts on a free
port (``--save "" --appendonly no``, a temp dir) and stops at the end; the Redis you
may have on 6379 is never touched:

* ``redis.lock.Lock``            - redis-py's lock, via ``client.lock(name, timeout=30)``
* ``redis_lock.Lock``            - python-redis-lock
* ``pottery.Redlock``            - pottery's Redlock with a single master
* ``celery_reliable.FencedLock`` - ours (``admit.lua`` + ``complete.lua``)

Each contender does N sequential iterations of *construct lock object, acquire
(non-blocking, must succeed), release (must succeed)* on a fresh key per iteration
(``bench:<contender>:<pass>:<i>``), with one client. After a warm-up, R rounds run,
each contender once per round in rotating order, and the median ops/s is reported,
so machine noise hits every contender alike.

Round trips are measured, never assumed, in one dedicated extra pass per contender:

* client side: the client's connection class counts ``send_packed_command`` calls,
  i.e. writes of a request that the client then waits on (one per round trip; a
  pipeline would count once);
* server side: the delta of ``INFO commandstats`` (sum of ``calls`` over every
  command except ``info`` itself, read through a separate uncounted client). Commands
  a Lua script runs (``redis.call('GET', ...)``) are counted there too, so this is
  "commands the server executed", not round trips.

"Fencing token" is also measured: the lock is acquired and released a few times on
one resource; it says yes only if ``acquire()`` returned integers that strictly grew.

Run ``python benchmarks/locks.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from itertools import pairwise
from pathlib import Path

import redis
from _redis_server import (
    counting_connection_class,
    server_calls,
    throwaway_redis,
)

# 4000 x 5 rounds keeps the default run near 50 s on a noisy 2-core VM (pottery dominates).
DEFAULT_ITERATIONS = 4000
DEFAULT_ROUNDS = 5
LEASE_SECONDS = 30
BASELINE = "redis-py Lock"
FENCE_CHECKS = 5

#: One acquire+release cycle on ``key``; returns what ``acquire()`` returned.
Cycle = Callable[[str], object]


class BenchmarkError(RuntimeError):
    """A contender misbehaved (acquire refused, release failed): the numbers would lie."""


# --------------------------------------------------------------------------- counting




# --------------------------------------------------------------------------- contenders


@dataclass(frozen=True)
class Contender:
    name: str
    slug: str
    note: str
    #: Given a client, returns the cycle function bound to it.
    bind: Callable[[redis.Redis], Cycle]


def redis_py_lock(client: redis.Redis) -> Cycle:
    def cycle(key: str) -> object:
        lock = client.lock(key, timeout=LEASE_SECONDS)
        got = lock.acquire(blocking=False)
        if not got:
            raise BenchmarkError(f"redis-py Lock refused {key}")
        lock.release()  # raises LockNotOwnedError if it was not ours
        return got

    return cycle


def python_redis_lock(client: redis.Redis) -> Cycle:
    import redis_lock  # type: ignore[import-untyped]

    def cycle(key: str) -> object:
        lock = redis_lock.Lock(client, key, expire=LEASE_SECONDS)
        got = lock.acquire(blocking=False)
        if not got:
            raise BenchmarkError(f"python-redis-lock refused {key}")
        lock.release()  # raises NotAcquired if it was not ours
        return got

    return cycle


def pottery_redlock(client: redis.Redis) -> Cycle:
    from pottery import Redlock

    masters = frozenset({client})

    # Redlock takes the key and masters at construction, so one object per
    # iteration is its natural use too. Each acquire/release fans out to the
    # masters through a thread pool even when there is only one master; that
    # is part of what the library costs and is measured as such.
    def cycle(key: str) -> object:
        lock = Redlock(key=key, masters=masters, auto_release_time=LEASE_SECONDS)
        got = lock.acquire(blocking=False)
        if not got:
            raise BenchmarkError(f"pottery Redlock refused {key}")
        lock.release()  # raises ReleaseUnlockedLock if it was not ours
        return got

    return cycle


def fenced_lock(client: redis.Redis) -> Cycle:
    from celery_reliable import FencedLock

    def cycle(key: str) -> object:
        lock = FencedLock(client, key, ttl=LEASE_SECONDS)
        token = lock.acquire()
        if token is None:
            raise BenchmarkError(f"FencedLock refused {key}")
        if not lock.release():
            raise BenchmarkError(f"FencedLock release of {key} found it not ours")
        return token

    return cycle


CONTENDERS = (
    Contender(BASELINE, "redispy", "client.lock(name, timeout=30)", redis_py_lock),
    Contender(
        "python-redis-lock",
        "redislock",
        "redis_lock.Lock(client, name, expire=30)",
        python_redis_lock,
    ),
    Contender(
        "pottery Redlock (1 master)",
        "pottery",
        "Redlock(key=name, masters={client}, auto_release_time=30)",
        pottery_redlock,
    ),
    Contender(
        "celery_reliable.FencedLock", "fenced", "FencedLock(client, name, ttl=30)", fenced_lock
    ),
)


# --------------------------------------------------------------------------- server


# --------------------------------------------------------------------------- running


@dataclass
class Result:
    name: str
    construction: str
    rounds_ops_per_s: list[float] = field(default_factory=list)
    median_ops_per_s: float = 0.0
    ratio_vs_baseline: float = 0.0
    #: ops/s divided by the baseline's ops/s of the SAME round, one per round.
    per_round_ratios: list[float] = field(default_factory=list)
    client_round_trips_per_op: float = 0.0
    server_commands_per_op: float = 0.0
    server_commands_breakdown_per_op: dict[str, float] = field(default_factory=dict)
    mints_fencing_token: bool = False
    acquire_returns: list[str] = field(default_factory=list)


def timed_pass(cycle: Cycle, keys: list[str]) -> float:
    gc.collect()
    start = time.perf_counter()
    for key in keys:
        cycle(key)
    return time.perf_counter() - start


#: ``--key-pool``: 0 locks a fresh resource every cycle; N cycles over N resources,
#: as a service locking the same orders again and again does.
KEY_POOL = 0


def keys_for(contender: Contender, tag: str, n: int) -> list[str]:
    if KEY_POOL:
        return [f"bench:{contender.slug}:pool:{i % KEY_POOL}" for i in range(n)]
    return [f"bench:{contender.slug}:{tag}:{i}" for i in range(n)]


def count_pass(
    contender: Contender, port: int, admin: redis.Redis, n: int, warmup: int, result: Result
) -> None:
    """One extra pass through a counting client: round trips and server commands."""
    conn_class = counting_connection_class()
    pool = redis.ConnectionPool(port=port, connection_class=conn_class)
    client = redis.Redis(connection_pool=pool)
    try:
        cycle = contender.bind(client)
        for key in keys_for(contender, "count-warmup", max(warmup, 1)):
            cycle(key)  # connects, loads scripts if needed: not measured
        keys = keys_for(contender, "count", n)
        conn_class.sends = conn_class.connects = 0
        before = server_calls(admin)
        for key in keys:
            cycle(key)
        after = server_calls(admin)
        if conn_class.connects:
            raise BenchmarkError(f"{contender.name}: reconnected during the counted pass")
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        delta = {k: v for k, v in sorted(delta.items()) if v}
        result.client_round_trips_per_op = conn_class.sends / n
        result.server_commands_per_op = sum(delta.values()) / n
        result.server_commands_breakdown_per_op = {k: v / n for k, v in delta.items()}

        returned = [cycle(f"bench:{contender.slug}:fence") for _ in range(FENCE_CHECKS)]
        result.acquire_returns = [repr(v) for v in returned]
        ints = [v for v in returned if isinstance(v, int) and not isinstance(v, bool)]
        result.mints_fencing_token = len(ints) == len(returned) and all(
            a < b for a, b in pairwise(ints)
        )
    finally:
        client.close()
        pool.disconnect()


def run(args: argparse.Namespace, port: int) -> list[Result]:
    n, rounds = args.iterations, args.rounds
    warmup = args.warmup if args.warmup is not None else max(100, n // 10)
    admin = redis.Redis(port=port)
    client = redis.Redis(port=port)
    cycles = {c.name: c.bind(client) for c in CONTENDERS}
    results = {c.name: Result(c.name, c.note) for c in CONTENDERS}

    progress(f"warm-up: {warmup} iterations each")
    for c in CONTENDERS:
        timed_pass(cycles[c.name], keys_for(c, "warmup", warmup))

    for r in range(rounds):
        order = CONTENDERS[r % len(CONTENDERS) :] + CONTENDERS[: r % len(CONTENDERS)]
        line = []
        for c in order:
            elapsed = timed_pass(cycles[c.name], keys_for(c, f"r{r}", n))
            ops = n / elapsed
            results[c.name].rounds_ops_per_s.append(ops)
            line.append(f"{c.name} {ops:,.0f}/s")
        progress(f"round {r + 1}/{rounds}: " + ", ".join(line))

    count_n = args.count_iterations or min(n, 1000)
    progress(f"counting pass: {count_n} iterations each")
    for c in CONTENDERS:
        count_pass(c, port, admin, count_n, warmup=min(warmup, 50), result=results[c.name])

    base = statistics.median(results[BASELINE].rounds_ops_per_s)
    for res in results.values():
        res.median_ops_per_s = statistics.median(res.rounds_ops_per_s)
        res.ratio_vs_baseline = res.median_ops_per_s / base
        res.per_round_ratios = [
            a / b
            for a, b in zip(res.rounds_ops_per_s, results[BASELINE].rounds_ops_per_s, strict=True)
        ]
    client.close()
    admin.close()
    return list(results.values())


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
        "python-redis-lock": v("python-redis-lock"),
        "pottery": v("pottery"),
        "celery-reliable": v("celery-reliable"),
        "redis-server": server_version,
    }


def table(results: list[Result]) -> str:
    header = [
        "implementation",
        "acquire+release/s (median)",
        f"vs {BASELINE}",
        "round trips / op",
        "server cmds / op (incl. Lua)",
        "fencing token",
        "rounds min..max /s",
    ]
    rows = [header]
    for r in results:
        rows.append(
            [
                r.name,
                f"{r.median_ops_per_s:,.0f}",
                f"{r.ratio_vs_baseline:.2f}x",
                f"{r.client_round_trips_per_op:g}",
                f"{r.server_commands_per_op:g}",
                "yes" if r.mints_fencing_token else "no",
                f"{min(r.rounds_ops_per_s):,.0f}..{max(r.rounds_ops_per_s):,.0f}",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    right = {1, 2, 3, 4, 6}

    def fmt(row: list[str]) -> str:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "| " + " | ".join(cells) + " |"

    sep = ["-" * (w - 1) + ":" if i in right else "-" * w for i, w in enumerate(widths)]
    return "\n".join([fmt(rows[0]), fmt(sep), *(fmt(row) for row in rows[1:])])


def breakdown(results: list[Result]) -> str:
    lines = ["Server commands per acquire+release (INFO commandstats delta / iterations):"]
    for r in results:
        parts = ", ".join(f"{k} {v:g}" for k, v in r.server_commands_breakdown_per_op.items())
        lines.append(f"  {r.name}: {parts}")
    lines.append(f"Same-round ratio vs {BASELINE} (min / median / max over rounds):")
    for r in results:
        q = r.per_round_ratios
        lines.append(f"  {r.name}: {min(q):.2f} / {statistics.median(q):.2f} / {max(q):.2f}")
    lines.append(f"acquire() returned, same resource {FENCE_CHECKS}x (fencing check):")
    for r in results:
        shown = ", ".join(r.acquire_returns[:3])
        lines.append(f"  {r.name}: {shown}, ...")
    return "\n".join(lines)


def reproduce_command(args: argparse.Namespace) -> str:
    cmd = f"python benchmarks/locks.py --iterations {args.iterations} --rounds {args.rounds}"
    if args.warmup is not None:
        cmd += f" --warmup {args.warmup}"
    if args.count_iterations is not None:
        cmd += f" --count-iterations {args.count_iterations}"
    if args.key_pool:
        cmd += f" --key-pool {args.key_pool}"
    return cmd


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Fenced-lock acquire+release/s: celery_reliable.FencedLock vs redis-py "
        "Lock, python-redis-lock and pottery Redlock, on a throwaway redis-server."
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=DEFAULT_ITERATIONS,
        help=f"acquire+release cycles per contender per round (default {DEFAULT_ITERATIONS})",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=DEFAULT_ROUNDS,
        help=f"interleaved rounds; the median is reported (default {DEFAULT_ROUNDS})",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="warm-up cycles per contender (default max(100, iterations/10))",
    )
    parser.add_argument(
        "--count-iterations",
        type=int,
        default=None,
        metavar="N",
        help="cycles in the (untimed) round-trip counting pass; counts are "
        "exact per cycle (default min(iterations, 1000))",
    )
    parser.add_argument(
        "--json", metavar="PATH", type=Path, help="also write the results as JSON to PATH"
    )
    parser.add_argument(
        "--key-pool",
        type=int,
        default=0,
        metavar="N",
        help="cycle over N resources instead of a fresh one per cycle (default 0: fresh)",
    )
    parser.add_argument(
        "--redis-server",
        default="redis-server",
        metavar="BINARY",
        help="redis-server binary to start (default: from PATH)",
    )
    args = parser.parse_args(argv)
    global KEY_POOL
    KEY_POOL = max(0, args.key_pool)
    if (
        args.iterations < 1
        or args.rounds < 1
        or (args.warmup or 0) < 0
        or (args.count_iterations is not None and args.count_iterations < 1)
    ):
        parser.error("--iterations, --rounds, --count-iterations must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    binary = shutil.which(args.redis_server)
    if binary is None:
        print(
            f"error: redis-server is not installed ({args.redis_server!r} not found); "
            "install Redis (e.g. apt-get install redis-server) or pass --redis-server PATH",
            file=sys.stderr,
        )
        return 2
    missing = []
    for module, dist in (
        ("redis_lock", "python-redis-lock"),
        ("pottery", "pottery"),
        ("celery_reliable", "celery-reliable"),
    ):
        try:
            __import__(module)
        except ImportError:
            missing.append(dist)
    if missing:
        print(
            f"error: missing {', '.join(missing)}; run: pip install -e '.[bench]'", file=sys.stderr
        )
        return 2

    started = dt.datetime.now(dt.timezone.utc)
    print(f"# reproduce: {reproduce_command(args)}" + (f" --json {args.json}" if args.json else ""))
    with throwaway_redis(binary, "bench-locks-") as (port, server_version):
        vers = versions(server_version)
        print("# " + ", ".join(f"{k} {v}" for k, v in vers.items()))
        print(
            f"# {os.cpu_count()} CPUs, {platform.platform()}, throwaway redis-server on "
            f"127.0.0.1:{port}; {args.iterations} iterations x {args.rounds} interleaved "
            f"rounds, median; started {started:%Y-%m-%d %H:%M} UTC",
            flush=True,
        )
        t0 = time.monotonic()
        results = run(args, port)
        wall = time.monotonic() - t0
    print()
    print(table(results))
    print()
    print(breakdown(results))
    print(
        f"\n(wall time {wall:.1f} s; 'round trips' = requests the client wrote, "
        "'server cmds' = INFO commandstats delta, Lua-internal calls included)"
    )

    if args.json:
        payload = {
            "benchmark": "locks",
            "reproduce": reproduce_command(args),
            "started_utc": started.isoformat(timespec="seconds"),
            "wall_seconds": round(wall, 2),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "machine": platform.machine(),
            },
            "versions": vers,
            "iterations": args.iterations,
            "rounds": args.rounds,
            "baseline": BASELINE,
            "results": [asdict(r) for r in results],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
