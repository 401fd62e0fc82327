"""``celery -A tests.cli_app reliable ...`` run as a user runs it: a subprocess.

Every command reads real state created here (locks through FencedLock,
bucket tokens and bulkhead slots through the admission script, a breaker
opened by real failures, dead letters through ``deadletter.record``) in the
private Redis and PostgreSQL of the run. Errors must be one line on stderr,
a non-zero exit and no traceback.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from celery_reliable import FencedLock, ReliableTask, deadletter, guards
from celery_reliable.admission import Admitted, Plan, Release
from celery_reliable.config import ReliableSettings
from celery_reliable.keys import KeySpace
from celery_reliable.schema import dead_letters, idempotency
from tests.cli_app import RELIABLE_CONF
from tests.conftest import PG_ADMIN_URL, ROOT, RedisServer, free_port

SETTINGS = ReliableSettings.from_conf(RELIABLE_CONF)


@pytest.fixture
def cli_env(redis_server: RedisServer, redis_url: str, database_url: str,
            prefix: str) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "COLUMNS": "220",
        "CLI_REDIS_URL": redis_url,
        "CLI_DATABASE_URL": database_url,
        "CLI_PREFIX": prefix,
        "CLI_BROKER_URL": f"{redis_server.url}/5",
        "CLI_QUEUE": f"q-{prefix}",
    }


def cli(env: dict[str, str], *args: str, stdin: str = "",
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.cli_app", "reliable", *args],
        cwd=ROOT, env=env, input=stdin, capture_output=True, text=True, timeout=timeout,
    )


def ok(env: dict[str, str], *args: str, stdin: str = "") -> str:
    proc = cli(env, *args, stdin=stdin)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc.stdout


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed command (and nothing else anywhere)."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert proc.stdout == ""
    return lines[0]


def letter(engine: sa.Engine, task: str, **overrides: Any) -> int:
    values: dict[str, Any] = {
        "task_name": task, "task_id": secrets.token_hex(8), "args": [1], "kwargs": {"x": "y"},
        "exc": ConnectionError("partner down"), "attempts": 5, "reason": "retries exhausted",
        "queue": None, "first_failure_at": None,
    }
    values.update(overrides)
    return deadletter.record(engine, **values)


def row_exists(engine: sa.Engine, letter_id: int) -> bool:
    with engine.connect() as conn:
        query = sa.select(dead_letters.c.id).where(dead_letters.c.id == letter_id)
        return conn.execute(query).first() is not None


# ------------------------------------------------------------------ plugin


def test_reliable_is_a_celery_command(cli_env: dict[str, str]) -> None:
    out = ok(cli_env, "--help")
    for command in ("status", "top", "locks", "dlq", "purge-idempotency", "migrate"):
        assert command in out
    assert "--iterations" not in ok(cli_env, "top", "--help")  # hidden


# ------------------------------------------------------------------ status / locks / top


def test_status_shows_locks_buckets_tiers_breakers_and_dead_letters(
    cli_env: dict[str, str], redis_client: redis.Redis, engine: sa.Engine, prefix: str
) -> None:
    keys = KeySpace(prefix)
    lock = FencedLock(redis_client, "order:42", ttl=30, prefix=prefix)
    token = lock.acquire(owner="3f1c-task-id/ab12")
    assert token is not None
    plan = Plan()  # 3 tokens from the emails bucket (0.1/s), one payments slot
    guards.bucket.plan(plan, keys.queue_bucket("emails"), SETTINGS.queue_rate_limits["emails"], 3)
    guards.bulkhead.plan(plan, keys, "payments", SETTINGS.bulkheads["payments"], "slot-owner", "t1")
    assert isinstance(plan.admit(redis_client), Admitted)
    breaker = keys.breaker("partner")
    for _ in range(2):  # two classified failures open it (min_calls 2, threshold 2)
        entry = Plan()
        guards.breaker.plan(entry, breaker, SETTINGS.circuit_breakers["partner"], "probe")
        assert isinstance(entry.admit(redis_client), Admitted)
        done = Release()
        guards.breaker.release(done, breaker, SETTINGS.circuit_breakers["partner"], "probe")
        guards.breaker.settle(done, "f")
        done.run(redis_client)
    letter(engine, f"cli.{prefix}")
    with engine.connect() as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(dead_letters)).scalar_one()

    out = ok(cli_env, "status")

    assert "Locks held (1)" in out
    assert keys.lock("order:42").rsplit(":", 1)[1] in out
    assert str(token) in out and "3f1c-task-id" in out
    assert re.search(r"\b(2\d|30)\.\d s\b", out), out  # lease time left, and said so
    assert "age is unknown" in out
    assert re.search(r"emails\s+7\.\d\d\s+10\s+0\.1/s", out), out  # 3 of 10 taken, refilling
    assert re.search(r"stripe\s+25\.00\s+25\s+25/s", out), out
    assert re.search(r"payments\s+1/2\s+0/3\s+0\s+0\s+0\s+wait", out), out
    assert re.search(r"critical\s+0/5", out), out  # the default tiers too
    assert re.search(r"partner\s+open", out), out
    assert f"{total} dead letter(s)" in out
    lock.release()
    assert "Locks held (0)" in ok(cli_env, "status")


def test_status_without_a_database_says_so(cli_env: dict[str, str]) -> None:
    out = ok({**cli_env, "CLI_DATABASE_URL": ""}, "status")
    assert "no database configured" in out
    assert "Locks held (0)" in out


def test_locks_lists_every_lock_of_the_prefix_only(
    cli_env: dict[str, str], redis_client: redis.Redis, prefix: str
) -> None:
    held = [FencedLock(redis_client, f"res:{i}", ttl=60, prefix=prefix) for i in range(20)]
    tokens = [lock.acquire(owner=f"task-{i}/n{i}") for i, lock in enumerate(held)]
    bare = FencedLock(redis_client, "bare", ttl=20, prefix=prefix)
    assert bare.acquire() is not None  # owner without a task id
    other = FencedLock(redis_client, "res:0", ttl=60, prefix=prefix + "x")
    assert other.acquire(owner="elsewhere/1") is not None
    held[3].release()

    out = ok(cli_env, "locks")

    assert "20 lock(s) held" in out
    digests = {KeySpace(prefix).lock(f"res:{i}").rsplit(":", 1)[1] for i in range(20)}
    released = KeySpace(prefix).lock("res:3").rsplit(":", 1)[1]
    for digest in digests - {released}:
        assert digest in out
    assert released not in out
    assert str(tokens[5]) in out and "task-5/n5" in out
    assert "elsewhere" not in out
    first = out.index(KeySpace(prefix).lock("bare").rsplit(":", 1)[1])
    assert first < out.index("task-0/n0")  # soonest expiry first
    # status shows the first 15 and says how many more there are
    assert "and 5 more" in ok(cli_env, "status")


def test_top_refreshes_then_exits(cli_env: dict[str, str], redis_client: redis.Redis,
                                  prefix: str) -> None:
    lock = FencedLock(redis_client, "order:7", ttl=30, prefix=prefix)
    assert lock.acquire(owner="top-task/1") is not None
    started = time.monotonic()
    out = ok(cli_env, "top", "--iterations", "3", "--interval", "0.3")
    assert time.monotonic() - started >= 0.6
    assert "refresh 3" in out
    for panel in ("Locks held (1)", "Token buckets", "Bulkhead tiers", "Circuit breakers",
                  "Dead letters"):
        assert panel in out
    assert "top-task" in out


# ------------------------------------------------------------------ dead letters


def test_dlq_list_and_show(cli_env: dict[str, str], engine: sa.Engine, prefix: str) -> None:
    task = f"cli.{prefix}"
    first = letter(engine, task, args=[7, "x"], kwargs={"order": 9})
    second = letter(engine, task, reason="worker lost", exc=None)

    out = ok(cli_env, "dlq", "list", "--task", task)
    assert re.search(rf"{second}\s+{re.escape(task)}\s+worker lost", out), out
    assert re.search(rf"{first}\s+{re.escape(task)}\s+retries exhausted\s+5\s", out), out
    assert re.search(r"^\s+ConnectionError: partner down", out, re.MULTILINE), out  # below it
    ids = [int(m) for m in re.findall(rf"^\s*(\d+)\s+{re.escape(task)}", out, re.MULTILINE)]
    assert ids == [second, first]  # newest first
    assert "worker lost" not in ok(cli_env, "dlq", "list", "--task", task, "--reason",
                                   "retries exhausted")

    shown = ok(cli_env, "dlq", "show", str(first))
    assert task in shown and '[7, "x"]' in shown and '{"order": 9}' in shown
    assert "ConnectionError: partner down" in shown
    assert "traceback:" in shown and "ConnectionError" in shown
    assert re.search(r"replayable\s+yes", shown), shown


def test_dlq_replay_publishes_the_task(cli_env: dict[str, str], engine: sa.Engine,
                                       redis_server: RedisServer, prefix: str) -> None:
    queue = f"replay-{prefix}"
    letter_id = letter(engine, "cli.charge", args=[42], kwargs={}, queue=queue)
    broker = redis.Redis(port=redis_server.port, db=5)

    out = ok(cli_env, "dlq", "replay", str(letter_id))

    match = re.search(rf"dead letter {letter_id} \(cli\.charge\) replayed as task (\S+)", out)
    assert match, out
    new_id = match.group(1)
    assert broker.llen(queue) == 1
    message = json.loads(broker.lindex(queue, 0) or b"{}")
    assert message["headers"]["task"] == "cli.charge"
    assert message["headers"]["id"] == new_id
    assert re.search(rf"replayed as\s+{new_id}", ok(cli_env, "dlq", "show", str(letter_id)))

    # a letter is replayed once: a second replay would run a task without a key twice
    again = one_line_error(cli(cli_env, "dlq", "replay", str(letter_id)))
    assert f"already replayed as task {new_id}" in again and "--force" in again
    assert broker.llen(queue) == 1
    forced = ok(cli_env, "dlq", "replay", "--force", str(letter_id))
    assert "replayed as task" in forced and broker.llen(queue) == 2

    unreplayable = letter(engine, "cli.charge", args=[object()])
    error = one_line_error(cli(cli_env, "dlq", "replay", str(unreplayable)))
    assert "cannot be replayed" in error
    assert broker.llen(queue) == 2


def test_dlq_purge_by_id_and_age(cli_env: dict[str, str], engine: sa.Engine,
                                 prefix: str) -> None:
    task = f"cli.{prefix}"
    keep, by_id, old = (letter(engine, task) for _ in range(3))
    with engine.begin() as conn:
        conn.execute(sa.update(dead_letters).where(dead_letters.c.id == old).values(
            last_failure_at=datetime.now(timezone.utc) - timedelta(days=40)))

    refused = cli(cli_env, "dlq", "purge", "--id", str(by_id), stdin="n\n")
    assert refused.returncode != 0 and "Aborted" in refused.stderr
    assert row_exists(engine, by_id)

    assert "deleted 1 dead letter(s)" in ok(cli_env, "dlq", "purge", "--id", str(by_id),
                                           stdin="y\n")
    assert not row_exists(engine, by_id)
    assert "deleted 1 dead letter(s)" in ok(cli_env, "dlq", "purge", "--older-than-days", "30",
                                           "--yes")
    assert not row_exists(engine, old)
    assert row_exists(engine, keep)


def test_unknown_dead_letter_id_is_one_line(cli_env: dict[str, str]) -> None:
    for command in ("show", "replay"):
        error = one_line_error(cli(cli_env, "dlq", command, "987654321"))
        assert error == "Error: no dead letter with id 987654321"


def test_dlq_without_a_database_is_one_line(cli_env: dict[str, str]) -> None:
    env = {**cli_env, "CLI_DATABASE_URL": ""}
    for args in (("dlq", "list"), ("dlq", "show", "1"), ("purge-idempotency",), ("migrate",)):
        error = one_line_error(cli(env, *args))
        assert "no database configured" in error and "reliable_database_url" in error


# ------------------------------------------------------------------ idempotency, migrate


def test_purge_idempotency_deletes_expired_records_only(
    cli_env: dict[str, str], engine: sa.Engine, prefix: str
) -> None:
    task = f"cli.{prefix}"
    now = datetime.now(timezone.utc)
    rows = [
        {"task": task, "key_digest": f"k{i}", "fingerprint": "f", "state": "S",
         "result_json": "1", "expires_at": now + timedelta(hours=-1 if i < 5 else 1)}
        for i in range(7)
    ]
    with engine.begin() as conn:
        conn.execute(sa.insert(idempotency), rows)

    out = ok(cli_env, "purge-idempotency", "--batch-size", "2")

    match = re.search(r"deleted (\d+) expired idempotency record", out)
    assert match and int(match.group(1)) >= 5, out
    with engine.connect() as conn:
        left = conn.execute(sa.select(idempotency.c.key_digest)
                            .where(idempotency.c.task == task)).scalars().all()
    assert sorted(left) == ["k5", "k6"]
    usage = cli(cli_env, "purge-idempotency", "--batch-size", "0")  # click's usage error
    assert usage.returncode == 2 and "Invalid value for '--batch-size'" in usage.stderr
    assert "Traceback" not in usage.stderr


@pytest.fixture
def empty_database() -> Iterator[str]:
    """A database of this test's own, without celery-reliable's tables."""
    name = f"reliable_cli_{secrets.token_hex(4)}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield admin.url.set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_migrate_creates_the_tables_and_is_idempotent(cli_env: dict[str, str],
                                                      empty_database: str) -> None:
    env = {**cli_env, "CLI_DATABASE_URL": empty_database}
    error = one_line_error(cli(env, "dlq", "list"))
    assert "tables are missing" in error and "reliable migrate" in error

    for _ in range(2):
        out = ok(env, "migrate")
        assert "tables ready in" in out and "hunter" not in out
        for table in ("reliable_dead_letters", "reliable_fences", "reliable_idempotency"):
            assert table in out
    check = sa.create_engine(empty_database)
    try:
        names = set(sa.inspect(check).get_table_names())
    finally:
        check.dispose()
    assert {"reliable_dead_letters", "reliable_fences", "reliable_idempotency"} <= names
    assert "no dead letters" in ok(env, "dlq", "list")


def test_status_before_migrate_shows_the_redis_panels_and_what_is_missing(
        cli_env: dict[str, str], empty_database: str) -> None:
    """`status` on a database without tables, at 80 columns: Redis panels, then the fix."""
    env = {**cli_env, "CLI_DATABASE_URL": empty_database, "COLUMNS": "80"}
    out = ok(env, "status")
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80, out
    for panel in ("Locks held (0)", "Token buckets", "Bulkhead tiers", "Circuit breakers"):
        assert panel in out
    assert "emails" in out and "partner" in out  # read from Redis
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", out).split())
    assert "tables are missing" in text, out
    assert "`celery -A cli_app reliable migrate`" in text, out


# ------------------------------------------------------------------ servers down, bad URLs


def test_redis_down_is_one_line(cli_env: dict[str, str]) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    env = {**cli_env, "CLI_REDIS_URL": url}
    for args in (("status",), ("locks",), ("top", "--iterations", "2")):
        error = one_line_error(cli(env, *args))
        assert error.startswith(f"Error: Redis at {url} is unavailable:"), error
        assert "Connection refused" in error


def test_bad_redis_url_is_one_line(cli_env: dict[str, str]) -> None:
    env = {**cli_env, "CLI_REDIS_URL": "http://user:secret@127.0.0.1:6379"}
    error = one_line_error(cli(env, "status"))
    assert "reliable_redis_url" in error and "not usable" in error
    assert "secret" not in error


def test_postgres_down_is_one_line(cli_env: dict[str, str]) -> None:
    url = f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/nope"
    env = {**cli_env, "CLI_DATABASE_URL": url}
    for args in (("dlq", "list"), ("status",), ("migrate",)):
        error = one_line_error(cli(env, *args))
        assert error.startswith("Error: PostgreSQL at postgresql://postgres:***@"), error
        assert "hunter2" not in error


def test_bad_database_url_is_one_line(cli_env: dict[str, str]) -> None:
    env = {**cli_env, "CLI_DATABASE_URL": "not a url"}
    error = one_line_error(cli(env, "dlq", "list"))
    assert "reliable_database_url" in error and "not usable" in error


# ------------------------------------------------------------------ 80 columns


def narrow(env: dict[str, str]) -> dict[str, str]:
    """The CLI's environment in an 80-column terminal (rich reads COLUMNS)."""
    return {**env, "COLUMNS": "80"}


def fits(out: str, width: int = 80) -> list[str]:
    """The output's lines, each checked to fit ``width`` columns."""
    lines = out.splitlines()
    wide = [line for line in lines if len(line.rstrip()) > width]
    assert not wide, "\n".join(wide)
    return lines


SECRET_EMAIL = "alice.secret@example.com"


def test_locks_at_80_columns_show_task_label_full_token_and_time_left_never_a_secret(
    cli_env: dict[str, str], celery_app: Any, celery_worker: Any
) -> None:
    """A real task's lock reads task, template label, whole token, time left; no argument value."""
    import threading

    from tests.conftest import wait_for

    release = threading.Event()
    tokens: list[int] = []

    @celery_app.task(base=ReliableTask, bind=True, shared=False, name="acct.reset",
                     lock="account:{email}", lock_ttl=60)
    def reset(self: Any, email: str) -> None:
        tokens.append(self.fence_token)
        release.wait(30)

    @celery_app.task(base=ReliableTask, bind=True, shared=False, name="acct.audit",
                     lock="audit:{account_id}", lock_label="audit of {account_id}")
    def audit(self: Any, account_id: int) -> None:  # opts in to showing a (harmless) value
        tokens.append(self.fence_token)
        release.wait(30)

    celery_worker.reload()
    conf = celery_app.conf
    env = {**narrow(cli_env), "CLI_REDIS_URL": conf.reliable_redis_url,
           "CLI_PREFIX": conf.reliable_key_prefix}
    client = redis.Redis.from_url(conf.reliable_redis_url)
    other = FencedLock(client, f"invoice:{SECRET_EMAIL}", ttl=60,
                       prefix=conf.reliable_key_prefix)  # no label: only its digest shows
    assert other.acquire() is not None
    result = reset.delay(SECRET_EMAIL)
    audited = audit.delay(42)
    try:
        wait_for(lambda: len(tokens) == 2, 20, "both tasks to take their locks")
        lock_key = KeySpace(conf.reliable_key_prefix).lock(f"account:{SECRET_EMAIL}")
        assert SECRET_EMAIL.encode() not in (client.get(lock_key) or b"")  # nor in Redis

        out = ok(env, "locks")
        screen = ok(env, "status")
    finally:
        release.set()
        other.release()
    result.get(timeout=20)
    audited.get(timeout=20)

    lines = fits(out)
    for token in tokens:  # each token whole, on its task's row
        row = next(line for line in lines if str(token) in line).rstrip()
        assert re.search(r"^acct\.(reset\s+account:\{email\}|audit\s+audit of 42)\s+\d{16}\s+"
                         r"(\d|[1-5]\d|60)\.\d s$", row), out
    assert re.search(rf"-\s+-\s+{other.token}\s+\d+\.\d s", out), out  # unlabelled FencedLock
    assert result.id[:8] in out  # the owner (task id) under the task name
    fits(screen, 80)
    assert str(tokens[0]) in screen and "account:{email}" in screen
    for text in (out, screen):
        assert "alice" not in text and "example.com" not in text


def test_fenced_lock_label_and_lock_label_option_are_shown(
    cli_env: dict[str, str], redis_client: redis.Redis, prefix: str
) -> None:
    """A FencedLock's label and a task's lock_label are kept with the lease, cut at 60."""
    lock = FencedLock(redis_client, "report:2026-12", ttl=30, prefix=prefix,
                      label="monthly report " + "x" * 80)
    token = lock.acquire()
    assert token is not None
    out = ok(cli_env, "locks")  # 220 columns: one line per row
    assert re.search(rf"monthly report x{{44}}…\s+{token}\s", out), out
    assert lock.extend() and lock.release()  # the lease value with a label renews, releases
    assert redis_client.get(KeySpace(prefix).lock("report:2026-12")) is None


def test_dlq_list_at_80_columns_keeps_every_id_whole(
    cli_env: dict[str, str], engine: sa.Engine, prefix: str
) -> None:
    """Long task names, errors and replayed ids wrap or shrink; the id column stays whole."""
    task = f"proj.billing.tasks.renew_customer_subscription_{prefix}"
    ids = [letter(engine, task, exc=ValueError("card declined " * 12)) for _ in range(3)]
    with engine.begin() as conn:
        conn.execute(sa.update(dead_letters).where(dead_letters.c.id == ids[0]).values(
            replayed_as="0f8c2a4e-7d3b-4c1a-9e6f-5a2b8c9d0e1f"))

    out = ok(narrow(cli_env), "dlq", "list", "--task", task)

    lines = fits(out)
    shown = [int(m.group(1)) for line in lines if (m := re.match(r"\s*(\d+)\s+proj\.", line))]
    assert shown == ids[::-1], out  # every id, whole, newest first
    assert re.search(r"^\s+ValueError: card declined c[a-z ]*…", out, re.MULTILINE), out  # cut
    assert "replayed as 0f8c2a4e" in out


def test_status_top_and_dlq_at_80_columns_keep_their_key_columns(
    cli_env: dict[str, str], redis_client: redis.Redis, engine: sa.Engine, prefix: str
) -> None:
    """Each table fits 80 columns with its key column whole: token, queue, tier, breaker, id."""
    lock = FencedLock(redis_client, "order:42", ttl=30, prefix=prefix)
    token = lock.acquire(owner="9b2e4f0c-1d3a-4e5f-8a7b-6c5d4e3f2a1b/ab12cd34")
    assert token is not None
    letter_id = letter(engine, f"cli.{prefix}", exc=RuntimeError("x " * 100))
    env = narrow(cli_env)
    try:
        screens = {"status": ok(env, "status"),
                   "top": ok(env, "top", "--iterations", "1", "--interval", "0.1"),
                   "dlq": ok(env, "dlq", "list", "--task", f"cli.{prefix}")}
    finally:
        lock.release()
    for name, out in screens.items():
        fits(out)
        if name == "dlq":
            assert re.search(rf"^\s*{letter_id}\s", out, re.MULTILINE), out
            continue
        assert re.search(rf"\s{token}\s+(2\d|30)\.\d s", out), out
        assert re.search(r"emails\s+\d+\.\d\d\s+10\s+0\.1/s", out), out
        assert re.search(r"payments\s+0/2\s+0/3\s+0\s+0\s+0\s+wait", out), out
        assert re.search(r"partner\s+(closed|open)", out), out


def test_a_lost_admission_reply_rolls_back_a_labelled_lock(
    redis_client: redis.Redis, prefix: str
) -> None:
    """rollback.lua finds the lease by its holder (owner, task, label), none other's."""
    keys = KeySpace(prefix)
    plan = Plan()
    index = guards.lock.plan_resource(plan, keys, "order:7", "owner-1", 30, task="t.x",
                                      label="order:{id}\nnext")
    admitted = plan.admit(redis_client)
    assert isinstance(admitted, Admitted)
    value = redis_client.get(keys.lock("order:7"))
    assert value == guards.lock.lease_value(plan, index, admitted.results[index]).encode()
    assert value.endswith(b" owner-1\nt.x\norder:{id} next")  # one line per field
    other = Plan()
    # same owner, no label: not this lease
    guards.lock.plan_resource(other, keys, "order:7", "owner-1", 30)
    assert other.rollback(redis_client) == [0]
    assert plan.rollback(redis_client) == [1]
    assert redis_client.get(keys.lock("order:7")) is None


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"lock": "o:{order_id}", "lock_label": "o {customer}"},
         "'lock_label' template 'o {customer}' names argument 'customer'"),
        ({"lock": "o:{order_id}", "lock_label": ""}, "'lock_label' must be a non-empty template"),
        ({"lock_label": "o {order_id}"}, "'lock_label' is set but 'lock' is not"),
        ({"lock": "o:{order_id}", "lock_lable": "x"}, "did you mean 'lock_label'?"),
    ],
)
def test_bad_lock_label_fails_at_bind(options: dict[str, Any], fragment: str) -> None:
    """lock_label is validated when the task binds, like lock, naming task and option."""
    from celery import Celery

    from celery_reliable import ConfigurationError
    from tests.test_config import bind

    with pytest.raises(ConfigurationError, match=re.escape(fragment)) as info:
        bind(Celery("cfg", broker="memory://", set_as_current=False), **options)
    assert str(info.value).startswith("shop.charge: ")


def test_lock_label_defaults_to_the_template_never_its_values() -> None:
    """Default label: the lock template (or a callable's name); lock_label formats values."""
    from celery import Celery

    from tests.test_config import bind

    arguments = {"order_id": SECRET_EMAIL, "amount": 3}

    def lock_for(args: Any) -> str:
        return f"order:{args['order_id']}"

    cases = [({"lock": "order:{order_id}"}, "order:{order_id}"),
             ({"lock": lock_for}, "lock_for(...)"),
             ({"lock": "order:{order_id}", "lock_label": "amount {amount}"}, "amount 3")]
    for options, label in cases:
        policy = bind(Celery("cfg", broker="memory://", set_as_current=False), **options)._policy()
        assert policy.lock.label("shop.charge", arguments) == label
