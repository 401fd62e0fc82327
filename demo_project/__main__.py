"""``python -m demo_project``: run a real worker fleet, inject faults, verify each guarantee.

Starts three ``celery -A demo_project.app worker`` processes (prefork, two
children each, queues ``demo`` and ``emails``), then runs the scenarios:
duplicate payment submissions, kill -9 of the process capturing a payment, a
lock holder paused past its lease, a partner outage behind the circuit
breaker, an email campaign through the fleet-wide bucket, a report flood on
the optional tier and a singleton report. It ends with a table of each
guarantee (configured, observed, PASS/FAIL).

Brokers: Redis and RabbitMQ (``DEMO_BROKER_URL=amqp://guest:guest@127.0.0.1:5672//``);
task results always go to a Redis result backend (``DEMO_RESULT_URL``).

Exit code: 0 all PASS, 1 any FAIL, 2 if the broker, Redis or PostgreSQL cannot
be reached or is not supported (or another run is using the same key prefix),
130 if interrupted.
``--external-workers`` (or ``DEMO_EXTERNAL_WORKERS=1``) uses workers that
already consume ``demo`` and ``emails`` instead; the kill and pause scenarios
then need to see their processes (same host, or one PID namespace in Docker
Compose: ``pid: service:worker``).

Only the demo's own things are touched: its queues, its key prefix, the rows
of this run's orders, fences, idempotency records and dead letters, and its
``demo_*`` tables. Each run removes its own rows, keys and results at the end
(``--keep-data`` keeps them) and its last lines say where they are.
``--cleanup`` removes everything the demo ever created: its tables (and the
celery-reliable tables it had to create, once only the demo's rows are in
them), its queues, and every key under its prefix.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa
from celery.result import AsyncResult
from celery.states import READY_STATES
from sqlalchemy.engine import make_url

from celery_reliable import (
    DROPPED,
    SKIPPED,
    ConfigurationError,
    breaker_state,
    bulkhead_stats,
    create_tables,
)
from celery_reliable.config import ReliableSettings
from celery_reliable.keys import KeySpace, idempotency_digest
from celery_reliable.schema import dead_letters, fences, idempotency
from celery_reliable.schema import metadata as reliable_metadata

from . import app as demo
from . import checks
from .app import (
    CAPTURE_LOCK_TTL,
    PARTNER_BACKOFF,
    QUEUES,
    REPORT_TIER,
    app,
    cancel_order,
    capture_payment,
    note_key,
    notify_partner,
    order_status,
    payments,
    process_start,
    rebuild_daily_report,
    render_report,
    send_email,
)
from .checks import Verdict
from .ui import UI, PlainUI, make_ui

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 3
CONCURRENCY = 2
DUPLICATES = 20
PARTNER_TASKS = 12
OUTAGE = 4.0
EMAILS = 150
REPORTS = 24
REPORT_RATE = 12.0  # reports offered per second
REPORT_SECONDS = 0.5
SINGLETON_DUPLICATES = 2
#: Another run's claim on the key prefix expires after this long (a killed runner).
CLAIM_TTL = 150

HOW_TO_START = ("start them with `docker compose up -d redis postgres`, or point "
                "DEMO_BROKER_URL / DEMO_RESULT_URL / DEMO_RELIABLE_REDIS_URL / "
                "DEMO_DATABASE_URL at running servers")

FINAL_STATES = frozenset(READY_STATES) | {SKIPPED, DROPPED}

ui: UI = PlainUI()


class Unavailable(Exception):
    """A service or the worker fleet is not there; one line says what to do."""


class Unsupported(Unavailable):
    """A broker or result backend the demo does not run on (starting a server won't help)."""


def say(line: str = "") -> None:
    ui.line(line)


def safe_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (drivers add context lines and SQL)."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else ""


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# ------------------------------------------------------------------ services

#: Brokers the demo runs on, by URL scheme. The scenarios need a broker that
#: redelivers an unacknowledged message when its worker dies (kill -9 under
#: ``acks_late``) and that the runner can purge; both of these do, and the
#: demo is run on both (tests/test_demo.py). Other transports are refused.
BROKERS = {"redis": "Redis", "rediss": "Redis",
           "amqp": "RabbitMQ", "amqps": "RabbitMQ", "pyamqp": "RabbitMQ"}
#: Result backends the runner can read and forget results in.
RESULT_BACKENDS = ("redis", "rediss")


def scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def broker_kind(url: str = demo.BROKER_URL) -> str:
    """"Redis" or "RabbitMQ", or Unavailable naming the brokers the demo supports."""
    kind = BROKERS.get(scheme(url))
    if kind is None:
        raise Unsupported(f"DEMO_BROKER_URL {safe_url(url)}: the demo runs on a Redis "
                          "(redis://, rediss://) or RabbitMQ (amqp://, amqps://, pyamqp://) "
                          "broker only, e.g. DEMO_BROKER_URL=amqp://guest:guest@127.0.0.1:5672//")
    return kind


def _ping_redis(what: str, url: str) -> None:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
        try:
            client.ping()
        finally:
            client.close()
    except (redis.RedisError, ValueError, OSError) as exc:
        raise Unavailable(f"cannot reach {what} at {safe_url(url)} "
                          f"({type(exc).__name__}: {first_line(exc)})") from exc


def check_services() -> sa.Engine:
    """Reach the broker, every Redis and PostgreSQL the demo uses, or raise Unavailable."""
    kind = broker_kind()
    if scheme(demo.RESULT_URL) not in RESULT_BACKENDS:
        raise Unsupported(f"DEMO_RESULT_URL {safe_url(demo.RESULT_URL)}: the demo keeps task "
                          "results in Redis only (redis://, rediss://), whatever the broker")
    if kind == "Redis":
        _ping_redis("Redis (broker)", demo.BROKER_URL)
    else:
        try:
            with app.connection_for_write(connect_timeout=3) as conn:
                conn.connect()
        except Exception as exc:  # socket errors, amqp's AccessRefused, a bad vhost
            raise Unavailable(f"cannot reach {kind} (broker) at {safe_url(demo.BROKER_URL)} "
                              f"({type(exc).__name__}: {first_line(exc)})") from exc
    _ping_redis("Redis (results)", demo.RESULT_URL)
    _ping_redis("Redis (celery-reliable)", demo.RELIABLE_REDIS_URL)
    try:
        engine = sa.create_engine(demo.sqlalchemy_url(), connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:  # OperationalError, a bad URL, a missing driver
        raise Unavailable(f"cannot reach PostgreSQL at {safe_url(demo.DATABASE_URL)} "
                          f"({type(exc).__name__}: {first_line(exc)})") from exc
    return engine


def purge_queues() -> int:
    """Drop messages left in the demo's own queues by an interrupted earlier run.

    Each queue is declared first, as a worker declares it: RabbitMQ refuses to
    purge a queue that does not exist (and closes the channel).
    """
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        purged = 0
        for name in QUEUES:
            queue = app.amqp.queues[name].bind(channel)
            queue.declare()
            purged += int(queue.purge() or 0)
        return purged


def delete_queues() -> None:
    """Delete the demo's queues (and, on RabbitMQ, their exchanges) from the broker."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        for name in QUEUES:
            queue = app.amqp.queues[name].bind(channel)
            queue.declare()  # kombu's Redis transport forgets only the bindings it declared
            queue.delete()
            if queue.exchange.name and broker_kind() == "RabbitMQ":
                with contextlib.suppress(Exception):
                    queue.exchange.delete(if_unused=True)


class Claim:
    """This run's claim on the key prefix: the guards' state (breaker, bucket,
    tiers) is fleet-wide, so two runs at once would measure each other."""

    RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end"

    def __init__(self, client: redis.Redis, run: str) -> None:
        self.client, self.run = client, run
        self.key = note_key("run")

    def take(self) -> str | None:
        """None if claimed, else the other run's id."""
        if self.client.set(self.key, self.run, nx=True, ex=CLAIM_TTL):
            return None
        return str(self.client.get(self.key) or "?")

    def refresh(self) -> None:
        with contextlib.suppress(redis.RedisError):
            if self.client.get(self.key) == self.run:
                self.client.expire(self.key, CLAIM_TTL)

    def release(self) -> None:
        with contextlib.suppress(redis.RedisError):
            self.client.eval(self.RELEASE, 1, self.key, self.run)


# ------------------------------------------------------------------- workers

class Fleet:
    """``celery worker`` subprocesses of demo_project.app, or already-running ones."""

    def __init__(self, run: str, external: bool) -> None:
        self.run = run
        self.external = external
        self.tmp = Path(tempfile.mkdtemp(prefix=f"reliable-demo-{run}-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.names: list[str] = []
        self.paused: set[int] = set()
        self.processes = WORKERS * CONCURRENCY  # task-executing processes, fleet-wide

    def start(self, timeout: float = 60) -> str:
        if self.external:
            return self._find_external(timeout=float(os.environ.get("DEMO_WORKER_WAIT", "90")))
        env = dict(os.environ)
        env["DEMO_READY_DIR"] = str(self.tmp)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        for i in range(WORKERS):
            name = f"demo{i + 1}-{self.run}"
            log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - the worker writes it
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "demo_project.app", "worker",
                 "-P", "prefork", "-c", str(CONCURRENCY), "-Q", ",".join(QUEUES),
                 "-n", f"{name}@%h", "--without-mingle", "--without-gossip", "-l", "info"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            ))
            log.close()
            self.names.append(name)
        deadline = time.monotonic() + timeout
        for name, proc in zip(self.names, self.procs, strict=True):
            while not (self.tmp / f"ready-{name}").exists():
                if proc.poll() is not None:
                    raise RuntimeError(f"worker {name} exited with {proc.returncode}; "
                                       f"log: {self.tmp / (name + '.log')}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker {name} not ready after {timeout:.0f}s; "
                                       f"log: {self.tmp / (name + '.log')}")
                time.sleep(0.05)
        return (f"{WORKERS} workers (prefork x{CONCURRENCY}, queues {','.join(QUEUES)}), "
                f"pids {', '.join(str(p.pid) for p in self.procs)}")

    def _find_external(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            replies = app.control.inspect(timeout=1.0).active_queues() or {}
            consumed = {host: {q.get("name") for q in queues or ()}
                        for host, queues in replies.items()}
            found = sorted(h for h, names in consumed.items() if names & set(QUEUES))
            if found and all(any(q in names for names in consumed.values()) for q in QUEUES):
                self.names = found
                stats = app.control.inspect(destination=found, timeout=1.0).stats() or {}
                total = sum(int((s.get("pool") or {}).get("max-concurrency") or 0)
                            for s in stats.values())
                self.processes = total or self.processes
                if self.processes < 2:
                    raise Unavailable(f"the demo needs at least 2 worker processes on queues "
                                      f"{','.join(QUEUES)} (one is paused while another works); "
                                      f"found {self.processes}")
                return (f"external workers on queues {','.join(QUEUES)}: {', '.join(found)} "
                        f"({self.processes} processes)")
            if time.monotonic() > deadline:
                raise Unavailable(f"no workers consume queues {', '.join(QUEUES)} after "
                                  f"{timeout:.0f}s; start them with `celery -A demo_project.app "
                                  f"worker -Q {','.join(QUEUES)}` (or `docker compose up -d "
                                  "worker worker-2`)")

    def verify(self, pid: int, proc_start: str | None) -> None:
        """Make sure ``pid`` names the task's process here (not a recycled or foreign pid)."""
        here = process_start(pid)
        if proc_start is not None or here is not None:
            if here != proc_start:
                raise RuntimeError(
                    f"pid {pid} is not the task's worker process in this PID namespace; run "
                    "the demo on the workers' host (Compose: `pid: service:worker`)")
        elif self.external:
            raise RuntimeError("cannot verify the worker's pid without /proc")

    def pause(self, pid: int, proc_start: str | None) -> None:
        self.verify(pid, proc_start)
        os.kill(pid, signal.SIGSTOP)
        self.paused.add(pid)

    def resume(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        self.paused.discard(pid)

    def kill(self, pid: int, proc_start: str | None) -> None:
        self.verify(pid, proc_start)
        os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        for pid in list(self.paused):
            self.resume(pid)
        for proc in self.procs:  # warm shutdown: the main process waits for its children
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        # Children that outlived their parent (a SIGKILLed main process).
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

    def logs_hint(self) -> str:
        return f"worker logs: {self.tmp}" if self.procs else "see the workers' logs"


# ----------------------------------------------------------------- the demo

#: ``--only`` names of the scenarios, in the order they run.
SCENARIOS = ("duplicates", "kill", "pause", "partner", "emails", "reports", "singleton")


class Demo:
    def __init__(self, fleet: Fleet, engine: sa.Engine, claim: Claim,
                 only: Sequence[str] = SCENARIOS) -> None:
        self.fleet = fleet
        self.engine = engine
        self.claim = claim
        self.run = fleet.run
        self.r = redis.Redis.from_url(demo.RELIABLE_REDIS_URL, decode_responses=True)
        self.keys = KeySpace(demo.PREFIX)
        self.settings = ReliableSettings.from_conf(app.conf)
        self.sent: list[str] = []
        self.order_ids: list[str] = []
        self.days: list[str] = []
        self.step_no = 0
        every = dict(zip(SCENARIOS, (
            self.duplicates, self.killed_payment, self.paused_holder, self.partner_outage,
            self.email_bucket, self.report_flood, self.singleton), strict=True))
        self.scenarios: list[Callable[[], list[Verdict]]] = [
            every[name] for name in SCENARIOS if name in only]

    # -- helpers

    def ident(self, name: str) -> str:
        """An id of this run (every note key, order and report embeds the run id)."""
        return f"d{self.run}-{name}"

    def order(self, name: str) -> str:
        order_id = self.ident(name)
        self.order_ids.append(order_id)
        return order_id

    def title(self, text: str) -> str:
        self.step_no += 1
        return f"[{self.step_no}/{len(self.scenarios)}] {text}"

    def send(self, task: Any, **kwargs: Any) -> AsyncResult:
        result = task.apply_async(kwargs=kwargs)
        self.sent.append(result.id)
        return result

    def capture(self, order_id: str, **kwargs: Any) -> AsyncResult:
        return self.send(capture_payment, order_id=order_id, amount="19.99", **kwargs)

    def states(self, results: Sequence[AsyncResult]) -> list[str]:
        """Each result's state, in one round trip to the result backend."""
        backend = app.backend
        try:
            values = backend.mget([backend.get_key_for_task(r.id) for r in results])
            return [backend.decode_result(v)["status"] if v else "PENDING" for v in values]
        except AttributeError:  # not a key-value backend
            return [r.state for r in results]

    def wait_all(self, results: Sequence[AsyncResult], timeout: float, step: Any) -> list[str]:
        """Wait until every result is final (or the timeout); returns their states."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.states(results)
            done = sum(s in FINAL_STATES for s in states)
            step.update(done)
            if done == len(results):
                return states
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(results) - done} of {len(results)} tasks unfinished "
                                   f"after {timeout:.0f}s ({checks.state_counts(states)})")
            time.sleep(0.1)

    def notes(self, key: str) -> list[Any]:
        return [json.loads(x) for x in self.r.lrange(key, 0, -1)]

    def payment_rows(self, order_id: str) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(payments)
                                    .where(payments.c.order_id == order_id)).scalar() or 0)

    def status_row(self, order_id: str) -> tuple[str, int] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(order_status.c.status, order_status.c.token)
                               .where(order_status.c.order_id == order_id)).first()
        return None if row is None else (str(row.status), int(row.token))

    def fence_row(self, resource: str) -> int | None:
        with self.engine.connect() as conn:
            token = conn.execute(sa.select(fences.c.token)
                                 .where(fences.c.resource == resource)).scalar()
        return None if token is None else int(token)

    # -- 1: duplicates

    def duplicates(self) -> list[Verdict]:
        order = self.order("dup")
        with ui.step(self.title(f"duplicate submissions: {DUPLICATES} captures of order "
                                f"{order} at once"), DUPLICATES) as step:
            results = [self.capture(order) for _ in range(DUPLICATES)]
            states = self.wait_all(results, 40, step)
        values = [r.result if s == "SUCCESS" else None for r, s in zip(results, states,
                                                                          strict=True)]
        started = self.notes(note_key(order, "started"))
        rows = self.payment_rows(order)
        replayed = sum(s == "SUCCESS" for s in states) - len(started)
        say(f"    {checks.state_counts(states)}; body ran {len(started)}x "
            f"(in {started[0]['worker'] if started else '-'}), {replayed} duplicates "
            "replayed the stored result")
        say(f"    demo_payments rows for {order}: {rows}")
        return [checks.check_duplicates(checks.Duplicates(
            submissions=DUPLICATES, states=states, results=values, executions=len(started),
            effect_rows=rows))]

    # -- 2: kill -9 mid-payment

    def killed_payment(self) -> list[Verdict]:
        order = self.order("kill9")
        gate = note_key(order, "gate")
        killed_pid: int | None = None
        rows_at_kill = -1
        with ui.step(self.title(f"kill -9 mid-payment: order {order}"), 3) as step:
            result = self.capture(order, gate=gate, gate_at="after-write")
            try:
                first = json.loads(wait_for(lambda: self.r.lindex(note_key(order, "written"), 0),
                                            20, "the capture to write its payment row"))
                step.update(1)
                rows_at_kill = self.payment_rows(order)
                self.fleet.kill(first["pid"], first["proc_start"])
                killed_pid = first["pid"]
                killed_at = time.monotonic()
                say(f"    payment row written (uncommitted: {rows_at_kill} rows visible) by "
                    f"pid {killed_pid} with token {first['token']}: SIGKILL")
                step.update(2)
            finally:
                self.r.set(gate, 1, ex=demo.NOTE_TTL)  # the redelivery must not wait
            [state] = self.wait_all([result], 40, _Offset(step, 2))
        took = time.monotonic() - killed_at
        started = self.notes(note_key(order, "started"))
        value = result.result if state == "SUCCESS" else None
        rows = self.payment_rows(order)
        result_pid = value.get("pid") if isinstance(value, dict) else None
        say(f"    redelivered and {state} in pid {result_pid} {took:.1f}s after the kill "
            f"(the dead capture's lease expired first); body ran {len(started)}x")
        say(f"    demo_payments rows for {order}: {rows}")
        return [checks.check_killed_payment(checks.KilledPayment(
            killed_pid=killed_pid, rows_at_kill=rows_at_kill, executions=len(started),
            final_state=state, result_pid=result_pid, effect_rows=rows))]

    # -- 3: paused lock holder

    def paused_holder(self) -> list[Verdict]:
        order = self.order("paused")
        resource = f"order:{order}"
        gate = note_key(order, "gate")
        with ui.step(self.title(f"paused lock holder: capture of {order} stopped, order "
                                "cancelled meanwhile"), 3) as step:
            a = self.capture(order, gate=gate, gate_at="before-write", gateway_seconds=0.0)
            info_a = json.loads(wait_for(lambda: self.r.lindex(note_key(order, "started"), 0),
                                         20, "the capture to start"))
            self.fleet.pause(info_a["pid"], info_a["proc_start"])
            paused_at = time.monotonic()
            say(f"    capture holds the lock with token {info_a['token']} in pid "
                f"{info_a['pid']}: SIGSTOP")
            step.update(1)
            try:
                wait_for(lambda: not self.r.exists(self.keys.lock(resource)),
                         CAPTURE_LOCK_TTL + 5, "the capture's lock to expire")
                expired_after = time.monotonic() - paused_at
                b = self.send(cancel_order, order_id=order, reason="customer request")
                b.get(timeout=20, propagate=False)
                b_value = b.result if b.state == "SUCCESS" else {}
                say(f"    lock expired {expired_after:.1f}s into the pause; the cancellation "
                    f"took token {b_value.get('token')}: {b.state}")
                step.update(2)
                # Past the lock's whole TTL, whenever its last renewal happened.
                time.sleep(max(0.0, paused_at + CAPTURE_LOCK_TTL + 0.5 - time.monotonic()))
            finally:
                self.r.set(gate, 1, ex=demo.NOTE_TTL)  # let A go on, even if interrupted
                self.fleet.resume(info_a["pid"])
            paused_for = time.monotonic() - paused_at
            a.get(timeout=20, propagate=False)
            step.update(3)
        error = a.result if a.state == "FAILURE" else None
        fence_token = self.fence_row(resource)
        status = self.status_row(order)
        rows = self.payment_rows(order)
        say(f"    SIGCONT after {paused_for:.1f}s: the capture's fenced write -> "
            f"{type(error).__name__ if error else a.state}; payment rows {rows}; order "
            f"status {status}; reliable_fences token {fence_token}")
        return [checks.check_paused_holder(checks.PausedHolder(
            lock_ttl=CAPTURE_LOCK_TTL, paused_for=paused_for,
            expired_while_paused=expired_after < paused_for, holder_token=info_a["token"],
            holder_state=a.state, holder_error=type(error).__name__ if error else None,
            holder_rows=rows, taker_token=b_value.get("token"), taker_state=b.state,
            order_status=status, fence_token=fence_token))]

    # -- 4: partner outage

    def partner_outage(self) -> list[Verdict]:
        partner = self.ident("partner")
        spec = self.settings.circuit_breakers["partner"]
        down = note_key(partner, "down")
        # The breaker is the demo's own (its prefix); start from closed.
        self.r.delete(*self.keys.breaker("partner"))
        with ui.step(self.title(f"partner outage: {PARTNER_TASKS} notifications, partner down "
                                f"for {OUTAGE:g}s"), PARTNER_TASKS) as step:
            self.r.set(down, 1, ex=demo.NOTE_TTL)
            t_down = time.monotonic()
            results = [self.send(notify_partner, order_id=self.ident(f"p{i:02d}"),
                                 partner=partner) for i in range(PARTNER_TASKS)]
            seen: list[int] = []
            while time.monotonic() - t_down < OUTAGE:
                state = breaker_state(app, "partner")
                if not seen or seen[-1] != state:
                    seen.append(state)
                time.sleep(0.05)
            self.r.delete(down)
            say(f"    while down, the breaker went {' -> '.join(_state_name(s) for s in seen)}"
                "; partner back up")
            states = self.wait_all(results, 40, step)
        final = breaker_state(app, "partner")
        calls = [checks.PartnerCall(at=c["at"], ok=c["ok"], retries=c["retries"],
                                    prev_delay=c["prev_delay"])
                 for c in self.notes(note_key(partner, "calls"))]
        values = [r.result for r, s in zip(results, states, strict=True) if s == "SUCCESS"]
        deferred = sum(1 for v in values if isinstance(v, dict) and v.get("deferrals", 0) > 0)
        bound = checks.breaker_call_bound(self.fleet.processes, spec.failure_threshold,
                                          spec.half_open_max, OUTAGE, spec.open_seconds)
        failed = sum(not c.ok for c in calls)
        say(f"    {len(calls)} partner calls, {failed} while it was down (at most {bound}: "
            f"{spec.failure_threshold - 1} before the breaker opens + 1 in flight per process "
            f"x {self.fleet.processes} + {spec.half_open_max} probes per {spec.open_seconds:g}s "
            f"open); {deferred} tasks deferred by the open breaker instead of failing; "
            f"{checks.state_counts(states)}; breaker {_state_name(final)}")
        outage = checks.PartnerOutage(
            tasks=PARTNER_TASKS, states=states, outage=OUTAGE,
            opened_while_down=any(s != 0 for s in seen), final_breaker=final,
            deferred_tasks=deferred, calls=calls, bound=bound,
            failure_threshold=spec.failure_threshold, open_seconds=spec.open_seconds,
            backoff=(PARTNER_BACKOFF.base, PARTNER_BACKOFF.cap, PARTNER_BACKOFF.jitter))
        return [checks.check_breaker(outage), checks.check_retry_jitter(outage)]

    # -- 5: email bucket

    def email_bucket(self) -> list[Verdict]:
        campaign = self.ident("campaign")
        spec = self.settings.queue_rate_limits[demo.EMAIL_QUEUE]
        sent_key = note_key(campaign, "sent")
        with ui.step(self.title(f"email campaign: {EMAILS} emails at once into queue "
                                f"'emails' ({spec.rate:g}/s fleet-wide)"), EMAILS) as step:
            t0 = time.monotonic()
            for i in range(EMAILS):
                self.send(send_email, to=f"customer{i:03d}@example.com",
                          template="order-shipped", campaign=campaign)
            deadline = t0 + 20 + EMAILS / spec.rate
            while (done := self.r.llen(sent_key)) < EMAILS:
                step.update(done)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{EMAILS - done} of {EMAILS} emails unsent after "
                                       f"{deadline - t0:.0f}s")
                time.sleep(0.1)
            step.update(EMAILS)
        sent = self.notes(sent_key)
        starts = [s["at"] for s in sent]
        span = max(starts) - min(starts)
        say(f"    {len(sent)} emails in {span:.1f}s by {len({s['pid'] for s in sent})} "
            f"processes; steady rate {checks.steady_rate(starts, spec.burst) or 0:.1f}/s, "
            f"peak {checks.max_in_window(starts, 1.0)} in any 1s")
        return [checks.check_bucket(checks.BucketRun(
            sent=EMAILS, starts=starts, recipients=len({s["to"] for s in sent}),
            rate=spec.rate, burst=spec.burst))]

    # -- 6: report flood

    def report_flood(self) -> list[Verdict]:
        batch = self.ident("reports")
        tier = self.settings.bulkheads[REPORT_TIER]
        before = bulkhead_stats(app)[REPORT_TIER].dropped
        with ui.step(self.title(f"report flood: {REPORTS} reports at {REPORT_RATE:g}/s on tier "
                                f"'{REPORT_TIER}' ({tier.concurrent} at once, "
                                f"{tier.policy})"), REPORTS) as step:
            results = []
            t0 = time.monotonic()
            for i in range(REPORTS):
                time.sleep(max(0.0, t0 + i / REPORT_RATE - time.monotonic()))
                results.append(self.send(render_report, report_id=f"r{i:02d}", batch=batch,
                                         seconds=REPORT_SECONDS))
            states = self.wait_all(results, 30, step)
        dropped = bulkhead_stats(app)[REPORT_TIER].dropped - before
        peak = int(self.r.get(note_key(batch, "max-active")) or 0)
        ran = self.r.llen(note_key(batch, "ran"))
        say(f"    {checks.state_counts(states)}; {ran} ran, at most {peak} at once; "
            f"bulkhead_stats dropped +{dropped}")
        return [checks.check_report_flood(checks.ReportFlood(
            sent=REPORTS, states=states, limit=tier.concurrent, max_concurrent=peak,
            dropped_counter=dropped, ran=ran))]

    # -- 7: singleton

    def singleton(self) -> list[Verdict]:
        day = self.ident("2025-01-31")
        self.days.append(day)
        with ui.step(self.title(f"singleton report: rebuild {day}, then "
                                f"{SINGLETON_DUPLICATES} duplicates while it runs"),
                     1 + SINGLETON_DUPLICATES) as step:
            first = self.send(rebuild_daily_report, day=day, seconds=1.5)
            wait_for(lambda: self.r.get(note_key(day, "report-runs")), 20, "the first rebuild")
            dups = [self.send(rebuild_daily_report, day=day, seconds=1.5)
                    for _ in range(SINGLETON_DUPLICATES)]
            states = self.wait_all([first, *dups], 20, step)
        runs = int(self.r.get(note_key(day, "report-runs")) or 0)
        say(f"    first: {states[0]}; duplicates: {', '.join(states[1:])}; body ran {runs}x")
        return [checks.check_singleton(checks.Singleton(
            first_state=states[0], duplicate_states=states[1:], runs=runs))]

    def run_all(self) -> list[Verdict]:
        verdicts: list[Verdict] = []
        for scenario in self.scenarios:
            self.claim.refresh()
            try:
                verdicts += scenario()
            except Exception as exc:
                name = scenario.__name__.replace("_", " ")
                say(f"    error: {type(exc).__name__}: {exc}")
                verdicts.append(checks.error_verdict(name, exc))
        return verdicts

    # -- cleanup

    def cleanup(self, keep: bool = False) -> None:
        """Forget this run's results, keys and rows; nothing else.

        ``keep``: leave them for inspection (``--keep-data``); the ids of the
        results are recorded under the demo's prefix so ``--cleanup`` finds them.
        """
        with contextlib.suppress(Exception):
            # Only after a failure: tasks still cycling in external workers (spawned
            # ones are stopped by now; whatever they handed back is purged).
            unfinished = [i for i in self.sent
                          if AsyncResult(i, app=app).state not in FINAL_STATES]
            if unfinished and self.fleet.external and self.fleet.names:
                app.control.revoke(unfinished, destination=self.fleet.names)
            purge_queues()
        if keep:
            with contextlib.suppress(redis.RedisError):
                if self.sent:
                    self.r.sadd(results_key(self.run), *self.sent)
                    self.r.expire(results_key(self.run), demo.NOTE_TTL)
            self.r.close()
            return
        with contextlib.suppress(Exception):
            for task_id in self.sent:
                AsyncResult(task_id, app=app).forget()
        resources = [f"order:{o}" for o in self.order_ids] + [f"report:{d}" for d in self.days]
        idem = [(task.name, f"{kind}:{o}") for o in self.order_ids
                for task, kind in ((capture_payment, "capture"), (cancel_order, "cancel"))]
        with contextlib.suppress(redis.RedisError):
            doomed = [k for res in resources for k in (self.keys.lock(res), self.keys.fence(res))]
            doomed += [self.keys.idempotency(task, key) for task, key in idem]
            doomed += [self.keys.deliveries(task_id) for task_id in self.sent]
            doomed += list(self.r.scan_iter(match=note_key(self.ident("*")), count=1000))
            for i in range(0, len(doomed), 500):
                self.r.delete(*doomed[i:i + 500])
        with contextlib.suppress(sa.exc.SQLAlchemyError), self.engine.begin() as conn:
            if self.order_ids:
                conn.execute(payments.delete().where(payments.c.order_id.in_(self.order_ids)))
                conn.execute(order_status.delete()
                             .where(order_status.c.order_id.in_(self.order_ids)))
                conn.execute(idempotency.delete().where(sa.tuple_(
                    idempotency.c.task, idempotency.c.key_digest).in_(
                        [(task, idempotency_digest(task, key)) for task, key in idem])))
            if resources:
                conn.execute(fences.delete().where(fences.c.resource.in_(resources)))
            if self.sent:
                conn.execute(dead_letters.delete().where(dead_letters.c.task_id.in_(self.sent)))
        self.r.close()


def results_key(run: str) -> str:
    """The ids of a kept run's task results (``--keep-data``), for ``--cleanup``."""
    return note_key(f"d{run}-results")


def where_line(kept: bool) -> str:
    """Where a run keeps its data, and how to remove it."""
    state = "kept for inspection" if kept else "this run's removed"
    expiry = f" (they expire after {demo.NOTE_TTL}s)" if kept else ""
    return (f"data ({state}): task results in {safe_url(demo.RESULT_URL)}{expiry}; rows in "
            f"{safe_url(demo.DATABASE_URL)} tables {', '.join(DEMO_TABLES)} and "
            f"{', '.join(t.name for t in reliable_metadata.sorted_tables)}; keys "
            f"{{{demo.PREFIX}}}:* in {safe_url(demo.RELIABLE_REDIS_URL)}. "
            "`python -m demo_project --cleanup` drops the demo's tables, queues and keys")


#: The demo's own tables (the shop's), dropped by ``--cleanup``.
DEMO_TABLES = tuple(t.name for t in demo.metadata.sorted_tables)
#: The comment ``prepare`` puts on a celery-reliable table it had to create: only
#: those are dropped by ``--cleanup``, and only once no rows but the demo's are left.
CREATED_MARK = "created by the celery-reliable demo; python -m demo_project --cleanup drops it"
#: Rows of celery-reliable's tables that belong to the demo (resources are
#: ``order:d<run>-...`` / ``report:d<run>-...``; tasks are the demo app's).
DEMO_RESOURCE = r"^(order|report):d[0-9a-f]{6}-"


def demo_task_names() -> list[str]:
    return sorted(name for name in app.tasks if name.startswith("demo."))


def cleanup_everything(engine: sa.Engine) -> list[str]:
    """``--cleanup``: every table, key, queue and result the demo created. Returns what it did."""
    done: list[str] = []
    r = redis.Redis.from_url(demo.RELIABLE_REDIS_URL, decode_responses=True)
    try:
        forgotten = 0
        for key in r.scan_iter(match=results_key("*"), count=1000):
            for task_id in r.smembers(key):
                AsyncResult(task_id, app=app).forget()
                forgotten += 1
        claim = note_key("run")
        deleted = 0
        batch: list[str] = []
        for key in r.scan_iter(match="{" + demo.PREFIX + "}:*", count=1000):
            if key != claim:
                batch.append(key)
            if len(batch) >= 500:
                deleted += int(r.delete(*batch))
                batch = []
        if batch:
            deleted += int(r.delete(*batch))
    finally:
        r.close()
    done.append(f"Redis {safe_url(demo.RELIABLE_REDIS_URL)}: deleted {deleted} keys under "
                f"{{{demo.PREFIX}}}; forgot the results of {forgotten} kept tasks in "
                f"{safe_url(demo.RESULT_URL)}")
    delete_queues()
    done.append(f"broker {safe_url(demo.BROKER_URL)}: deleted queues {', '.join(QUEUES)}")

    names = demo_task_names()
    preparer = engine.dialect.identifier_preparer
    with engine.begin() as conn:
        present = set(sa.inspect(conn).get_table_names())
        dropped = [t for t in DEMO_TABLES if t in present]
        demo.metadata.drop_all(conn, checkfirst=True)
        if fences.name in present:
            conn.execute(fences.delete().where(fences.c.resource.regexp_match(DEMO_RESOURCE)))
        if idempotency.name in present:
            conn.execute(idempotency.delete().where(idempotency.c.task.in_(names)))
        if dead_letters.name in present:
            conn.execute(dead_letters.delete().where(dead_letters.c.task_name.in_(names)))
        kept: list[str] = []
        for table in reversed(reliable_metadata.sorted_tables):
            if table.name not in present:
                continue
            comment = conn.execute(sa.text("SELECT obj_description(to_regclass(:t), 'pg_class')"),
                                   {"t": preparer.format_table(table)}).scalar()
            rows = int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() or 0)
            if comment == CREATED_MARK and rows == 0:
                table.drop(conn)
                dropped.append(table.name)
            else:
                why = "not created by the demo" if comment != CREATED_MARK else f"{rows} other rows"
                kept.append(f"{table.name} ({why})")
    done.append(f"PostgreSQL {safe_url(demo.DATABASE_URL)}: dropped "
                f"{', '.join(dropped) or 'no tables'}; removed the demo's rows"
                + (f"; kept {', '.join(kept)}" if kept else ""))
    return done


class _Offset:
    """A step whose progress starts at ``offset`` (a later phase of one step)."""

    def __init__(self, step: Any, offset: int) -> None:
        self.step, self.offset = step, offset

    def update(self, completed: int, total: int | None = None) -> None:
        self.step.update(self.offset + completed)


def _state_name(state: int) -> str:
    return {0: "closed", 1: "open", 2: "half-open"}.get(state, str(state))


@contextlib.contextmanager
def interrupted_as_exit() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C, so cleanup runs either way."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def prepare() -> sa.Engine:
    """Reach the services and create the tables, or raise Unavailable (one line).

    A celery-reliable table the demo has to create is marked (a table comment)
    so that ``--cleanup`` drops only those, never one your app already had.
    """
    engine = check_services()
    try:
        with engine.connect() as conn:
            before = set(sa.inspect(conn).get_table_names())
        create_tables(engine)  # celery-reliable's own tables (fences, idempotency, dead letters)
        demo.metadata.create_all(engine, checkfirst=True)
        created = [t for t in reliable_metadata.sorted_tables if t.name not in before]
        if created:
            preparer = engine.dialect.identifier_preparer
            with engine.begin() as conn:
                for table in created:
                    conn.execute(sa.text(f"COMMENT ON TABLE {preparer.format_table(table)} "
                                         f"IS '{CREATED_MARK}'"))
    except Exception as exc:
        raise Unavailable(f"cannot prepare PostgreSQL at {safe_url(demo.DATABASE_URL)} "
                          f"({type(exc).__name__}: {first_line(exc)})") from exc
    return engine


def _scenario_names(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown scenario {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(SCENARIOS)}")
    return names


def cleanup_command() -> int:
    """``--cleanup``: refuses while a run holds the prefix; 0 done, 2 unreachable or busy."""
    try:
        engine = check_services()
    except Unavailable as exc:
        say(f"demo: {exc}" + ("" if isinstance(exc, Unsupported) else f"; {HOW_TO_START}"))
        return 2
    claim = Claim(redis.Redis.from_url(demo.RELIABLE_REDIS_URL, decode_responses=True),
                  "cleanup-" + secrets.token_hex(3))
    try:
        other = claim.take()
        if other is not None:
            say(f"demo: a demo run ({other}) is using key prefix {demo.PREFIX!r}; "
                f"--cleanup waits for it to end (its claim expires within {CLAIM_TTL}s)")
            return 2
        for line in cleanup_everything(engine):
            say(line)
    except (redis.RedisError, sa.exc.SQLAlchemyError, OSError) as exc:
        say(f"demo: cleanup failed ({type(exc).__name__}: {first_line(exc)})")
        return 1
    finally:
        claim.release()
        engine.dispose()
    return 0


def main(argv: list[str] | None = None) -> int:
    global ui
    parser = argparse.ArgumentParser(prog="python -m demo_project",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--external-workers", action="store_true",
                        default=os.environ.get("DEMO_EXTERNAL_WORKERS", "").lower()
                        in ("1", "true", "yes"),
                        help="use workers already consuming queues demo,emails instead of "
                             "spawning them")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the spawned workers' logs (kept anyway when a scenario fails)")
    parser.add_argument("--plain", action="store_true",
                        default=bool(os.environ.get("DEMO_PLAIN")),
                        help="plain lines instead of rich progress bars (also DEMO_PLAIN=1)")
    parser.add_argument("--keep-data", action="store_true",
                        help="keep this run's task results, rows and keys for inspection "
                             "(the last line says where; --cleanup removes them)")
    parser.add_argument("--cleanup", action="store_true",
                        help="run nothing: drop the demo's tables, delete its queues and the "
                             "keys under its prefix, forget kept results, then exit")
    parser.add_argument("--only", type=_scenario_names, default=SCENARIOS,
                        metavar="NAME[,NAME]",
                        help=f"run only these scenarios (of {', '.join(SCENARIOS)})")
    args = parser.parse_args(argv)
    began = time.monotonic()
    try:
        app.finalize(auto=True)  # binds the tasks: a bad option or setting fails here
    except ConfigurationError as exc:
        say(f"demo: configuration error: {exc}")
        return 2
    if args.cleanup:
        return cleanup_command()
    try:
        engine = prepare()
    except Unavailable as exc:
        say(f"demo: {exc}" + ("" if isinstance(exc, Unsupported) else f"; {HOW_TO_START}"))
        return 2

    run = secrets.token_hex(3)
    claim = Claim(redis.Redis.from_url(demo.RELIABLE_REDIS_URL, decode_responses=True), run)
    try:
        other = claim.take()
        if other is None:
            purge_queues()
    except redis.RedisError as exc:
        say(f"demo: cannot reach Redis ({type(exc).__name__}: {first_line(exc)}); "
            f"{HOW_TO_START}")
        return 2
    if other is not None:
        say(f"demo: another demo run ({other}) is using key prefix {demo.PREFIX!r} on "
            f"{safe_url(demo.RELIABLE_REDIS_URL)}; wait for it (its claim expires within "
            f"{CLAIM_TTL}s) or set DEMO_PREFIX")
        return 2

    fleet = Fleet(run, external=args.external_workers)
    demo_run = Demo(fleet, engine, claim, only=args.only)
    verdicts: list[Verdict] = []
    with interrupted_as_exit():
        try:
            say(f"celery-reliable demo, run {run}: broker {safe_url(demo.BROKER_URL)}, "
                f"state {safe_url(demo.RELIABLE_REDIS_URL)} prefix {demo.PREFIX!r}, "
                f"database {safe_url(demo.DATABASE_URL)}")
            t0 = time.monotonic()
            try:
                started = fleet.start()
            except Unavailable as exc:
                say(f"demo: {exc}")
                return 2
            except Exception as exc:
                say(f"demo: could not start the workers: {exc}")
                return 1
            say(f"{started}; {'found' if fleet.external else 'ready'} in "
                f"{time.monotonic() - t0:.1f}s")
            ui = make_ui(len(demo_run.scenarios), plain=args.plain)
            verdicts = demo_run.run_all()
        except KeyboardInterrupt:
            ui.close()
            say(f"demo: interrupted; cleaning up ({fleet.logs_hint()})")
            return 130
        finally:
            fleet.stop()
            demo_run.cleanup(keep=args.keep_data)
            claim.release()
            engine.dispose()
            if not fleet.procs or (checks.exit_code(verdicts) == 0 and not args.keep_logs):
                shutil.rmtree(fleet.tmp, ignore_errors=True)
    say()
    ui.table(verdicts)
    ui.close()
    code = checks.exit_code(verdicts)
    say(where_line(kept=args.keep_data))
    say(f"{'PASS' if code == 0 else 'FAIL'}: {sum(v.passed for v in verdicts)}/{len(verdicts)} "
        f"guarantees in {time.monotonic() - began:.1f}s"
        + ("" if code == 0 and not args.keep_logs else f"; {fleet.logs_hint()}"))
    return code


if __name__ == "__main__":
    sys.exit(main())
