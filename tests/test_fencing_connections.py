"""check_postgres joins the caller's transaction on every connection it accepts (SQLAlchemy
Connection and Session, raw psycopg 3, Django), and refuses anything else by name."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from celery_reliable import ConfigurationError, StaleFenceToken, check_postgres
from celery_reliable.fencing import _CHECK, driver_statement

from .django_project import project

KINDS = ["sqlalchemy-connection", "sqlalchemy-session", "psycopg", "django"]

#: (connection to check on, run(sql, params) in the same transaction)
Caller = tuple[Any, Callable[[str, dict[str, Any]], None]]


@pytest.fixture(scope="module")
def django_db(database_url: str) -> Iterator[None]:
    with project(database_url):
        yield


@pytest.fixture
def scratch(engine: sa.Engine) -> str:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE IF NOT EXISTS fence_scratch (ref text)"))
    return "fence_scratch"


def psycopg_url(database_url: str) -> str:
    return sa.make_url(database_url).set(drivername="postgresql").render_as_string(
        hide_password=False)


@pytest.fixture
def caller(kind: str, engine: sa.Engine, database_url: str,
           django_db: None) -> Callable[[], AbstractContextManager[Caller]]:
    """A transaction of the given kind: commits on leaving, rolls back on an exception."""

    @contextmanager
    def open_transaction() -> Iterator[Caller]:
        if kind == "sqlalchemy-connection":
            with engine.begin() as conn:
                yield conn, lambda sql, params: conn.execute(sa.text(sql), params) and None
        elif kind == "sqlalchemy-session":
            with Session(engine) as session, session.begin():
                yield session, lambda sql, params: session.execute(sa.text(sql), params) and None
        elif kind == "psycopg":
            with psycopg.connect(psycopg_url(database_url)) as raw:  # commits on leaving
                yield raw, lambda sql, params: raw.execute(
                    sql.replace(":ref", "%(ref)s"), params) and None
        else:
            from django.db import connections, transaction

            conn = connections["default"]
            with transaction.atomic(using="default"):
                def run(sql: str, params: dict[str, Any]) -> None:
                    with conn.cursor() as cursor:
                        cursor.execute(sql.replace(":ref", "%(ref)s"), params)

                yield conn, run

    return open_transaction


def fence_row(engine: sa.Engine, resource: str) -> int | None:
    with engine.connect() as conn:
        token = conn.execute(sa.text("SELECT token FROM reliable_fences WHERE resource = :r"),
                             {"r": resource}).scalar()
    return int(token) if token is not None else None


def scratch_rows(engine: sa.Engine, ref: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM fence_scratch WHERE ref = :r"),
                                {"r": ref}).scalar_one())


@pytest.mark.parametrize("kind", KINDS)
def test_check_commits_and_rolls_back_with_the_callers_write(
    kind: str, caller: Callable[[], AbstractContextManager[Caller]], engine: sa.Engine,
    scratch: str, prefix: str,
) -> None:
    """The check is invisible until the caller commits, undone by its rollback, and a stale
    token is refused before the caller's write, on every kind of connection."""
    resource = f"{prefix}:{kind}"
    with pytest.raises(RuntimeError, match="caller failed"), caller() as (conn, write):
        check_postgres(conn, resource, 5, holder="a")
        write("INSERT INTO fence_scratch (ref) VALUES (:ref)", {"ref": resource})
        assert fence_row(engine, resource) is None  # not committed: the caller's transaction
        raise RuntimeError("caller failed")
    assert fence_row(engine, resource) is None and scratch_rows(engine, resource) == 0

    with caller() as (conn, write):
        check_postgres(conn, resource, 5, holder="a")
        write("INSERT INTO fence_scratch (ref) VALUES (:ref)", {"ref": resource})
    assert fence_row(engine, resource) == 5 and scratch_rows(engine, resource) == 1

    with pytest.raises(StaleFenceToken) as info, caller() as (conn, write):
        check_postgres(conn, resource, 4, holder="b")
        write("INSERT INTO fence_scratch (ref) VALUES (:ref)", {"ref": resource})
    assert info.value.current == 5 and info.value.token == 4
    assert scratch_rows(engine, resource) == 1


@pytest.mark.parametrize("wrong", ["engine", "sqlite", "none"])
def test_other_objects_are_refused_naming_what_is_accepted(
    wrong: str, engine: sa.Engine
) -> None:
    """An engine (a common slip), another database's connection or None: a TypeError that
    names the accepted kinds, before any I/O."""
    conn: Any = {"engine": engine, "sqlite": sqlite3.connect(":memory:"), "none": None}[wrong]
    with pytest.raises(TypeError, match="SQLAlchemy Connection or Session, a psycopg 3 "
                                        "connection, or a Django connection"):
        check_postgres(conn, "r", 1)


def test_a_connection_without_a_transaction_to_join_is_refused(
    database_url: str, django_db: None, engine: sa.Engine
) -> None:
    """SQLAlchemy in AUTOCOMMIT, psycopg in autocommit and Django outside atomic() would
    commit the check on its own, apart from the write: refused, saying how to open one."""
    with engine.connect() as conn:
        auto = conn.execution_options(isolation_level="AUTOCOMMIT")
        with pytest.raises(ConfigurationError, match="AUTOCOMMIT"):
            check_postgres(auto, "r", 1)
        with pytest.raises(ConfigurationError, match="AUTOCOMMIT"):
            check_postgres(Session(bind=auto), "r", 1)
    with psycopg.connect(psycopg_url(database_url), autocommit=True) as raw:
        with pytest.raises(ConfigurationError, match=r"conn\.transaction\(\)"):
            check_postgres(raw, "r", 1)
        with raw.transaction():  # joined: fine
            check_postgres(raw, "autocommit-joined", 1)
    from django.db import connections

    with pytest.raises(ConfigurationError, match=r"transaction\.atomic\(using='default'\)"):
        check_postgres(connections["default"], "r", 1)


def test_the_driver_sql_is_the_statement_sqlalchemy_runs(engine: sa.Engine) -> None:
    """The psycopg text is compiled from the same statement SQLAlchemy executes, with
    psycopg placeholders and no constants left behind."""
    sql, constants = driver_statement(_CHECK)
    assert "%(p_resource)s" in sql and "%(p_token)s" in sql and "%(p_holder)s" in sql
    assert set(constants) == {"p_resource", "p_token", "p_holder"}
    assert sql == str(_CHECK.compile(dialect=engine.dialect))
