"""The resource side: PostgreSQL and Redis accept a token only if higher than the last, or
equal and from the same holder (more in test_fencing_faults.py)."""

from __future__ import annotations

import threading
import time

import pytest
import redis
import sqlalchemy as sa

from celery_reliable import RedisFence, StaleFenceToken, check_postgres
from celery_reliable.fencing import Fence


def test_postgres_accepts_equal_or_higher_and_refuses_lower(engine: sa.Engine, prefix: str) -> None:
    resource = f"{prefix}:acct"
    with engine.begin() as conn:
        check_postgres(conn, resource, 10, holder="h")
    with engine.begin() as conn:
        check_postgres(conn, resource, 10, holder="h")  # same holder writes again
    with engine.begin() as conn:
        check_postgres(conn, resource, 12)
    with pytest.raises(StaleFenceToken) as info, engine.begin() as conn:
        check_postgres(conn, resource, 11)
    assert info.value.current == 12 and info.value.token == 11


def test_postgres_check_is_atomic_with_the_write(engine: sa.Engine, prefix: str) -> None:
    """A higher token waits for an open lower-token transaction, then wins."""
    resource = f"{prefix}:atomic"
    with engine.begin() as conn:
        check_postgres(conn, resource, 1)
    order: list[str] = []
    entered = threading.Event()

    def low() -> None:
        with engine.begin() as conn:
            check_postgres(conn, resource, 5)
            entered.set()
            time.sleep(0.5)  # the row stays locked until commit
            order.append("low-commit")

    def high() -> None:
        entered.wait(5)
        with engine.begin() as conn:
            check_postgres(conn, resource, 7)
            order.append("high-checked")

    threads = [threading.Thread(target=low), threading.Thread(target=high)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert order == ["low-commit", "high-checked"]
    with pytest.raises(StaleFenceToken), engine.begin() as conn:
        check_postgres(conn, resource, 5)
    # A refused or rolled-back transaction did not lower the recorded token.
    with engine.connect() as conn:
        token = conn.execute(
            sa.text("select token from reliable_fences where resource = :r"), {"r": resource}
        ).scalar()
    assert token == 7


def test_redis_fence(redis_client: redis.Redis, prefix: str) -> None:
    fence = RedisFence(redis_client)
    key = f"{prefix}:value"
    fence.set(key, "a", 3, holder="h")
    fence.set(key, "b", 3, holder="h")
    fence.set(key, "c", 9)
    with pytest.raises(StaleFenceToken) as info:
        fence.set(key, "stale", 4)
    assert info.value.current == 9
    assert fence.get(key) == (b"c", 9)


def test_task_fence_refuses_once_lock_lost(
    redis_client: redis.Redis, engine: sa.Engine, prefix: str
) -> None:
    """self.fence refuses before touching the resource once the lease is known lost."""
    lost = {"v": False}
    fence = Fence(f"{prefix}:r", 100, lambda: lost["v"])
    fence.redis_set(redis_client, f"{prefix}:fv", "x")
    lost["v"] = True
    with pytest.raises(StaleFenceToken, match="lock was lost"):
        fence.redis_set(redis_client, f"{prefix}:fv", "y")
    with pytest.raises(StaleFenceToken), engine.begin() as conn:
        fence.check_postgres(conn)
    assert RedisFence(redis_client).get(f"{prefix}:fv") == (b"x", 100)


def test_exceptions_round_trip_through_pickle_and_args() -> None:
    """Exceptions rebuild from their args (pickle, Celery's JSON backend)."""
    import pickle

    from celery_reliable import LockNotAcquired, SupersededWrite

    for exc in (StaleFenceToken("r", 3, 7), LockNotAcquired("t.x", "order:1"),
                SupersededWrite("r", 3, 4, 5)):
        again = pickle.loads(pickle.dumps(exc))
        rebuilt = type(exc)(*exc.args)
        assert str(again) == str(exc) == str(rebuilt)
        assert again.__dict__ == exc.__dict__
