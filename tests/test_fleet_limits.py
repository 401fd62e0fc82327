"""Fleet-wide limits across real worker processes: a global rate, a global concurrency cap."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import redis

from celery_reliable import bulkhead_stats

from .conftest import Fleet, wait_for
from .test_fleet import fleet_app

pytestmark = pytest.mark.slow


def offer(app: object, name: str, rate: float, seconds: float, queue: str) -> float:
    """Publish ``name`` at ``rate`` per second for ``seconds``; returns the start time."""
    started = time.time()
    sent = 0
    while (elapsed := time.time() - started) < seconds:
        due = int(elapsed * rate) + 1
        for _ in range(due - sent):
            app.send_task(name, queue=queue)  # type: ignore[attr-defined]
        sent = due
        time.sleep(0.01)
    return started


def starts_within(client: redis.Redis, key: str, t0: float, seconds: float) -> int:
    return sum(1 for v in client.lrange(key, 0, -1) if t0 <= float(v) < t0 + seconds)


def test_rate_is_global_and_celerys_is_per_worker(
    fleet: Fleet, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 20/s queue bucket over 4 workers: 20 x 15 s + burst within 5%.

    Celery's own rate_limit="20/s" on the same 4 workers is per worker and
    lets several times as many through in the same window.
    """
    queue = fleet.env["FLEET_QUEUE"]
    plain_queue = f"{queue}-plain"
    fleet.env["FLEET_RATE"] = "20/s"
    monkeypatch.setenv("FLEET_RATE", "20/s")
    module, app = fleet_app()
    fleet.start(n=4, concurrency=1, queues=f"{queue},{plain_queue}")
    seconds = 15.0
    t0 = offer(app, "fleet.tick", 40, seconds, queue)
    time.sleep(0.5)
    ours = starts_within(redis_client, module.rkey("ticks"), t0, seconds)
    expected = 20 * seconds + 20
    print(
        f"ReliableTask 20/s queue bucket, 4 workers, {seconds:.0f}s: {ours} runs "
        f"(expected {expected:.0f} +-5%)"
    )
    assert abs(ours - expected) <= 0.05 * expected

    t1 = offer(app, "fleet.plain_tick", 120, seconds, plain_queue)
    time.sleep(0.5)
    theirs = starts_within(redis_client, module.rkey("plain_ticks"), t1, seconds)
    print(
        f"Celery rate_limit='20/s', 4 workers, {seconds:.0f}s: {theirs} runs "
        f"({theirs / ours:.1f}x ours)"
    )
    assert theirs >= 2.5 * ours


def test_bulkhead_caps_concurrency_fleet_wide_and_survives_kill_9(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    """Tier of 3 over 4 workers x 4 processes: never more than 3 at once; a killed
    holder's slot comes back within the lease (3 s)."""
    module, app = fleet_app()
    fleet.start(n=4, concurrency=4, timeout=120)
    results = [app.send_task("fleet.bulk", args=(0.3,)) for _ in range(30)]
    for r in results:
        r.get(timeout=120)
    assert int(redis_client.get(module.rkey("max_active"))) == 3

    long = [app.send_task("fleet.bulk", args=(60,)) for _ in range(3)]
    holders = wait_for(
        lambda: (
            len(redis_client.hgetall(module.rkey("holders"))) == 3
            and redis_client.hgetall(module.rkey("holders"))
        ),
        30,
        "3 slot holders",
    )
    assert bulkhead_stats(app)["tier3"].active == 3
    victim = int(next(iter(holders.values())))
    os.kill(victim, signal.SIGKILL)
    killed = time.time()
    redis_client.decr(module.rkey("active"))  # the dead task cannot count itself out
    quick = app.send_task("fleet.bulk", args=(0.0,))
    assert quick.get(timeout=30) >= 1
    started = max(
        json.loads(v)["at"] for v in redis_client.lrange(module.rkey("bulk_starts"), 0, -1)
    )
    assert started - killed <= 3.0 + 1.0, "the dead worker's slot must free within its lease"
    assert int(redis_client.get(module.rkey("max_active"))) == 3
    del long
