"""PostgreSQL faults met by idempotent tasks: missing tables, and an outage inside the task's
own transaction (real PostgreSQL, a TCP proxy the test cuts, real workers)."""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from celery import Celery
from celery.contrib.testing.worker import TestWorkController

from celery_reliable import ConfigurationError, ReliableTask
from celery_reliable.classify import is_missing_table, is_outage
from celery_reliable.schema import dead_letters, metadata

from .conftest import PG_ADMIN_URL, Fleet, TcpProxy, free_port, reliable_task, wait_for

effects = sa.Table(
    "pgfault_effects",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tag", sa.Text, nullable=False),
)


def count(url: str, tag: str) -> int:
    check = sa.create_engine(url)
    try:
        with check.connect() as conn:
            query = sa.select(sa.func.count()).where(effects.c.tag == tag)
            return int(conn.execute(query).scalar_one())
    finally:
        check.dispose()


def table_names(url: str) -> set[str]:
    check = sa.create_engine(url)
    try:
        return set(sa.inspect(check).get_table_names())
    finally:
        check.dispose()


@pytest.fixture
def bare_database() -> Iterator[str]:
    """A database of this test's own with the test's effects table but none of ours."""
    name = f"reliable_bare_{secrets.token_hex(4)}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    setup = sa.create_engine(url)
    effects.metadata.create_all(setup)
    setup.dispose()
    yield url
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def charge_task(app: Celery, tag: str, gate: Any = None, wrap: bool = False) -> Any:
    """An idempotent task whose effect row commits with its record (``wrap``: the body turns
    a database error into an error of its own)."""

    @reliable_task(app, name=f"t.pgfault.{tag}", idempotency_key="charge:{order_id}",
                   defer_delay=0.1, defer_max_delay=0.5)
    def charge(self: Any, order_id: int) -> dict[str, Any]:
        with self.idempotent_transaction() as session:
            if gate is not None:
                gate(self)
            try:
                session.execute(sa.insert(effects).values(tag=tag))
            except sa.exc.DBAPIError as exc:
                if wrap:
                    raise RuntimeError("could not store the charge") from exc
                raise
        return {"order": order_id, "retries": self.request.retries}

    return charge


# ------------------------------------------------------------------ missing tables


def test_first_task_creates_missing_tables_and_succeeds(
    celery_app: Celery, celery_worker: TestWorkController, bare_database: str, prefix: str
) -> None:
    """On a database without our tables, the first idempotent tasks (4 at once) create them
    and succeed: no deferral loop."""
    celery_app.conf.reliable_database_url = bare_database
    charge = charge_task(celery_app, prefix)
    celery_worker.reload()
    results = [charge.delay(n) for n in range(4)]  # 4 worker threads race to first use
    assert sorted(r.get(timeout=30)["order"] for r in results) == [0, 1, 2, 3]
    assert all(r.get()["retries"] == 0 for r in results)
    assert set(metadata.tables) <= table_names(bare_database)
    assert count(bare_database, prefix) == 4


def test_a_table_dropped_after_first_use_is_created_again(
    celery_app: Celery, celery_worker: TestWorkController, bare_database: str, prefix: str
) -> None:
    """The idempotency table dropped while workers run: the next task recreates it and runs."""
    celery_app.conf.reliable_database_url = bare_database
    charge = charge_task(celery_app, prefix)
    celery_worker.reload()
    assert charge.delay(1).get(timeout=30)["order"] == 1
    admin = sa.create_engine(bare_database)
    with admin.begin() as conn:
        conn.execute(sa.text("DROP TABLE reliable_idempotency"))
    admin.dispose()
    assert charge.delay(2).get(timeout=30)["order"] == 2
    assert "reliable_idempotency" in table_names(bare_database)
    assert count(bare_database, prefix) == 2


def test_missing_tables_without_create_fail_at_once_naming_migrate(
    celery_app: Celery,
    celery_worker: TestWorkController,
    bare_database: str,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """reliable_create_tables=False and no tables: FAILURE with a ConfigurationError naming
    `reliable migrate`, at once, never a deferral; nothing is created behind the user's back."""
    caplog.set_level(logging.INFO, logger="celery_reliable")
    celery_app.conf.reliable_database_url = bare_database
    celery_app.conf.reliable_create_tables = False
    charge = charge_task(celery_app, prefix)
    celery_worker.reload()
    result = charge.delay(1)
    wait_for(lambda: result.state in ("FAILURE", "RETRY"), 20, "the task to fail or defer")
    assert result.state == "FAILURE"
    with pytest.raises(ConfigurationError, match=r"celery -A \S+ reliable migrate"):
        result.get(timeout=5)
    assert not [r for r in caplog.records if "deferred" in r.getMessage()]
    assert table_names(bare_database) == {"pgfault_effects"}
    assert count(bare_database, prefix) == 0


def test_create_tables_setting_is_validated(celery_app: Celery) -> None:
    """A non-boolean reliable_create_tables fails when a task binds, naming the setting."""
    celery_app.conf.reliable_create_tables = "no"
    with pytest.raises(ConfigurationError, match="reliable_create_tables"):
        charge_task(celery_app, "validated")._get_current_object()  # evaluating binds it


@pytest.mark.slow
def test_worker_processes_starting_together_create_the_tables_once(
    fleet: Fleet, bare_database: str, prefix: str
) -> None:
    """4 worker processes meet a database without tables at once: every task succeeds."""
    from .test_fleet import fleet_app

    fleet.env["FLEET_DATABASE_URL"] = bare_database
    os.environ["FLEET_DATABASE_URL"] = bare_database
    module, app = fleet_app()
    sa_engine = sa.create_engine(bare_database)
    module.effects.metadata.create_all(sa_engine)
    sa_engine.dispose()
    fleet.start(n=2, concurrency=2)
    results = [app.send_task("fleet.charge", args=(f"{prefix}-{n}", n)) for n in range(12)]
    assert sorted(r.get(timeout=120)["amount"] for r in results) == list(range(12))
    assert set(metadata.tables) <= table_names(bare_database)


# ------------------------------------------------------ outage inside the transaction


@pytest.mark.parametrize("wrap", [False, True], ids=["raised", "re-raised-as-its-own"])
def test_outage_inside_idempotent_transaction_defers_then_runs_once(
    celery_app: Celery,
    celery_worker: TestWorkController,
    engine: sa.Engine,
    database_url: str,
    pg_proxy: TcpProxy,
    prefix: str,
    wrap: bool,
) -> None:
    """PostgreSQL cut while the body's statement runs in idempotent_transaction(): deferred
    (not failed, not dead-lettered, no retry used); once it is back, the task runs once.
    Also when the body turns the error into one of its own."""
    effects.metadata.create_all(engine)
    url = sa.make_url(database_url).set(port=pg_proxy.port)
    celery_app.conf.reliable_database_url = url.render_as_string(hide_password=False)
    inside, cut = threading.Event(), threading.Event()
    runs: list[int] = []

    def gate(task: Any) -> None:
        runs.append(task.request.retries)
        if len(runs) == 1:  # the first run waits inside the block until the cut
            inside.set()
            assert cut.wait(30)

    charge = charge_task(celery_app, prefix, gate, wrap)
    celery_worker.reload()
    result = charge.delay(7)
    assert inside.wait(30)
    pg_proxy.stop()
    cut.set()
    wait_for(lambda: result.state in ("RETRY", "FAILURE"), 20, "the cut to be met")
    assert result.state == "RETRY", result.state
    time.sleep(1.0)  # redeliveries meet PostgreSQL down: deferred again, nothing runs
    assert not result.ready()
    assert count(database_url, prefix) == 0 and runs == [0]
    pg_proxy.start()
    assert result.get(timeout=60) == {"order": 7, "retries": 0}
    assert result.state == "SUCCESS"
    assert count(database_url, prefix) == 1 and runs == [0, 0]
    with engine.connect() as conn:
        letters = conn.execute(
            sa.select(sa.func.count()).where(dead_letters.c.task_id == result.id)
        ).scalar_one()
    assert letters == 0


def test_the_task_own_error_inside_the_transaction_still_fails(
    celery_app: Celery, celery_worker: TestWorkController, engine: sa.Engine, prefix: str
) -> None:
    """Not an outage: the body's IntegrityError inside idempotent_transaction() is a FAILURE."""
    effects.metadata.create_all(engine)

    @celery_app.task(base=ReliableTask, bind=True, shared=False, name=f"t.pgdup.{prefix}",
                     idempotency_key="dup:{n}", defer_delay=0.1, defer_max_delay=0.5)
    def duplicate_row(self: Any, n: int) -> None:
        with self.idempotent_transaction() as session:
            session.execute(sa.insert(effects).values(id=-n, tag=prefix))
            session.execute(sa.insert(effects).values(id=-n, tag=prefix))

    celery_worker.reload()
    result = duplicate_row.delay(secrets.randbelow(10**9) + 1)
    with pytest.raises(Exception, match="UniqueViolation"):
        result.get(timeout=20)
    assert result.state == "FAILURE"


def test_a_commit_refused_for_the_task_own_rows_fails_not_defers(
    celery_app: Celery, celery_worker: TestWorkController, engine: sa.Engine, prefix: str
) -> None:
    """A deferred constraint refusing the commit is the task's failure, not an outage:
    FAILURE with the UniqueViolation, not a deferral loop."""
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE IF NOT EXISTS pgfault_deferred (n int, CONSTRAINT "
                             "pgfault_deferred_n UNIQUE (n) DEFERRABLE INITIALLY DEFERRED)"))

    @celery_app.task(base=ReliableTask, bind=True, shared=False, name=f"t.pgcommit.{prefix}",
                     idempotency_key="c:{n}", defer_delay=0.1, defer_max_delay=0.5)
    def twice(self: Any, n: int) -> None:
        with self.idempotent_transaction() as session:
            for _ in range(2):  # accepted now, refused at COMMIT
                session.execute(sa.text("INSERT INTO pgfault_deferred VALUES (:n)"), {"n": n})

    celery_worker.reload()
    result = twice.delay(secrets.randbelow(10**9))
    wait_for(lambda: result.state in ("FAILURE", "RETRY"), 20, "the commit to be refused")
    assert result.state == "FAILURE"
    with pytest.raises(Exception, match="UniqueViolation"):
        result.get(timeout=5)


def test_another_connection_refused_inside_the_transaction_is_the_task_own_failure(
    celery_app: Celery, celery_worker: TestWorkController, engine: sa.Engine, prefix: str
) -> None:
    """A connection of the body's own refused inside idempotent_transaction() (a wrong URL)
    leaves the library's transaction alive: a FAILURE, not an endless deferral."""
    effects.metadata.create_all(engine)
    nowhere = sa.create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x")

    def gate(task: Any) -> None:
        with nowhere.connect():
            pass  # pragma: no cover - refused

    charge = charge_task(celery_app, prefix, gate)
    celery_worker.reload()
    result = charge.delay(1)
    wait_for(lambda: result.state in ("FAILURE", "RETRY"), 20, "the refused connection")
    assert result.state == "FAILURE"
    assert count(str(engine.url.render_as_string(hide_password=False)), prefix) == 0


@pytest.mark.parametrize("uses_session", [True, False], ids=["session", "no-session"])
def test_a_body_longer_than_idle_in_transaction_timeout_fails_once_not_loops(
    celery_app: Celery, celery_worker: TestWorkController, engine: sa.Engine,
    database_url: str, prefix: str, uses_session: bool
) -> None:
    """A server-side idle_in_transaction_session_timeout shorter than the body ends the task's
    transaction: a body that used idempotent_transaction() fails once with 25P03
    (dead-lettered, nothing committed), never deferred into the same timeout again; one
    that did not still succeeds, its record committed on its own."""
    effects.metadata.create_all(engine)
    url = sa.make_url(database_url).update_query_dict(
        {"options": "-c idle_in_transaction_session_timeout=300"})
    celery_app.conf.reliable_database_url = url.render_as_string(hide_password=False)
    runs: list[int] = []

    @celery_app.task(base=ReliableTask, bind=True, shared=False, name=f"t.pgidle.{prefix}",
                     idempotency_key="idle:{n}", defer_delay=0.1, defer_max_delay=0.5)
    def slow(self: Any, n: int) -> int:
        runs.append(n)
        if uses_session:
            with self.idempotent_transaction() as session:
                session.execute(sa.insert(effects).values(tag=prefix))
        time.sleep(1.0)  # the transaction sits idle past the server's 0.3 s
        return n

    celery_worker.reload()
    result = slow.delay(1)
    wait_for(lambda: result.state in ("FAILURE", "RETRY", "SUCCESS"), 20, "the task to end")
    time.sleep(1.0)  # a deferral would have run it again by now
    assert runs == [1]
    with engine.connect() as conn:
        reasons = conn.execute(sa.select(dead_letters.c.exc_type).where(
            dead_letters.c.task_id == result.id)).scalars().all()
    if not uses_session:
        assert (result.state, result.get(timeout=5), reasons) == ("SUCCESS", 1, [])
        assert slow.delay(1).get(timeout=10) == 1 and runs == [1]  # the record holds
        return
    assert result.state == "FAILURE", result.state
    with pytest.raises(Exception, match="idle-in-transaction timeout"):
        result.get(timeout=5)
    assert count(database_url, prefix) == 0 and reasons == ["InternalError"]


# ------------------------------------------------------------------ the classifier


def test_is_outage_tells_outages_from_the_task_own_errors(
    engine: sa.Engine, database_url: str, pg_proxy: TcpProxy
) -> None:
    """Real PostgreSQL errors: a cut link, a refused connection and a terminated backend are
    outages; a constraint, a missing table, a permission error and a timeout are not."""
    found: dict[str, BaseException] = {}

    def error(name: str, conn: Any, sql: str) -> None:
        try:
            conn.execute(sa.text(sql))
        except sa.exc.DBAPIError as exc:
            found[name] = exc
        else:  # pragma: no cover - the statement must fail
            raise AssertionError(f"{sql} did not fail")

    with engine.connect() as conn:
        error("missing", conn, "SELECT * FROM reliable_no_such_table")
        conn.rollback()
        error("data", conn, "SELECT 1/0")  # a DataError: the task's own
        conn.rollback()
        error("integrity", conn, "CREATE TEMP TABLE u (i int PRIMARY KEY); "
              "INSERT INTO u VALUES (1), (1)")
        conn.rollback()
        error("timeout", conn, "SET LOCAL statement_timeout = 10; SELECT pg_sleep(1)")
        conn.rollback()
        error("permission", conn, "SET LOCAL ROLE pg_monitor; CREATE TABLE reliable_x (i int)")
        conn.rollback()
    proxied = sa.create_engine(sa.make_url(database_url).set(port=pg_proxy.port))
    try:
        with proxied.connect() as victim, engine.connect() as killer:
            pid = victim.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
            killer.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
            error("terminated", victim, "SELECT 1")
        with proxied.connect() as cut:
            cut.execute(sa.text("SELECT 1"))
            pg_proxy.stop()
            error("cut", cut, "SELECT 1")
        try:
            proxied.connect()
        except sa.exc.OperationalError as exc:
            found["refused"] = exc
    finally:
        proxied.dispose()
    assert isinstance(found["terminated"].orig, psycopg.errors.AdminShutdown)  # type: ignore[attr-defined]
    assert {name for name, exc in found.items() if is_outage(exc)} == {
        "terminated", "cut", "refused"}
    assert is_outage(found["refused"].orig)  # type: ignore[attr-defined]  # the driver's own
    assert [name for name, exc in found.items() if is_missing_table(exc)] == ["missing"]
    assert not is_outage(ValueError("not a store error"))
