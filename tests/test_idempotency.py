"""Idempotent execution against real Redis and PostgreSQL (embedded worker)."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from celery import Celery
from celery.contrib.testing.worker import TestWorkController

from celery_reliable import (
    ArgumentsNotCanonical,
    IdempotencyKeyMismatch,
    ReplayedFailure,
    ResultNotSerializable,
    metrics,
)
from celery_reliable.idempotency import purge_expired
from celery_reliable.schema import idempotency

from .conftest import TcpProxy, reliable_task, wait_for

effects = sa.Table(
    "test_effects",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tag", sa.Text, nullable=False),
)


@pytest.fixture
def tag(prefix: str, engine: sa.Engine) -> str:
    effects.metadata.create_all(engine)
    return prefix


def count(engine: sa.Engine, tag: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).where(effects.c.tag == tag)).scalar())


def charge_task(app: Celery, tag: str, **options: Any) -> Any:
    options.setdefault("idempotency_key", "charge:{order_id}")

    @reliable_task(app, name=f"t.charge.{tag}", defer_delay=0.05, defer_max_delay=0.2, **options)
    def charge(self: Any, order_id: int, amount: int, sleep: float = 0.0) -> dict[str, Any]:
        with self.idempotent_transaction() as session:
            session.execute(sa.insert(effects).values(tag=tag))
        time.sleep(sleep)
        return {"order": order_id, "amount": amount, "nonce": time.time()}

    return charge


def test_duplicate_replays_the_stored_result(
    celery_app: Celery, celery_worker: TestWorkController, engine: sa.Engine, tag: str
) -> None:
    """The second delivery does not run: same result, SUCCESS, one effect, a replay metric."""
    charge = charge_task(celery_app, tag)
    celery_worker.reload()
    before = metrics.value("reliable_idempotent_replays_total", task=charge.name)
    first = charge.delay(1, 100).get(timeout=10)
    second = charge.delay(1, 100)
    assert second.get(timeout=10) == first
    assert second.state == "SUCCESS"
    assert count(engine, tag) == 1
    assert metrics.value("reliable_idempotent_replays_total", task=charge.name) == before + 1


def test_duplicate_in_progress_is_deferred_not_run(
    celery_app: Celery, celery_worker: TestWorkController, engine: sa.Engine, tag: str
) -> None:
    charge = charge_task(celery_app, tag)
    celery_worker.reload()
    first = charge.delay(2, 5, 1.0)
    time.sleep(0.3)  # the first is running (it sleeps 1 s)
    dup = charge.delay(2, 5, 1.0)
    wait_for(lambda: dup.state == "RETRY", 5, "the duplicate to be deferred")
    assert dup.get(timeout=15) == first.get(timeout=15)
    assert count(engine, tag) == 1


def test_same_key_other_arguments_is_a_mismatch(
    celery_app: Celery, celery_worker: TestWorkController, engine: sa.Engine, tag: str
) -> None:
    charge = charge_task(celery_app, tag)
    celery_worker.reload()
    charge.delay(3, 100).get(timeout=10)
    with pytest.raises(IdempotencyKeyMismatch, match=rf"t\.charge\.{tag}: idempotency key"):
        charge.delay(3, 999).get(timeout=10)
    assert count(engine, tag) == 1


def test_non_json_result_is_an_error_naming_the_task(
    celery_app: Celery, celery_worker: TestWorkController, engine: sa.Engine, tag: str
) -> None:
    """The transaction's rows roll back; the key keeps the failure, so duplicates never
    run the body again (its other effects may already have happened)."""
    runs: list[int] = []

    @reliable_task(celery_app, name=f"t.setret.{tag}", idempotency_key=True)
    def weird(self: Any, n: int) -> Any:
        runs.append(n)
        with self.idempotent_transaction() as session:
            session.execute(sa.insert(effects).values(tag=tag))
        return {1, 2}

    celery_worker.reload()
    with pytest.raises(ResultNotSerializable, match=rf"t\.setret\.{tag}: result is not JSON"):
        weird.delay(1).get(timeout=10)
    assert count(engine, tag) == 0
    with pytest.raises(ReplayedFailure, match="ResultNotSerializable"):
        weird.delay(1).get(timeout=10)
    assert runs == [1]


def test_uncanonical_argument_fails_in_the_caller(celery_app: Celery) -> None:
    @reliable_task(celery_app, name="t.canon", idempotency_key=True)
    def canon(self: Any, thing: Any) -> None:
        return None

    with pytest.raises(
        ArgumentsNotCanonical,
        match=r"t\.canon: option 'idempotency_key'.*"
        r"argument arguments\['thing'\] of type",
    ):
        canon.delay(object())


def test_header_key_without_option(
    celery_app: Celery, celery_worker: TestWorkController, engine: sa.Engine, tag: str
) -> None:
    """A producer's own key in the message header makes any ReliableTask idempotent."""
    charge = charge_task(celery_app, tag, idempotency_key=None)
    celery_worker.reload()
    headers = {"idempotency_key": f"req-{tag}"}
    one = charge.apply_async((4, 1), headers=headers).get(timeout=10)
    two = charge.apply_async((4, 1), headers=headers).get(timeout=10)
    assert one == two and count(engine, tag) == 1
    charge.apply_async((4, 1), headers={"idempotency_key": f"other-{tag}"}).get(timeout=10)
    assert count(engine, tag) == 2


def test_expiry_allows_re_execution_and_purge_deletes(
    celery_app: Celery, celery_worker: TestWorkController, engine: sa.Engine, tag: str
) -> None:
    charge = charge_task(celery_app, tag, idempotency_ttl=1, idempotency_lease=1)
    celery_worker.reload()
    for order in range(5):
        charge.delay(order, 1).get(timeout=10)
    assert count(engine, tag) == 5
    time.sleep(1.3)
    charge.delay(0, 1).get(timeout=10)
    assert count(engine, tag) == 6  # expired: ran again
    with engine.connect() as conn:
        mine = sa.select(sa.func.count()).where(idempotency.c.task == charge.name)
        assert conn.execute(mine).scalar() == 5
    assert purge_expired(engine, batch_size=2) >= 4
    with engine.connect() as conn:
        assert conn.execute(mine).scalar() == 1  # the live re-run record stays


def test_redis_flush_does_not_make_a_succeeded_key_run_again(
    celery_app: Celery, celery_worker: TestWorkController, engine: sa.Engine, tag: str
) -> None:
    charge = charge_task(celery_app, tag)
    celery_worker.reload()
    first = charge.delay(5, 7).get(timeout=10)
    redis.Redis.from_url(celery_app.conf.reliable_redis_url).flushdb()  # our private server
    assert charge.delay(5, 7).get(timeout=10) == first
    assert count(engine, tag) == 1
    assert charge.delay(5, 7).get(timeout=10) == first  # written back to Redis, replays fast


def test_kept_failure_replays_and_default_forgets(
    celery_app: Celery, celery_worker: TestWorkController, engine: sa.Engine, tag: str
) -> None:
    runs: list[str] = []

    def make(keep: bool) -> Any:
        @reliable_task(celery_app, name=f"t.fail{keep}.{tag}", idempotency_key="k:{n}",
                       idempotency_keep_failures=keep)
        def failing(self: Any, n: int) -> None:
            runs.append(f"{keep}")
            raise ValueError("card declined")

        return failing

    kept, forgot = make(True), make(False)
    celery_worker.reload()
    with pytest.raises(ValueError):
        kept.delay(1).get(timeout=10)
    with pytest.raises(ReplayedFailure, match="replayed failure ValueError: card declined"):
        kept.delay(1).get(timeout=10)
    for _ in range(2):
        with pytest.raises(ValueError):
            forgot.delay(1).get(timeout=10)
    assert runs == ["True", "False", "False"]


def test_postgres_down_defers_then_completes(
    celery_app: Celery,
    celery_worker: TestWorkController,
    engine: sa.Engine,
    tag: str,
    pg_proxy: TcpProxy,
    database_url: str,
) -> None:
    """Fail closed: with PostgreSQL unreachable the task does not run; it runs once it is back."""
    url = sa.make_url(database_url).set(port=pg_proxy.port)
    celery_app.conf.reliable_database_url = url.render_as_string(hide_password=False)
    charge = charge_task(celery_app, tag)
    celery_worker.reload()
    pg_proxy.stop()
    result = charge.delay(6, 1)
    wait_for(lambda: result.state == "RETRY", 15, "a deferral while PostgreSQL is down")
    time.sleep(1.0)
    assert count(engine, tag) == 0 and not result.ready()
    pg_proxy.start()
    assert result.get(timeout=30)["order"] == 6
    assert count(engine, tag) == 1
