"""The demo's Celery app: a small shop's payments, emails, partner sync and reports.

Run a worker with ``celery -A demo_project.app worker -Q demo,emails``.
Everything is configured from the environment (defaults suit the local
services):

===========================  ==============================================
``DEMO_BROKER_URL``          broker (``redis://127.0.0.1:6379/0``), Redis or
                             RabbitMQ (``amqp://guest:guest@127.0.0.1:5672//``)
``DEMO_RESULT_URL``          result backend (``redis://127.0.0.1:6379/1``)
``DEMO_RELIABLE_REDIS_URL``  celery-reliable's state (``.../2``)
``DEMO_DATABASE_URL``        PostgreSQL (``postgresql://postgres@127.0.0.1:5432/postgres``)
``DEMO_PREFIX``              celery-reliable key prefix (``reliable-demo``)
``DEMO_METRICS_PORT``        serve Prometheus ``/metrics`` from each worker
                             on this port (needs ``PROMETHEUS_MULTIPROC_DIR``)
===========================  ==============================================

What each task shows:

* ``capture_payment``: a fencing-token lock per order, idempotency with the
  payment row written in the same transaction as the idempotency record, the
  ``critical`` bulkhead tier, ``acks_late`` + ``reject_on_worker_lost``.
* ``cancel_order``: the same lock, so a capture and a cancellation of one
  order never overlap; its fenced write outranks a stalled capture's.
* ``send_email``: queue ``emails``, drained through one fleet-wide token bucket.
* ``notify_partner``: a flaky partner API behind a shared circuit breaker,
  retried with exponential backoff and full jitter.
* ``render_report``: the ``optional`` tier, which drops work when full.
* ``rebuild_daily_report``: a singleton (``lock_contention="skip"``).

The tasks also leave observations in Redis (under the demo's key prefix) and
take a few instrumentation arguments (``gate``, ``partner``, ``campaign``,
``batch``) so the runner can inject faults and verify what happened; a real
app would not.
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

from celery_reliable import Backoff, ReliableTask
from celery_reliable.task import DEFER_HEADER, PREV_DELAY_HEADER


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


BROKER_URL = _env("DEMO_BROKER_URL", "redis://127.0.0.1:6379/0")
RESULT_URL = _env("DEMO_RESULT_URL", "redis://127.0.0.1:6379/1")
RELIABLE_REDIS_URL = _env("DEMO_RELIABLE_REDIS_URL", "redis://127.0.0.1:6379/2")
DATABASE_URL = _env("DEMO_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
PREFIX = _env("DEMO_PREFIX", "reliable-demo")

#: The queues the demo publishes to and its workers consume.
QUEUE = "demo"
EMAIL_QUEUE = "emails"
QUEUES = (QUEUE, EMAIL_QUEUE)

#: Lease of an order's lock. Short so the paused-holder scenario is quick.
CAPTURE_LOCK_TTL = 2.0
#: Lease of a capture in progress: a killed capture's redelivery takes over after it.
CAPTURE_LEASE = 3.0
REPORT_LOCK_TTL = 10.0
#: The ``emails`` queue's fleet-wide bucket.
EMAIL_RATE = 20.0
EMAIL_BURST = 5.0
#: The partner API's shared circuit breaker.
PARTNER_BREAKER = {"failure_threshold": 3, "window": 6, "min_calls": 3, "open_seconds": 2.0,
                   "success_threshold": 2, "half_open_max": 2}
PARTNER_BACKOFF = Backoff.exponential(base=0.2, cap=2.0, jitter="full", max_attempts=10)
#: The tier the reports run in (at most this many at once, fleet-wide; extras dropped).
REPORT_TIER = "optional"
REPORT_SLOTS = 2
#: Observations the tasks leave in Redis expire on their own after this long.
NOTE_TTL = 3600

app = Celery("demo_project", broker=BROKER_URL, backend=RESULT_URL)
app.conf.update(
    reliable_redis_url=RELIABLE_REDIS_URL,
    reliable_database_url=DATABASE_URL,
    reliable_key_prefix=PREFIX,
    reliable_queue_rate_limits={EMAIL_QUEUE: {"rate": EMAIL_RATE, "burst": EMAIL_BURST}},
    reliable_circuit_breakers={"partner": PARTNER_BREAKER},
    # Tiers merge over the defaults (critical 5 slots/wait, optional 4/drop);
    # leases short so a killed worker's slot comes back quickly.
    reliable_bulkheads={"critical": {"lease": 10},
                        REPORT_TIER: {"concurrent": REPORT_SLOTS, "lease": 10}},
    task_default_queue=QUEUE,
    task_routes={"demo.send_email": {"queue": EMAIL_QUEUE}},
    task_serializer="json",
    result_serializer="json",
    result_expires=NOTE_TTL,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)

# ----------------------------------------------------------------- storage

metadata = sa.MetaData()

#: The effect that must happen exactly once: one row per captured payment.
payments = sa.Table(
    "demo_payments",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("order_id", sa.Text, nullable=False, index=True),
    sa.Column("amount", sa.Numeric(12, 2), nullable=False),
    sa.Column("token", sa.BigInteger, nullable=False),
    sa.Column("worker", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
              server_default=sa.func.now()),
)

#: An order's status, written only under its lock and fenced by the lock's token.
order_status = sa.Table(
    "demo_order_status",
    metadata,
    sa.Column("order_id", sa.Text, primary_key=True),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("token", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False,
              server_default=sa.func.now()),
)


def sqlalchemy_url(url: str = DATABASE_URL) -> str:
    """``postgresql://`` → ``postgresql+psycopg://`` (psycopg 3)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


_per_process: dict[tuple[int, str], Any] = {}


def notes() -> redis.Redis:
    """This process's Redis client for the demo's observations."""
    key = (os.getpid(), "redis")
    if key not in _per_process:
        _per_process[key] = redis.Redis.from_url(RELIABLE_REDIS_URL, decode_responses=True)
    return _per_process[key]  # type: ignore[no-any-return]


def note_key(*parts: str) -> str:
    """A key of the demo's observations, inside the demo's own prefix."""
    return ":".join(["{" + PREFIX + "}", "demo", *parts])


def note(key: str, value: Any) -> None:
    """Append one observation (JSON) to a list that expires on its own."""
    r = notes()
    r.rpush(key, json.dumps(value))
    r.expire(key, NOTE_TTL)


def process_start(pid: int | str = "self") -> str | None:
    """Kernel start time of a process: with its pid, it names one process unambiguously."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def header(task: ReliableTask, name: str) -> Any:
    """A message header of the running task (Celery exposes them two ways)."""
    request = task.request
    value = getattr(request, name, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(name)
    return value


def worker_name() -> str:
    return f"{socket.gethostname()}/{os.getpid()}"


def wait_gate(gate: str, timeout: float = 60.0) -> None:
    """Demo instrumentation: block until the runner sets ``gate`` (a Redis key)."""
    r = notes()
    deadline = time.monotonic() + timeout
    while not r.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)


# ----------------------------------------------------------------- payments

@app.task(base=ReliableTask, bind=True, name="demo.capture_payment",
          lock="order:{order_id}", lock_ttl=CAPTURE_LOCK_TTL,
          idempotency_key="capture:{order_id}", idempotency_lease=CAPTURE_LEASE,
          bulkhead="critical", acks_late=True, reject_on_worker_lost=True,
          defer_delay=0.05, defer_max_delay=0.5)
def capture_payment(self: ReliableTask, order_id: str, amount: str,
                    gateway_seconds: float = 0.2, gate: str | None = None,
                    gate_at: str = "before-write") -> dict[str, Any]:
    """Capture an order's payment: exactly one payment row per order, fenced.

    The row, the order's status, the idempotency record and the result commit
    in one PostgreSQL transaction when the task returns. ``gate`` (demo
    instrumentation) holds the task ``before-write`` or ``after-write`` until
    the runner sets that Redis key.
    """
    token = self.fence_token
    me = {"pid": os.getpid(), "proc_start": process_start(), "worker": worker_name(),
          "token": token, "retries": self.request.retries,
          "deferrals": int(header(self, DEFER_HEADER) or 0), "at": time.time()}
    note(note_key(order_id, "started"), me)
    if gate is not None and gate_at == "before-write":
        wait_gate(gate)
    with self.idempotent_transaction() as session:
        self.fence.check_postgres(session)  # a stale lock holder stops here
        session.execute(sa.insert(payments).values(
            order_id=order_id, amount=Decimal(amount), token=token, worker=me["worker"]))
        row = {"status": "captured", "token": token}
        session.execute(insert(order_status).values(order_id=order_id, **row)
                        .on_conflict_do_update(index_elements=[order_status.c.order_id],
                                               set_={**row, "updated_at": sa.func.now()}))
    note(note_key(order_id, "written"), me)
    time.sleep(gateway_seconds)  # the payment gateway call
    if gate is not None and gate_at == "after-write":
        wait_gate(gate)
    return {"order_id": order_id, "amount": amount, "status": "captured", "token": token,
            "pid": me["pid"], "worker": me["worker"]}


@app.task(base=ReliableTask, bind=True, name="demo.cancel_order",
          lock="order:{order_id}", lock_ttl=CAPTURE_LOCK_TTL,
          idempotency_key="cancel:{order_id}", idempotency_lease=CAPTURE_LEASE,
          bulkhead="critical", acks_late=True, reject_on_worker_lost=True,
          defer_delay=0.05, defer_max_delay=0.5)
def cancel_order(self: ReliableTask, order_id: str, reason: str) -> dict[str, Any]:
    """Cancel an order: under the order's lock, fenced like a capture."""
    token = self.fence_token
    with self.idempotent_transaction() as session:
        self.fence.check_postgres(session)
        row = {"status": "cancelled", "token": token}
        session.execute(insert(order_status).values(order_id=order_id, **row)
                        .on_conflict_do_update(index_elements=[order_status.c.order_id],
                                               set_={**row, "updated_at": sa.func.now()}))
    return {"order_id": order_id, "status": "cancelled", "reason": reason, "token": token}


# ------------------------------------------------------------------ partner

class PartnerUnavailable(ConnectionError):
    """The partner API did not answer (a connection error: retried, counted by the breaker)."""


@app.task(base=ReliableTask, bind=True, name="demo.notify_partner",
          circuit_breaker="partner", backoff=PARTNER_BACKOFF, retry_budget="20/s",
          defer_delay=0.2, defer_max_delay=1.0)
def notify_partner(self: ReliableTask, order_id: str, partner: str) -> dict[str, Any]:
    """Tell the shipping partner about an order.

    The partner is simulated (demo instrumentation): it is down while the
    Redis key ``<partner>:down`` exists, and each call is recorded.
    """
    r = notes()
    prev = header(self, PREV_DELAY_HEADER)
    call = {"order_id": order_id, "at": time.time(), "retries": self.request.retries,
            "prev_delay": None if prev is None else float(prev),
            "deferrals": int(header(self, DEFER_HEADER) or 0), "pid": os.getpid()}
    time.sleep(0.05)  # the HTTP round trip
    call["ok"] = not r.exists(note_key(partner, "down"))
    note(note_key(partner, "calls"), call)
    if not call["ok"]:
        raise PartnerUnavailable(f"partner {partner} is not answering")
    return {"order_id": order_id, "notified": True, "deferrals": call["deferrals"],
            "retries": call["retries"]}


# ------------------------------------------------------------------- emails

@app.task(base=ReliableTask, bind=True, name="demo.send_email", ignore_result=True,
          defer_delay=0.1, defer_max_delay=1.0)
def send_email(self: ReliableTask, to: str, template: str, campaign: str) -> None:
    """Send one email; queue ``emails`` is drained at the bucket's rate, fleet-wide."""
    note(note_key(campaign, "sent"), {"at": time.time(), "to": to, "pid": os.getpid()})
    time.sleep(0.01)  # the SMTP call


# ------------------------------------------------------------------ reports

# Count report bodies running at once and keep the maximum, atomically.
_ENTER = """
local v = redis.call('INCR', KEYS[1])
if v > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], v) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return v
"""


@app.task(base=ReliableTask, bind=True, name="demo.render_report", bulkhead=REPORT_TIER)
def render_report(self: ReliableTask, report_id: str, batch: str,
                  seconds: float = 0.5) -> dict[str, Any]:
    """An optional report: when its tier is full, it is dropped (state DROPPED)."""
    r = notes()
    active, peak = note_key(batch, "active"), note_key(batch, "max-active")
    r.eval(_ENTER, 2, active, peak, NOTE_TTL)
    try:
        time.sleep(seconds)
    finally:
        r.decr(active)
    note(note_key(batch, "ran"), report_id)
    return {"report": report_id, "pid": os.getpid()}


@app.task(base=ReliableTask, bind=True, name="demo.rebuild_daily_report",
          lock="report:{day}", lock_ttl=REPORT_LOCK_TTL, lock_contention="skip")
def rebuild_daily_report(self: ReliableTask, day: str, seconds: float = 1.0) -> dict[str, Any]:
    """A singleton: a second rebuild of the same day while one runs is dropped (SKIPPED)."""
    r = notes()
    r.incr(note_key(day, "report-runs"))
    r.expire(note_key(day, "report-runs"), NOTE_TTL)
    time.sleep(seconds)
    return {"day": day, "token": self.fence_token, "pid": os.getpid()}


if os.environ.get("DEMO_METRICS_PORT"):
    # Prometheus /metrics of this worker (its prefork children merged through
    # PROMETHEUS_MULTIPROC_DIR, which must be set before the worker starts).
    from celery_reliable.prometheus import setup_worker

    setup_worker(app, port=int(os.environ["DEMO_METRICS_PORT"]))


@signals.worker_ready.connect
def _announce_ready(sender: Any = None, **_: Any) -> None:
    """Tell a runner that spawned this worker that it consumes now (DEMO_READY_DIR)."""
    ready_dir = os.environ.get("DEMO_READY_DIR")
    if ready_dir and sender is not None:
        Path(ready_dir, "ready-" + str(sender.hostname).split("@", 1)[0]).touch()
