"""Failures are loud and say what to do: the start-up check of every store, rate-limited
warnings and the ``reliable_store_up`` gauge while one is unreachable, unknown
``reliable_*`` settings, and a task that forgot ``bind=True``.

Real servers throughout; "unreachable" is a closed free port.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery

from celery_reliable import ConfigurationError, ReliableTask, StorageError, metrics
from celery_reliable.health import REDIS, StoreReporter, check_stores, mask_url, report_startup
from tests.conftest import (
    PG_ADMIN_URL,
    ROOT,
    Fleet,
    RedisServer,
    TcpProxy,
    free_port,
    wait_for,
)

SECRET = "s3cr3t-pw"


def closed_redis_url() -> str:
    return f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"


def closed_pg_url() -> str:
    return f"postgresql://postgres:{SECRET}@127.0.0.1:{free_port()}/nope"


def make_app(**conf: Any) -> Celery:
    app = Celery(f"loud{secrets.token_hex(3)}", broker="memory://", backend="cache+memory://")
    app.conf.update(reliable_key_prefix=f"loud{secrets.token_hex(3)}", **conf)

    @app.task(base=ReliableTask, bind=True, shared=False, name="loud.locked", lock="r:{n}")
    def locked(self: ReliableTask, n: int) -> int:
        return n

    return app


def gauge(store: str) -> float | None:
    return metrics.gauge_value("reliable_store_up", store=store)


# ------------------------------------------------------------------ start-up check


def test_startup_check_names_each_unreachable_store_its_masked_url_and_the_fix(
        caplog: pytest.LogCaptureFixture) -> None:
    """Redis and PostgreSQL down at start: one ERROR each, URL without password, the fix."""
    redis_url, pg_url = closed_redis_url(), closed_pg_url()
    app = make_app(reliable_redis_url=redis_url, reliable_database_url=pg_url)
    caplog.set_level(logging.INFO, logger="celery_reliable")
    started = time.monotonic()
    findings = report_startup(app, timeout=2.0)
    assert time.monotonic() - started < 10  # short timeouts: a worker start never hangs

    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2, errors
    redis_line = next(m for m in errors if "Redis" in m)
    pg_line = next(m for m in errors if "PostgreSQL" in m)
    assert f"Redis at {mask_url(redis_url)} (reliable_redis_url) is unreachable" in redis_line
    assert ":***@127.0.0.1" in redis_line and "start Redis at 127.0.0.1:" in redis_line
    assert "fix reliable_redis_url" in redis_line
    assert "PostgreSQL at postgresql://postgres:***@127.0.0.1:" in pg_line
    assert "unreachable" in pg_line and "fix reliable_database_url" in pg_line
    assert SECRET not in caplog.text
    assert {f.store: f.up for f in findings} == {"redis": False, "postgres": False}
    assert gauge("redis") == 0 and gauge("postgres") == 0


def test_startup_check_says_the_stores_answer(
        redis_url: str, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Both stores up, tables present: INFO lines only, gauges 1."""
    app = make_app(reliable_redis_url=redis_url, reliable_database_url=database_url)
    caplog.set_level(logging.INFO, logger="celery_reliable")
    findings = report_startup(app)
    assert [f.level for f in findings] == [logging.INFO, logging.INFO], findings
    assert "answers" in findings[0].message and "tables present" in findings[1].message
    assert gauge("redis") == 1 and gauge("postgres") == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_startup_check_of_stalled_stores_is_bounded(
        redis_server: RedisServer, database_url: str, pg_proxy: TcpProxy) -> None:
    """Redis and PostgreSQL accept connections but never answer: the check still returns."""
    redis_proxy = TcpProxy(redis_server.port)
    redis_proxy.start()
    try:
        redis_proxy.stall()
        pg_proxy.stall()
        pg_url = sa.make_url(database_url).set(host="127.0.0.1", port=pg_proxy.port)
        app = make_app(reliable_redis_url=f"redis://127.0.0.1:{redis_proxy.port}/0",
                       reliable_database_url=pg_url.render_as_string(hide_password=False))
        started = time.monotonic()
        findings = check_stores(app, timeout=1.0)
        assert time.monotonic() - started < (2 * 1.0 + 1) + 2  # the checks run at once
    finally:
        redis_proxy.stop()
    assert [(f.store, f.level, f.up) for f in findings] == [
        ("redis", logging.ERROR, False), ("postgres", logging.ERROR, False)], findings


@pytest.fixture
def empty_database() -> Iterator[str]:
    """A database of this test's own, without celery-reliable's tables."""
    name = f"reliable_loud_{secrets.token_hex(4)}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield admin.url.set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_startup_check_missing_tables_is_an_error_only_when_they_are_not_created(
        redis_url: str, empty_database: str) -> None:
    """No tables and reliable_create_tables=False: ERROR naming `reliable migrate`."""
    off = make_app(reliable_redis_url=redis_url, reliable_database_url=empty_database,
                   reliable_create_tables=False)
    pg = check_stores(off)[1]
    assert pg.level == logging.ERROR
    assert "reliable_idempotency" in pg.message
    assert f"`celery -A {off.main} reliable migrate`" in pg.message

    on = make_app(reliable_redis_url=redis_url, reliable_database_url=empty_database)
    pg = check_stores(on)[1]
    assert pg.level == logging.INFO and "created when first needed" in pg.message


def test_a_worker_without_reliable_tasks_checks_nothing(
        caplog: pytest.LogCaptureFixture) -> None:
    """No ReliableTask in the app: no check, no log line, even with a dead Redis URL."""
    other = Celery("declares-a-shared-one", broker="memory://")

    @other.task(base=ReliableTask, bind=True, name=f"loud.shared{secrets.token_hex(3)}")
    def shared(self: ReliableTask) -> None: ...  # Celery copies it into every app

    other.finalize()
    app = Celery("plain", broker="memory://")
    app.conf.update(reliable_redis_url=closed_redis_url())

    @app.task(shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    caplog.set_level(logging.DEBUG, logger="celery_reliable")
    assert report_startup(app) == []
    assert caplog.records == []


def test_a_real_worker_says_redis_is_unreachable_at_start_and_while_it_defers(
        fleet: Fleet) -> None:
    """`celery worker` with Redis down: an ERROR at start, then a WARNING with the count."""
    url = closed_redis_url()
    fleet.env["FLEET_REDIS_URL"] = url
    fleet.start(n=1, concurrency=1)
    wanted = f"Redis at {mask_url(url)} (reliable_redis_url) is unreachable"
    wait_for(lambda: wanted in fleet.logs(), 30, "the start-up ERROR in the worker's log")
    assert "start Redis at 127.0.0.1:" in fleet.logs()  # (fleet.logs() keeps only the tail)

    sender = Celery("sender", broker=fleet.env["FLEET_BROKER_URL"])
    sender.send_task("fleet.exclusive", args=["k", 0.0], queue=fleet.env["FLEET_QUEUE"])
    wait_for(lambda: "task(s) deferred by this process so far" in fleet.logs(), 60,
             "the deferral WARNING in the worker's log")
    assert SECRET not in fleet.logs()


# ------------------------------------------------------------------ while a store is down


def test_reporter_warns_at_most_once_per_interval_with_the_deferred_count(
        caplog: pytest.LogCaptureFixture) -> None:
    """Deferrals while Redis is down: one WARNING per 30 s with the count, one on recovery."""
    now = [1000.0]
    reporter = StoreReporter(REDIS, closed_redis_url(), interval=30.0, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="celery_reliable")
    error = ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    for _ in range(5):  # 5 deferrals within a second: one WARNING
        reporter.failed(error)
        now[0] += 0.2
    assert len(warnings()) == 1
    assert "1 task(s) deferred by this process so far" in warnings()[0]
    assert "Connection refused" in warnings()[0] and ":***@127.0.0.1" in warnings()[0]
    assert gauge("redis") == 0

    now[0] = 1029.0  # still within the interval: silent
    reporter.failed(error)
    assert len(warnings()) == 1
    now[0] = 1030.5
    reporter.failed(error)  # 4 + 1 + 1 since the first report
    assert len(warnings()) == 2
    assert "6 task(s) deferred by this process in the last 30s" in warnings()[1]

    reporter.failed(error)
    reporter.ok()
    assert gauge("redis") == 1
    assert len(warnings()) == 3
    assert "answers again; 1 more task(s)" in warnings()[2]
    reporter.ok()  # nothing changed: silent
    assert len(warnings()) == 3
    assert SECRET not in caplog.text


def test_admission_without_redis_reports_and_sets_the_gauge(
        redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """The pipeline's admission calls the reporter: WARNING and gauge 0, then gauge 1."""
    down = make_app(reliable_redis_url=closed_redis_url())
    caplog.set_level(logging.WARNING, logger="celery_reliable")
    with pytest.raises(StorageError):  # eager: nothing can re-publish it
        down.tasks["loud.locked"].apply(args=[1], throw=True)
    assert gauge("redis") == 0
    assert "(reliable_redis_url) is unreachable" in caplog.text and SECRET not in caplog.text

    up = make_app(reliable_redis_url=redis_url)
    assert up.tasks["loud.locked"].apply(args=[2], throw=True).get() == 2
    assert gauge("redis") == 1


def test_durable_claim_without_postgres_reports_and_sets_the_gauge(
        redis_url: str, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """An idempotent task finding PostgreSQL down: WARNING with the masked URL, gauge 0; then 1."""
    def idempotent_app(pg_url: str) -> Celery:
        app = make_app(reliable_redis_url=redis_url, reliable_database_url=pg_url)

        @app.task(base=ReliableTask, bind=True, shared=False, name="loud.once",
                  idempotency_key="once:{n}")
        def once(self: ReliableTask, n: int) -> int:
            return n

        return app

    caplog.set_level(logging.WARNING, logger="celery_reliable")
    down = idempotent_app(closed_pg_url())
    with pytest.raises(StorageError):  # eager: nothing can re-publish it
        down.tasks["loud.once"].apply(args=[1], throw=True)
    assert gauge("postgres") == 0
    assert "PostgreSQL at postgresql://postgres:***@127.0.0.1:" in caplog.text
    assert "(reliable_database_url) is unreachable" in caplog.text and SECRET not in caplog.text

    up = idempotent_app(database_url)
    assert up.tasks["loud.once"].apply(args=[secrets.randbelow(10**9) + 1], throw=True).get()
    assert gauge("postgres") == 1


# ------------------------------------------------------------------ unknown settings


@pytest.mark.parametrize(("key", "suggestion"), [
    ("reliable_redis_uri", "reliable_redis_url"),
    ("reliable_queue_rate_limit", "reliable_queue_rate_limits"),
    ("RELIABLE_REDIS_URL", "reliable_redis_url"),  # Celery would never read it
])
def test_an_unknown_reliable_setting_fails_at_bind_with_did_you_mean(
        key: str, suggestion: str) -> None:
    """A misspelt reliable_* setting is refused when a ReliableTask is bound, with a hint."""
    app = Celery("typo", broker="memory://")
    app.conf.update({key: "redis://127.0.0.1:6379/0"}, broker_pool_limit=3)
    with pytest.raises(ConfigurationError,
                       match=f"unknown setting '{key}'; did you mean '{suggestion}'"):
        @app.task(base=ReliableTask, bind=True, shared=False)
        def t(self: ReliableTask) -> None: ...

        app.finalize()


def test_namespaced_settings_are_read_and_checked() -> None:
    """config_from_object(namespace="CELERY"): CELERY_RELIABLE_* is ours, the rest is not."""

    class Good:
        CELERY_RELIABLE_KEY_PREFIX = "ns"
        CELERY_BROKER_URL = "memory://"
        DATABASES: dict[str, Any] = {}  # a Django setting: not ours
        RELIABLE_SOMETHING_ELSE = 1  # an UPPER_CASE non-namespaced key: not read, not ours

    app = Celery("ns")
    app.config_from_object(Good, namespace="CELERY")

    @app.task(base=ReliableTask, bind=True, shared=False, name="ns.t")
    def t(self: ReliableTask) -> None: ...

    app.finalize()
    from celery_reliable.runtime import runtime_for

    assert runtime_for(app).settings.key_prefix == "ns"

    class Bad:
        CELERY_RELIABLE_KEY_PREFX = "ns"

    bad = Celery("ns-bad")
    bad.config_from_object(Bad, namespace="CELERY")
    with pytest.raises(ConfigurationError, match="did you mean 'CELERY_RELIABLE_KEY_PREFIX'"):
        @bad.task(base=ReliableTask, bind=True, shared=False)
        def u(self: ReliableTask) -> None: ...

        bad.finalize()


TYPO_APP = textwrap.dedent("""
    from celery import Celery
    from celery_reliable import ReliableTask

    app = Celery("typo_app", broker="memory://")
    app.conf.update(reliable_redis_uri="redis://127.0.0.1:6379/0")

    @app.task(base=ReliableTask, bind=True)
    def job(self):
        return 1
""")


def test_a_worker_with_an_unknown_setting_does_not_start(tmp_path: Path) -> None:
    """`celery worker` on an app with reliable_redis_uri exits with the did-you-mean error."""
    (tmp_path / "typo_app.py").write_text(TYPO_APP)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "typo_app", "worker", "-P", "solo",
         "--without-mingle", "--without-gossip", "--without-heartbeat"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert ("unknown setting 'reliable_redis_uri'; did you mean 'reliable_redis_url'"
            in proc.stdout + proc.stderr), proc.stderr[-3000:]


# ------------------------------------------------------------------ bind=True


def test_a_task_taking_self_without_bind_is_refused_with_the_fix() -> None:
    """`def f(self, ...)` without bind=True fails at declaration, saying to add bind=True."""
    app = Celery("bind", broker="memory://")
    with pytest.raises(ConfigurationError, match=r"add bind=True"):
        @app.task(base=ReliableTask, shared=False, lock="o:{order_id}")
        def charge(self: Any, order_id: int) -> None: ...

        app.finalize()


def test_legit_unbound_and_bound_tasks_are_accepted() -> None:
    """No `self` without bind, `self` with bind, a class-based task: all fine."""
    app = Celery("bind-ok", broker="memory://")

    @app.task(base=ReliableTask, shared=False, lock="o:{order_id}")
    def plain(order_id: int) -> int:
        return order_id

    @app.task(base=ReliableTask, bind=True, shared=False, lock="o:{order_id}")
    def bound(self: ReliableTask, order_id: int) -> int:
        return order_id

    class ClassBased(ReliableTask):
        name = "bind-ok.class_based"
        lock = "o:{order_id}"

        def run(self, order_id: int) -> int:
            return order_id

    app.register_task(ClassBased())
    app.finalize()
    assert plain(3) == 3 and bound(4) == 4
