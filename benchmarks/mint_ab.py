#!/usr/bin/env python
"""What a change to ``admit.lua`` costs a lock: two versions of the script, A/B in one process.

``locks.py`` compares whole libraries; on a shared machine its rounds swing more than a
few microseconds of script time. This script isolates the script: the same
``FencedLock``-shaped cycle (admission of one lock guard + the release script) runs with
script A and script B on one throwaway ``redis-server``, alternating A and B round by
round (the order flips every round), and reports the median acquire+release/s of each,
the median of the same-round ratios B/A, and the server's ``EVALSHA`` microseconds per
cycle (``INFO commandstats``: server time inside the two scripts, less sensitive to
client noise).

    git show main:celery_reliable/lua/admit.lua > /tmp/admit-main.lua
    python benchmarks/mint_ab.py /tmp/admit-main.lua celery_reliable/lua/admit.lua
    python benchmarks/mint_ab.py /tmp/admit-main.lua celery_reliable/lua/admit.lua --key-pool 100

``celery_reliable/lua/admit.lua`` is now a frame that the guards' fragments are composed
into (``celery_reliable.guards``); a frame given here is composed with THIS checkout's
fragments. To compare whole scripts of two checkouts, write each one's composed text:
``PYTHONPATH=<checkout> python -m celery_reliable.guards admit > /tmp/admit-<name>.lua``.
"""

from __future__ import annotations

import argparse
import gc
import secrets
import shutil
import statistics
import sys
import time
from pathlib import Path

import redis
from _redis_server import throwaway_redis

from celery_reliable import guards
from celery_reliable.admission import Release
from celery_reliable.guards import compose
from celery_reliable.guards.lock import FENCE_TTL_MIN
from celery_reliable.keys import KeySpace
from celery_reliable.scripts import Script

LEASE_MS = 30_000


def cycle(client: redis.Redis, admit: Script, keys: KeySpace, resource: str) -> int:
    """Acquire (one lock guard) and release ``resource``; returns the token."""
    owner = secrets.token_hex(8)
    lock_key = keys.lock(resource)
    # The last key is the request's rollback marker (a script older than it ignores it).
    reply = admit(client, [lock_key, keys.fence(resource), keys.undone(secrets.token_hex(8))],
                  ["L", owner, LEASE_MS, int(FENCE_TTL_MIN * 1000)])
    if int(reply[0]) != 1:
        raise RuntimeError(f"{admit.name}: lock on {resource} refused")
    release = Release()
    guards.lock.release(release, lock_key, f"{int(reply[1])} {owner}")
    if release.run(client)[0] != 1:
        raise RuntimeError(f"{admit.name}: release of {resource} found it not ours")
    return int(reply[1])


def evalsha_usec(admin: redis.Redis) -> float:
    stats = admin.info("commandstats").get("cmdstat_evalsha", {})
    return float(stats.get("usec", 0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a", type=Path, help="admit.lua, version A (e.g. main's)")
    parser.add_argument("b", type=Path, help="admit.lua, version B (e.g. this checkout's)")
    parser.add_argument("--iterations", type=int, default=3000, help="cycles per round")
    parser.add_argument("--rounds", type=int, default=20, help="rounds of A and B each")
    parser.add_argument("--key-pool", type=int, default=0, metavar="N",
                        help="cycle over N resources (the counter exists); 0: a fresh one each")
    args = parser.parse_args(argv)
    binary = shutil.which("redis-server")
    if binary is None:
        print("error: redis-server is not installed", file=sys.stderr)
        return 2
    scripts = {"A": Script("admit-a", compose(args.a.read_text())),
               "B": Script("admit-b", compose(args.b.read_text()))}
    n, pool = args.iterations, args.key_pool
    print(f"# reproduce: python benchmarks/mint_ab.py {args.a} {args.b} --iterations {n} "
          f"--rounds {args.rounds} --key-pool {pool}")
    with throwaway_redis(binary, "bench-mint-") as (port, version):
        client, admin = redis.Redis(port=port), redis.Redis(port=port)
        ops: dict[str, list[float]] = {"A": [], "B": []}
        usec: dict[str, list[float]] = {"A": [], "B": []}
        spaces = {name: KeySpace(f"ab{name}") for name in scripts}
        for name, admit in scripts.items():  # warm-up: connect, load the scripts
            for i in range(300):
                cycle(client, admit, spaces[name], f"w{i % pool if pool else i}")
        for r in range(args.rounds):
            for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
                resources = [f"r{r}:{i % pool if pool else i}" for i in range(n)]
                gc.collect()
                u0, t0 = evalsha_usec(admin), time.perf_counter()
                for resource in resources:
                    cycle(client, scripts[name], spaces[name], resource)
                elapsed = time.perf_counter() - t0
                ops[name].append(n / elapsed)
                usec[name].append((evalsha_usec(admin) - u0) / n)
        client.close()
        admin.close()
    ratios = [b / a for a, b in zip(ops["A"], ops["B"], strict=True)]
    print(f"# redis-server {version}; {n} cycles x {args.rounds} rounds each, "
          f"{'key pool ' + str(pool) if pool else 'a fresh resource per cycle'}")
    for name in ("A", "B"):
        print(f"{name}: {statistics.median(ops[name]):,.0f} acquire+release/s (median), "
              f"server EVALSHA {statistics.median(usec[name]):.1f} us per cycle (median)")
    print(f"B/A same-round ratio min / median / max: {min(ratios):.3f} / "
          f"{statistics.median(ratios):.3f} / {max(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
