"""celery_reliable.contrib.django with a real Django project (tests/django_project), its ORM
on the run's PostgreSQL database, and a real (embedded) Celery worker."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import celery.contrib.testing.tasks  # noqa: F401 - registers celery.ping for start_worker
import pytest
import sqlalchemy as sa
from celery import Celery
from celery.contrib.testing import worker

from celery_reliable import ConfigurationError, ReliableTask, check_postgres

from .conftest import PG_ADMIN_URL, ROOT
from .django_project import project


@pytest.fixture(scope="module")
def django_db(database_url: str) -> Iterator[None]:
    with project(database_url):
        yield


@pytest.fixture
def app(django_db: None, celery_config: dict[str, Any]) -> Celery:
    """An app whose idempotency records live on Django's 'default' connection."""
    from celery_reliable.contrib.django import database_url_from_django

    app = Celery(f"dj{secrets.token_hex(3)}", set_as_current=False)
    app.conf.update({
        **celery_config,
        "reliable_database_url": database_url_from_django("default"),
        "reliable_django_database": "default",
        "reliable_key_prefix": f"dj{secrets.token_hex(3)}",
    })
    return app


@contextmanager
def running(app: Celery) -> Iterator[None]:
    """An embedded worker (4 threads) for the tasks declared on ``app`` so far."""
    with worker.start_worker(app, pool="threads", concurrency=4, perform_ping_check=False):
        yield


def orders(ref: str) -> int:
    from tests.django_project.shop.models import Order

    return int(Order.objects.filter(ref=ref).count())


def test_database_url_from_django_is_the_same_database(database_url: str,
                                                       django_db: None) -> None:
    """The SQLAlchemy URL derived from DATABASES['default'] reaches the database Django uses."""
    from django.db import connection

    from celery_reliable.contrib.django import database_url_from_django

    url = database_url_from_django("default")
    assert url.startswith("postgresql+psycopg://")
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT current_database()")).scalar() == \
            connection.settings_dict["NAME"]
    engine.dispose()


def test_orm_writes_commit_with_the_idempotency_record(app: Celery, engine: sa.Engine) -> None:
    """Duplicates write one row; a body raising after its ORM write leaves no row and no
    record; the row and the record are written in one PostgreSQL transaction."""
    from tests.django_project.shop.models import Order

    @app.task(base=ReliableTask, bind=True, shared=False, name="dj.pay",
              idempotency_key="pay:{ref}", defer_delay=0.2, defer_max_delay=0.5)
    def pay(self: Any, ref: str, amount: int, fail: bool = False) -> dict[str, Any]:
        with self.idempotent_transaction() as conn:
            Order.objects.create(ref=ref, amount=amount)
            with conn.cursor() as cursor:
                cursor.execute("SELECT txid_current()")  # the top-level transaction
                txid = int(cursor.fetchone()[0])
        if fail:
            raise ValueError("failed after the ORM write")
        return {"txid": txid}

    ref, failing = f"o-{secrets.token_hex(3)}", f"f-{secrets.token_hex(3)}"
    with running(app):
        results = [pay.delay(ref, 10) for _ in range(4)]
        values = [r.get(timeout=60) for r in results]
        with pytest.raises(ValueError, match="after the ORM write"):
            pay.delay(failing, 5, fail=True).get(timeout=60)
    assert orders(ref) == 1 and all(v == values[0] for v in values)
    assert orders(failing) == 0
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT state, xmin::text FROM reliable_idempotency WHERE task = 'dj.pay'")).all()
    assert len(rows) == 1 and rows[0][0] == "S"  # the failed run left no record
    # The record's row version was written by the transaction the body's ORM write was in.
    assert int(rows[0][1]) == values[0]["txid"] % 2**32


def test_a_stale_token_refuses_the_fenced_orm_write(app: Celery, engine: sa.Engine) -> None:
    """A locked task fences its ORM write with check_django: once a newer token was accepted
    for the resource, the old holder's write is refused and nothing is written."""
    from django.db import transaction

    from tests.django_project.shop.models import Order

    @app.task(base=ReliableTask, bind=True, shared=False, name="dj.fenced", lock="acct:{n}")
    def fenced(self: Any, n: int, ref: str) -> dict[str, Any]:
        with transaction.atomic(using="default"):
            self.fence.check_django(using="default")
            Order.objects.create(ref=ref, amount=n)
        return {"resource": self.fence.resource, "token": self.fence_token}

    first, second = f"a-{secrets.token_hex(3)}", f"b-{secrets.token_hex(3)}"
    with running(app):
        held = fenced.delay(1, first).get(timeout=60)
        # A newer holder (elsewhere) wrote with a higher token meanwhile (tokens grow with
            # the clock: any later acquisition stays below this one).
        with engine.begin() as conn:
            check_postgres(conn, held["resource"], 2**62, holder="newer")
        result = fenced.delay(1, second)
        with pytest.raises(Exception) as info:
            result.get(timeout=60)
    assert type(info.value).__name__ == "StaleFenceToken", info.value
    assert orders(first) == 1 and orders(second) == 0


def test_the_record_alias_must_be_the_engines_database(django_db: None) -> None:
    """reliable_django_database on another database than reliable_database_url is refused:
    records would live apart from the tables, the CLI and the dead letters."""
    from celery_reliable.contrib.django.record import DjangoRecord

    admin = sa.create_engine(PG_ADMIN_URL)  # the server's 'postgres' database
    record = DjangoRecord(admin, "t", "k", "f", 60.0, alias="default", lock_timeout=5.0)
    with pytest.raises(ConfigurationError, match="database_url_from_django"):
        record.begin()
    admin.dispose()


def test_reliable_migrate_management_command_creates_the_tables() -> None:
    """`python manage.py reliable_migrate` creates celery-reliable's tables in a fresh
    database named by the Django settings."""
    name = f"reliable_dj_{secrets.token_hex(4)}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = admin.url.set(database=name)
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT),
               "RELIABLE_DJANGO_DATABASE_URL": url.render_as_string(hide_password=False),
               "DJANGO_SETTINGS_MODULE": "tests.django_project.settings"}
        done = subprocess.run(
            [sys.executable, str(ROOT / "tests" / "django_project" / "manage.py"),
             "reliable_migrate", "--database", "default"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        assert "tables ready" in done.stdout and name in done.stdout
        fresh = sa.create_engine(url)
        with fresh.connect() as conn:
            tables = set(sa.inspect(conn).get_table_names())
        fresh.dispose()
        assert {"reliable_idempotency", "reliable_fences", "reliable_dead_letters"} <= tables
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
