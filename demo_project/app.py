"""The demo's Celery app: payment captures serialised per order, and a singleton report.

Run a worker with ``celery -A demo_project.app worker -Q demo``. Everything is
configured from the environment (defaults suit the local services):

=========================  ==============================================
``DEMO_BROKER_URL``        broker (``redis://127.0.0.1:6379/0``)
``DEMO_RESULT_URL``        result backend (``redis://127.0.0.1:6379/1``)
``DEMO_RELIABLE_REDIS_URL`` locks and fencing counters (``.../2``)
``DEMO_DATABASE_URL``      PostgreSQL (``postgresql://postgres@127.0.0.1:5432/postgres``)
``DEMO_PREFIX``            celery-reliable key prefix (``reliable-demo``)
=========================  ==============================================

The tasks also leave a few observations in Redis (under the demo's key
prefix) so the runner can show what happened; a real app would not.
"""

from __future__ import annotations

import json
import os
import socket
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa
from celery import Celery, signals
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from celery_reliable import ReliableTask, StaleFenceToken
from celery_reliable.task import DEFER_HEADER


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


BROKER_URL = _env("DEMO_BROKER_URL", "redis://127.0.0.1:6379/0")
RESULT_URL = _env("DEMO_RESULT_URL", "redis://127.0.0.1:6379/1")
RELIABLE_REDIS_URL = _env("DEMO_RELIABLE_REDIS_URL", "redis://127.0.0.1:6379/2")
DATABASE_URL = _env("DEMO_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
PREFIX = _env("DEMO_PREFIX", "reliable-demo")

#: The only queue the demo publishes to and consumes from.
QUEUE = "demo"
#: Lease of an order's lock. Short so the paused-holder scenario is quick.
CAPTURE_LOCK_TTL = 2.0
REPORT_LOCK_TTL = 10.0
#: Observations the tasks leave in Redis expire on their own after this long.
NOTE_TTL = 3600

app = Celery("demo_project", broker=BROKER_URL, backend=RESULT_URL)
app.conf.update(
    reliable_redis_url=RELIABLE_REDIS_URL,
    reliable_database_url=DATABASE_URL,
    reliable_key_prefix=PREFIX,
    task_default_queue=QUEUE,
    task_serializer="json",
    result_serializer="json",
    result_expires=NOTE_TTL,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)

# ----------------------------------------------------------------- storage

metadata = sa.MetaData()

#: One row per order: who captured its payment, with which fencing token.
orders = sa.Table(
    "demo_orders",
    metadata,
    sa.Column("order_id", sa.Text, primary_key=True),
    sa.Column("captured_by", sa.Text, nullable=False),
    sa.Column("token", sa.BigInteger, nullable=False),
    sa.Column("amount", sa.Numeric(12, 2), nullable=False),
    sa.Column("captured_at", sa.DateTime(timezone=True), nullable=False,
              server_default=sa.func.now()),
)


def sqlalchemy_url(url: str = DATABASE_URL) -> str:
    """``postgresql://`` → ``postgresql+psycopg://`` (psycopg 3)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


_per_process: dict[tuple[int, str], Any] = {}


def engine() -> sa.Engine:
    """This process's engine (never shared across a prefork fork)."""
    key = (os.getpid(), "engine")
    if key not in _per_process:
        _per_process[key] = sa.create_engine(sqlalchemy_url(), pool_pre_ping=True)
    return _per_process[key]  # type: ignore[no-any-return]


def notes() -> redis.Redis:
    """This process's Redis client for the demo's observations."""
    key = (os.getpid(), "redis")
    if key not in _per_process:
        _per_process[key] = redis.Redis.from_url(RELIABLE_REDIS_URL, decode_responses=True)
    return _per_process[key]  # type: ignore[no-any-return]


def note_key(*parts: str) -> str:
    """A key of the demo's observations, inside the demo's own prefix."""
    return ":".join(["{" + PREFIX + "}", "demo", *parts])


def process_start(pid: int | str = "self") -> str | None:
    """Kernel start time of a process: with its pid, it names one process unambiguously."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


# -------------------------------------------------------------------- tasks

@app.task(base=ReliableTask, bind=True, name="demo.capture_payment",
          lock="order:{order_id}", lock_ttl=CAPTURE_LOCK_TTL, acks_late=True,
          defer_delay=0.05, defer_max_delay=0.4)
def capture_payment(self: ReliableTask, order_id: str, amount: str, attempt: str,
                    gateway_seconds: float = 0.1, hold_until: str | None = None
                    ) -> dict[str, Any]:
    """Capture an order's payment; one capture per order at a time, fenced in PostgreSQL.

    ``hold_until`` (demo instrumentation) names a Redis key the task waits for
    before it writes, so the runner can pause it at a known point.
    """
    r = notes()
    started = time.time()
    token = self.fence_token
    me = {"attempt": attempt, "token": token, "pid": os.getpid(), "host": socket.gethostname(),
          "retries": self.request.retries,
          "deferrals": int(self.request.get(DEFER_HEADER) or 0)}
    r.set(note_key(order_id, "running", attempt),
          json.dumps({**me, "proc_start": process_start()}), ex=NOTE_TTL)
    time.sleep(gateway_seconds)  # the payment gateway call
    if hold_until is not None:
        deadline = time.monotonic() + 60
        while not r.exists(hold_until) and time.monotonic() < deadline:
            time.sleep(0.01)
    outcome = dict(me)
    try:
        with Session(engine()) as session, session.begin():
            self.fence.check_postgres(session)
            row = {"captured_by": attempt, "token": token, "amount": Decimal(amount)}
            session.execute(
                insert(orders).values(order_id=order_id, **row)
                .on_conflict_do_update(index_elements=[orders.c.order_id],
                                       set_={**row, "captured_at": sa.func.now()})
            )
        outcome["write"] = "committed"
    except StaleFenceToken as exc:
        outcome.update(write="stale", current=exc.current, lock_lost=self.lock_lost)
        raise
    finally:
        outcome.update(start=started, end=time.time())
        r.rpush(note_key(order_id, "executions"), json.dumps(outcome))
        r.expire(note_key(order_id, "executions"), NOTE_TTL)
    return outcome


@app.task(base=ReliableTask, bind=True, name="demo.rebuild_daily_report",
          lock="report:{day}", lock_ttl=REPORT_LOCK_TTL, lock_contention="skip")
def rebuild_daily_report(self: ReliableTask, day: str, seconds: float = 1.0) -> dict[str, Any]:
    """A singleton: a second rebuild of the same day while one runs is dropped (SKIPPED)."""
    r = notes()
    r.incr(note_key(day, "report-runs"))
    r.expire(note_key(day, "report-runs"), NOTE_TTL)
    time.sleep(seconds)
    return {"day": day, "token": self.fence_token, "pid": os.getpid()}


@signals.worker_ready.connect
def _announce_ready(sender: Any = None, **_: Any) -> None:
    """Tell a runner that spawned this worker that it consumes now (DEMO_READY_DIR)."""
    ready_dir = os.environ.get("DEMO_READY_DIR")
    if ready_dir and sender is not None:
        Path(ready_dir, "ready-" + str(sender.hostname).split("@", 1)[0]).touch()
