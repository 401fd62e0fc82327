#!/usr/bin/env python
"""One command for the whole comparison: ``python benchmarks/run.py`` (``--quick``: ~3 min).

Builds on ``benchmarks/throughput.py`` (throwaway redis-servers on free ports, a private
PostgreSQL database, worker subprocesses, staged start via RENAME, prerun/postrun timing,
interleaved rounds, MONITOR + INFO commandstats) and the tasks of ``bench_app.py``.

Phases, each with its own worker fleets (stopped before the next phase starts):

1. **Throughput** of no-op tasks, 2 prefork workers (concurrency 1) per fleet, all
   contenders interleaved in ``--rounds`` rounds: plain Celery, celery-once ``QueueOnce``,
   celery-singleton ``Singleton`` (both on the throwaway reliable redis-server), ReliableTask
   with each guard alone, with all guards (idempotency durable in PostgreSQL) and with all
   guards on a fleet with ``reliable_idempotency_store="redis"``. tasks/s and the same-round
   ratio to plain Celery, against the issue's targets.
2. **Round trips** per task execution counted by the reliable redis-server (MONITOR:
   client commands = round trips; INFO commandstats delta = commands incl. Lua), in one
   untimed counting pass per contender. celery-once/-singleton lock at *publish* time;
   publishing happens before the counters are read, so only their execution-side commands
   (the unlock) are counted.
3. **Scale**: one fleet of 4 workers; queue ``scale.<k>`` is consumed by exactly k of them.
   ``--scale-tasks`` tasks are published at once to ``scale.1``, ``scale.2``, ``scale.4`` in
   turn, for a ReliableTask drawing from the fleet-wide 50/s bucket of its queue and for a
   plain task with Celery's ``rate_limit="50/s"``. Admitted rate = body starts per second
   from the 51st start (past the bucket's burst of 50) or the 10th percentile, whichever
   is later, to the 90th percentile of the start times (and, second figure, to the last
   start: deferred stragglers included). Latency:
   ``task_prerun`` -> body start in the same process (the admission decision for the run
   that was admitted: for ReliableTask the plan + admit.lua round trip; Celery's limiter
   acts before prerun, so ~0 there), and publish -> body start (dominated by the backlog).
4. **Memory**: a plain fleet and an all-guards (PostgreSQL) fleet, 1 worker x 2 pool
   processes each; ``--memory-tasks`` tasks in 5 equal batches; VmRSS/VmHWM of the pool
   processes (``/proc/<pid>/status``) after each batch.
5. **Client CPU** (phase ``client``, not in the default phases): ``client_cpu.py`` in a
   subprocess per idempotency store, against the same reliable redis-server and
   database: client CPU µs per task per guard, each bench task called in-process in a
   loop under a pushed request, against plain Celery's task called the same way.

Writes a table to stdout and a chart to ``benchmarks/results/run.png``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import throughput as tp  # noqa: E402
from throughput import (  # noqa: E402
    BenchmarkError,
    Cleanup,
    Contender,
    Fleets,
    FleetSpec,
    PgStats,
    fmt_table,
    num,
    progress,
    throwaway_database,
    throwaway_redis,
)

LIMITED_STAGING = "bench.staging.limited"  # = bench_app.LIMITED_STAGING (not imported early)
BASELINE = "plain"

CONTENDERS = (
    Contender("plain", "bench.plain", "pg", "@app.task"),
    Contender("celery-once", "bench.once", "pg", "base=QueueOnce (Redis backend)"),
    Contender("celery-singleton", "bench.singleton", "pg", "base=Singleton"),
    Contender("lock", "bench.lock", "pg", 'lock="bench:{n}"'),
    Contender("idempotency", "bench.idempotent", "pg", "idempotency_key=True (postgres)"),
    Contender("queue bucket", "bench.bucket", "pg", "queue bucket 1,000,000/s"),
    Contender("window", "bench.window", "pg", 'rate_limit_window="100000000/m" (exact)'),
    Contender("bulkhead", "bench.bulkhead", "pg", 'bulkhead="bench" (64 slots)'),
    Contender("backoff", "bench.backoff", "pg", "backoff=Backoff.exponential(...)"),
    Contender("all guards (pg)", "bench.all", "pg",
              "lock+idempotency+bucket+bulkhead+backoff+breaker, store postgres"),
    Contender("all guards (redis)", "bench.all", "redis",
              'the same, reliable_idempotency_store="redis"'),
)
SINGLE_GUARDS = ("lock", "idempotency", "queue bucket", "bulkhead", "backoff")
LIMITED_TASKS = ("bench.bucket", "bench.all")

#: the issue's targets: minimum same-round ratio to plain Celery
TARGETS = {"all guards (pg)": 0.75, "all guards (redis)": 0.90,
           **dict.fromkeys(SINGLE_GUARDS, 0.93)}
TARGET_ROUND_TRIPS = 2
SCALE_RATE = 50.0
SCALE_WORKERS = (1, 2, 4)


class RunBench(tp.Bench):
    def staging(self, contender: Contender) -> str:
        # the queue bucket is keyed by routing key, i.e. the list a message was published to
        return LIMITED_STAGING if contender.task in LIMITED_TASKS else tp.STAGING


@dataclass
class Row:
    contender: Contender
    rates: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    round_trips: float = 0.0
    commands: float = 0.0
    client_cmds: dict[str, float] = field(default_factory=dict)
    lua_cmds: dict[str, float] = field(default_factory=dict)
    pg_xacts: float = 0.0


# --------------------------------------------------------------------------- phases


def make_env(broker_port: int, reliable_port: int, db_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        BENCH_BROKER_URL=f"redis://127.0.0.1:{broker_port}/0",
        BENCH_STATS_URL=f"redis://127.0.0.1:{broker_port}/1",
        BENCH_RELIABLE_REDIS_URL=f"redis://127.0.0.1:{reliable_port}/0",
        BENCH_DATABASE_URL=db_url,
        PYTHONPATH=os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p),
    )
    env.pop("BENCH_PROFILE_DIR", None)
    os.environ.update({k: v for k, v in env.items() if k.startswith("BENCH_")})
    return env


def start_fleets(args: argparse.Namespace, tmp: Path, env: dict[str, str],
                 specs: list[FleetSpec], tag: str) -> tuple[Fleets, ExitStack]:
    stack = ExitStack()
    fleets = Fleets(args, tmp, env, specs=specs, tag=tag)
    stack.callback(fleets.stop)
    try:
        progress("starting workers: " + ", ".join(
            f"{s.name} {s.workers}x{s.concurrency}" for s in specs))
        fleets.start()
        fleets.wait_ready()
    except BaseException:
        stack.close()
        raise
    return fleets, stack


def phase_throughput(args: argparse.Namespace, ctx: dict[str, Any]) -> list[Row]:
    contenders = [c for c in CONTENDERS if c.name in args.contenders]
    store = {"pg": "postgres", "redis": "redis"}
    specs = [FleetSpec(f, {"BENCH_IDEMPOTENCY_STORE": store[f]}, args.workers, 1)
             for f in ("pg", "redis") if any(c.fleet == f for c in contenders)]
    fleets, stack = start_fleets(args, ctx["tmp"], ctx["env"], specs, "-throughput")
    with stack:
        bench = RunBench(args, ctx["app"], ctx["broker"], ctx["stats"], ctx["reliable"],
                         fleets, ctx["server_pids"], ctx["pg"])
        if args.warmup:
            progress(f"warm-up: {args.warmup} tasks per contender")
            for c in contenders:
                bench.timed_pass(c, args.warmup)
        rows = {c.name: Row(c) for c in contenders}
        for rnd in range(args.rounds):
            k = rnd % len(contenders)
            order = contenders[k:] + contenders[:k]
            rates = {}
            for c in order:
                p = bench.timed_pass(c, args.tasks)
                rates[c.name] = p.tasks_per_s
                rows[c.name].rates.append(p.tasks_per_s)
                progress(f"round {rnd + 1}/{args.rounds} {c.name:>18}: "
                         f"{p.tasks_per_s:7,.0f} tasks/s ({p.elapsed:.2f} s)")
            for name, rate in rates.items():
                rows[name].ratios.append(rate / rates[BASELINE])
        progress(f"counting pass: {args.count_tasks} tasks per contender (MONITOR, "
                 "commandstats, pg_stat_database)")
        for c in contenders:
            monitor, stats_delta, xacts = bench.counting_pass(
                c, args.count_tasks, ctx["pg"], ctx["reliable_port"])
            n = args.count_tasks
            r = rows[c.name]
            r.round_trips = sum(monitor.by_client.values()) / n
            r.commands = sum(stats_delta.values()) / n
            r.client_cmds = {k: v / n for k, v in monitor.by_client.items()}
            r.lua_cmds = {k: v / n for k, v in monitor.by_lua.items()}
            r.pg_xacts = xacts / n
    return list(rows.values())


@dataclass
class ScaleRow:
    limiter: str
    workers: int
    admitted_per_s: float
    overall_per_s: float
    deliveries_per_task: float
    started: int
    offered: int
    prerun_to_body_ms: tuple[float, float]
    publish_to_body_ms: tuple[float, float]
    wall_s: float


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def phase_scale(args: argparse.Namespace, ctx: dict[str, Any]) -> list[ScaleRow]:
    def queues(i: int) -> str:
        return ",".join(f"scale.{k}" for k in SCALE_WORKERS if k >= i)

    spec = FleetSpec("scale", {"BENCH_IDEMPOTENCY_STORE": "redis"}, max(SCALE_WORKERS), 1,
                     queues)
    fleets, stack = start_fleets(args, ctx["tmp"], ctx["env"], [spec], "-scale")
    app, stats = ctx["app"], ctx["stats"]
    out = []
    with stack:
        for workers in SCALE_WORKERS:
            for limiter, task_name in (("ReliableTask queue bucket 50/s", "bench.rate_reliable"),
                                       ('Celery rate_limit="50/s"',
                                        f"bench.rate_celery.scale.{workers}")):
                run = f"scale-{workers}-{task_name}-{time.monotonic_ns()}"
                task = app.tasks[task_name]
                n = args.scale_tasks
                t0 = time.monotonic()
                for i in range(n):
                    task.apply_async((run, i, time.time()), queue=f"scale.{workers}")
                key = f"bench:starts:{run}"
                # Celery's rate_limit on the Redis transport can fall to ~1 task/s (celery
                # issues #5927, #3166): stop waiting after 3x the nominal time, report it
                cap = max(args.scale_cap, 3 * n / SCALE_RATE)
                while stats.llen(key) < n and time.monotonic() - t0 < cap:
                    fleets.check_alive()
                    time.sleep(0.05)
                wall = time.monotonic() - t0
                rows = [tuple(map(float, v.split())) for v in stats.lrange(key, 0, -1)]
                if len(rows) < n:
                    progress(f"{limiter}, {workers} worker(s): only {len(rows)}/{n} started "
                             f"after {wall:.0f} s; rate from those, the rest purged")
                    ctx["broker"].delete(f"scale.{workers}")
                if len(rows) < 4:
                    raise BenchmarkError(f"{run}: {len(rows)} tasks started in {wall:.0f} s")
                time.sleep(0.2)  # let the stats flusher report the last postrun
                deliveries = sum(int(v.split()[0]) + int(v.split()[1]) for v in
                                 (x.decode() for x in stats.hvals(f"bench:stats:{run}")))
                starts = sorted(r[0] for r in rows)
                # past the bucket's burst (50 tokens) and the first 10%, up to the 90th
                m = len(rows)
                lo = min(max(int(0.1 * (m - 1)), int(SCALE_RATE)), m // 2)
                hi = int(0.9 * (m - 1))
                rate = (hi - lo) / (starts[hi] - starts[lo]) if starts[hi] > starts[lo] else 0.0
                # the whole run past the burst, tail included (deferred stragglers)
                span = starts[-1] - starts[lo]
                overall = (m - 1 - lo) / span if span > 0 else 0.0
                pre = [1000 * r[1] for r in rows]
                pub = [1000 * r[2] for r in rows]
                row = ScaleRow(limiter, workers, rate, overall, deliveries / m, m, n,
                               (pct(pre, 0.5), pct(pre, 0.99)), (pct(pub, 0.5), pct(pub, 0.99)),
                               wall)
                out.append(row)
                progress(f"scale {workers} worker(s) {limiter}: {rate:.1f}/s admitted "
                         f"({overall:.1f}/s to the last), "
                         f"{row.deliveries_per_task:.2f} deliveries/task, {wall:.1f} s")
                stats.delete(key, f"bench:stats:{run}")
    return out


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


@dataclass
class MemRow:
    name: str
    after: list[int] = field(default_factory=list)  # tasks done at each checkpoint
    rss_kb: list[int] = field(default_factory=list)  # max VmRSS over the pool processes
    hwm_kb: list[int] = field(default_factory=list)  # max VmHWM over the pool processes


def phase_memory(args: argparse.Namespace, ctx: dict[str, Any]) -> list[MemRow]:
    specs = [FleetSpec("memplain", {"BENCH_IDEMPOTENCY_STORE": "postgres"}, 1, 2),
             FleetSpec("memall", {"BENCH_IDEMPOTENCY_STORE": "postgres"}, 1, 2)]
    fleets, stack = start_fleets(args, ctx["tmp"], ctx["env"], specs, "-memory")
    batch = max(1, args.memory_tasks // 5)
    out = []
    with stack:
        bench = RunBench(args, ctx["app"], ctx["broker"], ctx["stats"], ctx["reliable"],
                         fleets, ctx["server_pids"], ctx["pg"])
        bench.next_n = 10_000_000  # never the arguments of phase 1
        for name, task in (("plain", "bench.plain"), ("all guards (pg)", "bench.all")):
            fleet = "memplain" if task == "bench.plain" else "memall"
            c = Contender(name, task, fleet, "")
            row = MemRow(name)
            done = 0
            for _ in range(5):
                bench.timed_pass(c, batch)
                done += batch
                main = fleets.procs[f"bench-{fleet}-1"].pid
                pool = tp.children(main)
                st = [proc_status(p) for p in pool]
                row.after.append(done)
                row.rss_kb.append(max(s.get("VmRSS", 0) for s in st))
                row.hwm_kb.append(max(s.get("VmHWM", 0) for s in st))
                progress(f"memory {name}: after {done} tasks pool VmRSS max "
                         f"{row.rss_kb[-1] / 1024:.1f} MiB, "
                         f"VmHWM max {row.hwm_kb[-1] / 1024:.1f} MiB")
            out.append(row)
    return out


@dataclass
class ClientRow:
    name: str
    store: str
    median_us: float
    added_us: float
    round_trips: float
    commands: float
    cpu_us: list[float]
    by_command: dict[str, float]
    user_median_us: float
    user_added_us: float


#: client phase: (row name, client_cpu.py contender, store)
CLIENT_CONTENDERS = (
    ("plain", "plain", "postgres"),
    ("lock", "lock", "postgres"),
    ("idempotency (pg)", "idempotency", "postgres"),
    ("queue bucket", "queue bucket", "postgres"),
    ("window", "window", "postgres"),
    ("bulkhead", "bulkhead", "postgres"),
    ("backoff", "backoff", "postgres"),
    ("all guards (pg)", "all guards", "postgres"),
    ("plain", "plain", "redis"),
    ("idempotency (redis)", "idempotency", "redis"),
    ("all guards (redis)", "all guards", "redis"),
)


def phase_client(args: argparse.Namespace, ctx: dict[str, Any]) -> list[ClientRow]:
    out = []
    for store in ("postgres", "redis"):
        wanted = [(name, c) for name, c, s in CLIENT_CONTENDERS if s == store]
        cmd = [sys.executable, str(HERE / "client_cpu.py"), "--store", store,
               "--tasks", str(args.client_tasks), "--rounds", str(args.client_rounds),
               "--contenders", ",".join(c for _, c in wanted)]
        progress("client CPU: " + " ".join(cmd[1:]))
        done = subprocess.run(cmd, env=ctx["env"], stdout=subprocess.PIPE, text=True,
                              check=False)
        if done.returncode != 0:
            raise BenchmarkError(f"client_cpu.py --store {store} exited {done.returncode}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        progress(f"client CPU ({store}): celery_reliable from {result['library']}")
        for name, c in wanted:
            r = result["contenders"][c]
            out.append(ClientRow(name, store, r["median_us"], r["added_us"],
                                 r["round_trips"], r["commands"], r["cpu_us"],
                                 r["by_command"], r["user_median_us"], r["user_added_us"]))
    return out


# --------------------------------------------------------------------------- report


def throughput_table(rows: list[Row]) -> str:
    header = ["contender", "options", "tasks/s (median)", "same-round ratio (median)",
              "min..max ratio", "target", "met", "Redis round trips/task",
              "Redis cmds/task (incl. Lua)", "PG xacts/task"]
    once = next((r for r in rows if r.contender.name == "celery-once"), None)
    out = []
    for r in rows:
        ratio = statistics.median(r.ratios)
        target = TARGETS.get(r.contender.name)
        met = ""
        if target is not None:
            ok = ratio >= target
            if r.contender.name in SINGLE_GUARDS and once is not None:
                # "never slower than celery-once in the same run": every round
                beats = all(a >= b for a, b in zip(r.ratios, once.ratios, strict=True))
                ok = ok and beats
                met = ("yes" if ok else "NO") + ("" if beats else " (slower than once)")
            else:
                met = "yes" if ok else "NO"
        out.append([
            r.contender.name, r.contender.option, f"{statistics.median(r.rates):,.0f}",
            f"{ratio:.2f}x", f"{min(r.ratios):.2f}..{max(r.ratios):.2f}",
            f">= {target:.2f}x" if target is not None else "", met,
            num(r.round_trips), num(r.commands), num(r.pg_xacts),
        ])
    return fmt_table(header, out, right={2, 3, 4, 7, 8, 9})


def roundtrip_lines(rows: list[Row]) -> str:
    lines = [f"Round trips (target <= {TARGET_ROUND_TRIPS} per task with all Redis guards), "
             "per task, counted by the reliable redis-server:"]
    for r in rows:
        client = ", ".join(f"{k} {num(v)}" for k, v in sorted(r.client_cmds.items())) or "-"
        lua = ", ".join(f"{k} {num(v)}" for k, v in sorted(r.lua_cmds.items())) or "-"
        lines.append(f"  {r.contender.name:<19} client: {client:<28} inside Lua: {lua}")
    return "\n".join(lines)


def client_table(rows: list[ClientRow]) -> str:
    header = ["contender", "store", "client CPU µs/task (median)", "added vs plain µs",
              "rounds min..max µs", "user µs/task", "user added vs plain µs",
              "EVALSHA/task (in-process)", "Redis cmds/task (incl. Lua)"]
    out = [[r.name, r.store, f"{r.median_us:,.0f}", f"{r.added_us:+,.0f}",
            f"{min(r.cpu_us):,.0f}..{max(r.cpu_us):,.0f}", f"{r.user_median_us:,.0f}",
            f"{r.user_added_us:+,.0f}", num(r.round_trips), num(r.commands)] for r in rows]
    lines = ["", "Commands per task on the reliable redis-server (INFO commandstats, in-process):"]
    for r in rows:
        cmds = ", ".join(f"{k} {num(v)}" for k, v in r.by_command.items()
                         if num(v) != "0") or "-"
        lines.append(f"  {r.name:<19} ({r.store}): {cmds}")
    return fmt_table(header, out, right={2, 3, 4, 5, 6, 7, 8}) + "\n".join(lines)


def scale_table(rows: list[ScaleRow]) -> str:
    header = ["limiter", "workers", "started/offered", "admitted/s (p10..p90)", "vs 50/s",
              "admitted/s (to the last)",
              "deliveries/task",
              "prerun->body p50/p99 ms", "publish->body p50/p99 ms"]
    out = [[r.limiter, str(r.workers), f"{r.started}/{r.offered} in {r.wall_s:.0f} s",
            f"{r.admitted_per_s:.1f}",
            f"{(r.admitted_per_s / SCALE_RATE - 1) * 100:+.0f}%", f"{r.overall_per_s:.1f}",
            f"{r.deliveries_per_task:.2f}",
            f"{r.prerun_to_body_ms[0]:.2f} / {r.prerun_to_body_ms[1]:.2f}",
            f"{r.publish_to_body_ms[0]:,.0f} / {r.publish_to_body_ms[1]:,.0f}"] for r in rows]
    return fmt_table(header, out, right={1, 2, 3, 4, 5, 6, 7, 8})


def memory_table(rows: list[MemRow]) -> str:
    if not rows:
        return ""
    header = ["worker", *(f"VmRSS after {n}" for n in rows[0].after), "VmHWM at end",
              f"growth {rows[0].after[0]}->{rows[0].after[-1]}"]
    out = [[r.name, *(f"{x / 1024:.1f} MiB" for x in r.rss_kb), f"{r.hwm_kb[-1] / 1024:.1f} MiB",
            f"{(r.rss_kb[-1] - r.rss_kb[0]) / 1024:+.2f} MiB"] for r in rows]
    return fmt_table(header, out, right=set(range(1, len(header))))


def chart(path: Path, rows: list[Row], scale: list[ScaleRow], mem: list[MemRow],
          title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5))
    ax = axes[0]
    names = [r.contender.name for r in rows]
    ratios = [statistics.median(r.ratios) for r in rows]
    ax.barh(names, ratios, color=["#888" if n in (BASELINE, "celery-once", "celery-singleton")
                                  else "#2a7" for n in names])
    for i, r in enumerate(rows):
        t = TARGETS.get(r.contender.name)
        if t is not None:
            ax.plot([t, t], [i - 0.4, i + 0.4], color="red")
    ax.invert_yaxis()
    ax.set_xlabel("same-round throughput vs plain Celery (red: target)")
    ax.set_title("throughput, no-op tasks, 2 workers")
    ax = axes[1]
    for limiter in dict.fromkeys(r.limiter for r in scale):
        pts = [(r.workers, r.admitted_per_s) for r in scale if r.limiter == limiter]
        ax.plot(*zip(*pts, strict=True), marker="o", label=limiter)
    ax.axhspan(SCALE_RATE * 0.95, SCALE_RATE * 1.05, color="green", alpha=0.15,
               label="50/s +- 5%")
    ax.set_xticks(list(SCALE_WORKERS))
    ax.set_xlabel("worker processes")
    ax.set_ylabel("admitted tasks/s")
    ax.set_title("rate limit 50/s vs worker count")
    ax.legend(fontsize=8)
    ax = axes[2]
    for m in mem:
        ax.plot(m.after, [x / 1024 for x in m.rss_kb], marker="o", label=f"{m.name} VmRSS")
    ax.set_xlabel("tasks executed")
    ax.set_ylabel("max pool-process VmRSS (MiB)")
    ax.set_title("memory")
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Throughput (plain Celery, celery-once, celery-singleton, ReliableTask per "
                    "guard and with all guards), Redis round trips, rate-limit scaling and "
                    "memory, with its own redis-servers, database and workers.")
    parser.add_argument("--quick", action="store_true",
                        help="small run (~3 min): --tasks 1000 --rounds 2 --warmup 100 "
                             "--count-tasks 300 --scale-tasks 300 --memory-tasks 2500")
    parser.add_argument("--tasks", type=int, help="tasks per timed pass (default 3000)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3)")
    parser.add_argument("--warmup", type=int, help="untimed tasks per contender (default 300)")
    parser.add_argument("--count-tasks", type=int, help="counting pass tasks (default 1000)")
    parser.add_argument("--scale-tasks", type=int, help="tasks per scale run (default 600)")
    parser.add_argument("--memory-tasks", type=int, help="tasks per memory fleet (default 10000)")
    parser.add_argument("--scale-cap", type=float, default=30.0,
                        help="stop a scale run after max(this, 3x its nominal time) seconds "
                             "(default 30)")
    parser.add_argument("--workers", type=int, default=2,
                        help="workers per fleet in phase 1 (default 2)")
    parser.add_argument("--phases", default="throughput,scale,memory",
                        help="comma-separated subset of throughput,scale,memory,client")
    parser.add_argument("--client-tasks", type=int, default=2000,
                        help="client phase: calls per pass (default 2000)")
    parser.add_argument("--client-rounds", type=int, default=5,
                        help="client phase: interleaved rounds (default 5)")
    parser.add_argument("--contenders", type=lambda s: [x for x in s.split(",") if x],
                        default=[c.name for c in CONTENDERS],
                        help="comma-separated subset of: " + ",".join(c.name for c in CONTENDERS))
    parser.add_argument("--chart", type=Path, default=HERE / "results" / "run.png")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--redis-server", default="redis-server")
    parser.add_argument("--postgres-url", default=os.environ.get("BENCH_POSTGRES_URL",
                                                                 tp.DEFAULT_ADMIN_URL))
    args = parser.parse_args(argv)
    quick = dict(tasks=1000, rounds=2, warmup=100, count_tasks=300, scale_tasks=300,
                 memory_tasks=2500)
    full = dict(tasks=3000, rounds=3, warmup=300, count_tasks=1000, scale_tasks=600,
                memory_tasks=10000)
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.phases = [p for p in args.phases.split(",") if p]
    if BASELINE not in args.contenders:
        parser.error("--contenders needs plain")
    args.concurrency = 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    binary = shutil.which(args.redis_server)
    if binary is None:
        print(f"error: {args.redis_server!r} not found", file=sys.stderr)
        return 2
    started = dt.datetime.now(dt.timezone.utc)
    cmd = "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"# {cmd.strip()}\n# {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; started {started:%Y-%m-%d %H:%M} "
          f"UTC; tasks {args.tasks} x {args.rounds} rounds, scale {args.scale_tasks}, "
          f"memory {args.memory_tasks}", flush=True)
    t0 = time.monotonic()
    stack = ExitStack()
    tmp = Path(tempfile.mkdtemp(prefix="bench-run-"))
    stack.callback(shutil.rmtree, tmp, ignore_errors=True)
    rows: list[Row] = []
    scale: list[ScaleRow] = []
    mem: list[MemRow] = []
    client: list[ClientRow] = []
    header: dict[str, Any] = {}
    try:
        with Cleanup():
            try:
                progress("starting redis-servers and the database")
                bport, rversion, bpid = stack.enter_context(throwaway_redis(binary, tmp, "broker"))
                rport, _, rpid = stack.enter_context(throwaway_redis(binary, tmp, "reliable"))
                db_name, db_url = stack.enter_context(throwaway_database(args.postgres_url))
                pg = PgStats(args.postgres_url, db_name)
                stack.callback(pg.close)
                header = {"versions": tp.versions(rversion, pg.version()),
                          "library_revision": tp.library_revision()}
                print("# " + ", ".join(f"{k} {v}" for k, v in header["versions"].items()))
                print(f"# library at commit {header['library_revision']}", flush=True)
                env = make_env(bport, rport, db_url)
                app = importlib.import_module("bench_app").app
                stack.callback(app.close)
                ctx = {
                    "tmp": tmp, "env": env, "app": app, "pg": pg, "reliable_port": rport,
                    "broker": redis.Redis(host="127.0.0.1", port=bport, db=0),
                    "stats": redis.Redis(host="127.0.0.1", port=bport, db=1),
                    "reliable": redis.Redis(host="127.0.0.1", port=rport, db=0),
                    "server_pids": {"broker": bpid, "reliable": rpid},
                }
                for k in ("broker", "stats", "reliable"):
                    stack.callback(ctx[k].close)
                if "throughput" in args.phases:
                    rows = phase_throughput(args, ctx)
                if "scale" in args.phases:
                    scale = phase_scale(args, ctx)
                if "memory" in args.phases:
                    mem = phase_memory(args, ctx)
                if "client" in args.phases:
                    client = phase_client(args, ctx)
            except BenchmarkError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            except (psycopg.Error, redis.RedisError) as exc:
                print(f"error: {exc!r}", file=sys.stderr)
                return 1
            except KeyboardInterrupt:
                print("interrupted; cleaning up", file=sys.stderr)
                return 130
    finally:
        with Cleanup.shielded():
            progress("stopping redis-servers, dropping the database")
            stack.close()
    wall = time.monotonic() - t0
    if rows:
        print("\n## 1. Throughput (no-op tasks, 2 prefork workers x concurrency 1)\n")
        print(throughput_table(rows))
        print("\n## 2. Round trips\n")
        print(roundtrip_lines(rows))
    if scale:
        print("\n## 3. Scale: admitted rate under a 50/s limit\n")
        print(scale_table(scale))
    if mem:
        print("\n## 4. Memory (pool processes, max over 2 per worker)\n")
        print(memory_table(mem))
    if client:
        print("\n## 5. Client CPU per task, in-process (bench tasks called in a loop)\n")
        print(client_table(client))
    print(f"\n(wall time {wall:.0f} s)")
    title = (f"celery-reliable benchmarks/run.py, {started:%Y-%m-%d %H:%M} UTC, "
             f"{os.cpu_count()} cores (noisy; ratios matter), {cmd.strip()}")
    if rows or scale or mem:
        chart(args.chart, rows, scale, mem, title)
        print(f"chart: {args.chart}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": cmd.strip(), "started_utc": started.isoformat(timespec="seconds"),
            "wall_seconds": round(wall, 1), "machine": platform.platform(), **header,
            "throughput": [{"name": r.contender.name, "rates": r.rates, "ratios": r.ratios,
                            "round_trips": r.round_trips, "commands": r.commands,
                            "pg_xacts": r.pg_xacts} for r in rows],
            "scale": [vars(s) for s in scale], "memory": [vars(m) for m in mem],
            "client": [vars(c) for c in client],
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
