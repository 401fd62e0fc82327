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
import redis
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


def make_app(celery_config: dict[str, Any], **kwargs: Any) -> Celery:
    """An app configured from the Django settings, as Celery's Django guide does: its
    idempotency records live on Django's 'default' connection."""
    app = Celery(f"dj{secrets.token_hex(3)}", set_as_current=False, **kwargs)
    app.config_from_object("django.conf:settings", namespace="CELERY")
    app.conf.update({
        **{k: v for k, v in celery_config.items() if k != "reliable_database_url"},
        "reliable_key_prefix": f"dj{secrets.token_hex(3)}",
    })
    assert app.conf.get("reliable_django_database") == "default"
    assert app.conf.get("reliable_database_url").startswith("postgresql+psycopg://")
    return app


@pytest.fixture
def app(django_db: None, celery_config: dict[str, Any]) -> Iterator[Celery]:
    """With Celery's Django fix-up (DJANGO_SETTINGS_MODULE is set while the app is made)."""
    app = make_app(celery_config)
    yield app
    app.close()


@contextmanager
def running(app: Celery, concurrency: int = 4) -> Iterator[None]:
    """An embedded worker (threads) for the tasks declared on ``app`` so far."""
    with worker.start_worker(app, pool="threads", concurrency=concurrency,
                             perform_ping_check=False):
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


def records(engine: sa.Engine, task: str) -> list[str]:
    with engine.connect() as conn:
        return [row[0] for row in conn.execute(sa.text(
            "SELECT state FROM reliable_idempotency WHERE task = :t"), {"t": task})]


def test_a_kept_failure_is_recorded_apart_from_the_rolled_back_rows(
    app: Celery, engine: sa.Engine
) -> None:
    """idempotency_keep_failures on Django's connection: the body's rows (inside and outside
    idempotent_transaction()) roll back, the failure is recorded on its own, and a duplicate
    replays it without running."""
    from celery_reliable import ReplayedFailure
    from tests.django_project.shop.models import Order

    ran: list[str] = []

    @app.task(base=ReliableTask, bind=True, shared=False, name="dj.kept",
              idempotency_key="kept:{ref}", idempotency_keep_failures=True)
    def kept(self: Any, ref: str) -> None:
        ran.append(ref)
        Order.objects.create(ref=f"{ref}-outside", amount=0)  # in the record's transaction too
        with self.idempotent_transaction():
            Order.objects.create(ref=ref, amount=1)
        raise KeyError("no such account")

    ref = f"k-{secrets.token_hex(3)}"
    with running(app):
        with pytest.raises(KeyError):
            kept.delay(ref).get(timeout=60)
        with pytest.raises(ReplayedFailure, match="no such account"):
            kept.delay(ref).get(timeout=60)
    assert ran == [ref] and orders(ref) == 0 and orders(f"{ref}-outside") == 0
    assert records(engine, "dj.kept") == ["F"]


def test_a_lost_django_connection_defers_and_the_redelivery_commits_once(
    django_db: None, celery_config: dict[str, Any], engine: sa.Engine
) -> None:
    """PostgreSQL ends the body's Django connection mid-run (pg_terminate_backend): the run
    defers like a failed commit, nothing of it commits, and the redelivery (on a fresh
    connection, without Celery's Django fix-up) writes the row once."""
    from tests.django_project.shop.models import Order

    app = make_app(celery_config, fixups=[])  # the record must heal the connection itself
    attempts: list[int] = []

    @app.task(base=ReliableTask, bind=True, shared=False, name="dj.cut",
              idempotency_key="cut:{ref}", defer_delay=0.2, defer_max_delay=0.5, max_retries=0)
    def cut(self: Any, ref: str) -> str:
        attempts.append(1)
        with self.idempotent_transaction() as conn:
            Order.objects.create(ref=ref, amount=1)
            if len(attempts) == 1:
                with conn.cursor() as cursor:
                    cursor.execute("SELECT pg_backend_pid()")
                    pid = cursor.fetchone()[0]
                with engine.connect() as admin:
                    admin.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
            Order.objects.create(ref=ref, amount=2)
        return "done"

    ref = f"c-{secrets.token_hex(3)}"
    try:
        with running(app):
            assert cut.delay(ref).get(timeout=60) == "done"
    finally:
        app.close()
    assert len(attempts) == 2
    assert sorted(Order.objects.filter(ref=ref).values_list("amount", flat=True)) == [1, 2]
    assert records(engine, "dj.cut") == ["S"]


def test_a_connection_broken_between_tasks_is_replaced(
    django_db: None, celery_config: dict[str, Any], engine: sa.Engine
) -> None:
    """A worker thread's idle Django connection ended by the server (restart, idle timeout):
    the next task's claim fails on it, defers, and Django's failed rollback drops it, so the
    redelivery runs on a fresh connection, even without Celery's Django fix-up."""
    from tests.django_project.shop.models import Order

    app = make_app(celery_config, fixups=[])

    @app.task(base=ReliableTask, bind=True, shared=False, name="dj.idle",
              idempotency_key="idle:{ref}", defer_delay=0.2, defer_max_delay=0.5)
    def idle(self: Any, ref: str) -> int:
        with self.idempotent_transaction() as conn:
            Order.objects.create(ref=ref, amount=1)
            with conn.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                return int(cursor.fetchone()[0])

    first, second = f"i-{secrets.token_hex(3)}", f"j-{secrets.token_hex(3)}"
    try:
        with running(app, concurrency=1):  # one thread: one Django connection
            pid = idle.delay(first).get(timeout=60)
            with engine.connect() as admin:
                admin.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
            assert idle.delay(second).get(timeout=30) != pid
    finally:
        app.close()
    assert orders(first) == 1 and orders(second) == 1


def test_a_record_redis_lost_is_replayed_from_the_django_transaction(
    app: Celery, engine: sa.Engine
) -> None:
    """Redis forgets a finished key (flush, failover): the duplicate's claim on Django's
    connection finds the committed record and replays it; the body does not run again."""
    ran: list[str] = []

    @app.task(base=ReliableTask, bind=True, shared=False, name="dj.lost",
              idempotency_key="lost:{ref}")
    def lost(self: Any, ref: str) -> str:
        ran.append(ref)
        return f"paid {ref}"

    ref = f"l-{secrets.token_hex(3)}"
    client = redis.Redis.from_url(app.conf.reliable_redis_url)
    with running(app):
        assert lost.delay(ref).get(timeout=60) == f"paid {ref}"
        keys = list(client.scan_iter("{" + app.conf.reliable_key_prefix + "}:*"))
        assert keys
        client.delete(*keys)
        assert lost.delay(ref).get(timeout=60) == f"paid {ref}"
    client.close()
    assert ran == [ref] and records(engine, "dj.lost") == ["S"]


def test_eager_apply_runs_on_the_callers_connection(app: Celery, engine: sa.Engine) -> None:
    """.apply() (eager) claims the record on this thread's Django connection too: the row
    and the record commit together, on_commit callbacks run after both, a second apply
    replays."""
    from django.db import transaction

    from tests.django_project.shop.models import Order

    seen: list[list[str]] = []

    @app.task(base=ReliableTask, bind=True, shared=False, name="dj.eager",
              idempotency_key="eager:{ref}")
    def eager(self: Any, ref: str) -> int:
        with self.idempotent_transaction():
            # runs once the record has committed: it sees the record from elsewhere
            transaction.on_commit(lambda: seen.append(records(engine, "dj.eager")))
            return int(Order.objects.create(ref=ref, amount=3).pk)

    ref = f"e-{secrets.token_hex(3)}"
    first = eager.apply(args=(ref,)).get()
    assert eager.apply(args=(ref,)).get() == first
    assert orders(ref) == 1 and records(engine, "dj.eager") == ["S"]
    assert seen == [["S"]]


def test_django_records_need_the_postgres_store(celery_config: dict[str, Any]) -> None:
    """reliable_django_database with records in Redis only is refused, not ignored."""
    from celery_reliable.config import ReliableSettings

    with pytest.raises(ConfigurationError, match="reliable_idempotency_store='postgres'"):
        ReliableSettings.from_conf({"reliable_django_database": "default",
                                    "reliable_idempotency_store": "redis"})


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


def test_a_stale_token_inside_the_record_transaction_leaves_no_row_and_no_record(
    app: Celery, engine: sa.Engine
) -> None:
    """A locked, idempotent task fencing inside idempotent_transaction(): the refused write
    takes the whole run with it (no row, no record), so the key stays free to run again."""
    from tests.django_project.shop.models import Order

    @app.task(base=ReliableTask, bind=True, shared=False, name="dj.both", lock="both:{n}",
              idempotency_key="both:{ref}")
    def both(self: Any, n: int, ref: str) -> str:
        with self.idempotent_transaction() as conn:
            Order.objects.create(ref=ref, amount=n)
            self.fence.check_postgres(conn)  # Django's connection, in the record's transaction
        return str(self.fence.resource)

    first, second = f"p-{secrets.token_hex(3)}", f"q-{secrets.token_hex(3)}"
    with running(app):
        resource = both.delay(7, first).get(timeout=60)
        with engine.begin() as conn:
            check_postgres(conn, resource, 2**62, holder="newer")
        with pytest.raises(Exception) as info:
            both.delay(7, second).get(timeout=60)
    assert type(info.value).__name__ == "StaleFenceToken", info.value
    assert orders(first) == 1 and orders(second) == 0
    assert records(engine, "dj.both") == ["S"]  # first's only


def test_django_not_set_up_is_a_configuration_error(database_url: str) -> None:
    """A worker that never ran django.setup() is told so by name, not with Django's
    ImproperlyConfigured from deep inside a claim."""
    code = (
        "import sqlalchemy as sa\n"
        "from celery_reliable.contrib.django.record import DjangoRecord\n"
        f"record = DjangoRecord(sa.create_engine({database_url!r}), 't', 'k', 'f', 60.0,\n"
        "                      alias='default', lock_timeout=None)\n"
        "try:\n"
        "    record.begin()\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.stdout.startswith("ConfigurationError"), done.stdout + done.stderr
    assert "django.setup()" in done.stdout


def test_the_record_alias_must_be_the_engines_database(django_db: None) -> None:
    """reliable_django_database on another database than reliable_database_url is refused:
    records would live apart from the tables the CLI and the dead letters use."""
    from celery_reliable.contrib.django.record import DjangoRecord

    admin = sa.create_engine(PG_ADMIN_URL)  # the server's 'postgres' database
    record = DjangoRecord(admin, "t", "k", "f", 60.0, alias="default", lock_timeout=5.0)
    with pytest.raises(ConfigurationError, match=r"in another database: .*database_url_from"):
        record.begin()
    admin.dispose()


def test_the_record_alias_must_reach_the_engines_tables(database_url: str,
                                                        django_db: None) -> None:
    """The same database, but the engine's search_path finds celery-reliable's tables in
    another schema (as the pytest plugin's per-test schema does): refused too."""
    from celery_reliable import create_tables
    from celery_reliable.contrib.django.record import DjangoRecord

    schema = f"s{secrets.token_hex(4)}"
    plain = sa.create_engine(database_url)
    with plain.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    elsewhere = sa.create_engine(database_url, connect_args={
        "options": f"-csearch_path={schema}"})
    try:
        create_tables(elsewhere)
        record = DjangoRecord(elsewhere, "t", "k", "f", 60.0, alias="default",
                              lock_timeout=5.0)
        with pytest.raises(ConfigurationError, match=r"another schema \(search_path\)"):
            record.begin()
    finally:
        elsewhere.dispose()
        with plain.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        plain.dispose()


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


BIND_ONLY = """
import sys
from celery import Celery
from celery_reliable import ReliableTask
app = Celery("bind", broker="memory://")
app.conf.update(reliable_django_database="default",
                reliable_database_url="postgresql://app@127.0.0.1:1/app")

@app.task(base=ReliableTask, bind=True, shared=False, idempotency_key="k:{n}")
def pay(self, n):
    return n

app.finalize()
print("celery_reliable.contrib.django.record" in sys.modules)
"""


def test_the_django_record_module_is_imported_when_the_task_binds() -> None:
    """With reliable_django_database, binding imports the record module, so a pool thread
    never imports it first (a thread's import through pytest's rewriter raced a traceback
    in another: "AST constructor recursion depth mismatch" in CPython 3.11)."""
    done = subprocess.run([sys.executable, "-c", BIND_ONLY], cwd=ROOT, capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True"]
