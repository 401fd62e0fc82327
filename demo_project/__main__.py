"""``python -m demo_project``: run a real worker fleet and show each guard at work.

Starts two ``celery -A demo_project.app worker`` processes (prefork, two
children each, queue ``demo``), then runs three scenarios against them and
ends with a PASS/FAIL table; the exit code is 1 if anything failed, 2 if
Redis or PostgreSQL cannot be reached. ``--external-workers`` (or
``DEMO_EXTERNAL_WORKERS=1``) uses workers that already consume ``demo``
instead; the paused-holder scenario then needs to see their processes (same
host, or ``pid: service:worker`` in Docker Compose).

Only the demo's own things are touched: its queue, its key prefix, the rows
of its own orders and fences, and its ``demo_orders`` table.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa
from celery.result import AsyncResult
from celery.states import READY_STATES
from sqlalchemy.engine import make_url

from celery_reliable import SKIPPED, ConfigurationError, StaleFenceToken, create_tables
from celery_reliable.keys import KeySpace
from celery_reliable.schema import fences

from . import app as demo
from .app import (
    CAPTURE_LOCK_TTL,
    QUEUE,
    app,
    capture_payment,
    note_key,
    orders,
    process_start,
    rebuild_daily_report,
)

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 2
CONCURRENCY = 2
HOT_CAPTURES = 20
OTHER_ORDERS = 3
CAPTURES_PER_OTHER = 2
DUPLICATES = 2

HOW_TO_START = ("start them with `docker compose up -d redis postgres`, or point "
                "DEMO_BROKER_URL / DEMO_RESULT_URL / DEMO_RELIABLE_REDIS_URL / "
                "DEMO_DATABASE_URL at running servers")


class Unavailable(Exception):
    """A service or the worker fleet is not there; one line says what to do."""


@dataclass
class Outcome:
    scenario: str
    configured: str
    observed: str
    passed: bool


def say(line: str = "") -> None:
    print(line, flush=True)


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

def check_services() -> sa.Engine:
    """Reach every Redis and PostgreSQL the demo uses, or raise Unavailable."""
    for what, url in (("Redis (broker)", demo.BROKER_URL), ("Redis (results)", demo.RESULT_URL),
                      ("Redis (locks)", demo.RELIABLE_REDIS_URL)):
        try:
            client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
            try:
                client.ping()
            finally:
                client.close()
        except (redis.RedisError, ValueError, OSError) as exc:
            raise Unavailable(f"cannot reach {what} at {safe_url(url)} "
                              f"({type(exc).__name__}: {first_line(exc)})") from exc
    try:
        engine = sa.create_engine(demo.sqlalchemy_url(), connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:  # OperationalError, a bad URL, a missing driver
        raise Unavailable(f"cannot reach PostgreSQL at {safe_url(demo.DATABASE_URL)} "
                          f"({type(exc).__name__}: {first_line(exc)})") from exc
    return engine


def purge_queue() -> int:
    """Drop messages left in the demo's own queue by an interrupted earlier run."""
    with app.connection_for_write() as conn:
        return int(conn.default_channel.queue_purge(QUEUE) or 0)


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

    def start(self, timeout: float = 40) -> str:
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
                 "-P", "prefork", "-c", str(CONCURRENCY), "-Q", QUEUE, "-n", f"{name}@%h",
                 "--without-mingle", "--without-gossip", "-l", "info"],
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
        return (f"{WORKERS} workers (prefork x{CONCURRENCY}, queue {QUEUE!r}), "
                f"pids {', '.join(str(p.pid) for p in self.procs)}")

    def _find_external(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            replies = app.control.inspect(timeout=1.0).active_queues() or {}
            found = sorted(host for host, queues in replies.items()
                           if any(q.get("name") == QUEUE for q in queues or ()))
            if found:
                self.names = found
                return f"external workers on queue {QUEUE!r}: {', '.join(found)}"
            if time.monotonic() > deadline:
                raise Unavailable(f"no worker consumes queue {QUEUE!r} after {timeout:.0f}s; "
                                  "start one with `celery -A demo_project.app worker -Q demo` "
                                  "(or `docker compose up -d worker`)")

    def pause(self, pid: int, proc_start: str | None) -> None:
        """SIGSTOP one worker child, after making sure the pid names that process here."""
        here = process_start(pid)
        if proc_start is not None or here is not None:
            if here != proc_start:
                raise RuntimeError(
                    f"pid {pid} is not the task's worker process in this PID namespace; run "
                    "the demo on the workers' host (Compose: `pid: service:worker`)")
        elif self.external:
            raise RuntimeError("cannot verify the worker's pid without /proc")
        os.kill(pid, signal.SIGSTOP)
        self.paused.add(pid)

    def resume(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        self.paused.discard(pid)

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

class Demo:
    def __init__(self, fleet: Fleet, engine: sa.Engine) -> None:
        self.fleet = fleet
        self.engine = engine
        self.run = fleet.run
        self.r = redis.Redis.from_url(demo.RELIABLE_REDIS_URL, decode_responses=True)
        self.keys = KeySpace(demo.PREFIX)
        self.sent: list[str] = []
        self.order_ids: list[str] = []
        self.days: list[str] = []

    # -- helpers

    def order(self, name: str) -> str:
        order_id = f"d{self.run}-{name}"
        self.order_ids.append(order_id)
        return order_id

    def capture(self, order_id: str, attempt: str, **kwargs: Any) -> AsyncResult:
        result = capture_payment.apply_async(
            kwargs={"order_id": order_id, "amount": "19.99", "attempt": attempt, **kwargs})
        self.sent.append(result.id)
        return result

    def executions(self, order_id: str) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.r.lrange(note_key(order_id, "executions"), 0, -1)]

    def stored(self, order_id: str) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(orders.c.captured_by, orders.c.token)
                                .where(orders.c.order_id == order_id)).first()

    def fence_row(self, resource: str) -> int | None:
        with self.engine.connect() as conn:
            token = conn.execute(sa.select(fences.c.token)
                                 .where(fences.c.resource == resource)).scalar()
        return None if token is None else int(token)

    # -- scenario 1

    def contending(self) -> Outcome:
        hot = self.order("hot")
        others = [self.order(f"o{i + 1}") for i in range(OTHER_ORDERS)]
        configured = (f"order:{{order_id}} ttl {CAPTURE_LOCK_TTL:g}s defer; {HOT_CAPTURES} "
                      f"captures of 1 order + {OTHER_ORDERS * CAPTURES_PER_OTHER} others")
        say(f"[1] contending captures: {HOT_CAPTURES} on order {hot} and "
            f"{CAPTURES_PER_OTHER} on each of {OTHER_ORDERS} other orders, sent at once")
        side_jobs = [(others[k % OTHER_ORDERS], f"x{k + 1:02d}")
                     for k in range(OTHER_ORDERS * CAPTURES_PER_OTHER)]
        pending = []
        t0 = time.monotonic()
        for i in range(HOT_CAPTURES):
            pending.append(self.capture(hot, f"h{i + 1:02d}"))
            if i % 3 == 1 and side_jobs:  # interleave the other orders' captures
                pending.append(self.capture(*side_jobs.pop(0), gateway_seconds=0.3))
        for job in side_jobs:
            pending.append(self.capture(*job, gateway_seconds=0.3))
        deadline = time.monotonic() + 45
        failed = 0
        for res in pending:
            res.get(timeout=max(1.0, deadline - time.monotonic()), propagate=False)
            failed += res.state != "SUCCESS"
        took = time.monotonic() - t0

        runs = sorted(self.executions(hot), key=lambda e: e["start"])
        committed = sum(e.get("write") == "committed" for e in runs)
        overlaps = sum(b["start"] < a["end"] for a, b in itertools.pairwise(runs))
        gaps = [b["start"] - a["end"] for a, b in itertools.pairwise(runs)]
        tokens = [e["token"] for e in runs]
        increasing = all(b > a for a, b in itertools.pairwise(tokens))
        deferrals = sum(e["deferrals"] for e in runs)
        retries = sum(e["retries"] for e in runs)
        pids = {(e["host"], e["pid"]) for e in runs}
        row = self.stored(hot)
        last = runs[-1] if runs else {}
        stored_ok = row is not None and row.token == max(tokens, default=-1) \
            and row.captured_by == last.get("attempt")
        side = [e for o in others for e in self.executions(o)]
        side_ok = sum(e.get("write") == "committed" for e in side)
        alongside = sum(any(s["start"] < h["end"] and h["start"] < s["end"] for h in runs)
                        for s in side)

        say(f"    all {len(pending)} finished in {took:.1f}s ({failed} not SUCCESS); "
            f"hot order ran in {len(pids)} worker processes")
        say(f"    hot order: {committed}/{len(runs)} executions committed, "
            f"{overlaps} overlapping"
            + (f", gaps between executions {min(gaps) * 1000:.1f}-{max(gaps) * 1000:.0f} ms"
               if gaps else ""))
        if tokens:
            base = tokens[0]
            shown = " ".join(f"+{t - base}" for t in tokens[1:5])
            verdict = "strictly increasing" if increasing else "NOT increasing"
            say(f"    fencing tokens in acquisition order: {base} {shown} ... "
                f"+{tokens[-1] - base} ({verdict})")
        say(f"    {deferrals} deferrals while the lock was busy, {retries} retries consumed; "
            f"demo_orders[{hot}] = {row.captured_by if row else None} "
            f"token {row.token if row else None}")
        say(f"    other orders: {side_ok}/{len(side)} committed, {alongside} ran alongside "
            "a hot-order capture (the lock is per order)")
        passed = (failed == 0 and len(runs) == HOT_CAPTURES and committed == HOT_CAPTURES
                  and overlaps == 0 and increasing and retries == 0 and stored_ok
                  and side_ok == OTHER_ORDERS * CAPTURES_PER_OTHER)
        observed = (f"{committed}/{HOT_CAPTURES} serialised, {overlaps} overlaps, tokens "
                    f"{'increasing' if increasing else 'NOT increasing'}, {retries} retries")
        return Outcome("contending work", configured, observed, passed)

    # -- scenario 2

    def paused_holder(self) -> Outcome:
        order_id = self.order("paused")
        resource = f"order:{order_id}"
        gate = note_key(order_id, "gate")
        configured = f"A SIGSTOPped > lock_ttl {CAPTURE_LOCK_TTL:g}s, B sent meanwhile"
        say(f"[2] paused lock holder: order {order_id}")
        a = self.capture(order_id, "A", gateway_seconds=0.0, hold_until=gate)
        info_a = json.loads(wait_for(
            lambda: self.r.get(note_key(order_id, "running", "A")), 20, "capture A to start"))
        self.fleet.pause(info_a["pid"], info_a["proc_start"])
        paused_at = time.monotonic()
        say(f"    A holds the lock with token {info_a['token']} in pid {info_a['pid']}: "
            "SIGSTOP")
        lock_key = self.keys.lock(resource)
        try:
            wait_for(lambda: not self.r.exists(lock_key), CAPTURE_LOCK_TTL + 5,
                     "A's lock to expire")
            expired_after = time.monotonic() - paused_at
            b = self.capture(order_id, "B", gateway_seconds=0.05)
            b.get(timeout=20, propagate=False)
            info_b = next((e for e in self.executions(order_id) if e["attempt"] == "B"), {})
            say(f"    lock expired {expired_after:.1f}s into the pause; B acquired token "
                f"{info_b.get('token')} and wrote: {info_b.get('write')} ({b.state})")
        finally:
            self.r.set(gate, 1, ex=demo.NOTE_TTL)  # let A go on to its write, even if interrupted
            self.fleet.resume(info_a["pid"])
        paused_for = time.monotonic() - paused_at
        a.get(timeout=20, propagate=False)
        info_a = next((e for e in self.executions(order_id) if e["attempt"] == "A"), {})
        error = a.result
        row = self.stored(order_id)
        fence_token = self.fence_row(resource)
        if info_a.get("current") is None:
            why = "refused before the write: its heartbeat had found the lock lost"
        else:
            why = f"PostgreSQL fence had already accepted token {info_a['current']}"
        say(f"    SIGCONT after {paused_for:.1f}s: A's fenced write -> "
            f"{type(error).__name__} ({why}); task state {a.state}")
        say(f"    demo_orders[{order_id}] = {row.captured_by if row else None} "
            f"token {row.token if row else None}; reliable_fences token {fence_token}")
        passed = (paused_for > CAPTURE_LOCK_TTL and b.state == "SUCCESS"
                  and info_b.get("write") == "committed"
                  and info_b.get("token", 0) > info_a.get("token", 0)
                  and a.state == "FAILURE" and isinstance(error, StaleFenceToken)
                  and info_a.get("write") == "stale"
                  and row is not None and row.captured_by == "B"
                  and row.token == info_b.get("token") and fence_token == info_b.get("token"))
        observed = (f"B token {'>' if info_b.get('token', 0) > info_a.get('token', 0) else '<='}"
                    f" A; A's write {type(error).__name__}; row = "
                    f"{row.captured_by if row else None}")
        return Outcome("paused lock holder", configured, observed, passed)

    # -- scenario 3

    def singleton(self) -> Outcome:
        day = f"d{self.run}-2025-01-31"
        self.days.append(day)
        configured = f"report:{{day}} skip; {DUPLICATES} duplicates while it runs"
        say(f"[3] singleton report: rebuild {day}, then {DUPLICATES} duplicates while it runs")
        first = rebuild_daily_report.apply_async(kwargs={"day": day, "seconds": 1.5})
        self.sent.append(first.id)
        wait_for(lambda: self.r.get(note_key(day, "report-runs")), 20, "the first rebuild")
        dups = [rebuild_daily_report.apply_async(kwargs={"day": day, "seconds": 1.5})
                for _ in range(DUPLICATES)]
        self.sent += [d.id for d in dups]
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: all(d.state == SKIPPED for d in dups), 15, "the duplicates",
                     interval=0.05)
        first.get(timeout=20, propagate=False)
        ran = int(self.r.get(note_key(day, "report-runs")) or 0)
        states = [d.state for d in dups]
        say(f"    first: {first.state}; duplicates: {', '.join(states)}; body ran {ran}x")
        passed = first.state == "SUCCESS" and states == [SKIPPED] * DUPLICATES and ran == 1
        observed = (f"{states.count(SKIPPED)}/{DUPLICATES} {SKIPPED}, "
                    f"body ran {ran}x, first {first.state}")
        return Outcome("singleton duplicate", configured, observed, passed)

    # -- cleanup

    def cleanup(self) -> None:
        """Forget this run's results, keys and rows; nothing else."""
        with contextlib.suppress(Exception):
            # Only after a failure: tasks still cycling in external workers (spawned
            # ones are stopped by now; whatever they handed back is purged).
            unfinished = [i for i in self.sent
                          if AsyncResult(i, app=app).state not in (SKIPPED, *READY_STATES)]
            if unfinished and self.fleet.external and self.fleet.names:
                app.control.revoke(unfinished, destination=self.fleet.names)
            purge_queue()
        for task_id in self.sent:
            with contextlib.suppress(Exception):
                AsyncResult(task_id, app=app).forget()
        resources = [f"order:{o}" for o in self.order_ids] + [f"report:{d}" for d in self.days]
        with contextlib.suppress(redis.RedisError):
            doomed = [k for res in resources for k in (self.keys.lock(res), self.keys.fence(res))]
            for ident in self.order_ids + self.days:
                doomed += list(self.r.scan_iter(match=note_key(ident, "*"), count=500))
            if doomed:
                self.r.delete(*doomed)
        with contextlib.suppress(sa.exc.SQLAlchemyError), self.engine.begin() as conn:
            if self.order_ids:
                conn.execute(orders.delete().where(orders.c.order_id.in_(self.order_ids)))
            if resources:
                conn.execute(fences.delete().where(fences.c.resource.in_(resources)))
        self.r.close()


# ------------------------------------------------------------------- output

def table(outcomes: list[Outcome]) -> None:
    rows = [("scenario", "configured", "observed", "result")]
    rows += [(o.scenario, o.configured, o.observed, "PASS" if o.passed else "FAIL")
             for o in outcomes]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    rule = "+-" + "-+-".join("-" * w for w in widths) + "-+"
    say(rule)
    for n, r in enumerate(rows):
        say("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
        if n == 0:
            say(rule)
    say(rule)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo_project", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--external-workers", action="store_true",
                        default=os.environ.get("DEMO_EXTERNAL_WORKERS", "").lower()
                        in ("1", "true", "yes"),
                        help="use workers already consuming queue 'demo' instead of spawning")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the spawned workers' logs (kept anyway when a scenario fails)")
    args = parser.parse_args(argv)
    began = time.monotonic()
    try:
        app.finalize(auto=True)  # binds the tasks: a bad option or setting fails here
    except ConfigurationError as exc:
        say(f"demo: configuration error: {exc}")
        return 2
    try:
        engine = check_services()
        create_tables(engine)       # celery-reliable's own tables (reliable_fences)
        demo.metadata.create_all(engine, checkfirst=True)
        purge_queue()
    except Unavailable as exc:
        say(f"demo: {exc}; {HOW_TO_START}")
        return 2
    except Exception as exc:
        say(f"demo: cannot prepare Redis/PostgreSQL ({type(exc).__name__}: "
            f"{first_line(exc)}); {HOW_TO_START}")
        return 2

    run = secrets.token_hex(3)
    fleet = Fleet(run, external=args.external_workers)
    outcomes: list[Outcome] = []
    demo_run = Demo(fleet, engine)
    with interrupted_as_exit():
        try:
            say(f"celery-reliable demo, run {run}: broker {safe_url(demo.BROKER_URL)}, "
                f"locks {safe_url(demo.RELIABLE_REDIS_URL)} prefix {demo.PREFIX!r}, "
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
            for scenario in (demo_run.contending, demo_run.paused_holder, demo_run.singleton):
                try:
                    outcomes.append(scenario())
                except Exception as exc:
                    name = scenario.__name__.replace("_", " ")
                    say(f"    error: {type(exc).__name__}: {exc}")
                    outcomes.append(Outcome(name, "-", f"error: {type(exc).__name__}", False))
        except KeyboardInterrupt:
            say(f"demo: interrupted; cleaning up ({fleet.logs_hint()})")
            return 130
        finally:
            fleet.stop()
            demo_run.cleanup()
            engine.dispose()
            if all(o.passed for o in outcomes) and len(outcomes) == 3 and not args.keep_logs:
                shutil.rmtree(fleet.tmp, ignore_errors=True)
    say()
    table(outcomes)
    ok = all(o.passed for o in outcomes)
    say(f"{'PASS' if ok else 'FAIL'}: {sum(o.passed for o in outcomes)}/{len(outcomes)} "
        f"scenarios in {time.monotonic() - began:.1f}s"
        + ("" if ok and not args.keep_logs else f"; {fleet.logs_hint()}"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
