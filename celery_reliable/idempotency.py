"""The durable side of idempotent execution (PostgreSQL), and purging.

The fast path lives in Redis (``admit.lua``/``complete.lua``, guard ``I``:
``guards/idempotency.lua``):
a finished key replays from Redis without touching PostgreSQL, and a key in
progress defers its duplicates. PostgreSQL holds the durable record:

* When Redis lets an execution start (no record, or an expired lease), the
  execution opens ONE PostgreSQL transaction and inserts its record as ``P``.
  A committed record for that key (Redis lost it: flush, restart, failover)
  shows up here and is replayed instead of running the task again; an
  *uncommitted* one (a stalled twin) blocks the insert until that twin ends
  or ``reliable_database_lock_timeout`` passes (then this delivery defers).
* The task body runs inside that transaction's lifetime;
  ``self.idempotent_transaction()`` hands out a session on it, so the task's
  own rows commit together with the record. With ``reliable_django_database``
  the transaction is a ``transaction.atomic`` block on Django's connection
  instead (:mod:`celery_reliable.contrib.django`), so ORM writes commit with it.
* On success the record becomes ``S`` with the result JSON and the
  transaction commits. On failure it rolls back (nothing kept), or a kept
  failure is written as ``F``.

A worker killed mid-task drops its connection; PostgreSQL rolls its
transaction back, so neither the task's rows nor the record survive, and the
redelivery runs cleanly.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import cache
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, Interval, and_, bindparam, delete, func, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import Insert, Update

from .schema import idempotency

if TYPE_CHECKING:
    from .config import ReliableSettings

__all__ = ["Existing", "PostgresRecord", "dumps_result", "open_record", "purge_expired"]

log = logging.getLogger("celery_reliable")

# The hot-path statements are built ONCE. Building ``insert().values()
# .on_conflict_do_update(... excluded ...)`` and ``update()`` per call, and letting
# SQLAlchemy derive their cache keys, cost about 0.7 ms of CPU per first execution,
# more than the PostgreSQL round trips themselves (benchmarks/throughput.py).
_KEY = and_(
    idempotency.c.task == bindparam("p_task"),
    idempotency.c.key_digest == bindparam("p_key"),
)
_claim = insert(idempotency).values(
    task=bindparam("p_task"),
    key_digest=bindparam("p_key"),
    fingerprint=bindparam("p_fingerprint"),
    state="P",
    expires_at=func.now() + bindparam("p_ttl", type_=Interval()),
)
#: Insert the key as P, or take over an expired record; returns a row if claimed.
_CLAIM = _claim.on_conflict_do_update(
    index_elements=[idempotency.c.task, idempotency.c.key_digest],
    set_={
        "fingerprint": _claim.excluded.fingerprint,
        "state": "P",
        "result_json": None,
        "created_at": func.now(),
        "updated_at": func.now(),
        "expires_at": _claim.excluded.expires_at,
    },
    where=idempotency.c.expires_at <= func.now(),
).returning(idempotency.c.state)
_LOOKUP = select(idempotency.c.state, idempotency.c.fingerprint, idempotency.c.result_json).where(
    _KEY
)
_SUCCEED = (
    update(idempotency)
    .where(_KEY)
    .values(
        state="S",
        result_json=bindparam("p_result"),
        # clock_timestamp(), not now(): a record lives ``ttl`` from completion
        # (as in Redis), not from the start of a long run's transaction.
        updated_at=func.clock_timestamp(),
        expires_at=func.clock_timestamp() + bindparam("p_ttl", type_=Interval()),
    )
)

_upsert = insert(idempotency).values(
    task=bindparam("p_task"),
    key_digest=bindparam("p_key"),
    fingerprint=bindparam("p_fingerprint"),
    state=bindparam("p_state"),
    result_json=bindparam("p_result"),
    expires_at=func.now() + bindparam("p_ttl", type_=Interval()),
)
#: Write a finished record (S or F) whatever is there, in a transaction of its own.
_UPSERT = _upsert.on_conflict_do_update(
    index_elements=[idempotency.c.task, idempotency.c.key_digest],
    set_={
        "state": _upsert.excluded.state,
        "result_json": _upsert.excluded.result_json,
        "updated_at": func.now(),
        "fingerprint": _upsert.excluded.fingerprint,
        "expires_at": _upsert.excluded.expires_at,
    },
)


class Existing:
    """A committed, unexpired record found for a key."""

    __slots__ = ("fingerprint", "payload", "state")

    def __init__(self, state: str, fingerprint: str, payload: str) -> None:
        self.state = state
        self.fingerprint = fingerprint
        self.payload = payload


@cache
def _compiled(statement: Insert | Update, dialect: Dialect) -> tuple[str, dict[str, Any]]:
    """SQL text and constant parameters of a statement, compiled once per dialect."""
    compiled = statement.compile(dialect=dialect)
    return compiled.string, dict(compiled.params)


def _execute(conn: Connection, statement: Insert | Update, params: dict[str, Any]) -> Any:
    """Run one hot-path statement; returns the first row or None.

    On psycopg 3 (the default driver) the compiled SQL goes straight to the
    driver's cursor, skipping SQLAlchemy's per-execution machinery (about
    100 us of CPU per task, ``benchmarks/throughput.py``); psycopg prepares it
    server-side after a few uses. Errors still surface as SQLAlchemy's
    ``DBAPIError`` subclasses, and a connection the error broke is invalidated
    so the pool never hands it out again. Other drivers take the ordinary path.
    """
    dialect = conn.dialect
    if dialect.driver != "psycopg":
        return conn.execute(statement, params).first()
    sql, constants = _compiled(statement, dialect)
    raw = conn.connection.driver_connection
    assert raw is not None
    values = {**constants, **params}
    try:
        with raw.cursor() as cursor:
            cursor.execute(sql, values)
            return cursor.fetchone() if cursor.description is not None else None
    except dialect.loaded_dbapi.Error as exc:
        broken = bool(getattr(raw, "broken", False) or raw.closed)
        if broken:
            conn.invalidate(exc)
        raise DBAPIError.instance(
            sql,
            values,
            exc,
            dialect.loaded_dbapi.Error,
            connection_invalidated=broken,
            dialect=dialect,
        ) from exc


class PostgresRecord:
    """The durable record of one execution, inside its own open transaction."""

    def __init__(
        self, engine: Engine, task: str, key_digest: str, fingerprint: str, ttl: float
    ) -> None:
        self.engine = engine
        self.task = task
        self.key_digest = key_digest
        self.fingerprint = fingerprint
        self.ttl = ttl
        self.conn: Connection | None = None
        self.session_used = False

    def begin(self) -> Existing | None:
        """Open the transaction and claim the key; return a committed record if one exists.

        Raises SQLAlchemy's ``OperationalError``/``DBAPIError`` if PostgreSQL is
        unreachable or the claim timed out behind a stalled twin.
        """
        conn = self.engine.connect()
        try:
            conn.begin()
            claimed = _execute(conn, _CLAIM, self._params())
            if claimed is None:
                state, fingerprint, payload = conn.execute(_LOOKUP, self._params()).one()
                conn.rollback()
                conn.close()
                return Existing(state, fingerprint, payload or "null")
        except BaseException:
            conn.close()
            raise
        self.conn = conn
        return None

    def _params(self) -> dict[str, Any]:
        return {
            "p_task": self.task,
            "p_key": self.key_digest,
            "p_fingerprint": self.fingerprint,
            "p_ttl": timedelta(seconds=self.ttl),
        }

    @property
    def lost(self) -> bool:
        """True once this execution's connection is gone (SQLAlchemy invalidated it after a
        disconnect, or it was closed): its transaction can no longer commit."""
        conn = self.conn
        return conn is None or conn.invalidated or conn.closed

    def session(self) -> Session:
        """A session in this execution's transaction (commits happen at completion)."""
        assert self.conn is not None
        self.session_used = True
        return Session(bind=self.conn, join_transaction_mode="create_savepoint")

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """``idempotent_transaction()``'s block: a :meth:`session` whose work is flushed on
        leaving (a savepoint released), rolled back to the savepoint on an exception."""
        session = self.session()
        try:
            yield session
            session.commit()  # releases the savepoint; the transaction commits at completion
        except BaseException:
            try:
                session.rollback()
            except SQLAlchemyError:
                # The connection broke as well; completion drops it. The body's own
                # exception is the one that tells what happened.
                log.debug("celery-reliable: rollback in idempotent_transaction failed",
                          exc_info=True)
            raise
        finally:
            session.close()

    def succeed(self, result_json: str) -> None:
        """Record the result and commit everything of this execution."""
        assert self.conn is not None
        conn, self.conn = self.conn, None
        try:
            _execute(conn, _SUCCEED, {**self._params(), "p_result": result_json})
            conn.commit()
        finally:
            conn.close()

    def abandon(self) -> None:
        """Roll back everything of this execution (safe to call twice)."""
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.rollback()
            except Exception:
                # The server already ended the session (restart, terminate,
                # idle timeout): its transaction is gone; drop the connection.
                conn.invalidate()
            finally:
                conn.close()

    def record_success(self, result_json: str) -> None:
        """Upsert the succeeded record in a transaction of its own (after a failed commit)."""
        self._upsert("S", result_json)

    def fail_kept(self, error_json: str) -> None:
        """Roll back the execution's rows, then record a kept failure on its own."""
        self.abandon()
        self._upsert("F", error_json)

    def _upsert(self, state: str, payload: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(_UPSERT, {**self._params(), "p_state": state, "p_result": payload})


def open_record(
    engine: Engine, task: str, key_digest: str, fingerprint: str, ttl: float,
    settings: ReliableSettings,
) -> PostgresRecord:
    """The durable record of one execution: on ``engine`` (the default), or on Django's
    connection for ``reliable_django_database`` (:mod:`celery_reliable.contrib.django`)."""
    if settings.django_database is None:
        return PostgresRecord(engine, task, key_digest, fingerprint, ttl)
    from .contrib.django.record import DjangoRecord

    return DjangoRecord(engine, task, key_digest, fingerprint, ttl,
                        alias=settings.django_database,
                        lock_timeout=settings.database_lock_timeout)


def purge_expired(engine: Engine, *, batch_size: int = 1000, max_batches: int | None = None) -> int:
    """Delete expired idempotency records in batches; returns how many were deleted.

    Each batch is its own short transaction (``DELETE ... WHERE ctid IN
    (SELECT ... LIMIT n FOR UPDATE SKIP LOCKED)``), so no lock is held for
    long and concurrent purges do not block each other or running tasks.
    """
    if batch_size <= 0:
        raise ValueError(f"purge_expired: batch_size must be > 0, got {batch_size!r}")
    total = 0
    batches = 0
    victims = (
        select(idempotency.c.task, idempotency.c.key_digest)
        .where(idempotency.c.expires_at <= func.now())
        .limit(batch_size)
        .with_for_update(skip_locked=True)
    )
    while max_batches is None or batches < max_batches:
        with engine.begin() as conn:
            result = conn.execute(
                delete(idempotency).where(
                    tuple_(idempotency.c.task, idempotency.c.key_digest).in_(victims)
                )
            )
        deleted = int(result.rowcount or 0)
        total += deleted
        batches += 1
        if deleted < batch_size:
            break
    return total


def dumps_result(value: Any) -> str:
    """JSON text of a result; raises TypeError/ValueError if it has none."""
    return json.dumps(value, allow_nan=False, separators=(",", ":"))
