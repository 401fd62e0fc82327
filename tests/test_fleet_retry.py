"""Retries, poison messages and the shared breaker across real worker processes."""

from __future__ import annotations

import json
import time

import pytest
import redis

from celery_reliable import DeadLetters, PoisonMessage, breaker_state

from .conftest import Fleet, wait_for
from .test_fleet import fleet_app

pytestmark = pytest.mark.slow


def test_flaky_task_under_three_workers(fleet: Fleet) -> None:
    """Fails 4 times with a connection error, then succeeds, retried across the fleet."""
    _module, app = fleet_app()
    fleet.start(n=3, concurrency=1)
    out = app.send_task("fleet.flaky", args=("f1", 4)).get(timeout=60)
    assert out["retries"] == 4 and len(out["pids"]) == 5


def test_kill_9_loop_is_dead_lettered_after_max_redeliveries(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    """A task that kills its worker every time runs 1 + 2 times, then is dead-lettered."""
    module, app = fleet_app()
    fleet.start(n=1, concurrency=2)
    result = app.send_task("fleet.suicide", args=("p1",))
    with pytest.raises(PoisonMessage, match="delivered 3 times without finishing"):
        result.get(timeout=120)
    assert redis_client.llen(module.rkey("suicide", "p1")) == 3
    [letter] = DeadLetters(app).list(task_name="fleet.suicide")
    assert letter.reason == "worker lost" and letter.args == ["p1"]
    assert letter.task_id == result.id


def test_breaker_opened_by_worker_a_holds_worker_b(fleet: Fleet, redis_client: redis.Redis) -> None:
    """Failures on worker A open the breaker; worker B defers until it half-opens."""
    module, app = fleet_app()
    queue = fleet.env["FLEET_QUEUE"]
    fleet.start(n=1, concurrency=1, queues=f"{queue}-a")
    fleet.start(n=1, concurrency=1, queues=f"{queue}-b")
    for _ in range(2):
        with pytest.raises(ConnectionError):
            app.send_task("fleet.partner", args=("down",), queue=f"{queue}-a").get(timeout=30)
    assert breaker_state(app, "partner") == 1
    opened = time.time()
    result = app.send_task("fleet.partner", args=("up",), queue=f"{queue}-b")
    wait_for(lambda: result.state == "RETRY", 10, "worker B to defer")
    out = result.get(timeout=30)
    runs = [json.loads(r) for r in redis_client.lrange(module.rkey("partner"), 0, -1)]
    ups = [r for r in runs if r["mode"] == "up"]
    downs = [r for r in runs if r["mode"] == "down"]
    assert len(ups) == 1 and ups[0]["at"] - opened >= 1.9  # ran only after 2 s open
    assert ups[0]["host"] == out["host"] and ups[0]["host"] != downs[0]["host"]
    assert breaker_state(app, "partner") == 0
