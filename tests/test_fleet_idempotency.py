"""Idempotency across real worker processes: a storm of duplicates, and kill -9 mid-task."""

from __future__ import annotations

import json
import os
import signal

import pytest
import redis
import sqlalchemy as sa

from .conftest import Fleet, wait_for
from .test_fleet import fleet_app

pytestmark = pytest.mark.slow


def effect_count(engine: sa.Engine, table: sa.Table, order_id: str) -> int:
    with engine.connect() as conn:
        query = sa.select(sa.func.count()).where(table.c.order_id == order_id)
        return int(conn.execute(query).scalar())


def test_fifty_concurrent_deliveries_run_once(fleet: Fleet, engine: sa.Engine) -> None:
    """50 deliveries of one key over 2 workers x 2 processes: one effect, one result for all."""
    module, app = fleet_app()
    module.effects.metadata.create_all(engine)
    fleet.start(n=2, concurrency=2)
    results = [app.send_task("fleet.charge", args=("o-50", 42)) for _ in range(50)]
    values = [r.get(timeout=120) for r in results]
    assert effect_count(engine, module.effects, "o-50") == 1
    assert all(v == values[0] for v in values)
    assert values[0]["amount"] == 42


@pytest.mark.parametrize("transactional", [True, False], ids=["idempotent_transaction", "plain"])
def test_kill_9_mid_task(
    fleet: Fleet, engine: sa.Engine, redis_client: redis.Redis, transactional: bool
) -> None:
    """With idempotent_transaction the effect is exactly 1 after redelivery.

    Without it the effect committed on its own before the crash, and the
    redelivery runs the task again: at-least-once (documented in the README).
    """
    module, app = fleet_app()
    module.effects.metadata.create_all(engine)
    fleet.start(n=1, concurrency=2)
    order = f"k9-{transactional}"
    result = app.send_task("fleet.charge_slow", args=(order, transactional))
    key = module.rkey("attempts", order)
    first = json.loads(wait_for(lambda: redis_client.lindex(key, 0), 30, "the first attempt"))
    wait_for(lambda: redis_client.exists(module.rkey("first", order)), 10, "the effect")
    os.kill(first["pid"], signal.SIGKILL)
    assert result.get(timeout=60) == "done"
    assert redis_client.llen(key) == 2
    assert effect_count(engine, module.effects, order) == (1 if transactional else 2)
    # A later duplicate replays; it never runs again.
    assert app.send_task("fleet.charge_slow", args=(order, transactional)).get(timeout=30) == "done"
    assert redis_client.llen(key) == 2
