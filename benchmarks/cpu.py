#!/usr/bin/env python
"""Where a task's CPU goes: per-task CPU of every process involved, plain Celery vs guards.

``throughput.py`` reports CPU per task by process group too; this script adds the
split between the worker's main and pool processes, counts every PostgreSQL process
(WAL writer included, not only the bench database's backends) and derives the ceiling.

Throughput on a 2-core machine is bounded by the CPU that ALL processes spend per task
(worker main and pool processes, the broker's redis-server, the reliable redis-server,
PostgreSQL), not only by the worker's Python.
The worker's CPU is split into its main process (consumer: broker I/O, acks) and its
pool processes (where the task and every guard run). This script measures that split, so a
throughput ratio can be explained (and its ceiling computed) instead of guessed:

    ceiling of a contender = plain CPU per task / (plain CPU per task + what it adds
    in servers alone), i.e. the ratio it would reach if its own Python cost nothing.

It starts two throwaway redis-servers (broker, reliable) on free ports, a throwaway
PostgreSQL database (dropped at the end), and ``--workers`` ``celery worker`` processes
(prefork, concurrency 1) of ``benchmarks/bench_app.py``. For each contender and round it
publishes ``--tasks`` no-op tasks, waits until all ran, and reads utime+stime from
``/proc`` for: the worker main processes, their pool processes, each redis-server, and
every process of the ``postgres`` user (the local cluster; keep the machine otherwise
quiet). Linux only.

    python benchmarks/cpu.py                      # ~1 min on 2 cores
    python benchmarks/cpu.py --tasks 3000 --rounds 3 --store redis
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from throughput import (  # noqa: E402
    children,
    process_cpu,
    throwaway_database,
    throwaway_redis,
)

QUEUE = "cpu"
LIMITED = "bench.staging.limited"  # bench_app.LIMITED_STAGING: its queue bucket is 1e6/s
#: contender -> (task name, queue)
CONTENDERS = {
    "plain": ("bench.plain", QUEUE),
    "lock": ("bench.lock", QUEUE),
    "bulkhead": ("bench.bulkhead", QUEUE),
    "queue bucket": ("bench.bucket", LIMITED),
    "idempotency": ("bench.idempotent", QUEUE),
    "all guards": ("bench.all", LIMITED),
}
GROUPS = ("worker main", "worker pool", "broker redis", "reliable redis", "postgresql")
CLIENTS = ("worker main", "worker pool")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes (those gone count 0)."""
    return sum(process_cpu(pid) or 0.0 for pid in pids)


def postgres_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-u", "postgres"], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per pass (2000)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; median shown (2)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    parser.add_argument("--store", choices=("postgres", "redis"), default="postgres",
                        help="reliable_idempotency_store of the workers (postgres)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help="comma-separated subset of: " + ", ".join(CONTENDERS))
    parser.add_argument("--redis-server", default="redis-server")
    parser.add_argument("--postgres-url", default=os.environ.get(
        "BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    args = parser.parse_args(argv)
    args.contenders = [c for c in args.contenders.split(",") if c]
    unknown = set(args.contenders) - set(CONTENDERS)
    if unknown or "plain" not in args.contenders:
        parser.error(f"contenders must include plain and come from {list(CONTENDERS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"# reproduce: python benchmarks/cpu.py --tasks {args.tasks} --rounds {args.rounds} "
          f"--workers {args.workers} --store {args.store} --contenders "
          + ",".join(args.contenders))
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmpdir:
        tmp = Path(tmpdir)
        with throwaway_redis(args.redis_server, tmp, "broker") as (bport, _, bpid), \
                throwaway_redis(args.redis_server, tmp, "reliable") as (rport, _, rpid), \
                throwaway_database(args.postgres_url) as (_, db_url):
            env = dict(os.environ)
            env.update(
                BENCH_BROKER_URL=f"redis://127.0.0.1:{bport}/0",
                BENCH_STATS_URL=f"redis://127.0.0.1:{bport}/1",
                BENCH_RELIABLE_REDIS_URL=f"redis://127.0.0.1:{rport}/0",
                BENCH_DATABASE_URL=db_url,
                BENCH_IDEMPOTENCY_STORE=args.store,
                PYTHONPATH=os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH")) if p),
            )
            env.pop("BENCH_PROFILE_DIR", None)
            os.environ.update({k: v for k, v in env.items() if k.startswith("BENCH_")})
            workers = [
                subprocess.Popen(
                    [sys.executable, "-m", "celery", "-A", "bench_app", "worker", "-P", "prefork",
                     "-c", "1", "-Q", f"{QUEUE},{LIMITED}", "-n", f"cpu{i}@%h", "-l", "warning",
                     "--without-mingle", "--without-gossip", "--without-heartbeat"],
                    cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
                for i in range(args.workers)
            ]
            try:
                return measure(args, workers, bport, bpid, rpid)
            finally:
                for proc in workers:
                    proc.terminate()
                for proc in workers:
                    try:
                        proc.wait(20)
                    except subprocess.TimeoutExpired:
                        proc.kill()


def measure(args: argparse.Namespace, workers: list[subprocess.Popen[bytes]], bport: int,
            bpid: int, rpid: int) -> int:
    import bench_app

    app = bench_app.app
    stats = redis.Redis(port=bport, db=1)
    serial = iter(range(10**9))

    def run_pass(task: str, queue: str, n: int) -> float:
        run = uuid.uuid4().hex[:12]
        started = time.monotonic()  # the publisher competes for the CPU in every pass alike
        with app.producer_or_acquire() as producer:
            for _ in range(n):
                app.send_task(task, args=[run, next(serial)], queue=queue, producer=producer)
        while True:
            done = sum(int(v.split()[0]) + int(v.split()[1])
                       for v in stats.hgetall(f"bench:stats:{run}").values())
            if done >= n:
                return time.monotonic() - started
            if time.monotonic() - started > 120:
                raise RuntimeError(f"{task}: only {done} of {n} tasks ran in 120 s")
            time.sleep(0.02)

    print("# warming up", file=sys.stderr)
    time.sleep(3)
    for name in args.contenders:
        run_pass(*CONTENDERS[name], 300)
    per_task: dict[str, list[dict[str, float]]] = {c: [] for c in args.contenders}
    rates: dict[str, list[float]] = {c: [] for c in args.contenders}
    for rnd in range(args.rounds):
        for name in args.contenders:
            groups = {
                "worker main": [w.pid for w in workers],
                "worker pool": [p for w in workers for p in children(w.pid)],
                "broker redis": [bpid],
                "reliable redis": [rpid],
                "postgresql": postgres_pids(),
            }
            before = {g: cpu_seconds(pids) for g, pids in groups.items()}
            wall = run_pass(*CONTENDERS[name], args.tasks)
            after = {g: cpu_seconds(pids) for g, pids in groups.items()}
            cpu = {g: (after[g] - before[g]) / args.tasks * 1e6 for g in groups}
            per_task[name].append(cpu)
            rates[name].append(args.tasks / wall)
            print(f"# round {rnd + 1}: {name}: {args.tasks / wall:,.0f} tasks/s, "
                  f"{sum(cpu.values()):,.0f} us CPU/task", file=sys.stderr)

    med = {c: {g: statistics.median(r[g] for r in per_task[c]) for g in GROUPS}
           for c in args.contenders}
    plain_total = sum(med["plain"].values())
    plain_rate = statistics.median(rates["plain"])
    header = ("| contender | tasks/s | vs plain | " + " | ".join(f"{g} µs" for g in GROUPS)
              + " | total µs/task | added µs | added in servers µs | ceiling |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for c in args.contenders:
        m = med[c]
        total = sum(m.values())
        servers = sum(m[g] - med["plain"][g] for g in GROUPS if g not in CLIENTS)
        rate = statistics.median(rates[c])
        ceiling = plain_total / (plain_total + max(0.0, servers))
        print(f"| {c} | {rate:,.0f} | {rate / plain_rate:.2f}x | "
              + " | ".join(f"{m[g]:,.0f}" for g in GROUPS)
              + f" | {total:,.0f} | {total - plain_total:+,.0f} | {servers:+,.0f} | "
              f"{ceiling:.2f}x |")
    print("\n(µs of CPU per task: utime+stime deltas from /proc, median over rounds; "
          "'ceiling' = plain total / (plain total + servers' added CPU): the best ratio "
          "possible if the guard's own client work cost nothing, with CPU the bottleneck)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
