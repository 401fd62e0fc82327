"""PostgreSQL tables (SQLAlchemy 2 Core) and their idempotent creation.

Add :data:`metadata` to your Alembic ``target_metadata`` (as a list entry) to
manage these tables with your own migrations, or call :func:`create_tables`
(``celery -A proj reliable migrate`` later) which is safe to run repeatedly.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Column, DateTime, Index, MetaData, String, Table, Text, func
from sqlalchemy import create_engine as _create_engine
from sqlalchemy.engine import Engine, make_url

from .errors import ConfigurationError

__all__ = ["create_tables", "fences", "idempotency", "make_engine", "metadata"]

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


def normalise_url(url: str) -> str:
    """``postgresql://`` → ``postgresql+psycopg://`` (psycopg 3); other URLs unchanged."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str | None, **kwargs: Any) -> Engine:
    """An engine for ``reliable_database_url``; raises ConfigurationError when unset."""
    if not url:
        raise ConfigurationError(
            "app settings: option 'reliable_database_url' is not set; "
            "PostgreSQL-backed features need it"
        )
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("connect_args", {"connect_timeout": 5})
    return _create_engine(normalise_url(url), **kwargs)


def create_tables(engine: Engine) -> None:
    """Create every celery-reliable table that does not exist yet (idempotent)."""
    metadata.create_all(engine, checkfirst=True)
