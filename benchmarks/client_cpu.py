#!/usr/bin/env python
"""Client CPU µs per task per guard, in-process: the tasks of ``bench_app.py`` called in a loop.

Run by ``benchmarks/run.py`` (phase ``client``), once per idempotency store, with the
``BENCH_*`` environment of its throwaway servers; it can also be run by hand against
any Redis and PostgreSQL database made by ``celery_reliable.create_tables()``::

    BENCH_RELIABLE_REDIS_URL=redis://127.0.0.1:6390/0 BENCH_DATABASE_URL=postgresql://... \\
        python benchmarks/client_cpu.py --store postgres --tasks 2000 --rounds 5

Each call is what a worker's pool process does around the body, without Celery's
tracer: ``task.push_request(id=<new>, delivery_info={"routing_key": <staging list>})``,
``task(run, n)``, ``task.pop_request()``. So a ReliableTask pays its whole client side
(options, plan, ``admit.lua``, body, ``complete.lua``, PostgreSQL records) and plain
Celery only the call; the difference is the guards' client cost. ``n`` is unique, so
idempotent calls are first executions and locks never contend.

Per contender and round: user + system CPU (``getrusage``) over ``--tasks`` calls (the
whole process, so the lease heartbeat thread counts too), GC off inside a pass; rounds
interleaved with the order rotating. Reports the median per call, the median of the
same-round differences to plain, and the same for the user time alone: the system time
(socket calls; on loopback presumably also the receiving side's packet processing) moved
a lot between runs on a 2-core VM (115 and 190 µs for the same lock task in two runs a
minute apart) while the user time stayed within about 10%. Also the reliable Redis's
``INFO commandstats`` delta per call: ``evalsha`` = round trips (only this process talks
to that server), and all commands including those Lua ran. Prints one JSON object on
stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import uuid
from pathlib import Path
from typing import Any

import redis

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from throughput import commandstats, delta  # noqa: E402

LIMITED = "bench.staging.limited"  # = bench_app.LIMITED_STAGING: its queue bucket is 1e6/s
STAGING = "bench.staging"
#: contender -> (task name, routing key it is delivered from)
CONTENDERS = {
    "plain": ("bench.plain", STAGING),
    "lock": ("bench.lock", STAGING),
    "idempotency": ("bench.idempotent", STAGING),
    "queue bucket": ("bench.bucket", LIMITED),
    "window": ("bench.window", STAGING),
    "bulkhead": ("bench.bulkhead", STAGING),
    "backoff": ("bench.backoff", STAGING),
    "all guards": ("bench.all", LIMITED),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=("postgres", "redis"), default="postgres",
                        help="reliable_idempotency_store (default postgres)")
    parser.add_argument("--tasks", type=int, default=2000, help="calls per pass (default 2000)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=200,
                        help="untimed calls per contender first (default 200)")
    parser.add_argument("--contenders", type=lambda s: [x for x in s.split(",") if x],
                        default=list(CONTENDERS),
                        help="comma-separated subset of: " + ",".join(CONTENDERS))
    args = parser.parse_args(argv)
    if "plain" not in args.contenders:
        parser.error("--contenders needs plain")
    unknown = set(args.contenders) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders: {sorted(unknown)}")
    return args


class Caller:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.n = 0
        self.run = f"client-{uuid.uuid4().hex[:8]}"

    def calls(self, contender: str, count: int) -> None:
        name, routing_key = CONTENDERS[contender]
        task = self.app.tasks[name]
        info = {"routing_key": routing_key, "exchange": ""}
        run = self.run
        for _ in range(count):
            self.n += 1
            task.push_request(id=str(uuid.uuid4()), delivery_info=info, retries=0,
                              called_directly=False, is_eager=False, args=(run, self.n),
                              kwargs={})
            try:
                task(run, self.n)
            finally:
                task.pop_request()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["BENCH_IDEMPOTENCY_STORE"] = args.store
    import bench_app

    app = bench_app.app
    reliable = redis.Redis.from_url(os.environ.get("BENCH_RELIABLE_REDIS_URL",
                                                   "redis://127.0.0.1:6379/15"))
    caller = Caller(app)
    for c in args.contenders:
        caller.calls(c, args.warmup)
    cpu: dict[str, list[float]] = {c: [] for c in args.contenders}
    user: dict[str, list[float]] = {c: [] for c in args.contenders}
    added: dict[str, list[float]] = {c: [] for c in args.contenders}
    cmds: dict[str, dict[str, int]] = {c: {} for c in args.contenders}
    for rnd in range(args.rounds):
        k = rnd % len(args.contenders)
        order = args.contenders[k:] + args.contenders[:k]
        this: dict[str, float] = {}
        for c in order:
            before = commandstats(reliable)
            gc.collect()
            gc.disable()
            t0 = resource.getrusage(resource.RUSAGE_SELF)
            caller.calls(c, args.tasks)
            t1 = resource.getrusage(resource.RUSAGE_SELF)
            gc.enable()
            used = (t1.ru_utime - t0.ru_utime) + (t1.ru_stime - t0.ru_stime)
            user[c].append(1e6 * (t1.ru_utime - t0.ru_utime) / args.tasks)
            for cmd, v in delta(commandstats(reliable), before).items():
                cmds[c][cmd] = cmds[c].get(cmd, 0) + v
            this[c] = 1e6 * used / args.tasks
            cpu[c].append(this[c])
            print(f"client cpu ({args.store}) round {rnd + 1}/{args.rounds} {c:>13}: "
                  f"{this[c]:7.1f} µs/call (user {user[c][-1]:6.1f})", file=sys.stderr, flush=True)
        for c in args.contenders:
            added[c].append(this[c] - this["plain"])
    calls = args.tasks * args.rounds
    import celery_reliable

    out = {
        "library": str(Path(celery_reliable.__file__).parent),
        "store": args.store, "tasks": args.tasks, "rounds": args.rounds,
        "contenders": {
            c: {
                "cpu_us": cpu[c], "median_us": statistics.median(cpu[c]),
                "added_us": statistics.median(added[c]),
                "user_us": user[c], "user_median_us": statistics.median(user[c]),
                "user_added_us": statistics.median(
                    [u - p for u, p in zip(user[c], user["plain"], strict=True)]),
                "round_trips": cmds[c].get("evalsha", 0) / calls,
                "commands": sum(cmds[c].values()) / calls,
                "by_command": {k: v / calls for k, v in sorted(cmds[c].items())},
            } for c in args.contenders
        },
    }
    print(json.dumps(out))
    app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
