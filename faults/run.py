"""The campaign: servers, fleet, workload and a seeded schedule of faults; heal, quiesce, check.

``python -m faults --minutes 3 --seed 1`` (or ``scripts/faults``). The same seed
gives the same schedule (printed, and saved as ``schedule.json``); what the
fleet does under it is timing-dependent. Exit 0 only when every invariant held.
The broker is a private RabbitMQ node (``--broker redis``: a private
redis-server, where a whole-worker kill can lose a message in kombu's Redis
transport; faults/README.md says what differs).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import random
import secrets
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa

from faults.cluster import BROKERS, Cluster
from faults.fleet import Fleet
from faults.history import Recorder
from faults.nemesis import NEMESES, Context

ROOT = Path(__file__).resolve().parent.parent
TERMINAL = {"SUCCESS", "FAILURE", "SKIPPED", "DROPPED", "REVOKED"}
# how long each fault lasts (s): a pause outlives the leases (lock 3 s, slot 3 s)
DURATIONS: dict[str, tuple[float, float]] = {
    "kill": (1.0, 5.0), "pause": (4.5, 9.0), "stall": (2.0, 7.0), "redis-restart": (1.0, 4.0),
    "failover": (2.0, 5.0), "pg-restart": (1.0, 4.0), "broker-restart": (1.0, 4.0),
    "clock": (4.5, 9.0),
}


@dataclass
class Step:
    at: float  # seconds after the workload started
    nemesis: str
    duration: float
    plan: dict[str, Any]


def schedule(seed: int, seconds: float, names: list[str]) -> list[Step]:
    """Every chosen nemesis once (in a seeded order), then seeded picks until the end."""
    rng = random.Random(seed)
    order = list(names)
    rng.shuffle(order)
    steps: list[Step] = []
    t = rng.uniform(4.0, 8.0)
    while True:
        name = order[len(steps)] if len(steps) < len(order) else rng.choice(names)
        low, high = DURATIONS[name]
        duration = round(rng.uniform(low, high), 2)
        plan = NEMESES[name].plan(rng)
        if t + duration > seconds - 3.0:
            break
        steps.append(Step(round(t, 2), name, duration, plan))
        t += duration + rng.uniform(3.0, 8.0)
    return steps


def parse(argv: list[str] | None) -> argparse.Namespace:
    from faults.workloads import WORKLOADS

    ap = argparse.ArgumentParser(prog="scripts/faults", description=__doc__)
    ap.add_argument("--self-test", action="store_true",
                    help="run the checker's self-test (planted violations) and exit")
    ap.add_argument("--minutes", type=float, default=3.0, help="workload phase length")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workload", default="mix", choices=WORKLOADS)
    ap.add_argument("--nemesis", default=",".join(NEMESES),
                    help=f"comma-separated, from {','.join(NEMESES)} (default all)")
    ap.add_argument("--results", type=Path, default=None,
                    help="default results/faults-<timestamp>-seed<S>/")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--rate", type=float, default=2.5, help="units of work submitted per second")
    ap.add_argument("--quiesce-timeout", type=float, default=180.0)
    ap.add_argument("--broker", default="rabbitmq", choices=BROKERS,
                    help="the Celery broker: a private RabbitMQ node (default; its own ports, "
                         "node name and epmd; results go to a redis-server of their own) or a "
                         "private redis-server (results in its database 1)")
    ap.add_argument("--kill-workers", action=argparse.BooleanOptionalAction, default=True,
                    help="let the kill nemesis take down whole workers (default; "
                         "--no-kill-workers: pool children only). With --broker redis a "
                         "whole-worker kill can lose a message (kombu's Redis transport, see "
                         "faults/README.md); with --broker rabbitmq the node requeues a dead "
                         "worker's deliveries")
    ap.add_argument("--log-level", default="warning",
                    help="the workers' log level (info shows every received message)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.nemesis.split(",") if n.strip()]
    unknown = [n for n in names if n not in NEMESES]
    if unknown:
        ap.error(f"unknown nemesis {', '.join(unknown)}: from {', '.join(NEMESES)}")
    args.nemeses = names
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.self_test:
        try:
            selftest = importlib.import_module("faults.selftest")
        except ImportError:
            print("checker not available (faults.selftest missing)")
            return 2
        return int(selftest.main())
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    results: Path = (args.results or ROOT / "results" / f"faults-{stamp}-seed{args.seed}")
    results = results.resolve()
    results.mkdir(parents=True, exist_ok=True)
    steps = schedule(args.seed, args.minutes * 60, args.nemeses)
    print(f"seed {args.seed}: {len(steps)} faults over {args.minutes:g} min -> {results}")
    for s in steps:
        print(f"  t+{s.at:7.2f}s {s.nemesis:<15} {s.duration:5.2f}s {json.dumps(s.plan)}")
    (results / "schedule.json").write_text(json.dumps([asdict(s) for s in steps], indent=1))
    # SIGTERM, like Ctrl-C, unwinds through Campaign.run's cleanup: no server is left running
    signal.signal(signal.SIGTERM, _exit_on_signal)
    return Campaign(args, results, steps).run()


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


class Campaign:
    def __init__(self, args: argparse.Namespace, results: Path, steps: list[Step]) -> None:
        self.args = args
        self.results = results
        self.steps = steps
        self.recorder = Recorder(results, "runner")
        self.cluster = Cluster(results / "servers", broker=args.broker)
        self.fleet: Fleet | None = None
        self.submitted: dict[str, str] = {}
        self.active: tuple[Step, Any] | None = None

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def phase(self, name: str, action: str) -> None:
        self.recorder.emit("phase", name=name, action=action)
        self.log(f"phase {name} {action}")

    def run(self) -> int:
        try:
            began = time.monotonic()
            self.cluster.start()
            self.log(f"servers up in {time.monotonic() - began:.1f}s: "
                     f"{self.cluster.broker_kind} broker :{self.cluster.broker.port}, state "
                     f":{self.cluster.state.port} (+replica), postgres :{self.cluster.pg.port}")
            self.setup()
            return self.campaign()
        finally:
            if self.fleet is not None:
                self.fleet.stop()
            self.cluster.stop()

    def setup(self) -> None:
        prefix = f"fc{self.args.seed}-{secrets.token_hex(3)}"
        env = dict(os.environ)
        env.update(
            FAULTS_BROKER_URL=self.cluster.broker_url,
            FAULTS_RESULT_URL=self.cluster.result_url,
            FAULTS_STATE_URL=self.cluster.worker_state_url,
            FAULTS_DATABASE_URL=self.cluster.worker_database_url,
            FAULTS_PREFIX=prefix,
            FAULTS_RESULTS=str(self.results),
            FAULTS_LOG_LEVEL=self.args.log_level,
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        )
        if "clock" in self.args.nemeses:  # the workers run under faults.clockskew
            env["FAULTS_CLOCK_DIR"] = str(self.results / "clock")
        else:
            env.pop("FAULTS_CLOCK_DIR", None)
        # this process (the producer) talks to the servers directly, not through the proxies
        os.environ.update({k: v for k, v in env.items() if k.startswith("FAULTS_")})
        os.environ["FAULTS_STATE_URL"] = f"{self.cluster.state.url}/0"
        os.environ["FAULTS_DATABASE_URL"] = self.cluster.database_url
        self.prefix = prefix
        from celery_reliable import create_tables
        from faults.workloads import locked, payments

        engine = sa.create_engine(self.cluster.database_url)
        create_tables(engine)
        locked.meta.create_all(engine)
        payments.meta.create_all(engine)
        engine.dispose()
        self.fleet = Fleet(self.args.workers, self.args.concurrency, env, self.results / "logs")
        self.fleet.start()
        self.log(f"fleet up: {self.args.workers} workers x {self.args.concurrency} processes")

    def config_event(self) -> None:
        from faults.workloads import chosen

        fields: dict[str, Any] = {}
        for module in chosen(self.args.workload):
            fields.update(module.CONFIG)
        self.recorder.emit("config", workload=self.args.workload, seed=self.args.seed,
                           nemeses=self.args.nemeses, minutes=self.args.minutes,
                           broker=self.args.broker, kill_workers=self.args.kill_workers,
                           prefix=self.prefix, database_url=self.cluster.database_url, **fields)

    # ------------------------------------------------------------------ phases

    def campaign(self) -> int:
        from faults.app import app
        from faults.workloads import chosen
        from faults.workloads._common import Producer

        assert self.fleet is not None
        self.config_event()
        modules = chosen(self.args.workload)
        stop = threading.Event()
        producer = Producer(app=app, rng=random.Random(self.args.seed * 7919 + 1),
                            recorder=self.recorder, submitted=self.submitted,
                            publish=lambda name, **kw: self.publish(app, stop, name, **kw))
        ctx = Context(self.cluster, self.fleet, self.recorder, self.results,
                      kill_workers=self.args.kill_workers)

        def produce() -> None:
            rng = random.Random(self.args.seed * 104729 + 2)
            while not stop.is_set():
                module = rng.choice(modules)
                try:
                    module.produce(producer)
                except Exception as exc:  # the broker stayed down past the workload phase
                    self.log(f"producer: {exc!r}")
                stop.wait(rng.expovariate(self.args.rate))

        self.phase("workload", "start")
        started = time.monotonic()
        thread = threading.Thread(target=produce, name="producer", daemon=True)
        thread.start()
        supervising = threading.Event()

        def supervise() -> None:
            assert self.fleet is not None
            while not supervising.wait(1.0):
                for what in self.fleet.supervise():
                    # not a planned fault: a worker exited on its own (see Fleet.supervise)
                    for action in ("start", "stop"):
                        self.recorder.emit("nemesis", name="worker-crash", action=action,
                                           target=f"worker {what}",
                                           detail="exited on its own; restarted by supervisor")
                    self.log(f"supervisor: restarted {what}")

        threading.Thread(target=supervise, name="supervisor", daemon=True).start()
        for step in self.steps:
            self.sleep_until(started + step.at)
            self.inject(ctx, step)
            self.sleep_until(started + step.at + step.duration)
            self.heal_step(ctx)
        self.sleep_until(started + self.args.minutes * 60)
        stop.set()
        thread.join(60)
        self.phase("workload", "stop")

        self.phase("heal", "start")
        self.heal_step(ctx)
        self.cluster.heal()
        self.fleet.heal()
        self.phase("heal", "stop")

        self.phase("quiesce", "start")
        states = self.quiesce()
        self.phase("quiesce", "stop")
        supervising.set()
        self.record_final(app, states)
        self.fleet.stop()
        self.dump_tables()
        return self.check()

    def sleep_until(self, deadline: float) -> None:
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.5))

    def publish(self, app: Any, stop: threading.Event, name: str, *, task_id: str,
                queue: str, kwargs: dict[str, Any]) -> None:
        """Publish until the broker takes it (the same task id each try)."""
        deadline = time.monotonic() + 120
        while True:
            try:
                app.send_task(name, kwargs=kwargs, task_id=task_id, queue=queue,
                              retry_policy={"max_retries": 2, "interval_start": 0.2,
                                            "interval_step": 0.2})
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def inject(self, ctx: Context, step: Step) -> None:
        nemesis = NEMESES[step.nemesis]
        detail = json.dumps(step.plan)
        try:
            target = nemesis.start(ctx, step.plan)  # may note what it did in the plan (a pid)
        except Exception as exc:
            target = f"failed to inject: {exc!r}"
        self.active = (step, step.plan)
        self.recorder.emit("nemesis", name=step.nemesis, action="start", target=target,
                           detail=detail)
        self.log(f"nemesis {step.nemesis} start: {target}")
        step.plan["_target"] = target

    def heal_step(self, ctx: Context) -> None:
        if self.active is None:
            return
        step, _ = self.active
        self.active = None
        try:
            detail = NEMESES[step.nemesis].stop(ctx, step.plan)
        except Exception as exc:
            detail = f"failed to heal: {exc!r}"
        self.recorder.emit("nemesis", name=step.nemesis, action="stop",
                           target=str(step.plan.get("_target", "")), detail=detail)
        self.log(f"nemesis {step.nemesis} stop: {detail}")

    # ------------------------------------------------------- quiescence, final

    def result_client(self) -> redis.Redis:
        return redis.Redis.from_url(self.cluster.result_url, socket_timeout=10)

    def dead_letters(self) -> dict[str, tuple[str, float]]:
        engine = sa.create_engine(self.cluster.database_url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(sa.text(
                    "SELECT task_id, reason, last_failure_at FROM reliable_dead_letters"))
                return {r.task_id: (r.reason, r.last_failure_at.timestamp()) for r in rows}
        finally:
            engine.dispose()

    def states(self) -> dict[str, str]:
        ids = list(self.submitted)
        client = self.result_client()
        out: dict[str, str] = {}
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            for task_id, raw in zip(chunk, client.mget([f"celery-task-meta-{t}" for t in chunk]),
                                    strict=True):
                out[task_id] = json.loads(raw)["status"] if raw else "PENDING"
        client.close()
        return out

    def quiesce(self) -> dict[str, str]:
        """Wait until every submitted task is terminal (or dead-lettered), or the timeout."""
        deadline = time.monotonic() + self.args.quiesce_timeout
        while True:
            states = self.states()
            letters = self.dead_letters()
            open_ = [t for t, s in states.items() if s not in TERMINAL and t not in letters]
            if not open_ or time.monotonic() > deadline:
                self.log(f"quiescence: {len(states) - len(open_)}/{len(states)} terminal"
                         + (f", {len(open_)} not (e.g. {open_[0]})" if open_ else ""))
                return states
            time.sleep(2)

    def record_final(self, app: Any, states: dict[str, str]) -> None:
        client = self.result_client()
        for task_id, state in states.items():
            raw = client.get(f"celery-task-meta-{task_id}")
            result = json.loads(raw).get("result") if raw else None
            self.recorder.emit("final", task_id=task_id, state=state,
                               result=json.dumps(result, sort_keys=True, default=str))
        client.close()
        for task_id, (reason, at) in self.dead_letters().items():
            self.recorder.emit("deadletter", task_id=task_id, reason=reason, at=at)
        self.record_leases(app)

    def record_leases(self, app: Any) -> None:
        """What the plugin's Redis still holds after healing: each lease and its time left."""
        from faults.workloads import breaker, bulkhead, locked

        r = self.cluster.state.client()
        tag = "{" + self.prefix + "}"
        sec, usec = r.time()
        now_ms = int(sec) * 1000 + int(usec) // 1000
        for key in r.scan_iter(f"{tag}:lock:*"):
            self.recorder.emit("lease", kind="lock", key=key.decode(),
                               ttl_ms=int(locked.LOCK_TTL * 1000), remaining_ms=int(r.pttl(key)))
        for kind, pattern, ttl in (
            ("slot", f"{tag}:bh:*:slots", bulkhead.LEASE),
            ("probe", f"{tag}:cb:*:probes",
             breaker.SETTINGS["reliable_circuit_breakers"][breaker.BREAKER]["probe_lease"]),
        ):
            for key in r.scan_iter(pattern):
                entries: Any = r.zrange(key, 0, -1, withscores=True)
                for member, score in entries:
                    holder = member.decode()
                    self.recorder.emit("lease", kind=kind, key=f"{key.decode()} {holder}",
                                       ttl_ms=int(ttl * 1000), remaining_ms=int(score) - now_ms)
        lease_s = float(getattr(app.tasks["fc.pay"], "idempotency_lease", 0) or 0)
        for key in r.scan_iter(f"{tag}:idem:*"):
            record = r.hgetall(key)
            if record.get(b"s") == b"P" and b"d" in record:
                self.recorder.emit("lease", kind="idempotency", key=key.decode(),
                                   ttl_ms=int(lease_s * 1000),
                                   remaining_ms=int(float(record[b"d"])) - now_ms)
        r.close()

    def dump_tables(self) -> None:
        """The workloads' tables as JSON lines, so a results folder can be re-checked later."""
        folder = self.results / "db"
        folder.mkdir(exist_ok=True)
        engine = sa.create_engine(self.cluster.database_url)
        try:
            with engine.connect() as conn:
                for table in ("fc_counter", "fc_counter_writes", "fc_payments",
                              "reliable_dead_letters"):
                    rows = conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY 1"))
                    with open(folder / f"{table}.jsonl", "w") as f:
                        for row in rows.mappings():
                            f.write(json.dumps(dict(row), default=str) + "\n")
        finally:
            engine.dispose()

    def check(self) -> int:
        self.phase("check", "start")
        try:
            checker = importlib.import_module("faults.checker")
            report = importlib.import_module("faults.report")
        except ImportError:
            print("checker not available (faults.checker / faults.report missing)")
            self.phase("check", "stop")
            return 2
        verdicts = checker.check(self.results, self.cluster.database_url)
        self.phase("check", "stop")
        report.print_verdicts(verdicts)
        with contextlib.suppress(Exception):
            print(f"plot: {report.plot(self.results)}")
        failed = [v for v in verdicts if v.violations]
        (self.results / "verdicts.json").write_text(json.dumps(
            [{"invariant": v.invariant, "checked": v.checked, "violations": v.violations,
              "example": v.example} for v in verdicts], indent=1, default=str))
        print(f"results: {self.results}")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
