#!/usr/bin/env python
"""Backoff and jitter under contention: the AWS Architecture Blog experiment, on a real Redis.

Reproduces the table of "Exponential Backoff and Jitter" (AWS Architecture Blog, 2015;
simulator: github.com/aws-samples/aws-arch-backoff-simulator) with
``celery_reliable.Backoff`` and real concurrency instead of a discrete-event simulation.

The experiment
--------------

N clients (threads, default 10, 50 and 100) each have to make ONE successful write to the
same resource: a version number in one Redis key, updated with optimistic concurrency,
exactly like the blog's ``OccServer`` ("a single row with a single version"):

1. read the version (``GET``);
2. "work" for ``--work-ms`` (a fixed ``time.sleep``; in the blog this is the network
   delay between the read and the write, ~20 ms). This is what makes attempts overlap;
3. compare-and-set (one Lua ``EVALSHA``): if the version is still the one read, bump it
   and succeed; otherwise fail. **One call = one compare-and-set attempt**, as in the
   blog, where only writes are counted;
4. on failure, sleep ``policy.delay(retry, rng, previous)`` and go back to 1 (``retry``
   is 0 for the first retry; ``previous`` is the last delay, used by decorrelated).

All N clients are released together by a barrier (the blog starts every client at t=0).
"Completion time" runs from the barrier to the last client's successful write. "Total
calls" is the sum of compare-and-set attempts over the N clients. It is counted twice:
by the clients, and by the Lua script on the server (a counter key). The two must agree,
and the final version must equal N, or the run stops: its numbers would lie.

Policies: ``Backoff.exponential(base, cap, jitter)`` for jitter ``none``, ``full``,
``equal`` and ``decorrelated``. Defaults: base 5 ms (the blog's), cap 1 s (the blog used 2 s;
1 s keeps the no-jitter runs short), work 5 ms.

Every (N, strategy) cell runs ``--repeats`` times (default 3). The medians are reported.
The cells are interleaved (repeat by repeat, the strategy order rotating), so a burst of
load from elsewhere on a busy machine does not land on one strategy only. Each client
has its own ``random.Random`` seeded from ``--seed``, N, the repeat and the client index,
so every strategy sees the same seeds. Thread scheduling is not reproducible, so two runs
give close numbers, not identical ones.

The script starts its own ``redis-server`` on a free port (``--save "" --appendonly no``,
in a temp dir) and stops it at the end. It never touches any other Redis. It prints the
table (stdout) and saves a PNG chart (``--png``, default ``benchmarks/results/backoff.png``;
the directory is git-ignored). ``--json PATH`` writes every run too.

Run ``python benchmarks/backoff.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import redis
from _redis_server import throwaway_redis

from celery_reliable import Backoff

DEFAULT_CLIENTS = (10, 50, 100)
STRATEGIES = ("none", "full", "equal", "decorrelated")
DEFAULT_REPEATS = 3
DEFAULT_SEED = 1
DEFAULT_BASE_MS = 5.0
DEFAULT_CAP_MS = 1000.0
DEFAULT_WORK_MS = 5.0
DEFAULT_CELL_TIMEOUT = 300.0
DEFAULT_PNG = Path(__file__).resolve().parent / "results" / "backoff.png"

# KEYS[1] version, KEYS[2] call counter; ARGV[1] the version the client read.
# Succeeds (1) only if nobody wrote since that read. Every call is counted server-side.
CAS_LUA = """
redis.call('INCR', KEYS[2])
local current = redis.call('GET', KEYS[1]) or '0'
if current == ARGV[1] then
  redis.call('SET', KEYS[1], tonumber(current) + 1)
  return 1
end
return 0
"""


class BenchmarkError(RuntimeError):
    """A run is inconsistent (counts disagree, a client never finished): numbers would lie."""


# --------------------------------------------------------------------------- server


# --------------------------------------------------------------------------- one run


@dataclass
class Run:
    clients: int
    strategy: str
    repeat: int
    total_calls: int
    server_calls: int
    seconds: float
    max_calls_one_client: int
    median_calls_one_client: float


def policy_for(strategy: str, args: argparse.Namespace) -> Backoff:
    return Backoff.exponential(args.base_ms / 1000, args.cap_ms / 1000, strategy)  # type: ignore[arg-type]


def run_once(
    port: int, sha: str, n: int, strategy: str, repeat: int, args: argparse.Namespace
) -> Run:
    """N clients, each until its one write succeeds. Returns the run's counts and time."""
    policy = policy_for(strategy, args)
    work = args.work_ms / 1000
    tag = f"bench:backoff:{n}:{strategy}:{repeat}"
    version_key, calls_key = f"{tag}:version", f"{tag}:calls"
    admin = redis.Redis(port=port)
    admin.delete(version_key, calls_key)

    # One connection per client, opened (PING) before the start: no connect inside the race.
    conns = [redis.Redis(port=port, single_connection_client=True) for _ in range(n)]
    for c in conns:
        c.ping()
    calls = [0] * n
    done_at: list[float | None] = [None] * n
    errors: list[BaseException] = []
    started: list[float] = []
    stop = threading.Event()
    barrier = threading.Barrier(n, action=lambda: started.append(time.perf_counter()))

    def client(i: int) -> None:
        conn = conns[i]
        rng = random.Random(f"{args.seed}:{n}:{repeat}:{i}")
        retry = 0
        previous: float | None = None
        try:
            barrier.wait()
            while not stop.is_set():
                seen = conn.get(version_key) or b"0"
                time.sleep(work)
                calls[i] += 1
                if conn.evalsha(sha, 2, version_key, calls_key, seen) == 1:
                    done_at[i] = time.perf_counter()
                    return
                previous = policy.delay(retry, rng, previous)
                retry += 1
                time.sleep(previous)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + args.cell_timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        stop.set()
        for t in threads:
            t.join(args.cap_ms / 1000 + args.work_ms / 1000 + 5)
    for c in conns:
        c.close()
    server_calls = int(admin.get(calls_key) or 0)
    final_version = int(admin.get(version_key) or 0)
    admin.delete(version_key, calls_key)
    admin.close()

    label = f"N={n} {strategy} repeat {repeat + 1}"
    if errors:
        raise BenchmarkError(f"{label}: a client raised {errors[0]!r}")
    finished = [d for d in done_at if d is not None]
    if len(finished) != n:
        raise BenchmarkError(
            f"{label}: only {len(finished)}/{n} clients finished within --cell-timeout "
            f"{args.cell_timeout:g} s"
        )
    total = sum(calls)
    if total != server_calls or final_version != n:
        raise BenchmarkError(
            f"{label}: client-counted calls {total}, server-counted {server_calls}, "
            f"final version {final_version} (expected {n})"
        )
    return Run(
        clients=n,
        strategy=strategy,
        repeat=repeat,
        total_calls=total,
        server_calls=server_calls,
        seconds=max(finished) - started[0],
        max_calls_one_client=max(calls),
        median_calls_one_client=statistics.median(calls),
    )


# --------------------------------------------------------------------------- all runs


@dataclass
class Cell:
    clients: int
    strategy: str
    runs: list[Run] = field(default_factory=list)

    @property
    def calls(self) -> float:
        return statistics.median(r.total_calls for r in self.runs)

    @property
    def seconds(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    @property
    def calls_per_client(self) -> float:
        return self.calls / self.clients


def run_all(args: argparse.Namespace, port: int) -> list[Cell]:
    cells = {(n, s): Cell(n, s) for n in args.clients for s in args.strategies}
    admin = redis.Redis(port=port)
    sha = str(admin.script_load(CAS_LUA))
    admin.close()
    k = len(args.strategies)
    for repeat in range(args.repeats):
        for j, n in enumerate(args.clients):
            shift = (repeat + j) % k
            for strategy in args.strategies[shift:] + args.strategies[:shift]:
                run = run_once(port, sha, n, strategy, repeat, args)
                cells[(n, strategy)].runs.append(run)
                progress(
                    f"repeat {repeat + 1}/{args.repeats} N={n:<3} {strategy:<12} "
                    f"calls {run.total_calls:>5}  time {run.seconds:6.2f} s  "
                    f"max/client {run.max_calls_one_client}"
                )
    return [cells[(n, s)] for n in args.clients for s in args.strategies]


def progress(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- output


def table(cells: list[Cell]) -> str:
    header = [
        "N",
        "strategy",
        "total calls",
        "completion time (s)",
        "calls / client",
        "calls min..max",
        "time min..max (s)",
    ]
    rows = [header]
    for c in cells:
        calls = [r.total_calls for r in c.runs]
        secs = [r.seconds for r in c.runs]
        rows.append(
            [
                str(c.clients),
                c.strategy,
                f"{c.calls:,.0f}",
                f"{c.seconds:.2f}",
                f"{c.calls_per_client:.1f}",
                f"{min(calls):,}..{max(calls):,}",
                f"{min(secs):.2f}..{max(secs):.2f}",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    right = {0, 2, 3, 4, 5, 6}

    def fmt(row: list[str]) -> str:
        cells_ = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "| " + " | ".join(cells_) + " |"

    sep = ["-" * (w - 1) + ":" if i in right else "-" * w for i, w in enumerate(widths)]
    return "\n".join([fmt(rows[0]), fmt(sep), *(fmt(row) for row in rows[1:])])


def shape_check(cells: list[Cell]) -> tuple[list[str], bool]:
    """Compare with the published shape; returns report lines and whether it matches.

    Published (as the issue states it): no jitter is worst by far; full and decorrelated
    jitter make the fewest calls. Checked as: at every N, no jitter makes the most calls
    and is the slowest; at the largest N, if it is >= 50, it makes at least 1.5x the calls
    of the worst jittered strategy ("by far": the model of the blog's simulator, same base, cap 2 s,
    gives about 1.2x at 10 clients, 1.7x at 50 and 1.8x at 100); and at every N, full
    and decorrelated make the two fewest calls.
    """
    lines: list[str] = []
    ok = True
    sizes = sorted({c.clients for c in cells})
    for n in sizes:
        row = {c.strategy: c for c in cells if c.clients == n}
        by_calls = sorted(row, key=lambda s: row[s].calls)
        by_time = sorted(row, key=lambda s: row[s].seconds)
        lines.append(f"N={n}: calls " + " < ".join(f"{s} {row[s].calls:,.0f}" for s in by_calls))
        lines.append(f"N={n}: time  " + " < ".join(f"{s} {row[s].seconds:.2f}s" for s in by_time))
        jittered = [s for s in row if s != "none"]
        if "none" in row and jittered:
            ratio = row["none"].calls / max(row[s].calls for s in jittered)
            t_ratio = row["none"].seconds / max(row[s].seconds for s in jittered)
            worst_ok = by_calls[-1] == "none" and by_time[-1] == "none"
            far = n != sizes[-1] or n < 50 or ratio >= 1.5
            ok &= worst_ok and far
            verdict = "yes" if worst_ok and far else ("yes, but not by far" if worst_ok else "NO")
            lines.append(
                f"N={n}: no jitter worst? {verdict} ({ratio:.2f}x the calls, "
                f"{t_ratio:.1f}x the time of the worst jittered strategy)"
            )
        if {"full", "decorrelated"} <= row.keys() and len(row) > 2:
            fewest_ok = set(by_calls[:2]) == {"full", "decorrelated"}
            ok &= fewest_ok
            lines.append(
                f"N={n}: full and decorrelated fewest calls? {'yes' if fewest_ok else 'NO'}"
            )
    lines.append(
        "shape matches the published one" if ok else "shape does NOT match the published one"
    )
    return lines, ok


def chart(cells: list[Cell], path: Path, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {
        "none": ("tab:red", "o"),
        "full": ("tab:blue", "s"),
        "equal": ("tab:orange", "^"),
        "decorrelated": ("tab:green", "D"),
    }
    fig, (ax_calls, ax_time) = plt.subplots(1, 2, figsize=(11, 4.6))
    for strategy in dict.fromkeys(c.strategy for c in cells):
        mine = sorted((c for c in cells if c.strategy == strategy), key=lambda c: c.clients)
        xs = [c.clients for c in mine]
        color, marker = styles.get(strategy, ("black", "x"))
        for ax, median, values in (
            (ax_calls, [c.calls for c in mine], [[r.total_calls for r in c.runs] for c in mine]),
            (ax_time, [c.seconds for c in mine], [[r.seconds for r in c.runs] for c in mine]),
        ):
            lo = [m - min(v) for m, v in zip(median, values, strict=True)]
            hi = [max(v) - m for m, v in zip(median, values, strict=True)]
            ax.errorbar(
                xs,
                median,
                yerr=[lo, hi],
                color=color,
                marker=marker,
                capsize=3,
                label="no jitter" if strategy == "none" else f"{strategy} jitter",
            )
    ax_calls.set_title("Total calls (work)")
    ax_calls.set_ylabel("compare-and-set attempts, all clients")
    ax_time.set_title("Completion time")
    ax_time.set_ylabel("seconds until the last client's write")
    xticks = sorted({c.clients for c in cells})
    for ax in (ax_calls, ax_time):
        ax.set_xlabel("contending clients (N)")
        ax.set_xticks(xticks)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle("Exponential backoff and jitter: N clients, one optimistic-concurrency key")
    fig.text(0.5, 0.005, subtitle, ha="center", va="bottom", fontsize=8, color="dimgray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
        "matplotlib": v("matplotlib"),
        "celery-reliable": v("celery-reliable"),
        "redis-server": server_version,
    }


def reproduce_command(args: argparse.Namespace) -> str:
    cmd = (
        "python benchmarks/backoff.py"
        f" --clients {','.join(map(str, args.clients))}"
        f" --strategies {','.join(args.strategies)}"
        f" --repeats {args.repeats} --seed {args.seed}"
        f" --base-ms {args.base_ms:g} --cap-ms {args.cap_ms:g} --work-ms {args.work_ms:g}"
    )
    if args.png != DEFAULT_PNG:
        cmd += f" --png {args.png}"
    if args.json:
        cmd += f" --json {args.json}"
    return cmd


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1: {text!r}")
    return values


def _strategies(text: str) -> tuple[str, ...]:
    values = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [v for v in values if v not in STRATEGIES]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"strategies must be among {','.join(STRATEGIES)}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="The AWS 'Exponential Backoff and Jitter' experiment: N clients, one "
        "optimistic-concurrency key on a throwaway redis-server, total calls and completion "
        "time per jitter strategy."
    )
    parser.add_argument(
        "--clients",
        type=_ints,
        default=DEFAULT_CLIENTS,
        metavar="N,N,...",
        help="numbers of contending clients (default 10,50,100)",
    )
    parser.add_argument(
        "--strategies",
        type=_strategies,
        default=STRATEGIES,
        metavar="S,S,...",
        help=f"jitter strategies (default {','.join(STRATEGIES)})",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=DEFAULT_REPEATS,
        help=f"runs per cell; medians are reported (default {DEFAULT_REPEATS})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help=f"seed for every client's RNG (default {DEFAULT_SEED})",
    )
    parser.add_argument(
        "--base-ms",
        type=float,
        default=DEFAULT_BASE_MS,
        help=f"backoff base in ms (default {DEFAULT_BASE_MS:g})",
    )
    parser.add_argument(
        "--cap-ms",
        type=float,
        default=DEFAULT_CAP_MS,
        help=f"backoff cap in ms (default {DEFAULT_CAP_MS:g})",
    )
    parser.add_argument(
        "--work-ms",
        type=float,
        default=DEFAULT_WORK_MS,
        help="fixed time between reading the version and the compare-and-set, in ms "
        f"(default {DEFAULT_WORK_MS:g})",
    )
    parser.add_argument(
        "--cell-timeout",
        type=float,
        default=DEFAULT_CELL_TIMEOUT,
        metavar="SECONDS",
        help="give up (error) if one run takes longer (default %(default)g)",
    )
    parser.add_argument(
        "--png",
        type=Path,
        default=DEFAULT_PNG,
        metavar="PATH",
        help="where to save the chart (default benchmarks/results/backoff.png)",
    )
    parser.add_argument(
        "--json", metavar="PATH", type=Path, help="also write every run as JSON to PATH"
    )
    parser.add_argument(
        "--redis-server",
        default="redis-server",
        metavar="BINARY",
        help="redis-server binary to start (default: from PATH)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.base_ms <= 0 or args.cap_ms < args.base_ms or args.work_ms < 0:
        parser.error("need --base-ms > 0, --cap-ms >= --base-ms, --work-ms >= 0")
    if args.cell_timeout <= 0:
        parser.error("--cell-timeout must be > 0")
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
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: missing matplotlib; run: pip install -e '.[bench]'", file=sys.stderr)
        return 2

    started = dt.datetime.now(dt.timezone.utc)
    print(f"# reproduce: {reproduce_command(args)}")
    with throwaway_redis(binary, "bench-backoff-") as (port, server_version):
        vers = versions(server_version)
        print("# " + ", ".join(f"{k} {v}" for k, v in vers.items()))
        print(
            f"# {os.cpu_count()} CPUs, {platform.platform()}, throwaway redis-server on "
            f"127.0.0.1:{port}; Backoff.exponential(base={args.base_ms:g} ms, "
            f"cap={args.cap_ms:g} ms), work {args.work_ms:g} ms between read and "
            f"compare-and-set; {args.repeats} repeats per cell, median; seed {args.seed}; "
            f"started {started:%Y-%m-%d %H:%M} UTC",
            flush=True,
        )
        t0 = time.monotonic()
        try:
            cells = run_all(args, port)
        except BenchmarkError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        wall = time.monotonic() - t0
    print()
    print(table(cells))
    print()
    lines, matches = shape_check(cells)
    print("Published shape: no jitter worst by far; full and decorrelated jitter fewest calls.")
    for line in lines:
        print(f"  {line}")
    subtitle = (
        f"median of {args.repeats} (bars: min..max); base {args.base_ms:g} ms, cap "
        f"{args.cap_ms:g} ms, work {args.work_ms:g} ms; seed {args.seed}; "
        f"{os.cpu_count()} CPUs; {started:%Y-%m-%d}"
    )
    chart(cells, args.png, subtitle)
    print(f"\nchart: {args.png}")
    print(f"(wall time {wall:.1f} s)")

    if args.json:
        payload = {
            "benchmark": "backoff",
            "reproduce": reproduce_command(args),
            "started_utc": started.isoformat(timespec="seconds"),
            "wall_seconds": round(wall, 2),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "machine": platform.machine(),
            },
            "versions": vers,
            "parameters": {
                "clients": list(args.clients),
                "strategies": list(args.strategies),
                "repeats": args.repeats,
                "seed": args.seed,
                "base_ms": args.base_ms,
                "cap_ms": args.cap_ms,
                "work_ms": args.work_ms,
            },
            "shape_matches_published": matches,
            "shape_check": lines,
            "cells": [
                {
                    "clients": c.clients,
                    "strategy": c.strategy,
                    "median_total_calls": c.calls,
                    "median_seconds": round(c.seconds, 4),
                    "calls_per_client": round(c.calls_per_client, 3),
                    "runs": [asdict(r) for r in c.runs],
                }
                for c in cells
            ],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
