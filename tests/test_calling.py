"""A guarded task called directly, with .apply(), and in eager mode (the README's "Testing")."""

from __future__ import annotations

import secrets
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
import redis
import sqlalchemy as sa
from celery import Celery

from celery_reliable import Backoff, ConfigurationError, FencedLock, ReliableTask, StorageError

from .conftest import free_port

if TYPE_CHECKING:  # imported by pytest as a plugin, with its asserts rewritten
    from celery_reliable.contrib.pytest import ReliableGuards

pytest_plugins = ["celery_reliable.contrib.pytest"]


def hold(client: redis.Redis, guards: ReliableGuards, resource: str) -> tuple[FencedLock, int]:
    """The lock on ``resource`` taken by someone else, under this test's prefix; its token."""
    lock = FencedLock(client, resource, ttl=30, prefix=guards.prefix)
    token = lock.acquire(owner="someone-else")
    assert token is not None
    return lock, token


def test_direct_call_runs_the_body_without_guards(
    reliable_app: Celery, reliable_guards: ReliableGuards, redis_client: redis.Redis
) -> None:
    """A direct call is a plain call: no lock, no record; lock and transaction helpers say so."""
    ran: list[int] = []

    @reliable_app.task(base=ReliableTask, bind=True, shared=False, name="c.both",
                       lock="acct:{n}", idempotency_key="k:{n}")
    def both(self: Any, n: int) -> int:
        ran.append(n)
        return n * 2

    @reliable_app.task(base=ReliableTask, bind=True, shared=False, name="c.fenced",
                       lock="acct:{n}")
    def fenced(self: Any, n: int) -> int:
        return int(self.fence_token)

    @reliable_app.task(base=ReliableTask, bind=True, shared=False, name="c.tx",
                       idempotency_key="k:{n}")
    def tx(self: Any, n: int) -> int:
        with self.idempotent_transaction():
            return n

    other, _ = hold(redis_client, reliable_guards, "acct:1")
    assert both(1) == 2 and both(1) == 2  # the lock is busy, the key was seen: runs anyway
    assert ran == [1, 1]
    assert [lock.owner for lock in reliable_guards.held_locks()] == ["someone-else"]
    with pytest.raises(RuntimeError, match=r"not available in a direct call .*\.apply\(\)"):
        fenced(1)
    with pytest.raises(ConfigurationError, match=r"not available in a direct call .*\.apply\(\)"):
        tx(1)
    other.release()


def test_apply_runs_every_guard_in_this_process(
    reliable_app: Celery, reliable_guards: ReliableGuards
) -> None:
    """.apply(): the whole pipeline in the caller: a real token, a replayed duplicate."""
    ran: list[int] = []

    @reliable_app.task(base=ReliableTask, bind=True, shared=False, name="c.apply",
                       lock="acct:{n}", idempotency_key="k:{n}")
    def job(self: Any, n: int) -> int:
        ran.append(n)
        return int(self.fence_token)

    first = job.apply(args=(3,))
    second = job.apply(args=(3,))
    assert first.get() == second.get() >= 1
    assert ran == [3]
    reliable_guards.assert_replayed(second)
    with pytest.raises(AssertionError, match="was not replayed"):
        reliable_guards.assert_replayed(first)
    assert reliable_guards.held_locks() == []


def test_eager_mode_waits_out_a_busy_lock_in_the_caller(
    reliable_app: Celery, reliable_guards: ReliableGuards, redis_client: redis.Redis
) -> None:
    """task_always_eager: .delay() sleeps out deferrals until the lock is free, then runs."""
    reliable_app.conf.task_always_eager = True

    @reliable_app.task(base=ReliableTask, bind=True, shared=False, name="c.eager",
                       lock="acct:{n}", defer_delay=0.05, defer_max_delay=0.1)
    def job(self: Any, n: int) -> int:
        return int(self.fence_token)

    other, theirs = hold(redis_client, reliable_guards, "acct:2")
    releaser = threading.Timer(0.5, other.release)
    started = time.monotonic()
    releaser.start()
    try:
        token = job.delay(2).get(timeout=30)
    finally:
        releaser.cancel()
    assert time.monotonic() - started >= 0.5  # it waited for the other holder
    assert token > theirs  # it held the lock after the other holder


def test_eager_mode_raises_when_redis_is_unreachable(celery_app: Celery) -> None:
    """Eager: a store that is down raises StorageError at once; it is never waited out."""
    celery_app.conf.reliable_redis_url = f"redis://127.0.0.1:{free_port()}/0"

    @celery_app.task(base=ReliableTask, bind=True, shared=False, name="c.down", lock="x")
    def job(self: Any) -> None:
        raise AssertionError("ran without its lock")

    result = job.apply()
    assert isinstance(result.result, StorageError), result.result
    assert "Redis unavailable" in str(result.result)


def test_the_test_schema_comes_first_and_your_tables_stay_visible(
    reliable_app: Celery, reliable_guards: ReliableGuards, engine: sa.Engine
) -> None:
    """idempotent_transaction() in a test: rows in your table (public), its record in the schema."""
    table = f"orders_{secrets.token_hex(4)}"
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE public.{table} (id int PRIMARY KEY)"))

    @reliable_app.task(base=ReliableTask, bind=True, shared=False, name="c.order",
                       idempotency_key="order:{n}")
    def order(self: Any, n: int) -> int:
        with self.idempotent_transaction() as session:
            session.execute(sa.text(f"INSERT INTO {table} VALUES (:n)"), {"n": n})
        return n

    try:
        assert order.apply(args=(5,)).get() == 5
        with engine.connect() as conn:
            assert conn.execute(sa.text(f"SELECT id FROM public.{table}")).scalars().all() == [5]
            mine = conn.execute(sa.text(
                f'SELECT count(*) FROM "{reliable_guards.schema}".reliable_idempotency '
                "WHERE task = 'c.order'")).scalar_one()
            public = conn.execute(sa.text(
                "SELECT count(*) FROM public.reliable_idempotency WHERE task = 'c.order'"
            )).scalar_one()
        assert (mine, public) == (1, 0)
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE public.{table}"))


def test_eager_retries_run_at_once_in_the_caller(
    reliable_app: Celery, reliable_guards: ReliableGuards
) -> None:
    """.apply(): each retry runs at once in the caller, through the guards again."""
    calls: list[int] = []

    @reliable_app.task(base=ReliableTask, bind=True, shared=False, name="c.retry", lock="r",
                       retry_for=(ValueError,),
                       backoff=Backoff.exponential(base=0.01, cap=0.02, max_attempts=3))
    def job(self: Any) -> int:
        calls.append(self.request.retries)
        if len(calls) < 3:
            raise ValueError("again")
        return int(self.fence_token)

    result = job.apply()
    assert result.state == "SUCCESS" and result.get() >= 1
    assert calls == [0, 1, 2]
    assert reliable_guards.dead_letters() == []
    assert reliable_guards.held_locks() == []
