#!/usr/bin/env python
"""No-op task throughput through real ``celery worker`` processes: ReliableTask vs plain Celery.

Contenders (tasks of ``benchmarks/bench_app.py``), all in one run, interleaved:

* ``plain``            ``@app.task`` (the baseline)
* ``idempotent-pg``    ``base=ReliableTask, idempotency_key=True``,
                       ``reliable_idempotency_store="postgres"`` (the default)
* ``idempotent-redis`` the same task on workers whose app has
                       ``reliable_idempotency_store="redis"``
* ``lock``             ``base=ReliableTask, lock="bench:{n}"`` (n unique: never contends)

Everything is throwaway and private to the run, and removed at the end, also on Ctrl-C,
SIGTERM or an error (after a SIGKILL the servers and workers still exit, through
PR_SET_PDEATHSIG, but the database and a temp directory are left behind):

* a ``redis-server`` on a free port as the broker (db 0; db 1 carries the workers'
  completion reports), ``--save "" --appendonly no``;
* a SEPARATE ``redis-server`` for ``reliable_redis_url``, so that broker traffic never
  shows up in the round-trip counts;
* a PostgreSQL database ``reliable_bench_<random>`` (tables by
  ``celery_reliable.create_tables``), dropped at the end;
* two worker fleets of ``--workers`` ``celery worker`` processes each (prefork,
  ``--concurrency`` 1 by default, ``--without-heartbeat --without-gossip
  --without-mingle``, Celery's default prefetch). They differ in ONE setting,
  ``reliable_idempotency_store``: fleet ``pg`` runs plain, idempotent-pg and lock;
  fleet ``redis`` runs idempotent-redis. The idle fleet sits in a blocking BRPOP.

No result backend, ``ignore_result=True`` on every task: this measures task execution.

One timed pass of a contender: N tasks with distinct arguments (so every idempotent
task is a first execution) are published to a staging list while no worker consumes
it, then the list is RENAMEd to the fleet's queue in one atomic step, which wakes every
worker's blocking BRPOP at once. tasks/s = N / (end of the last task - start of the
first task), both taken by ``task_prerun``/``task_postrun`` receivers that only touch
memory (the same cost for every contender); a thread per pool process reports them
every 50 ms. Passes run in ``--rounds`` rounds, the contender order rotating each round;
the table shows the median and the ratio to plain Celery's median, and the median of
the same-round ratios (less sensitive to load that drifts between rounds).

CPU time per task is measured for every timed pass from ``/proc/<pid>/stat`` (user +
system) of every process involved: the fleet's worker processes and pool children, both
redis-servers, and the bench database's PostgreSQL backends. It moves less than tasks/s
with the other load on the machine (it still inflates when the CPUs are oversubscribed).

Round trips and transactions are measured by the servers, in one extra untimed
counting pass per contender (``--count-tasks`` tasks):

* Redis round trips: ``MONITOR`` on the reliable Redis marks each command with its
  origin; commands sent by clients are round trips, commands a Lua script ran show
  as ``lua`` and are not. Commands/task (incl. Lua) is the ``INFO commandstats``
  delta (sum of ``calls``), also recorded for every timed pass as a cross-check.
* PostgreSQL transactions: ``xact_commit + xact_rollback`` of the bench database in
  ``pg_stat_database``. Backends publish their counters only every second or after
  10 s idle, so the pass terminates the bench database's client backends before and
  after (a backend flushes its counters when it exits) and reads after they are gone,
  from a connection to the ``postgres`` database. The workers' pools reconnect on their
  next checkout; whatever a new connection runs (e.g. ``SET lock_timeout``) is counted,
  at most once per pool process per pass (+0.002/task with the defaults).

Run ``python benchmarks/throughput.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import psycopg
import redis
from sqlalchemy.engine import make_url

HERE = Path(__file__).resolve().parent
DEFAULT_TASKS = 3000
DEFAULT_ROUNDS = 3
DEFAULT_WORKERS = 2
DEFAULT_CONCURRENCY = 1
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
BASELINE = "plain"
STAGING = "bench.staging"
SCRIPT_COMMANDS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro")
#: Commands the benchmark itself sends to the reliable Redis (never celery_reliable).
OWN_COMMANDS = ("info", "echo", "monitor", "ping", "client", "hello", "select")

#: Targets from the issue, for idempotent-pg.
TARGET_RATIO = 0.75
TARGET_ROUND_TRIPS = 2
TARGET_PG_XACTS = 1


@dataclass(frozen=True)
class Contender:
    name: str
    task: str
    fleet: str
    option: str


CONTENDERS = (
    Contender("plain", "bench.plain", "pg", "@app.task"),
    Contender("idempotent-pg", "bench.idempotent", "pg",
              "base=ReliableTask, idempotency_key=True (store postgres)"),
    Contender("idempotent-redis", "bench.idempotent", "redis",
              "base=ReliableTask, idempotency_key=True (store redis)"),
    Contender("lock", "bench.lock", "pg", 'base=ReliableTask, lock="bench:{n}"'),
)
#: fleet -> environment of its workers (they differ in reliable_idempotency_store only)
FLEETS: dict[str, dict[str, str]] = {
    "pg": {"BENCH_IDEMPOTENCY_STORE": "postgres"},
    "redis": {"BENCH_IDEMPOTENCY_STORE": "redis"},
}


class BenchmarkError(RuntimeError):
    """Something went wrong that would make the numbers lie."""


@dataclass
class Result:
    name: str
    task_options: str
    fleet: str
    rounds_tasks_per_s: list[float] = field(default_factory=list)
    median_tasks_per_s: float = 0.0
    ratio_vs_plain: float = 0.0
    per_round_ratios: list[float] = field(default_factory=list)
    #: per timed pass: tasks each worker process ran (to show the load was shared)
    rounds_tasks_per_process: list[list[int]] = field(default_factory=list)
    #: INFO commandstats delta per task, every timed pass (cross-check of the count pass)
    rounds_redis_commands_per_task: list[float] = field(default_factory=list)
    #: CPU ms per task by process group, every timed pass (Linux /proc; machine-wide noise
    #: hardly changes it, unlike tasks/s)
    rounds_cpu_ms_per_task: list[dict[str, float]] = field(default_factory=list)
    median_cpu_ms_per_task: dict[str, float] = field(default_factory=dict)
    redis_round_trips_per_task: float = 0.0
    redis_commands_per_task: float = 0.0
    redis_client_commands_per_task: dict[str, float] = field(default_factory=dict)
    redis_lua_commands_per_task: dict[str, float] = field(default_factory=dict)
    redis_commandstats_per_task: dict[str, float] = field(default_factory=dict)
    pg_transactions_per_task: float = 0.0
    pg_transactions_counted: int = 0
    count_tasks: int = 0


# --------------------------------------------------------------------------- cleanup


class Cleanup:
    """Turn SIGTERM/SIGHUP into SystemExit (so every ``finally`` runs); shield the cleanup."""

    def __enter__(self) -> Cleanup:
        self._old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
        for s in self._old:
            signal.signal(s, self._exit)
        return self

    @staticmethod
    def _exit(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)

    @staticmethod
    @contextmanager
    def shielded() -> Iterator[None]:
        """No Ctrl-C / SIGTERM while cleaning up (a second Ctrl-C must not leak processes)."""
        sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        old = {s: signal.signal(s, signal.SIG_IGN) for s in sigs}
        try:
            yield
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- redis-server


def _die_with_parent() -> None:
    """In a child, before exec: get SIGTERM if the benchmark dies (even by SIGKILL). Linux only."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL; the process group too (each is started in its own session)."""
    if proc.poll() is None:
        try:
            proc.terminate()
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # leftovers of this process's own group (the pool children of a celery worker)
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextmanager
def throwaway_redis(binary: str, tmp: Path, name: str) -> Iterator[tuple[int, str, int]]:
    """A private redis-server on a free port: no persistence, its own directory."""
    home = tmp / name
    home.mkdir()
    for _attempt in range(3):
        port = free_port()
        log = home / "redis.log"
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(home), "--logfile", str(log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        try:
            probe = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2)
            version = ""
            deadline = time.monotonic() + 10
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    version = str(probe.info("server")["redis_version"])
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            probe.close()
            if not version:
                tail = log.read_text(errors="replace")[-400:] if log.exists() else ""
                progress(f"{name} redis-server on port {port} did not start: {tail}")
                stop_process(proc)
                continue
            yield port, version, proc.pid
            return
        finally:
            stop_process(proc)
    raise BenchmarkError(f"could not start the {name} redis-server (3 attempts)")


# --------------------------------------------------------------------------- PostgreSQL


@contextmanager
def throwaway_database(admin_url: str) -> Iterator[tuple[str, str]]:
    """Create ``reliable_bench_<random>`` with celery-reliable's tables; drop it at the end."""
    from celery_reliable import create_tables
    from celery_reliable.schema import make_engine

    name = f"reliable_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        engine = make_engine(url)
        try:
            create_tables(engine)
        finally:
            engine.dispose()
        yield name, url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class PgStats:
    """Transactions of one database from ``pg_stat_database``, read from another database."""

    def __init__(self, admin_url: str, database: str) -> None:
        self.conn = psycopg.connect(admin_url, autocommit=True)
        self.database = database

    def close(self) -> None:
        self.conn.close()

    def version(self) -> str:
        row = self.conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "?"

    def backend_pids(self) -> list[int]:
        """Client backends of the bench database (for CPU accounting; local server only)."""
        rows = self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s "
            "AND backend_type = 'client backend'", (self.database,)).fetchall()
        return [int(r[0]) for r in rows]

    def flush_and_read(self, timeout: float = 30.0) -> int:
        """Make every client backend of the database publish its counters, then read them.

        A backend flushes its pending statistics when it exits; terminating the
        (idle) backends of the bench database is the only way to get exact counts
        now rather than up to 10 s later. The workers' pools reconnect on their next
        checkout (``pool_pre_ping``).
        """
        self.conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
            (self.database,),
        )
        deadline = time.monotonic() + timeout
        while True:
            row = self.conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                "AND backend_type = 'client backend'",
                (self.database,),
            ).fetchone()
            if row is not None and row[0] == 0:
                break
            if time.monotonic() > deadline:
                raise BenchmarkError("bench database backends did not exit")
            time.sleep(0.02)
        self.conn.execute("SELECT pg_stat_clear_snapshot()")
        row = self.conn.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
            (self.database,),
        ).fetchone()
        return int(row[0]) if row and row[0] is not None else 0


# --------------------------------------------------------------------------- Redis counting


def commandstats(client: redis.Redis) -> dict[str, int]:
    """``INFO commandstats`` calls per command (the benchmark's own commands excluded)."""
    out = {}
    for key, value in client.info("commandstats").items():
        command = key.removeprefix("cmdstat_").lower()
        if command not in OWN_COMMANDS:
            out[command] = int(value["calls"])
    return out


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    diff = {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)}
    return {k: v for k, v in diff.items() if v}


# --------------------------------------------------------------------------- CPU accounting

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
CPU_GROUPS = ("workers", "broker redis", "reliable redis", "PostgreSQL backends")


def process_cpu(pid: int) -> float | None:
    """User + system CPU seconds of one process (Linux /proc), None if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def cpu_snapshot(pids: dict[str, list[int]]) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for group, members in pids.items():
        out[group] = {}
        for pid in members:
            value = process_cpu(pid)
            if value is not None:
                out[group][pid] = value
    return out


def cpu_delta(after: dict[str, dict[int, float]],
              before: dict[str, dict[int, float]]) -> dict[str, float]:
    """CPU seconds per group; a process that appeared in between counts in full."""
    return {group: sum(v - before.get(group, {}).get(pid, 0.0) for pid, v in procs.items())
            for group, procs in after.items()}


class Monitor:
    """``MONITOR`` on a Redis server in a thread, counting commands by origin (client or Lua).

    Stops when it sees its own ``ECHO <marker>``, so no command is lost at the end.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.client = redis.Redis(host="127.0.0.1", port=port)
        self.marker = f"bench-monitor-end-{secrets.token_hex(6)}"
        self.by_client: Counter[str] = Counter()
        self.by_lua: Counter[str] = Counter()
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-monitor", daemon=True)

    def __enter__(self) -> Monitor:
        self._thread.start()
        if not self._ready.wait(10):
            raise BenchmarkError("MONITOR did not start")
        return self

    def _run(self) -> None:
        try:
            with self.client.monitor() as mon:
                self._ready.set()
                for event in mon.listen():
                    if event is None:
                        continue
                    words = str(event["command"]).split(" ", 1)
                    command = words[0].lower()
                    if command == "echo" and len(words) > 1 and self.marker in words[1]:
                        return
                    if command in OWN_COMMANDS:
                        continue
                    if event["client_type"] == "lua":
                        self.by_lua[command] += 1
                    else:
                        self.by_client[command] += 1
        except BaseException as exc:  # reported by stop()
            self.error = exc
            self._ready.set()

    def stop(self) -> None:
        with redis.Redis(host="127.0.0.1", port=self.port) as c:
            c.echo(self.marker)
        self._thread.join(30)
        if self._thread.is_alive() or self.error is not None:
            raise BenchmarkError(f"MONITOR failed: {self.error!r}")

    def __exit__(self, *exc: object) -> None:
        self.client.close()


# --------------------------------------------------------------------------- workers


@dataclass(frozen=True)
class FleetSpec:
    """``workers`` celery workers sharing one environment (``benchmarks/run.py`` builds its own)."""

    name: str
    env: dict[str, str]
    workers: int
    concurrency: int
    #: worker number (1-based) -> its ``-Q`` argument; default: the fleet's own queue
    queues: Callable[[int], str] | None = None


class Fleets:
    """The worker processes: ``--workers`` per fleet, each in its own session."""

    def __init__(self, args: argparse.Namespace, tmp: Path, env: dict[str, str],
                 specs: list[FleetSpec] | None = None, tag: str = "") -> None:
        self.args = args
        self.tmp = tmp
        self.env = env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        self.ready_dir = tmp / f"ready{tag}"
        self.ready_dir.mkdir()
        if specs is None:  # throughput.py: the fleets its contenders use
            specs = [FleetSpec(fleet, fleet_env, args.workers, args.concurrency)
                     for fleet, fleet_env in FLEETS.items()
                     if any(c.fleet == fleet for c in CONTENDERS if c.name in args.contenders)]
        self.specs = specs

    @staticmethod
    def queue(fleet: str) -> str:
        return f"bench.{fleet}"

    def start(self) -> None:
        for spec in self.specs:
            fleet = spec.name
            for i in range(1, spec.workers + 1):
                name = f"bench-{fleet}-{i}"
                env = dict(self.env, **spec.env, BENCH_READY_DIR=str(self.ready_dir))
                log = self.tmp / f"{name}.log"
                queues = spec.queues(i) if spec.queues else self.queue(fleet)
                cmd = [sys.executable, "-m", "celery", "-A", "bench_app", "worker",
                       "-P", "prefork", "-c", str(spec.concurrency),
                       "-n", f"{name}@%h", "-Q", queues,
                       "--without-heartbeat", "--without-gossip", "--without-mingle",
                       "-l", "WARNING"]
                with log.open("wb") as out:
                    self.procs[name] = subprocess.Popen(
                        cmd, cwd=HERE, env=env, stdout=out, stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL, start_new_session=True,
                        preexec_fn=_die_with_parent,
                    )
                self.logs[name] = log

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            ready = {p.name.removeprefix("ready-") for p in self.ready_dir.iterdir()}
            if ready >= set(self.procs):
                return
            if time.monotonic() > deadline:
                raise BenchmarkError(
                    f"workers not ready after {timeout:.0f}s: {sorted(set(self.procs) - ready)}"
                    + self.tails())
            time.sleep(0.1)

    def pids(self, fleet: str) -> list[int]:
        """The worker processes of one fleet and their pool children."""
        mains = [p.pid for n, p in self.procs.items() if n.startswith(f"bench-{fleet}-")]
        return mains + [c for m in mains for c in children(m)]

    def check_alive(self) -> None:
        dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
        if dead:
            raise BenchmarkError(f"worker(s) exited: {dead}" + self.tails())

    def tails(self, size: int = 1500) -> str:
        out = []
        for name, log in self.logs.items():
            text = log.read_text(errors="replace") if log.exists() else ""
            if text.strip():
                out.append(f"\n--- {name} log (tail) ---\n{text[-size:]}")
        return "".join(out)

    def stop(self) -> None:
        for proc in self.procs.values():  # warm shutdown of all at once
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            stop_process(proc, timeout=1)


# --------------------------------------------------------------------------- one pass


@dataclass
class PassResult:
    tasks: int
    elapsed: float
    per_process: list[int]
    redis_commands: dict[str, int]
    cpu_seconds: dict[str, float]

    @property
    def tasks_per_s(self) -> float:
        return self.tasks / self.elapsed


class Bench:
    def __init__(self, args: argparse.Namespace, app: Any, broker: redis.Redis,
                 stats: redis.Redis, reliable: redis.Redis, fleets: Fleets,
                 server_pids: dict[str, int], pg: PgStats) -> None:
        self.server_pids = server_pids
        self.pg = pg
        self.args = args
        self.app = app
        self.broker = broker
        self.stats = stats
        self.reliable = reliable
        self.fleets = fleets
        self.next_n = 0
        self.passes = 0

    def staging(self, contender: Contender) -> str:
        """The unconsumed list a contender's tasks are published to (its routing key)."""
        return STAGING

    def stage(self, contender: Contender, count: int) -> str:
        """Publish ``count`` tasks with fresh arguments to the (unconsumed) staging list."""
        staging = self.staging(contender)
        if self.broker.exists(staging):
            raise BenchmarkError(f"{staging} is not empty")
        self.passes += 1
        run = f"{contender.name}-{self.passes}-{secrets.token_hex(3)}"
        task = self.app.tasks[contender.task]
        for _ in range(count):
            self.next_n += 1
            task.apply_async((run, self.next_n), queue=staging)
        staged = self.broker.llen(staging)
        if staged != count:
            raise BenchmarkError(f"staged {staged} messages, expected {count}")
        return run

    def release(self, contender: Contender) -> None:
        """Hand every staged message to the fleet at once (wakes the workers' BRPOP)."""
        queue = Fleets.queue(contender.fleet)
        if self.broker.exists(queue):
            raise BenchmarkError(f"queue {queue} is not empty before a pass")
        self.broker.rename(self.staging(contender), queue)

    def wait(self, run: str, count: int) -> tuple[float, list[int]]:
        timeout = max(60.0, count / 20)
        deadline = time.monotonic() + timeout
        key = f"bench:stats:{run}"
        while True:
            rows = [v.decode().split() for v in self.stats.hgetall(key).values()]
            ok = sum(int(r[0]) for r in rows)
            other = sum(int(r[1]) for r in rows)
            if other:
                raise BenchmarkError(
                    f"{run}: {other} task(s) did not succeed (deferred or failed); the "
                    "numbers would lie" + self.fleets.tails())
            if ok >= count:
                if ok > count:
                    raise BenchmarkError(f"{run}: {ok} completions for {count} tasks")
                first = min(float(r[2]) for r in rows)
                last = max(float(r[3]) for r in rows)
                self.stats.delete(key)
                return last - first, sorted((int(r[0]) for r in rows), reverse=True)
            if time.monotonic() > deadline:
                raise BenchmarkError(f"{run}: only {ok}/{count} tasks done after {timeout:.0f}s"
                                     + self.fleets.tails())
            self.fleets.check_alive()
            time.sleep(0.02)

    def cpu_pids(self, contender: Contender) -> dict[str, list[int]]:
        return {
            "workers": self.fleets.pids(contender.fleet),
            "broker redis": [self.server_pids["broker"]],
            "reliable redis": [self.server_pids["reliable"]],
            "PostgreSQL backends": self.pg.backend_pids(),
        }

    def timed_pass(self, contender: Contender, count: int) -> PassResult:
        run = self.stage(contender, count)
        before = commandstats(self.reliable)
        cpu_before = cpu_snapshot(self.cpu_pids(contender))
        self.release(contender)
        elapsed, per_process = self.wait(run, count)
        cpu_after = cpu_snapshot(self.cpu_pids(contender))
        after = commandstats(self.reliable)
        return PassResult(count, elapsed, per_process, delta(after, before),
                          cpu_delta(cpu_after, cpu_before))

    def counting_pass(self, contender: Contender, count: int, pg: PgStats,
                      port: int) -> tuple[Monitor, dict[str, int], int]:
        run = self.stage(contender, count)
        xacts_before = pg.flush_and_read()
        with Monitor(port) as monitor:
            before = commandstats(self.reliable)
            self.release(contender)
            self.wait(run, count)
            after = commandstats(self.reliable)
            monitor.stop()
        xacts_after = pg.flush_and_read()
        return monitor, delta(after, before), xacts_after - xacts_before


# --------------------------------------------------------------------------- report


def versions(redis_version: str, pg_version: str) -> dict[str, str]:
    def v(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "python": platform.python_version(),
        "celery": v("celery"),
        "kombu": v("kombu"),
        "redis-py": v("redis"),
        "hiredis": v("hiredis"),
        "SQLAlchemy": v("SQLAlchemy"),
        "psycopg": v("psycopg"),
        "celery-reliable": v("celery-reliable"),
        "redis-server": redis_version,
        "postgresql": pg_version,
    }


def library_revision() -> str:
    """The git commit of the checkout, and whether celery_reliable/ has uncommitted changes."""
    root = HERE.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--",
                                "celery_reliable"], capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{commit}" + (" + uncommitted changes under celery_reliable/" if dirty else "")


def fmt_table(header: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "| " + " | ".join(cells) + " |"

    sep = "| " + " | ".join(("-" * (w - 1) + ":") if i in right else "-" * w
                            for i, w in enumerate(widths)) + " |"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def num(value: float, digits: int = 2) -> str:
    text = f"{value:.{digits}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def table(results: list[Result]) -> str:
    header = ["contender", "tasks/s (median)", "vs plain", "same-round vs plain (median)",
              "rounds min..max /s", "Redis round trips/task", "Redis cmds/task (incl. Lua)",
              "PG xacts/task"]
    rows = []
    for r in results:
        rows.append([
            r.name,
            f"{r.median_tasks_per_s:,.0f}",
            f"{r.ratio_vs_plain:.2f}x",
            f"{statistics.median(r.per_round_ratios):.2f}x",
            f"{min(r.rounds_tasks_per_s):,.0f}..{max(r.rounds_tasks_per_s):,.0f}",
            num(r.redis_round_trips_per_task),
            num(r.redis_commands_per_task),
            num(r.pg_transactions_per_task),
        ])
    return fmt_table(header, rows, right={1, 2, 3, 4, 5, 6, 7})


def cpu_table(results: list[Result]) -> str:
    header = ["contender", *(f"{g} (ms)" for g in CPU_GROUPS), "total (ms)", "vs plain"]
    base = sum(results[0].median_cpu_ms_per_task.values()) or 1.0
    for r in results:
        if r.name == BASELINE:
            base = sum(r.median_cpu_ms_per_task.values()) or 1.0
    rows = []
    for r in results:
        cpu = r.median_cpu_ms_per_task
        total = sum(cpu.values())
        rows.append([r.name, *(f"{cpu.get(g, 0.0):.3f}" for g in CPU_GROUPS), f"{total:.3f}",
                     f"{total / base:.2f}x"])
    return ("CPU time per task (median over timed passes; user+system from /proc, all processes "
            "involved; less\nsensitive to the other load on the machine than tasks/s):\n"
            + fmt_table(header, rows, right=set(range(1, len(header)))))


def targets(results: list[Result]) -> str:
    r = next((x for x in results if x.name == "idempotent-pg"), None)
    if r is None:
        return "Targets: idempotent-pg was not run."
    checks = [
        (f"throughput >= {TARGET_RATIO:.2f}x plain", f"{r.ratio_vs_plain:.2f}x",
         r.ratio_vs_plain >= TARGET_RATIO),
        (f"Redis round trips/task <= {TARGET_ROUND_TRIPS}", num(r.redis_round_trips_per_task),
         r.redis_round_trips_per_task <= TARGET_ROUND_TRIPS + 0.005),
        (f"PostgreSQL transactions/first execution <= {TARGET_PG_XACTS}",
         num(r.pg_transactions_per_task), r.pg_transactions_per_task <= TARGET_PG_XACTS + 0.005),
    ]
    rows = [[what, got, "met" if ok else "MISSED"] for what, got, ok in checks]
    return "Issue targets for idempotent-pg:\n" + fmt_table(
        ["target", "measured", "status"], rows, right={1})


def breakdown(results: list[Result]) -> str:
    def per(d: dict[str, float]) -> str:
        return ", ".join(f"{k} {num(v)}" for k, v in sorted(d.items())) or "-"

    lines = ["Per task, measured by the servers in the counting pass:"]
    for r in results:
        lines.append(f"  {r.name} ({r.count_tasks} tasks):")
        lines.append(f"    Redis client commands (round trips): "
                     f"{per(r.redis_client_commands_per_task)}")
        lines.append(f"    Redis commands run inside Lua:       "
                     f"{per(r.redis_lua_commands_per_task)}")
        lines.append(f"    INFO commandstats delta:             "
                     f"{per(r.redis_commandstats_per_task)}")
        lines.append(f"    PostgreSQL transactions:             {r.pg_transactions_counted} "
                     f"({num(r.pg_transactions_per_task)}/task)")
        rounds = ", ".join(num(x) for x in r.rounds_redis_commands_per_task)
        lines.append(f"    timed passes, Redis cmds/task:       {rounds}")
    lines.append("Same-round ratio vs plain (min / median / max over rounds):")
    for r in results:
        if r.name != BASELINE and r.per_round_ratios:
            q = r.per_round_ratios
            lines.append(f"  {r.name}: {min(q):.2f} / {statistics.median(q):.2f} / {max(q):.2f}")
    lines.append("Tasks per worker process in each timed pass:")
    for r in results:
        lines.append(f"  {r.name}: " + "; ".join(
            "/".join(str(c) for c in p) for p in r.rounds_tasks_per_process))
    return "\n".join(lines)


def reproduce_command(args: argparse.Namespace) -> str:
    cmd = (f"python benchmarks/throughput.py --tasks {args.tasks} --rounds {args.rounds} "
           f"--workers {args.workers} --concurrency {args.concurrency} "
           f"--warmup {args.warmup} --count-tasks {args.count_tasks}")
    if args.contenders != [c.name for c in CONTENDERS]:
        cmd += " --contenders " + ",".join(args.contenders)
    if args.postgres_url != DEFAULT_ADMIN_URL:
        cmd += f" --postgres-url {args.postgres_url}"
    if args.redis_server != "redis-server":
        cmd += f" --redis-server {args.redis_server}"
    if args.profile:
        cmd += f" --profile {args.profile} --profile-clock {args.profile_clock}"
    if args.json:
        cmd += f" --json {args.json}"
    return cmd


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="No-op task throughput through real celery workers: plain Celery vs "
                    "ReliableTask (idempotency on PostgreSQL/Redis, fencing-token lock), with "
                    "Redis round trips and PostgreSQL transactions per task measured by the "
                    "servers. Starts its own redis-servers, database and workers.")
    parser.add_argument("--tasks", type=int, default=DEFAULT_TASKS,
                        help=f"tasks per timed pass (default {DEFAULT_TASKS})")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                        help=f"interleaved rounds, contender order rotating; the median is "
                             f"reported (default {DEFAULT_ROUNDS})")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help=f"celery worker processes per fleet (default {DEFAULT_WORKERS})")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                        help=f"prefork pool size of each worker (default {DEFAULT_CONCURRENCY})")
    parser.add_argument("--warmup", type=int, default=300,
                        help="untimed tasks per contender before the rounds (default 300)")
    parser.add_argument("--count-tasks", type=int, default=1000, metavar="N",
                        help="tasks per contender in the untimed counting pass (MONITOR, "
                             "pg_stat_database) (default 1000)")
    parser.add_argument("--contenders", type=lambda s: [x for x in s.split(",") if x],
                        default=[c.name for c in CONTENDERS],
                        help="comma-separated subset of: "
                             + ",".join(c.name for c in CONTENDERS) + " (plain is required)")
    parser.add_argument("--json", metavar="PATH", type=Path,
                        help="also write the results as JSON to PATH")
    parser.add_argument("--redis-server", default="redis-server", metavar="BINARY",
                        help="redis-server binary to start (default: from PATH)")
    parser.add_argument("--postgres-url", default=os.environ.get("BENCH_POSTGRES_URL",
                                                                 DEFAULT_ADMIN_URL),
                        help="PostgreSQL URL of a maintenance database with CREATE DATABASE "
                             "rights (default $BENCH_POSTGRES_URL or " + DEFAULT_ADMIN_URL + ")")
    parser.add_argument("--profile", metavar="DIR", type=Path,
                        help="cProfile every pool process into DIR/*.prof (slows everything; "
                             "throughput numbers are then not comparable)")
    parser.add_argument("--profile-clock", choices=("wall", "cpu"), default="wall",
                        help="--profile's clock: wall time, or the pool process's CPU time")
    args = parser.parse_args(argv)
    known = {c.name for c in CONTENDERS}
    unknown = [c for c in args.contenders if c not in known]
    if unknown or BASELINE not in args.contenders:
        parser.error(f"--contenders: unknown {unknown}" if unknown else "--contenders needs plain")
    if min(args.tasks, args.rounds, args.workers, args.concurrency, args.count_tasks) < 1 or (
            args.warmup < 0):
        parser.error("--tasks, --rounds, --workers, --concurrency, --count-tasks must be >= 1")
    return args


def run(args: argparse.Namespace, stack: ExitStack, tmp: Path, binary: str,
        header: dict[str, Any]) -> list[Result]:
    contenders = [c for c in CONTENDERS if c.name in args.contenders]
    progress("starting redis-servers and the database")
    broker_port, redis_version, broker_pid = stack.enter_context(
        throwaway_redis(binary, tmp, "broker"))
    reliable_port, _, reliable_pid = stack.enter_context(throwaway_redis(binary, tmp, "reliable"))
    db_name, db_url = stack.enter_context(throwaway_database(args.postgres_url))
    pg = PgStats(args.postgres_url, db_name)
    stack.callback(pg.close)
    header["versions"] = versions(redis_version, pg.version())
    header["library_revision"] = library_revision()
    header["services"] = {
        "broker": f"redis://127.0.0.1:{broker_port}/0 (completion reports in db 1)",
        "reliable_redis_url": f"redis://127.0.0.1:{reliable_port}/0",
        "database": db_name,
    }
    print("# " + ", ".join(f"{k} {v}" for k, v in header["versions"].items()))
    print(f"# library at commit {header['library_revision']}")
    print("# " + "; ".join(f"{k}: {v}" for k, v in header["services"].items()), flush=True)

    env = dict(os.environ)
    env.update(
        BENCH_BROKER_URL=f"redis://127.0.0.1:{broker_port}/0",
        BENCH_STATS_URL=f"redis://127.0.0.1:{broker_port}/1",
        BENCH_RELIABLE_REDIS_URL=f"redis://127.0.0.1:{reliable_port}/0",
        BENCH_DATABASE_URL=db_url,
        PYTHONPATH=os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p),
    )
    env.pop("BENCH_PROFILE_DIR", None)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        env["BENCH_PROFILE_DIR"] = str(args.profile.resolve())
        env["BENCH_PROFILE_CLOCK"] = args.profile_clock
    os.environ.update({k: v for k, v in env.items() if k.startswith("BENCH_")})

    fleets = Fleets(args, tmp, env)
    stack.callback(fleets.stop)
    fleets_used = {c.fleet for c in contenders}
    progress(f"starting {len(fleets_used)} x {args.workers} celery workers "
             f"(prefork, concurrency {args.concurrency})")
    fleets.start()
    fleets.wait_ready()

    sys.path.insert(0, str(HERE))
    bench_app = importlib.import_module("bench_app")
    app = bench_app.app
    stack.callback(app.close)
    broker = redis.Redis(host="127.0.0.1", port=broker_port, db=0)
    stats = redis.Redis(host="127.0.0.1", port=broker_port, db=1)
    reliable = redis.Redis(host="127.0.0.1", port=reliable_port, db=0)
    for client in (broker, stats, reliable):
        stack.callback(client.close)
    bench = Bench(args, app, broker, stats, reliable, fleets,
                  {"broker": broker_pid, "reliable": reliable_pid}, pg)

    if args.warmup:
        progress(f"warm-up: {args.warmup} tasks per contender")
        for c in contenders:
            bench.timed_pass(c, args.warmup)

    results = {c.name: Result(c.name, c.option, c.fleet) for c in contenders}
    for rnd in range(args.rounds):
        order = contenders[rnd % len(contenders):] + contenders[:rnd % len(contenders)]
        round_rates = {}
        for c in order:
            p = bench.timed_pass(c, args.tasks)
            r = results[c.name]
            r.rounds_tasks_per_s.append(p.tasks_per_s)
            r.rounds_tasks_per_process.append(p.per_process)
            r.rounds_redis_commands_per_task.append(sum(p.redis_commands.values()) / p.tasks)
            r.rounds_cpu_ms_per_task.append(
                {g: 1000 * v / p.tasks for g, v in p.cpu_seconds.items()})
            round_rates[c.name] = p.tasks_per_s
            progress(f"round {rnd + 1}/{args.rounds} {c.name:>16}: {p.tasks_per_s:8,.0f} "
                     f"tasks/s ({p.elapsed:.2f} s; per process "
                     f"{'/'.join(map(str, p.per_process))})")
        for name, rate in round_rates.items():
            results[name].per_round_ratios.append(rate / round_rates[BASELINE])

    progress(f"counting pass: {args.count_tasks} tasks per contender (MONITOR, pg_stat_database)")
    for c in contenders:
        monitor, stats_delta, xacts = bench.counting_pass(c, args.count_tasks, pg, reliable_port)
        r = results[c.name]
        n = args.count_tasks
        r.count_tasks = n
        r.redis_client_commands_per_task = {k: v / n for k, v in monitor.by_client.items()}
        r.redis_lua_commands_per_task = {k: v / n for k, v in monitor.by_lua.items()}
        r.redis_commandstats_per_task = {k: v / n for k, v in stats_delta.items()}
        r.redis_round_trips_per_task = sum(monitor.by_client.values()) / n
        r.redis_commands_per_task = sum(stats_delta.values()) / n
        r.pg_transactions_counted = xacts
        r.pg_transactions_per_task = xacts / n
        monitored = sum(monitor.by_client.values()) + sum(monitor.by_lua.values())
        if monitored != sum(stats_delta.values()):
            progress(f"note: {c.name}: MONITOR saw {monitored} commands, INFO commandstats "
                     f"{sum(stats_delta.values())}")
        progress(f"counted {c.name:>16}: Redis {r.redis_round_trips_per_task:.2f} round trips, "
                 f"{r.redis_commands_per_task:.2f} cmds; PostgreSQL "
                 f"{r.pg_transactions_per_task:.2f} xacts per task")

    base = statistics.median(results[BASELINE].rounds_tasks_per_s)
    for r in results.values():
        r.median_cpu_ms_per_task = {
            g: statistics.median(x.get(g, 0.0) for x in r.rounds_cpu_ms_per_task)
            for g in CPU_GROUPS}
        r.median_tasks_per_s = statistics.median(r.rounds_tasks_per_s)
        r.ratio_vs_plain = r.median_tasks_per_s / base
    return list(results.values())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    binary = shutil.which(args.redis_server)
    if binary is None:
        print(f"error: redis-server is not installed ({args.redis_server!r} not found); "
              "install Redis or pass --redis-server PATH", file=sys.stderr)
        return 2
    started = dt.datetime.now(dt.timezone.utc)
    print(f"# reproduce (from the repository root): {reproduce_command(args)}")
    print(f"# {os.cpu_count()} CPUs, {platform.platform()}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.tasks} no-op tasks x "
          f"{args.rounds} interleaved rounds, {args.workers} workers x concurrency "
          f"{args.concurrency} per fleet; started {started:%Y-%m-%d %H:%M} UTC", flush=True)
    header: dict[str, Any] = {}
    t0 = time.monotonic()
    stack = ExitStack()
    tmp = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    stack.callback(shutil.rmtree, tmp, ignore_errors=True)
    try:
        with Cleanup():
            try:
                results = run(args, stack, tmp, binary, header)
            except BenchmarkError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            except psycopg.Error as exc:
                print(f"error: PostgreSQL ({args.postgres_url}): {exc}", file=sys.stderr)
                return 1
            except redis.RedisError as exc:
                print(f"error: Redis: {exc!r}", file=sys.stderr)
                return 1
            except KeyboardInterrupt:
                print("interrupted; cleaning up", file=sys.stderr)
                return 130
    finally:
        with Cleanup.shielded():
            progress("stopping workers and redis-servers, dropping the database")
            stack.close()
    wall = time.monotonic() - t0

    print()
    print(table(results))
    print()
    print(cpu_table(results))
    print()
    print(targets(results))
    print()
    print(breakdown(results))
    print(f"\n(wall time {wall:.0f} s. tasks/s: N / (last task end - first task start), median "
          "over rounds. Redis round trips: commands clients sent to the reliable Redis "
          "(MONITOR); cmds incl. Lua: INFO commandstats delta. PG xacts: pg_stat_database "
          "xact_commit + xact_rollback delta of the bench database.)")

    if args.json:
        payload = {
            "benchmark": "throughput",
            "reproduce": reproduce_command(args),
            "started_utc": started.isoformat(timespec="seconds"),
            "wall_seconds": round(wall, 1),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            **header,
            "tasks": args.tasks,
            "rounds": args.rounds,
            "workers_per_fleet": args.workers,
            "concurrency": args.concurrency,
            "baseline": BASELINE,
            "targets": {"idempotent-pg": {"ratio_vs_plain_min": TARGET_RATIO,
                                          "redis_round_trips_max": TARGET_ROUND_TRIPS,
                                          "pg_transactions_max": TARGET_PG_XACTS}},
            "results": [asdict(r) for r in results],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
