"""PostgresRecord's hot path (compiled SQL on the psycopg cursor) against a real PostgreSQL."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from celery_reliable.idempotency import PostgresRecord
from celery_reliable.schema import idempotency, make_engine

TTL = 3600.0


@pytest.fixture
def reliable_engine(database_url: str) -> Iterator[sa.Engine]:
    """An engine as the workers build it: psycopg 3, lock_timeout 0.3 s, pool of 2."""
    eng = make_engine(database_url, lock_timeout=0.3, pool_size=2, max_overflow=0)
    assert eng.dialect.driver == "psycopg"
    yield eng
    eng.dispose()


def _row(engine: sa.Engine, task: str, key: str) -> tuple[str, str | None] | None:
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(idempotency.c.state, idempotency.c.result_json).where(
                idempotency.c.task == task, idempotency.c.key_digest == key
            )
        ).first()
    return None if row is None else (row[0], row[1])


def test_claim_then_succeed_commits_one_record(reliable_engine: sa.Engine) -> None:
    """The claim inserts P invisibly; succeed commits S with the result; a second claim replays."""
    task, key = "t.rec", secrets.token_hex(8)
    record = PostgresRecord(reliable_engine, task, key, "f" * 64, TTL)
    assert record.begin() is None
    assert _row(reliable_engine, task, key) is None  # uncommitted: invisible to others
    record.succeed('{"ok":1}')
    assert _row(reliable_engine, task, key) == ("S", '{"ok":1}')
    again = PostgresRecord(reliable_engine, task, key, "f" * 64, TTL).begin()
    assert again is not None
    assert (again.state, again.fingerprint, again.payload) == ("S", "f" * 64, '{"ok":1}')


def test_a_stalled_twin_times_out_as_a_sqlalchemy_error(reliable_engine: sa.Engine) -> None:
    """The claim blocked behind an open twin ends at lock_timeout as OperationalError,
    and the pooled connection is still good afterwards (nothing half-done left on it)."""
    task, key = "t.rec", secrets.token_hex(8)
    first = PostgresRecord(reliable_engine, task, key, "f" * 64, TTL)
    assert first.begin() is None
    twin = PostgresRecord(reliable_engine, task, key, "f" * 64, TTL)
    with pytest.raises(sa.exc.OperationalError) as info:
        twin.begin()
    assert "lock timeout" in str(info.value).lower()
    assert not info.value.connection_invalidated
    first.succeed("1")
    assert _row(reliable_engine, task, key) == ("S", "1")
    for _ in range(3):  # both pooled connections are usable
        other = PostgresRecord(reliable_engine, task, secrets.token_hex(8), "f" * 64, TTL)
        assert other.begin() is None
        other.abandon()


def test_a_killed_session_invalidates_the_connection(
    reliable_engine: sa.Engine, engine: sa.Engine
) -> None:
    """A backend killed during the body: succeed raises a DBAPIError marked invalidated,
    nothing is committed, and the pool replaces the dead connection."""
    task, key = "t.rec", secrets.token_hex(8)
    record = PostgresRecord(reliable_engine, task, key, "f" * 64, TTL)
    assert record.begin() is None
    assert record.conn is not None
    pid = record.conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
    with engine.connect() as admin:
        admin.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    with pytest.raises(sa.exc.DBAPIError) as info:
        record.succeed("1")
    assert info.value.connection_invalidated
    assert _row(reliable_engine, task, key) is None
    retry = PostgresRecord(reliable_engine, task, key, "f" * 64, TTL)
    assert retry.begin() is None  # a fresh connection from the pool
    retry.succeed("2")
    assert _row(reliable_engine, task, key) == ("S", "2")
