"""PostgreSQL tables (SQLAlchemy 2 Core) and their idempotent creation.

Add :data:`metadata` to your Alembic ``target_metadata`` (as a list entry) to
manage these tables with your own migrations, or call :func:`create_tables`
(``celery -A proj reliable migrate`` later) which is safe to run repeatedly.
"""

from __future__ import annotations

import select as _select
import time
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Identity,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    event,
    func,
    text,
)
from sqlalchemy import create_engine as _create_engine
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DisconnectionError

from .errors import ConfigurationError

__all__ = ["create_tables", "dead_letters", "fences", "idempotency", "make_engine", "metadata"]

metadata = MetaData()

#: Highest fencing token each resource has accepted (``celery_reliable.fencing``), and
#: the holder (lock acquisition) that sent it: an equal token is accepted only from it.
fences = Table(
    "reliable_fences",
    metadata,
    Column("resource", Text, primary_key=True),
    Column("token", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("holder", Text),  # added later (ADDED_COLUMNS); NULL: unknown
)

#: Durable idempotency records (``celery_reliable.idempotency``). ``state`` is
#: S (succeeded, ``result_json`` holds the result) or F (failed and kept,
#: ``result_json`` holds ``{"type", "message"}``); an execution in progress
#: holds its row as P inside its own open transaction, invisible to others.
idempotency = Table(
    "reliable_idempotency",
    metadata,
    Column("task", Text, primary_key=True),
    Column("key_digest", String(64), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("state", String(1), nullable=False),
    Column("result_json", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Index("ix_reliable_idempotency_expires_at", "expires_at"),
)


#: Tasks that will not be retried (``celery_reliable.deadletter``).
dead_letters = Table(
    "reliable_dead_letters",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("task_name", Text, nullable=False),
    Column("task_id", Text, nullable=False),
    Column("args_json", Text, nullable=False),
    Column("kwargs_json", Text, nullable=False),
    Column("replayable", Boolean, nullable=False),
    Column("exc_type", Text, nullable=False),
    Column("exc_message", Text, nullable=False),
    Column("traceback", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("reason", Text, nullable=False),
    Column("queue", Text),
    Column("first_failure_at", DateTime(timezone=True), nullable=False),
    Column("last_failure_at", DateTime(timezone=True), nullable=False,
           server_default=func.now()),
    Column("replayed_as", Text),
    Column("replayed_at", DateTime(timezone=True)),
    # added later (ADDED_COLUMNS); NULL in letters recorded before: replayed without them
    Column("headers_json", Text),  # the call's own message headers (idempotency_key, ...)
    Column("idempotency_digest", String(64)),  # its idempotency record's key, if it had one
    Index("ix_reliable_dead_letters_task_name", "task_name"),
)

#: Columns added to a table after its first release: ``create_tables`` adds each
#: one an existing table lacks (all nullable, so adding one rewrites nothing).
ADDED_COLUMNS = (
    (fences, "holder"),
    (dead_letters, "headers_json"),
    (dead_letters, "idempotency_digest"),
)


def normalise_url(url: str) -> str:
    """``postgresql://`` → ``postgresql+psycopg://`` (psycopg 3); other URLs unchanged."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


#: A pooled connection idle longer than this is pinged before use.
PING_AFTER_IDLE = 30.0


def make_engine(url: str | None, *, lock_timeout: float | None = None, **kwargs: Any) -> Engine:
    """An engine for ``reliable_database_url``; raises ConfigurationError when unset.

    ``lock_timeout`` (seconds) is set on every new connection, keeping any
    ``options`` the URL carries. Pooled connections are pinged only when they may
    be dead (:func:`_ping_when_suspect`), not on every checkout: SQLAlchemy's
    ``pool_pre_ping`` costs a round trip and a PostgreSQL transaction per task.
    """
    if not url:
        raise ConfigurationError(
            "app settings: option 'reliable_database_url' is not set; "
            "PostgreSQL-backed features need it"
        )
    kwargs.setdefault("pool_pre_ping", False)
    kwargs.setdefault("connect_args", {"connect_timeout": 5})
    engine = _create_engine(normalise_url(url), **kwargs)
    if not kwargs["pool_pre_ping"]:
        _ping_when_suspect(engine, PING_AFTER_IDLE)
    if lock_timeout is not None:
        statement = f"SET lock_timeout = {int(lock_timeout * 1000)}"

        @event.listens_for(engine, "connect")
        def _set_lock_timeout(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute(statement)
            cursor.close()
            dbapi_conn.commit()

    return engine


def _ping_when_suspect(engine: Engine, idle: float) -> None:
    """Ping a pooled connection at checkout only if it sat idle > ``idle`` s or its socket is
    readable (the server closed the session: restart, ``pg_terminate_backend``,
    ``idle_session_timeout``; it costs one ``select()``, no round trip). A failed ping makes
    the pool replace the connection, as ``pool_pre_ping`` does.
    """

    @event.listens_for(engine, "checkin")
    def _checkin(_dbapi_conn: Any, record: Any) -> None:
        record.info["reliable_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.pop("reliable_idle_since", None)
        if since is None:
            return  # a new connection
        try:
            readable = bool(_select.select([dbapi_conn.fileno()], [], [], 0)[0])
        except (OSError, ValueError):
            readable = True
        if readable or time.monotonic() - since > idle:
            try:
                engine.dialect.do_ping(dbapi_conn)
            except Exception as exc:
                raise DisconnectionError(str(exc)) from exc


def create_tables(engine: Engine) -> None:
    """Create every celery-reliable table that does not exist yet (idempotent).

    Also adds the columns of :data:`ADDED_COLUMNS` to tables created by an
    older release. Safe to run from many processes at once: a
    transaction-level advisory lock serialises the creators.
    """
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(7310420561)"))
        metadata.create_all(conn, checkfirst=True)
        _add_missing_columns(conn)


def _add_missing_columns(conn: Any) -> None:
    """``ALTER TABLE ... ADD COLUMN`` for each added column a table lacks.

    Looked up first, because ``ADD COLUMN IF NOT EXISTS`` takes the table's
    ACCESS EXCLUSIVE lock even when the column exists: it would wait for, and
    then block, every open transaction that holds a fence row.
    """
    preparer = conn.dialect.identifier_preparer
    for table, name in ADDED_COLUMNS:
        present = conn.execute(
            text("SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(CAST(:t AS text))"
                 " AND attname = :c AND NOT attisdropped"),
            {"t": preparer.format_table(table), "c": name},
        ).first()
        if present is None:
            column = table.c[name]
            conn.execute(text(
                f"ALTER TABLE {preparer.format_table(table)} ADD COLUMN IF NOT EXISTS "
                f"{preparer.format_column(column)} {column.type.compile(dialect=conn.dialect)}"
            ))
