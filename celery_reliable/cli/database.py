"""``reliable migrate`` and ``reliable purge-idempotency``: celery-reliable's PostgreSQL tables."""

from __future__ import annotations

import click
from sqlalchemy.engine import make_url

from .common import current_runtime, database_engine, guarded, make_console

__all__ = ["migrate", "purge_idempotency"]


@click.command("purge-idempotency")
@click.option("--batch-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Records deleted per (short) transaction.")
@guarded
def purge_idempotency(batch_size: int) -> None:
    """Delete expired idempotency records from PostgreSQL (run it from cron or beat)."""
    from ..idempotency import purge_expired

    deleted = purge_expired(database_engine(current_runtime()), batch_size=batch_size)
    make_console().print(f"deleted {deleted} expired idempotency record(s)")


@click.command()
@guarded
def migrate() -> None:
    """Create celery-reliable's PostgreSQL tables that do not exist yet (safe to repeat)."""
    from ..schema import create_tables, metadata

    runtime = current_runtime()
    engine = database_engine(runtime)
    create_tables(engine)
    url = make_url(str(runtime.settings.database_url)).render_as_string(hide_password=True)
    names = ", ".join(sorted(metadata.tables))
    make_console().print(f"tables ready in {url}: {names}")
