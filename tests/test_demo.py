"""The demo: its verdict logic, its one-line service errors, the Compose file, full runs
on a Redis and on a RabbitMQ broker, and its cleanup."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import kombu
import pytest
import redis
import sqlalchemy as sa

from demo_project import checks
from demo_project.checks import (
    BucketRun,
    Duplicates,
    KilledPayment,
    PartnerCall,
    PartnerOutage,
    PausedHolder,
    ReportFlood,
    Singleton,
    Verdict,
)
from demo_project.ui import PlainUI

from .conftest import RedisServer, _missing, free_port, new_database

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- checks.py


def dup(**kw: Any) -> Duplicates:
    result = {"order_id": "o1", "token": 7, "pid": 11}
    base: dict[str, Any] = dict(submissions=5, states=["SUCCESS"] * 5, results=[result] * 5,
                                executions=1, effect_rows=1)
    return Duplicates(**{**base, **kw})


def test_duplicates_pass() -> None:
    verdict = checks.check_duplicates(dup())
    assert verdict.passed
    assert "1 payment row" in verdict.observed and "1 distinct" in verdict.observed


@pytest.mark.parametrize("change", [
    {"effect_rows": 2},
    {"effect_rows": 0},
    {"executions": 2},
    {"states": ["SUCCESS"] * 4 + ["FAILURE"]},
    {"results": [{"token": 7}] * 4 + [{"token": 8}]},
    {"states": ["SUCCESS"] * 4, "results": [{"token": 7}] * 4},  # one result missing
    {"submissions": 1, "states": ["SUCCESS"], "results": [{}]},  # nothing was duplicated
])
def test_duplicates_fail(change: dict[str, Any]) -> None:
    assert not checks.check_duplicates(dup(**change)).passed


def killed(**kw: Any) -> KilledPayment:
    base: dict[str, Any] = dict(killed_pid=100, rows_at_kill=0, executions=2,
                                final_state="SUCCESS", result_pid=101, effect_rows=1)
    return KilledPayment(**{**base, **kw})


def test_killed_payment_pass() -> None:
    assert checks.check_killed_payment(killed()).passed


@pytest.mark.parametrize("change", [
    {"effect_rows": 2},  # the redelivery ran the effect again
    {"effect_rows": 0},  # the payment was lost
    {"rows_at_kill": 1},  # the row had committed before the kill: not a mid-payment kill
    {"killed_pid": None},
    {"executions": 1},  # never redelivered
    {"final_state": "FAILURE"},
    {"result_pid": 100},  # "succeeded" in the process that was killed
    {"result_pid": None},
])
def test_killed_payment_fail(change: dict[str, Any]) -> None:
    assert not checks.check_killed_payment(killed(**change)).passed


def paused(**kw: Any) -> PausedHolder:
    base: dict[str, Any] = dict(lock_ttl=2.0, paused_for=2.6, expired_while_paused=True,
                                holder_token=10, holder_state="FAILURE",
                                holder_error="StaleFenceToken", holder_rows=0, taker_token=11,
                                taker_state="SUCCESS", order_status=("cancelled", 11),
                                fence_token=11)
    return PausedHolder(**{**base, **kw})


def test_paused_holder_pass() -> None:
    verdict = checks.check_paused_holder(paused())
    assert verdict.passed and "cancelled@11" in verdict.observed


@pytest.mark.parametrize("change", [
    {"paused_for": 1.5},  # not past the lock's TTL
    {"expired_while_paused": False},
    {"taker_token": 9},  # the new holder's token must be higher
    {"taker_token": None, "taker_state": "FAILURE"},
    {"holder_state": "SUCCESS", "holder_error": None},  # the stale write went through
    {"holder_rows": 1},
    {"holder_error": "ValueError"},
    {"order_status": ("captured", 10)},
    {"fence_token": 10},
])
def test_paused_holder_fail(change: dict[str, Any]) -> None:
    assert not checks.check_paused_holder(paused(**change)).passed


def outage(**kw: Any) -> PartnerOutage:
    calls = [PartnerCall(at=1.0, ok=False, retries=0, prev_delay=None),
             PartnerCall(at=1.1, ok=False, retries=0, prev_delay=None),
             PartnerCall(at=1.2, ok=False, retries=0, prev_delay=None),
             PartnerCall(at=3.0, ok=False, retries=1, prev_delay=0.13),
             PartnerCall(at=5.0, ok=True, retries=2, prev_delay=0.31),
             PartnerCall(at=5.1, ok=True, retries=1, prev_delay=0.07),
             PartnerCall(at=5.2, ok=True, retries=1, prev_delay=0.18),
             PartnerCall(at=5.3, ok=True, retries=0, prev_delay=None)]
    base: dict[str, Any] = dict(tasks=4, states=["SUCCESS"] * 4, outage=4.0,
                                opened_while_down=True, final_breaker=0, deferred_tasks=3,
                                calls=calls, bound=12, failure_threshold=3, open_seconds=2.0,
                                backoff=(0.2, 2.0, "full"))
    return PartnerOutage(**{**base, **kw})


def test_breaker_and_jitter_pass() -> None:
    assert checks.check_breaker(outage()).passed
    verdict = checks.check_retry_jitter(outage())
    assert verdict.passed and "4 retries" in verdict.observed


@pytest.mark.parametrize("change", [
    {"opened_while_down": False},
    {"final_breaker": 1},
    {"final_breaker": 2},
    {"states": ["SUCCESS"] * 3 + ["FAILURE"]},  # a task failed instead of deferring
    {"states": ["SUCCESS"] * 3},
    {"deferred_tasks": 0},
    {"bound": 3},  # more calls reached the partner while down than a breaker allows
    {"calls": [PartnerCall(at=1.0, ok=True, retries=0, prev_delay=None)]},  # never failed
])
def test_breaker_fail(change: dict[str, Any]) -> None:
    assert not checks.check_breaker(outage(**change)).passed


def test_retry_jitter_fail() -> None:
    same = [PartnerCall(at=1.0, ok=True, retries=1, prev_delay=0.1),
            PartnerCall(at=1.1, ok=True, retries=1, prev_delay=0.1)]
    assert not checks.check_retry_jitter(outage(calls=same)).passed  # lockstep: no jitter
    too_long = [PartnerCall(at=1.0, ok=True, retries=1, prev_delay=0.25)]  # > base * 2**0
    assert not checks.check_retry_jitter(outage(calls=too_long)).passed
    capped = [PartnerCall(at=1.0, ok=True, retries=6, prev_delay=2.5)]  # > cap
    assert not checks.check_retry_jitter(outage(calls=capped)).passed
    unknown = [PartnerCall(at=1.0, ok=True, retries=1, prev_delay=None)]
    assert not checks.check_retry_jitter(outage(calls=unknown)).passed
    assert not checks.check_retry_jitter(outage(calls=[])).passed  # nothing retried
    assert not checks.check_retry_jitter(outage(states=["SUCCESS"] * 3 + ["FAILURE"])).passed


def test_breaker_call_bound() -> None:
    # 2 failures before the 3rd opens it, 6 in flight, 2 probes in each of 2 open periods
    assert checks.breaker_call_bound(6, 3, 2, outage=4.0, open_seconds=2.0) == 12
    assert checks.breaker_call_bound(1, 1, 1, outage=0.5, open_seconds=2.0) == 2


def paced(rate: float, n: int, burst: int = 0, start: float = 100.0) -> list[float]:
    """``burst`` starts at once, then one every 1/rate seconds."""
    return [start] * burst + [start + (i + 1) / rate for i in range(n - burst)]


def test_steady_rate_and_window() -> None:
    starts = paced(20, 100, burst=5)
    assert checks.steady_rate(starts, burst=5) == pytest.approx(20, rel=0.01)
    assert checks.max_in_window(starts, 1.0) == 5 + 19  # the burst + a second's worth
    assert checks.steady_rate(starts[:8], burst=5) is None  # too few to measure
    # A slow tail (the backlog is gone) does not drag the steady rate down.
    tail = [*starts, starts[-1] + 1.0, starts[-1] + 2.0]
    assert checks.steady_rate(tail, burst=5) == pytest.approx(20, rel=0.05)


def bucket(**kw: Any) -> BucketRun:
    starts = paced(20, 150, burst=5)
    base: dict[str, Any] = dict(sent=150, starts=starts, recipients=150, rate=20.0, burst=5.0)
    return BucketRun(**{**base, **kw})


def test_bucket_pass() -> None:
    assert checks.check_bucket(bucket()).passed
    assert checks.check_bucket(bucket(starts=paced(22, 150, burst=5))).passed  # within 15%


@pytest.mark.parametrize("change", [
    {"starts": paced(80, 150, burst=5)},  # 4x the rate: per-worker limits, not fleet-wide
    {"starts": paced(12, 150, burst=5)},  # far below the rate
    {"starts": paced(20, 150, burst=40)},  # a burst larger than configured
    {"starts": paced(20, 149, burst=5)},  # an email was lost
    {"recipients": 149},  # one recipient got two emails
])
def test_bucket_fail(change: dict[str, Any]) -> None:
    assert not checks.check_bucket(bucket(**change)).passed


def flood(**kw: Any) -> ReportFlood:
    states = ["SUCCESS"] * 8 + ["DROPPED"] * 16
    base: dict[str, Any] = dict(sent=24, states=states, limit=2, max_concurrent=2,
                                dropped_counter=16, ran=8)
    return ReportFlood(**{**base, **kw})


def test_report_flood_pass() -> None:
    assert checks.check_report_flood(flood()).passed
    assert checks.check_report_flood(flood(dropped_counter=None, ran=None)).passed


@pytest.mark.parametrize("change", [
    {"max_concurrent": 3},  # above the tier's limit
    {"max_concurrent": 0},
    {"states": ["SUCCESS"] * 24, "dropped_counter": 0, "ran": 24},  # nothing dropped
    {"states": ["DROPPED"] * 24, "dropped_counter": 24, "ran": 0},  # nothing ran
    {"states": ["SUCCESS"] * 8 + ["DROPPED"] * 15 + ["FAILURE"]},
    {"states": ["SUCCESS"] * 8 + ["DROPPED"] * 15},  # a report unaccounted for
    {"dropped_counter": 15},  # bulkhead_stats disagrees
    {"ran": 9},  # a "dropped" report ran anyway
])
def test_report_flood_fail(change: dict[str, Any]) -> None:
    assert not checks.check_report_flood(flood(**change)).passed


def test_singleton() -> None:
    ok = Singleton(first_state="SUCCESS", duplicate_states=["SKIPPED", "SKIPPED"], runs=1)
    assert checks.check_singleton(ok).passed
    assert not checks.check_singleton(Singleton("SUCCESS", ["SKIPPED", "SUCCESS"], 2)).passed
    assert not checks.check_singleton(Singleton("FAILURE", ["SKIPPED"], 1)).passed
    assert not checks.check_singleton(Singleton("SUCCESS", [], 1)).passed


def test_exit_code_and_errors() -> None:
    good = Verdict("a", "b", "c", True)
    assert checks.exit_code([good, good]) == 0
    assert checks.exit_code([]) == 1
    error = checks.error_verdict("kill -9", TimeoutError("no worker"))
    assert not error.passed and "TimeoutError: no worker" in error.observed
    assert checks.exit_code([good, error]) == 1


def test_plain_table(capsys: pytest.CaptureFixture[str]) -> None:
    PlainUI().table([Verdict("email bucket", "20/s", "19.8/s", True),
                     Verdict("kill -9", "acks_late", "2 rows", False)])
    out = capsys.readouterr().out
    assert re.search(r"\| email bucket +\| 20/s +\| 19.8/s +\| PASS +\|", out)
    assert re.search(r"\| kill -9 +\| acks_late +\| 2 rows +\| FAIL +\|", out)


# ------------------------------------------------------- unreachable services


def run_demo(env: dict[str, str], timeout: float,
             args: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHONPATH": str(ROOT), "DEMO_PLAIN": "1", **env}
    return subprocess.run([sys.executable, "-m", "demo_project", *args], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=timeout)


def test_redis_unreachable_is_one_line() -> None:
    port = free_port()  # nothing listens there
    proc = run_demo({"DEMO_BROKER_URL": f"redis://127.0.0.1:{port}/0"}, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stdout + proc.stderr
    assert f"cannot reach Redis (broker) at redis://127.0.0.1:{port}/0" in lines[0]
    assert "docker compose up -d redis postgres" in lines[0] and "DEMO_" in lines[0]


def test_postgres_unreachable_is_one_line(redis_server: RedisServer) -> None:
    port = free_port()
    proc = run_demo({
        "DEMO_BROKER_URL": f"{redis_server.url}/8",
        "DEMO_RESULT_URL": f"{redis_server.url}/9",
        "DEMO_RELIABLE_REDIS_URL": f"{redis_server.url}/10",
        "DEMO_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{port}/postgres",
    }, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stdout + proc.stderr
    assert "cannot reach PostgreSQL" in lines[0] and "docker compose up -d" in lines[0]


def test_unsupported_broker_is_refused_by_name() -> None:
    """A broker the demo does not run on is refused in one line naming the ones it does."""
    proc = run_demo({"DEMO_BROKER_URL": "sqs://key:secret@localhost"}, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stdout + proc.stderr
    assert "Redis (redis://, rediss://) or RabbitMQ (amqp://" in lines[0]
    assert "secret" not in lines[0] and "docker compose" not in lines[0]
    proc = run_demo({"DEMO_RESULT_URL": "rpc://"}, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.strip() == ("demo: DEMO_RESULT_URL rpc://: the demo keeps task results "
                                   "in Redis only (redis://, rediss://), whatever the broker")


def test_rabbitmq_unreachable_is_one_line() -> None:
    """An AMQP broker URL is reached as RabbitMQ (not pinged as Redis), in one line if down."""
    port = free_port()
    proc = run_demo({"DEMO_BROKER_URL": f"amqp://guest:guest@127.0.0.1:{port}//"}, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stdout + proc.stderr
    assert f"cannot reach RabbitMQ (broker) at amqp://guest:***@127.0.0.1:{port}//" in lines[0]


def test_cleanup_waits_for_a_running_demo(redis_server: RedisServer, database_url: str) -> None:
    """--cleanup refuses while a run holds the demo's key prefix, and deletes nothing."""
    prefix = f"demo{secrets.token_hex(3)}"
    client = redis.Redis.from_url(f"{redis_server.url}/13")
    claim = "{" + prefix + "}:demo:run"
    client.set(claim, "abc123", ex=60)
    client.set("{" + prefix + "}:fence:x", 1)
    try:
        proc = run_demo({"DEMO_BROKER_URL": f"{redis_server.url}/11",
                         "DEMO_RESULT_URL": f"{redis_server.url}/12",
                         "DEMO_RELIABLE_REDIS_URL": f"{redis_server.url}/13",
                         "DEMO_DATABASE_URL": database_url, "DEMO_PREFIX": prefix},
                        timeout=60, args=["--cleanup"])
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "a demo run (abc123) is using key prefix" in proc.stdout
        assert client.get("{" + prefix + "}:fence:x") == b"1"
    finally:
        client.delete(claim, "{" + prefix + "}:fence:x")
        client.close()


# ------------------------------------------------------------ Compose file


def compose_command() -> list[str] | None:
    """``docker compose`` (v2 plugin) if it works here, else ``docker-compose`` (v1)."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_file_is_valid() -> None:
    """`config` validates without an engine. Skipped locally without Compose; in CI
    (CI set) a missing Compose fails: install Debian's `docker-compose` package."""
    command = compose_command()
    if command is None:
        message = "neither `docker compose` nor `docker-compose` is installed"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    base = [*command, "-f", str(ROOT / "docker-compose.yml")]
    check = subprocess.run([*base, "config", "-q"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    listed = subprocess.run([*base, "config", "--services"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    assert {"redis", "postgres", "worker", "worker-2", "demo", "prometheus"} <= services
    # Prometheus scrapes every worker service, on the port the workers serve.
    scrape = (ROOT / "deploy" / "prometheus.yml").read_text()
    targets = set(re.findall(r'"([\w-]+):9808"', scrape))
    assert targets == {"worker", "worker-2"} and targets <= services
    assert 'DEMO_METRICS_PORT: "9808"' in (ROOT / "docker-compose.yml").read_text()


# ------------------------------------------------------------- a full run


@pytest.mark.slow
def test_demo_runs_and_passes(redis_server: RedisServer, database_url: str) -> None:
    """The README's demo, end to end, against the private Redis and database."""
    proc = run_demo({
        "DEMO_BROKER_URL": f"{redis_server.url}/11",
        "DEMO_RESULT_URL": f"{redis_server.url}/12",
        "DEMO_RELIABLE_REDIS_URL": f"{redis_server.url}/13",
        "DEMO_DATABASE_URL": database_url,
        "DEMO_PREFIX": f"demo{secrets.token_hex(3)}",
        "DEMO_EXTERNAL_WORKERS": "",
    }, timeout=150)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Traceback" not in output
    assert re.search(r"^PASS: (\d+)/\1 guarantees in", proc.stdout, re.M), output
    assert "| FAIL" not in proc.stdout
    assert f"data (this run's removed): task results in {redis_server.url}/12" in proc.stdout


AMQP_URL = os.environ.get("RELIABLE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


@pytest.fixture
def rabbitmq_url() -> str:
    """The machine's RabbitMQ (the CI machine runs one): skipped locally if absent."""
    try:
        with kombu.Connection(AMQP_URL, connect_timeout=3) as conn:
            conn.connect()
    except Exception as exc:
        _missing(f"RabbitMQ not reachable at {AMQP_URL}: {exc}")
    return AMQP_URL


@pytest.fixture
def empty_database() -> Iterator[str]:
    """A database of this test's own with no tables at all (``database_url`` has ours)."""
    with new_database("reliable_demo") as url:
        yield url


def _tables(engine: sa.Engine) -> dict[str, str | None]:
    """Each table of the database and its comment."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT c.relname, obj_description(c.oid, 'pg_class') FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind = 'r' AND n.nspname = 'public'")).all()
    return {str(name): comment for name, comment in rows}


@pytest.mark.slow
def test_demo_on_rabbitmq_keeps_data_then_cleans_up(
        rabbitmq_url: str, redis_server: RedisServer, empty_database: str) -> None:
    """Every scenario passes with RabbitMQ as the broker; --keep-data keeps the run's data
    where its last lines say; --cleanup then removes the demo's tables, queues, keys and
    results, and keeps a celery-reliable table that holds another app's rows."""
    prefix = f"demo{secrets.token_hex(3)}"
    env = {"DEMO_BROKER_URL": rabbitmq_url,
           "DEMO_RESULT_URL": f"{redis_server.url}/14",
           "DEMO_RELIABLE_REDIS_URL": f"{redis_server.url}/15",
           "DEMO_DATABASE_URL": empty_database,
           "DEMO_PREFIX": prefix,
           "DEMO_EXTERNAL_WORKERS": ""}
    proc = run_demo(env, timeout=150, args=["--keep-data"])
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Traceback" not in output and "| FAIL" not in proc.stdout
    assert re.search(r"^PASS: (\d+)/\1 guarantees in", proc.stdout, re.M), output
    assert "broker amqp://guest:***@127.0.0.1:5672//" in proc.stdout
    where = next(line for line in proc.stdout.splitlines() if line.startswith("data ("))
    assert where.startswith("data (kept for inspection): task results in "
                            f"{redis_server.url}/14")
    assert empty_database.split("@")[-1] in where and "{" + prefix + "}:*" in where
    assert f"{redis_server.url}/15" in where and "--cleanup" in where

    engine = sa.create_engine(empty_database.replace("postgresql://", "postgresql+psycopg://"))
    state = redis.Redis.from_url(f"{redis_server.url}/15")
    results = redis.Redis.from_url(f"{redis_server.url}/14")
    try:
        tables = _tables(engine)
        mark = "created by the celery-reliable demo"
        assert {"demo_payments", "demo_order_status"} <= tables.keys()
        for name in ("reliable_fences", "reliable_idempotency", "reliable_dead_letters"):
            assert mark in (tables[name] or ""), tables
        with engine.begin() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM demo_payments")).scalar()
            # another app's fence, in a table the demo created: it must survive the cleanup
            conn.execute(sa.text("INSERT INTO reliable_fences (resource, token) "
                                 "VALUES ('invoice:7', 3)"))
        assert list(state.scan_iter(match="{" + prefix + "}:*"))
        assert list(results.scan_iter(match="celery-task-meta-*"))
        state.set("not-the-demos", 1)

        proc = run_demo(env, timeout=60, args=["--cleanup"])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "kept reliable_fences (1 other rows)" in proc.stdout, proc.stdout
        tables = _tables(engine)
        assert set(tables) == {"reliable_fences"}, tables
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT resource FROM reliable_fences")).scalars().all()
        assert rows == ["invoice:7"]
        assert not list(state.scan_iter(match="{" + prefix + "}:*"))
        assert state.get("not-the-demos") == b"1"
        assert not list(results.scan_iter(match="celery-task-meta-*"))
        with kombu.Connection(rabbitmq_url, connect_timeout=3) as conn:
            for queue in ("demo", "emails"):
                with pytest.raises(Exception, match="NOT_FOUND"):
                    conn.channel().queue_declare(queue, passive=True)

        # once the other app's row is gone, a table the demo created is dropped too
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM reliable_fences"))
        proc = run_demo(env, timeout=60, args=["--cleanup"])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert _tables(engine) == {}
    finally:
        state.delete("not-the-demos")
        state.close()
        results.close()
        engine.dispose()
