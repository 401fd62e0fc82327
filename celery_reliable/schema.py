"""PostgreSQL tables (SQLAlchemy 2 Core) and their idempotent creation.

Add :data:`metadata` to your Alembic ``target_metadata`` (as a list entry) to
manage these tables with your own migrations, or call :func:`create_tables`
(``celery -A proj reliable migrate`` later) which is safe to run repeatedly.
"""

from __future__ import annotations

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

from .errors import ConfigurationError

__all__ = ["create_tables", "dead_letters", "fences", "idempotency", "make_engine", "metadata"]

metadata = MetaData()

#: Highest fencing token each resource has accepted (``celery_reliable.fencing``).
fences = Table(
    "reliable_fences",
    metadata,
    Column("resource", Text, primary_key=True),
    Column("token", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
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
    Index("ix_reliable_dead_letters_task_name", "task_name"),
)


def normalise_url(url: str) -> str:
    """``postgresql://`` → ``postgresql+psycopg://`` (psycopg 3); other URLs unchanged."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str | None, *, lock_timeout: float | None = None, **kwargs: Any) -> Engine:
    """An engine for ``reliable_database_url``; raises ConfigurationError when unset.

    ``lock_timeout`` (seconds) is set on every new connection, keeping any
    ``options`` the URL carries.
    """
    if not url:
        raise ConfigurationError(
            "app settings: option 'reliable_database_url' is not set; "
            "PostgreSQL-backed features need it"
        )
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("connect_args", {"connect_timeout": 5})
    engine = _create_engine(normalise_url(url), **kwargs)
    if lock_timeout is not None:
        statement = f"SET lock_timeout = {int(lock_timeout * 1000)}"

        @event.listens_for(engine, "connect")
        def _set_lock_timeout(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute(statement)
            cursor.close()
            dbapi_conn.commit()

    return engine


def create_tables(engine: Engine) -> None:
    """Create every celery-reliable table that does not exist yet (idempotent).

    Safe to run from many processes at once: a transaction-level advisory lock
    serialises the creators.
    """
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(7310420561)"))
        metadata.create_all(conn, checkfirst=True)
