"""Check the library's guarantees against a campaign's history and the workloads' own rows.

Every invariant is one small function over a :class:`History` (the merged JSON-lines events,
indexed) and, where the workload's effect lives in PostgreSQL, the rows of its tables
(:class:`Tables`). Nothing here reads the library's own counters or Redis: the verdict rests
on what the tasks recorded and what the database holds.

A verdict is *not applicable* (``applicable=False``) when the workload it needs did not run,
never a silent pass with zero checked; if the workload ran but its evidence is missing (no
table, no config event), that is a violation, since the campaign could not check what it claims.

Tolerances (each stated again in the verdict's ``checked`` text):

- fence order: equal consecutive tokens are accepted only from one holder (``check_postgres``
  accepts an equal token only with the same holder); the database's order is its
  ``seq``/``id`` column (insertion order under the fence row's lock, i.e. commit order per
  resource), else ``at``; history-only (Redis) writes are ordered by ``seq`` if every one has
  it, else by ``t``.
- critical sections: an overlap of two executions of one resource is *explained* when the
  earlier holder lost its lease: its ``end`` says ``lost-lock``/``stale``, it had a refused
  fenced write, or a lease-losing fault (:func:`costs_lease`) that reaches it was active
  between its start (less :data:`FAULT_LEAD_S`) and the later holder's start. Explained
  overlaps are still violations if the earlier holder had a write *accepted* after the later
  holder's first accepted write.
- clock faults (``faults/nemesis/clock.py``, the plan in the start event's ``detail``): a
  ``suspend`` (stopped, its clock counting only part of the stop) or a forward ``jump`` can
  cost the target its leases; a ``slow`` clock only below rate :data:`SLOW_CLOCK_LOSES_BELOW`
  (the heartbeat renews every ``ttl / 3`` of the skewed clock, i.e. within ``ttl`` of real
  time above it): an overlap or an excess holder is not explained by a slow clock at that
  rate or faster. A ``suspend`` counts as a pause for the bucket's late starts.
- buckets: every window ``[t_i, t_j]`` of starts holds ``count <= rate*(t_j-t_i) + burst +
  tolerance`` (checked for all windows at once, O(n)); ``tolerance`` comes from the config
  event, default :func:`default_bucket_tolerance` (half a second of tokens plus one: the
  admission-to-record latency on a loaded machine); each Redis state loss (``redis-restart``,
  ``failover``) inside a window adds one ``burst`` (the bucket comes back full); starts
  recorded within :data:`PAUSE_LATE_S` after their process was resumed are left out (the
  admission happened before the pause).
- bulkheads: concurrent holders ``<= slots``, except that holders which had lost their slot
  lease at that moment are not counted: a pause/stall reaching them that began at least the
  lease TTL earlier and lasted at least the TTL, a lease-losing clock fault reaching them that
  began at least 2/3 of the TTL earlier (the last renewal may have been ``ttl / 3`` before it;
  its effect outlasts its stop: the clock stays behind or ahead), a Redis state loss since
  they started, or an ``end`` of ``lost-lock``.
- windows (exact mode): the starts whose admission lies within one window of its length
  ``<= limit``; a start's admission is at most ``window_latency_s`` (config, default 0.5 s)
  before it, or, for a start just after a SIGCONT or the end of a Redis-link stall, that
  much before the fault began, and never before its process's previous start; each Redis
  state loss in the window adds one ``limit`` (the log may be forgotten). Clock faults
  excuse nothing: the window is kept on the Redis server's ``TIME``.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from faults.history import TERMINAL_STATES, Event, Scan, scan

__all__ = [
    "FAULT_LEAD_S",
    "INVARIANTS",
    "LEASE_FAULTS",
    "PAUSE_LATE_S",
    "Execution",
    "Fault",
    "History",
    "Tables",
    "Verdict",
    "check",
    "check_history",
    "costs_lease",
    "default_bucket_tolerance",
    "default_window_latency",
    "passed",
    "read_dumps",
    "read_tables",
]

# Faults that can make a holder lose a Redis lease (a lock, a slot): its process stops
# renewing (pause, kill, clock skew), cannot reach Redis (stall), or Redis forgets (restart
# from an older snapshot or empty, failover to a lagging replica).
LEASE_FAULTS = frozenset({"pause", "stall", "kill", "redis-restart", "failover", "clock"})
# Faults that erase or roll back the plugin's Redis state fleet-wide.
STATE_LOSS_FAULTS = frozenset({"redis-restart", "failover"})
# Faults aimed at one process or worker: they reach only the executions their target names.
TARGETED_FAULTS = frozenset({"kill", "pause", "clock"})
# A lease is taken at admission, a moment before the ``start`` event: a fault that began up
# to this long before a holder's start may still have cost it its lease.
FAULT_LEAD_S = 1.0
# A process resumed after SIGSTOP records the start of a task admitted before the pause.
PAUSE_LATE_S = 1.0
# A clock slower than this rate renews a lease (every ttl/3 of its time) too late to keep it.
SLOW_CLOCK_LOSES_BELOW = 1 / 3


@dataclass(frozen=True)
class Verdict:
    """One invariant's result: what was checked, how many violations, one example."""

    invariant: str
    checked: str
    violations: int
    example: str = ""
    applicable: bool = True
    notes: str = ""

    @property
    def held(self) -> bool:
        """True when nothing violated it (a not-applicable verdict holds vacuously)."""
        return self.violations == 0

    @property
    def status(self) -> str:
        if not self.applicable:
            return "n/a"
        return "held" if self.held else "VIOLATED"


def _na(invariant: str, why: str) -> Verdict:
    return Verdict(invariant, why, 0, applicable=False)


# ---------------------------------------------------------------------------------------------
# The history, indexed


@dataclass
class Fault:
    """One nemesis interval: from its ``start`` to its ``stop`` (open: to the history's end)."""

    name: str
    target: str
    detail: str
    t0: float
    t1: float

    def overlaps(self, lo: float, hi: float) -> bool:
        return self.t0 <= hi and self.t1 >= lo


def _plan(fault: Fault) -> dict[str, Any]:
    """The plan a nemesis recorded in its start event's ``detail`` (JSON), or {}."""
    try:
        plan = json.loads(fault.detail)
    except ValueError:
        return {}
    return plan if isinstance(plan, dict) else {}


def costs_lease(fault: Fault) -> bool:
    """Whether ``fault`` can make the holders it reaches lose a Redis lease (or their belief
    outlive it): every :data:`LEASE_FAULTS` fault, except a ``slow`` clock fault at a rate
    of at least :data:`SLOW_CLOCK_LOSES_BELOW` (a clock fault without a readable plan counts)."""
    if fault.name not in LEASE_FAULTS:
        return False
    plan = _plan(fault)
    if fault.name == "clock" and plan.get("mode") == "slow":
        return float(plan.get("rate", 0.0)) < SLOW_CLOCK_LOSES_BELOW
    return True


def stops_process(fault: Fault) -> bool:
    """A SIGSTOP of its target: a ``pause``, or a ``suspend`` clock fault."""
    if fault.name == "clock":
        return _plan(fault).get("mode") == "suspend"
    return fault.name == "pause"


@dataclass
class Execution:
    """One run of a task body by one process: a ``start`` and (unless killed) its ``end``."""

    task_id: str
    pid: int
    start: Event
    end: Event | None = None
    writes: list[Event] = field(default_factory=list)
    last_t: float = 0.0  # the last event of this execution (its end, else its last write)

    @property
    def t0(self) -> float:
        return float(self.start["t"])

    @property
    def t1(self) -> float:
        return float(self.end["t"]) if self.end is not None else self.last_t

    @property
    def outcome(self) -> str | None:
        return None if self.end is None else str(self.end["outcome"])

    def field(self, name: str) -> Any:
        value = self.start.get(name)
        if value is None and self.end is not None:
            value = self.end.get(name)
        return value

    @property
    def worker(self) -> str:
        return str(self.start.get("worker") or "")

    @property
    def ran(self) -> bool:
        """False for an execution a guard deferred (if RUN records ``start`` before admission)."""
        return self.outcome != "deferred"


_PID = re.compile(r"\bpid\s*[:=]?\s*(\d+)")
# the targets RUN's nemeses record when they injected nothing
_INERT = re.compile(
    r"\bskipped\b|^none\b|failed to inject|no worker alive|no pool child|already gone"
    r"|nothing (?:paused|to restart)",
    re.I,
)


def _names(hostname: str) -> set[str]:
    """A worker's names a nemesis target may use: ``w1@host`` and ``w1``."""
    return {hostname, hostname.split("@", 1)[0]} - {""}


def _mentions(text: str, name: str) -> bool:
    return re.search(rf"(?<![\w.@-]){re.escape(name)}(?![\w.@-])", text) is not None


class History:
    """The merged events of one results folder, with the indexes the invariants share."""

    def __init__(self, events: Sequence[Event], malformed: Sequence[tuple[str, int, str]] = ()):
        self.events = list(events)
        self.malformed = list(malformed)
        self.by_type: dict[str, list[Event]] = defaultdict(list)
        for event in self.events:
            self.by_type[str(event["type"])].append(event)
        self.t_end = max((float(e["t"]) for e in self.events), default=0.0)
        self.submits: dict[str, Event] = {}
        for event in self.by_type["submit"]:
            self.submits.setdefault(str(event["task_id"]), event)
        self.executions = self._executions()
        self.faults = self._faults()
        self.exec_pids = {ex.pid for ex in self.executions}
        self.pids = {int(e["pid"]) for e in self.events}
        self.worker_names: set[str] = set()
        for ex in self.executions:
            self.worker_names |= _names(ex.worker)

    @classmethod
    def from_scan(cls, result: Scan) -> History:
        return cls(result.events, result.malformed)

    def of(self, kind: str) -> list[Event]:
        return self.by_type.get(kind, [])

    def workloads(self) -> set[str]:
        """Workloads that submitted at least one task (plus those a config names)."""
        names = {str(e["workload"]) for e in self.of("submit")}
        names |= {str(e["workload"]) for e in self.of("start")}
        names |= {str(e["workload"]) for e in self.of("config") if e["workload"] != "mix"}
        return names

    def configs(self, workload: str) -> list[Event]:
        return [e for e in self.of("config") if e["workload"] in (workload, "mix")]

    def _executions(self) -> list[Execution]:
        per_pid: dict[int, list[Event]] = defaultdict(list)
        for event in self.events:
            if event["type"] in ("start", "end", "fenced_write"):
                per_pid[int(event["pid"])].append(event)
        out: list[Execution] = []
        for pid, events in per_pid.items():
            # one process's own clock orders its own events exactly
            events.sort(key=lambda e: float(e["mono"] if "mono" in e else e["t"]))
            open_: dict[str, Execution] = {}
            for event in events:
                task_id = str(event["task_id"])
                if event["type"] == "start":
                    ex = Execution(task_id, pid, event, last_t=float(event["t"]))
                    open_[task_id] = ex
                    out.append(ex)
                elif task_id in open_:
                    ex = open_[task_id]
                    ex.last_t = max(ex.last_t, float(event["t"]))
                    if event["type"] == "end":
                        ex.end = event
                        del open_[task_id]
                    else:
                        ex.writes.append(event)
        out.sort(key=lambda ex: ex.t0)
        return out

    def _faults(self) -> list[Fault]:
        out: list[Fault] = []
        opened: dict[tuple[str, str], Fault] = {}
        for event in self.of("nemesis"):
            key = (str(event["name"]), str(event["target"]))
            t = float(event["t"])
            if event["action"] == "start":
                fault = Fault(key[0], key[1], str(event.get("detail", "")), t, math.inf)
                opened[key] = fault
                out.append(fault)
            elif key in opened:
                opened.pop(key).t1 = t
            else:  # a stop with no start: an instantaneous fault
                out.append(Fault(key[0], key[1], str(event.get("detail", "")), t, t))
        for fault in out:
            if fault.t1 == math.inf:
                fault.t1 = self.t_end
        # a nemesis that found nothing to do (or failed) explains nothing
        return [f for f in out if not _INERT.search(f.target)]

    def reaches(self, fault: Fault, ex: Execution) -> bool:
        """Whether ``fault`` can have hit execution ``ex``'s process (or its leases)."""
        if fault.name == "stall" and re.search(r"postgres|\bpg\b", fault.target, re.I):
            return False  # a stalled PostgreSQL link does not touch a Redis lease
        if fault.name not in TARGETED_FAULTS:
            return True
        text = f"{fault.target} {fault.detail}"
        pids = {int(p) for p in _PID.findall(text)}
        if pids & self.exec_pids:  # aimed at pool children: exactly those
            return ex.pid in pids
        named = {n for n in self.worker_names if _mentions(text, n)}
        if named:  # aimed at whole workers: their executions
            return bool(named & _names(ex.worker))
        return True  # cannot tell whom it reached: assume it may have reached this one

    def faults_reaching(
        self, ex: Execution, lo: float, hi: float, names: Iterable[str] = LEASE_FAULTS
    ) -> list[Fault]:
        wanted = set(names)
        return [
            f
            for f in self.faults
            if f.name in wanted and f.overlaps(lo, hi) and self.reaches(f, ex)
        ]

    def lease_faults_reaching(self, ex: Execution, lo: float, hi: float) -> list[Fault]:
        """The faults active in [lo, hi] that reach ``ex`` and can cost it a lease."""
        return [f for f in self.faults_reaching(ex, lo, hi) if costs_lease(f)]


# ---------------------------------------------------------------------------------------------
# Database rows


@dataclass
class Tables:
    """The workloads' rows; ``None`` for a table that does not exist (workload not run)."""

    counter: list[dict[str, Any]] | None = None
    counter_writes: list[dict[str, Any]] | None = None
    payments: list[dict[str, Any]] | None = None
    error: str | None = None  # the database could not be read at all
    source: str = "no database URL given"


# the column a table's rows are ordered by, best first (see the module docstring)
_ORDER_COLUMNS = ("seq", "id", "at")


_TABLES = ("fc_counter", "fc_counter_writes", "fc_payments")
_TABLE_ATTR = {
    "fc_counter": "counter",
    "fc_counter_writes": "counter_writes",
    "fc_payments": "payments",
}


def read_dumps(folder: Path) -> Tables:
    """The tables as the runner dumped them (``<results>/db/<table>.jsonl``, one row a line)."""
    tables = Tables(source=f"dumps in {folder}")
    for name in _TABLES:
        path = folder / f"{name}.jsonl"
        if not path.is_file():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        order = next((c for c in _ORDER_COLUMNS if rows and all(c in r for r in rows)), None)
        if order is not None and order != "at":  # "at" was dumped as text
            rows.sort(key=lambda r: int(r[order]))
        setattr(tables, _TABLE_ATTR[name], rows)
    return tables


def read_tables(database_url: str | None, results_dir: Path | None = None) -> Tables:
    """Read fc_counter, fc_counter_writes and fc_payments, whichever exist.

    Without a URL, the runner's dumps under ``<results_dir>/db`` are read if there are any
    (a saved results folder can be re-checked after its database is gone).
    """
    if not database_url:
        if results_dir is not None and (Path(results_dir) / "db").is_dir():
            return read_dumps(Path(results_dir) / "db")
        return Tables()
    import sqlalchemy as sa

    tables = Tables(source="PostgreSQL")
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            present = set(inspector.get_table_names())

            def rows(name: str) -> list[dict[str, Any]] | None:
                if name not in present:
                    return None
                columns = {c["name"] for c in inspector.get_columns(name)}
                order = next((c for c in _ORDER_COLUMNS if c in columns), None)
                sql = f'SELECT * FROM "{name}"' + (f' ORDER BY "{order}"' if order else "")
                return [dict(r._mapping) for r in conn.execute(sa.text(sql))]

            tables.counter = rows("fc_counter")
            tables.counter_writes = rows("fc_counter_writes")
            tables.payments = rows("fc_payments")
    except Exception as exc:  # unreachable, auth, ...: every DB-backed verdict says so
        tables.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    finally:
        engine.dispose()
    return tables


def _db_missing(
    invariant: str, h: History, workload: str, table: str, db: Tables
) -> Verdict | None:
    """A verdict when ``table`` cannot be read: n/a if its workload did not run, else violated."""
    ran = workload in h.workloads()
    if db.error is not None:
        if not ran:
            return _na(invariant, f"{workload} workload not run")
        return Verdict(invariant, f"{table}: database unreadable", 1, db.error)
    if getattr(db, _TABLE_ATTR[table]) is None:
        if not ran:
            return _na(invariant, f"{workload} workload not run ({table} absent)")
        return Verdict(
            invariant, f"{table}: missing", 1, f"{workload} ran but {table} is absent ({db.source})"
        )
    return None


# ---------------------------------------------------------------------------------------------
# Invariants


def _token_order(
    writes: Iterable[tuple[str, int, str, str]],
) -> tuple[int, int, str, set[str]]:
    """(resource, token, holder, where) in acceptance order -> (checked, violations, example).

    Accepted tokens per resource never decrease, and an equal token is accepted again only
    from the same holder (``check_postgres``/``RedisFence`` accept an equal token only then).
    """
    last: dict[str, tuple[int, str, str]] = {}
    checked = violations = 0
    example = ""
    resources: set[str] = set()
    for resource, token, holder, where in writes:
        checked += 1
        resources.add(resource)
        prev = last.get(resource)
        if prev is not None and (token < prev[0] or (token == prev[0] and holder != prev[1])):
            violations += 1
            example = example or (
                f"{resource}: token {token} ({holder}, {where}) accepted after "
                f"token {prev[0]} ({prev[1]}, {prev[2]})"
            )
        if prev is None or token >= prev[0]:
            last[resource] = (token, holder, where)
    return checked, violations, example, resources


def fence_order(h: History, db: Tables) -> Verdict:
    """Accepted fenced writes per resource: tokens increase in acceptance order."""
    name = "fence order"
    parts: list[str] = []
    total = violations = 0
    example = ""
    history_writes = [e for e in h.of("fenced_write") if e["accepted"]]
    # PostgreSQL: the table is the source of truth, in its commit order per resource; without
    # it (a workload of another store, or the table unreadable) the history's order is used
    pg_from_table = db.counter_writes is not None and db.error is None
    if db.counter_writes is not None and db.error is None:
        n, v, ex, res = _token_order(
            # the execution's fence holder if the table keeps it, else its task id (coarser: two
            # executions of one task id with one token would pass as one holder)
            (
                str(r["resource"]),
                int(r["token"]),
                str(r.get("holder") or r.get("task_id")),
                f"row {i}",
            )
            for i, r in enumerate(db.counter_writes)
        )
        total, violations, example = total + n, violations + v, example or ex
        parts.append(f"{n} accepted writes on {len(res)} resources (fc_counter_writes)")
    elif "locked" in h.workloads() and not history_writes:
        missing = _db_missing(name, h, "locked", "fc_counter_writes", db)
        if missing is not None:
            return missing
    rest = [e for e in history_writes if not (pg_from_table and e["store"] == "postgres")]
    if rest:
        by_seq = all("seq" in e for e in rest)
        rest.sort(key=lambda e: float(e["seq"]) if by_seq else float(e["t"]))
        n, v, ex, res = _token_order(
            (
                f"{e['store']}:{e['resource']}",
                int(e["token"]),
                str(e.get("holder") or e["task_id"]),
                f"t={float(e['t']):.3f}",
            )
            for e in rest
        )
        total, violations, example = total + n, violations + v, example or ex
        parts.append(
            f"{n} accepted writes on {len(res)} resources (history, by {'seq' if by_seq else 't'})"
        )
    if not parts:
        return _na(name, "no fenced writes recorded and no fc_counter_writes table")
    parts.append("equal token only from the same holder")
    return Verdict(name, "; ".join(parts), violations, example)


def counter_updates(h: History, db: Tables) -> Verdict:
    """The locked counter lost no update: value = number of accepted writes, token = max."""
    name = "counter (no lost update)"
    missing = _db_missing(name, h, "locked", "fc_counter", db) or _db_missing(
        name, h, "locked", "fc_counter_writes", db
    )
    if missing is not None:
        return missing
    assert db.counter is not None and db.counter_writes is not None  # _db_missing checked
    writes: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in db.counter_writes:
        writes[str(row["resource"])].append(row)
    violations = 0
    example = ""
    for row in db.counter:
        resource = str(row["resource"])
        mine = writes.get(resource, [])
        want_token = max((int(w["token"]) for w in mine), default=None)
        problems = []
        if int(row["value"]) != len(mine):
            problems.append(f"value {row['value']} but {len(mine)} accepted writes")
        if (
            want_token is not None
            and row.get("token") is not None
            and int(row["token"]) != (want_token)
        ):
            problems.append(f"token {row['token']} but highest written {want_token}")
        # with a value column per write: each write is the previous value plus one
        values = [int(w["value"]) for w in mine if w.get("value") is not None]
        if len(values) == len(mine):
            for before, after in zip([0, *values], values, strict=False):
                if after != before + 1:
                    problems.append(f"a write set {after} after {before}")
                    break
        if problems:
            violations += 1
            example = example or f"{resource}: " + "; ".join(problems)
    orphans = sorted(set(writes) - {str(row["resource"]) for row in db.counter})
    if orphans:
        violations += len(orphans)
        example = example or (
            f"{orphans[0]}: {len(writes[orphans[0]])} accepted writes but no fc_counter row"
        )
    return Verdict(
        name,
        f"{len(db.counter)} counters against {len(db.counter_writes)} accepted writes",
        violations,
        example,
    )


def _lost_lease_evidence(h: History, a: Execution, until: float) -> str | None:
    """Why execution ``a`` may have lost its lease before ``until``, or None."""
    if a.outcome in ("lost-lock", "stale"):
        return f"end {a.outcome}"
    if any(not w["accepted"] for w in a.writes):
        return "refused write"
    faults = h.lease_faults_reaching(a, a.t0 - FAULT_LEAD_S, until)
    if faults:
        return f"nemesis {faults[0].name}"
    return None


def critical_sections(h: History, db: Tables) -> Verdict:
    """Executions of one locked resource overlap only where a fault cost the holder its lease,
    and then the fence refused that holder's stale write."""
    name = "locked critical sections"
    locked = [
        ex
        for ex in h.executions
        if ex.ran and ex.field("resource") is not None and ex.field("token") is not None
    ]
    if not locked:
        if "locked" in h.workloads():
            return Verdict(
                name,
                "no lock execution recorded",
                1,
                "the locked workload ran but no start carries resource+token",
            )
        return _na(name, "no lock executions (locked workload not run)")
    by_resource: dict[str, list[Execution]] = defaultdict(list)
    for ex in locked:
        by_resource[str(ex.field("resource"))].append(ex)
    overlaps = explained = violations = 0
    # what the earlier (stale) holder did after the later one started: its write was refused
    # with lock_lost true (its belief had ended) or by the fence while it still believed, or
    # accepted before the successor's first write (order kept), or it wrote nothing
    refused_lost = refused_believed = refused_other = wrote_first = no_write = by_clock = 0
    unended = sum(1 for ex in locked if ex.end is None)
    reasons: dict[str, int] = defaultdict(int)
    example = ""
    for resource, runs in by_resource.items():
        runs.sort(key=lambda ex: ex.t0)
        active: list[Execution] = []
        for b in runs:
            active = [a for a in active if a.t1 > b.t0]
            for a in active:
                overlaps += 1
                why = _lost_lease_evidence(h, a, b.t0)
                b_first = min((float(w["t"]) for w in b.writes if w["accepted"]), default=math.inf)
                late_ok = [w for w in a.writes if w["accepted"] and float(w["t"]) > b_first]
                if why is None:
                    violations += 1
                    example = example or (
                        f"{resource}: {b.task_id} (token {b.field('token')}) started at "
                        f"{b.t0:.3f} while {a.task_id} (token {a.field('token')}) ran "
                        f"[{a.t0:.3f}, {a.t1:.3f}] with no fault reaching it that can cost a lease"
                    )
                    continue
                explained += 1
                reasons[why] += 1
                if any(f.name == "clock" for f in h.lease_faults_reaching(a, a.t0 - FAULT_LEAD_S,
                                                                         b.t0)):
                    by_clock += 1
                if late_ok:
                    violations += 1
                    example = example or (
                        f"{resource}: stale holder {a.task_id} (token {a.field('token')}) had a "
                        f"write accepted at {float(late_ok[0]['t']):.3f} after successor "
                        f"{b.task_id} (token {b.field('token')}) wrote at {b_first:.3f}"
                    )
                elif any(not w["accepted"] and float(w["t"]) >= b.t0 for w in a.writes) or (
                    a.outcome == "stale"
                ):
                    if a.outcome == "lost-lock":
                        refused_lost += 1
                    elif a.outcome == "stale":
                        refused_believed += 1
                    else:  # no end recorded (killed), or another outcome
                        refused_other += 1
                elif any(w["accepted"] and float(w["t"]) >= b.t0 for w in a.writes):
                    wrote_first += 1
                else:
                    no_write += 1
            active.append(b)
    why_text = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
    checked = (
        f"{len(locked)} lock executions on {len(by_resource)} resources ({unended} unended); "
        f"{overlaps} overlaps, {explained} by a lost lease ({why_text or '-'}; {by_clock} with "
        f"a skewed clock): {refused_lost + refused_believed + refused_other} stale writes "
        f"refused ({refused_lost} with lock_lost true, {refused_believed} by the fence while the "
        f"holder still believed"
        + (f", {refused_other} ended otherwise or not at all" if refused_other else "")
        + f"), {wrote_first} accepted before the successor's first write, "
        f"{no_write} made no write"
    )
    return Verdict(name, checked, violations, example)


def _canonical(value: Any) -> str:
    """One spelling per result: a JSON string (as the runner stores it) is parsed first."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = json.loads(value)
    return json.dumps(value, sort_keys=True, default=repr)


def idempotent_effects(h: History, db: Tables) -> Verdict:
    """Exactly one effect per idempotency key; every SUCCESS result of a key equal."""
    name = "idempotent effects"
    keyed = {tid: str(e["key"]) for tid, e in h.submits.items() if e.get("key") is not None}
    effects = h.of("effect")
    if not keyed and not effects and db.payments is None:
        return _na(name, "no keyed submissions (payments workload not run)")
    violations = 0
    examples: list[str] = []
    parts: list[str] = []
    succeeded: set[str] = set()
    results: dict[str, set[str]] = defaultdict(set)
    for final in _last_finals(h).values():
        key = final.get("key") or keyed.get(str(final["task_id"]))
        if key is None or final["state"] != "SUCCESS":
            continue
        succeeded.add(str(key))
        if "result" in final:
            results[str(key)].add(_canonical(final["result"]))
    # the database is the source of truth for payments
    missing = _db_missing(name, h, "payments", "fc_payments", db)
    if missing is not None and missing.applicable:
        violations += missing.violations
        examples.append(missing.example)
    elif db.payments is not None:
        rows: dict[str, int] = defaultdict(int)
        for row in db.payments:
            rows[str(row["key"])] += 1
        dup = {k: n for k, n in rows.items() if n > 1}
        lost = sorted(k for k in succeeded if rows.get(k, 0) == 0)
        payment_keys = {
            str(e["key"])
            for e in h.of("submit")
            if e["workload"] == "payments" and e.get("key") is not None
        }
        phantom = sorted(k for k in rows if payment_keys and k not in payment_keys)
        violations += len(dup) + len(lost) + len(phantom)
        if dup:
            k = sorted(dup)[0]
            examples.append(f"key {k}: {dup[k]} rows in fc_payments")
        if lost:
            examples.append(f"key {lost[0]}: SUCCESS but no fc_payments row")
        if phantom:
            examples.append(f"key {phantom[0]}: fc_payments row for a key never submitted")
        parts.append(f"{len(rows)} keys in fc_payments ({len(db.payments)} rows)")
    # the history's effect events: a cross-check (and the only evidence for other stores)
    # distinct executions per key: one task id replaying its own stored result after a
    # redelivery may record the effect again, a second task id paying is a duplicate
    per_key: dict[str, set[str]] = defaultdict(set)
    for event in effects:
        per_key[str(event["key"])].add(str(event["task_id"]))
    twice = sorted(k for k, ids in per_key.items() if len(ids) > 1)
    violations += len(twice)
    if twice:
        examples.append(
            f"key {twice[0]}: effects by {len(per_key[twice[0]])} tasks "
            f"({', '.join(sorted(per_key[twice[0]]))})"
        )
    parts.append(f"{len(per_key)} keys with effect events")
    unequal = sorted(k for k, r in results.items() if len(r) > 1)
    violations += len(unequal)
    if unequal:
        examples.append(f"key {unequal[0]}: SUCCESS results differ: {sorted(results[unequal[0]])}")
    parts.append(f"{len(succeeded)} keys with SUCCESS, their results compared")
    return Verdict(name, "; ".join(parts), violations, examples[0] if examples else "")


def _last_finals(h: History) -> dict[str, Event]:
    out: dict[str, Event] = {}
    for event in h.of("final"):  # sorted by t: the last one wins
        out[str(event["task_id"])] = event
    return out


def nothing_lost(h: History, db: Tables) -> Verdict:
    """Every submitted task id reached a terminal state, or was dead-lettered."""
    name = "nothing lost"
    if not h.submits:
        return _na(name, "no submissions recorded")
    finals = _last_finals(h)
    dead = {str(e["task_id"]) for e in h.of("deadletter")}
    lost: list[str] = []
    for task_id, submit in h.submits.items():
        final = finals.get(task_id)
        if task_id in dead or (final is not None and final["state"] in TERMINAL_STATES):
            continue
        state = "no final state recorded" if final is None else f"final {final['state']}"
        lost.append(f"{task_id} ({submit['workload']} {submit['name']}): {state}")
    states: dict[str, int] = defaultdict(int)
    for task_id in h.submits:
        states[str(finals[task_id]["state"]) if task_id in finals else "none"] += 1
    summary = ", ".join(f"{k} {v}" for k, v in sorted(states.items()))
    return Verdict(
        name,
        f"{len(h.submits)} submitted tasks ({summary}; {len(dead)} dead letters)",
        len(lost),
        lost[0] if lost else "",
    )


def default_bucket_tolerance(rate: float) -> float:
    """Tokens of slack when the config gives none: half a second of the rate, plus one."""
    return rate * 0.5 + 1.0


def buckets(h: History, db: Tables) -> Verdict:
    """Starts of one bucket in any window ``[t_i, t_j]`` <= rate*(t_j-t_i) + burst + tolerance."""
    name = "buckets"
    starts: dict[str, list[Execution]] = defaultdict(list)
    for ex in h.executions:
        if ex.ran and ex.field("bucket") is not None:
            starts[str(ex.field("bucket"))].append(ex)
    if not starts:
        if "bucket" in h.workloads():
            return Verdict(
                name,
                "no start carries a bucket",
                1,
                "the bucket workload ran but no start event names its bucket",
            )
        return _na(name, "no bucketed starts (bucket workload not run)")
    losses = sorted(f.t0 for f in h.faults if f.name in STATE_LOSS_FAULTS)
    total = violations = late = 0
    example = ""
    parts: list[str] = []
    for bucket, runs in sorted(starts.items()):
        config = _config_for(h, "bucket", bucket=bucket)
        if config is None or config.get("rate") is None or config.get("burst") is None:
            violations += 1
            example = example or f"bucket {bucket}: no config event with rate and burst"
            continue
        rate, burst = float(config["rate"]), float(config["burst"])
        tol = (
            float(config["tolerance"])
            if config.get("tolerance") is not None
            else default_bucket_tolerance(rate)
        )
        times: list[float] = []
        for ex in runs:
            pauses = h.faults_reaching(ex, ex.t0 - PAUSE_LATE_S, ex.t0, names=("pause", "clock"))
            if any(p.t1 <= ex.t0 <= p.t1 + PAUSE_LATE_S for p in pauses if stops_process(p)):
                late += 1
                continue
            times.append(ex.t0)
        times.sort()
        total += len(times)
        # g(k) = k - rate*t_k - burst*losses_before(t_k); window i..j is too full when
        # g(j) - g(i) + 1 > burst + tol; keep the running minimum of g(i) (O(n), every window)
        best: tuple[float, int] | None = None
        worst = 0.0
        worst_at = ""
        lost_i = 0
        over = False  # inside a run of too-full windows: one violation per run
        for k, t in enumerate(times):
            while lost_i < len(losses) and losses[lost_i] <= t:
                lost_i += 1
            g = k - rate * t - burst * lost_i
            if best is None or g < best[0]:
                best = (g, k)
            excess = g - best[0] + 1 - (burst + tol)
            if excess <= 1e-9:
                over = False
                continue
            if not over:
                violations += 1
                over = True
            if excess > worst:
                i = best[1]
                worst = excess
                worst_at = (
                    f"bucket {bucket}: {k - i + 1} starts in [{times[i]:.3f}, {t:.3f}] "
                    f"({t - times[i]:.3f} s) > {rate:g}/s x {t - times[i]:.3f} s + burst "
                    f"{burst:g} + tolerance {tol:g}"
                )
        example = example or worst_at
        parts.append(f"{bucket}: {len(times)} starts, {rate:g}/s burst {burst:g} tol {tol:g}")
    checked = (
        f"{total} starts, every window; "
        + "; ".join(parts)
        + f"; {late} starts just after a SIGCONT left out; "
        f"{len(losses)} Redis state losses (+burst each)"
    )
    return Verdict(name, checked, violations, example)


def default_window_latency() -> float:
    """Seconds from a window's admission to its ``start`` when the config gives none."""
    return 0.5


def _previous_starts(h: History) -> dict[int, float]:
    """For each execution (by id), the start of the one its process ran before it (or -inf)."""
    out: dict[int, float] = {}
    last: dict[int, float] = {}
    for ex in h.executions:  # sorted by start
        out[id(ex)] = last.get(ex.pid, -math.inf)
        last[ex.pid] = ex.t0
    return out


def _admitted_from(h: History, ex: Execution, lag: float, previous: float) -> float:
    """The earliest its admission can have been.

    ``lag`` before its start; or, when its process was resumed (SIGCONT after a pause or a
    suspend) or the workers' Redis link resumed (a stall holds the admission's reply) at
    most :data:`PAUSE_LATE_S` before its start, ``lag`` before that fault began. Never
    before ``previous``, the start of the execution its process ran before it: a pool
    child runs one task at a time, its admission included (so only its first start after
    the resume can have been admitted before the fault).
    """
    lo = ex.t0 - lag
    for fault in h.faults_reaching(ex, ex.t0 - PAUSE_LATE_S, ex.t0,
                                   names=("pause", "clock", "stall")):
        resumed = fault.name == "stall" or stops_process(fault)
        if resumed and fault.t1 <= ex.t0 <= fault.t1 + PAUSE_LATE_S:
            lo = min(lo, fault.t0 - lag)
    return max(lo, previous)


def _window_excess(
    starts: Sequence[tuple[float, float]], limit: int, seconds: float, losses: Sequence[float]
) -> tuple[int, int, str]:
    """Overfull windows of one window's starts, each ``(admitted_from, start)``: (runs of
    them, peak, worst).

    For each start i, the window opening just before its earliest admission ``lo_i`` holds
    every start k whose admission range lies in it (``lo_k >= lo_i``, ``t_k < lo_i +
    seconds``): at most ``limit``, plus ``limit`` per Redis state loss that began in
    ``[lo_i, lo_i + seconds]`` (a loss before the window cannot let more in: every
    admission inside it came after the loss and was logged).
    """
    ordered = sorted(starts)
    runs = peak = 0
    worst, worst_at = 0, ""
    over = False  # inside a run of overfull windows (by their opening): one violation
    for i, (lo, _) in enumerate(ordered):
        closes = lo + seconds
        inside = [t for lo_k, t in ordered[i:] if lo_k < closes and t < closes]
        peak = max(peak, len(inside))
        lost = sum(1 for t in losses if lo <= t <= closes)
        excess = len(inside) - limit * (1 + lost)
        if excess > 0:
            if not over:
                runs += 1
            if excess > worst:
                worst = excess
                worst_at = (
                    f"{len(inside)} starts admitted within ({lo:.3f}, {closes:.3f}] "
                    f"(starts {min(inside):.3f} to {max(inside):.3f}) > limit {limit} x "
                    f"(1 + {lost} Redis state losses)"
                )
        over = excess > 0
    return runs, peak, worst_at


def windows(h: History, db: Tables) -> Verdict:
    """Starts admitted within any one sliding window <= its limit.

    Each ``start`` of the window workload lists the windows it counted in (``windows``:
    a key's, the queue's); the config event gives each one's ``limit`` and ``seconds``
    (exact mode) and ``window_latency_s`` (default :func:`default_window_latency`). The
    window counts admissions on the Redis server's clock (``TIME`` in ``admit.lua``,
    read by ``window.lua``'s ``clock()``), not the worker's: a skewed pool-child clock
    (``time.monotonic``, the ``clock`` nemesis) changes nothing here and excuses nothing.
    The wall times of the history and the server's ``TIME`` are the same machine's clock.

    A start's admission came before it, by at most ``window_latency_s``; or, for a start
    recorded within :data:`PAUSE_LATE_S` after its process was resumed (a ``pause``, a
    ``suspend`` clock fault) or after a stall of the workers' Redis link ended (the
    admission's reply was held), at most ``window_latency_s`` before that fault began;
    and never before the previous start of its process (one task at a time per pool
    child). Only starts whose whole admission range lies within one window count against it
    (in particular: any ``seconds - window_latency_s`` of ordinary starts). Tolerance:
    a Redis state loss (``redis-restart`` without the last writes, or ``failover`` to a
    replica that lacked them) can forget the window's log: at most ``limit`` more starts
    per loss that began in the window, as the bucket comes back full after one.

    Liveness of the window's tasks (all terminal after healing) is :func:`nothing_lost`'s;
    the counts are repeated here.
    """
    name = "windows"
    per_window: dict[str, list[Execution]] = defaultdict(list)
    for ex in h.executions:
        names = ex.field("windows")
        if ex.ran and names:
            for window in names:
                per_window[str(window)].append(ex)
    if not per_window:
        if "window" in h.workloads():
            return Verdict(name, "no start lists a window", 1,
                           "the window workload ran but no start event names its windows")
        return _na(name, "no windowed starts (window workload not run)")
    config = _config_for(h, "window") or {}
    specs = config.get("windows")
    if not isinstance(specs, dict):
        return Verdict(name, "no config event with windows", 1,
                       "the window workload ran but no config event gives its windows")
    lag = float(config.get("window_latency_s") or default_window_latency())
    losses = sorted(f.t0 for f in h.faults if f.name in STATE_LOSS_FAULTS)
    violations = 0
    example = ""
    parts: list[str] = []
    admitted: dict[int, float] = {}  # by execution (one start, several windows)
    previous = _previous_starts(h)
    for window, runs in sorted(per_window.items()):
        spec = specs.get(window)
        if not isinstance(spec, dict) or spec.get("limit") is None or not spec.get("seconds"):
            violations += 1
            example = example or f"window {window} has no limit and seconds in the config event"
            continue
        limit, seconds = int(spec["limit"]), float(spec["seconds"])
        starts = []
        for ex in runs:
            if id(ex) not in admitted:
                admitted[id(ex)] = _admitted_from(h, ex, lag, previous[id(ex)])
            starts.append((admitted[id(ex)], ex.t0))
        bad, peak, worst = _window_excess(starts, limit, seconds, losses)
        violations += bad
        if bad:
            example = example or f"window {window} ({limit}/{seconds:g}s) had {worst}"
        parts.append(f"{window} ({len(starts)} starts, {limit}/{seconds:g}s, peak {peak})")
    late = sum(1 for ex in h.executions
               if id(ex) in admitted and admitted[id(ex)] < ex.t0 - lag)
    submitted = [tid for tid, e in h.submits.items() if e["workload"] == "window"]
    finals = _last_finals(h)
    terminal = sum(1 for tid in submitted
                   if tid in finals and finals[tid]["state"] in TERMINAL_STATES)
    checked = (
        f"{len(admitted)} starts, admitted <= {lag:g} s before; "
        + "; ".join(parts)
        + f"; {late} starts just after a SIGCONT or a Redis-link stall (admitted from the "
        f"fault's start); {len(losses)} Redis state losses (+limit each); "
        f"{terminal} of {len(submitted)} window tasks terminal"
    )
    return Verdict(name, checked, violations, example)


def _config_for(h: History, workload: str, **match: str) -> Event | None:
    configs = h.configs(workload)
    for key, value in match.items():
        exact = [c for c in configs if c.get(key) == value]
        if exact:
            return exact[-1]
    plain = [c for c in configs if c["workload"] == workload] or configs
    return plain[-1] if plain else None


def _lost_slot(h: History, ex: Execution, at: float, ttl: float) -> bool:
    """Whether holder ``ex`` had lost its slot lease by time ``at``."""
    if ex.outcome == "lost-lock":
        return True
    for fault in h.lease_faults_reaching(ex, ex.t0 - FAULT_LEAD_S, at):
        if fault.name in STATE_LOSS_FAULTS and fault.t0 <= at:
            return True
        # The heartbeat renews every ttl / 3, so the last renewal before a pause or a
        # stall began may be ttl / 3 older: the lease can run out 2/3 of a ttl after the
        # fault began (a 24-min soak, seed 11: a slot taken 0.28 s before a pause ran out
        # 2.99 s after it began; the rule was "a full ttl after", a false violation).
        if (
            fault.name in ("pause", "stall")
            and fault.t0 + ttl * 2 / 3 <= at
            and fault.t1 - fault.t0 >= ttl * 2 / 3
        ):
            return True
        if fault.name == "clock" and fault.t0 + ttl * 2 / 3 <= at:
            return True
    return False


def bulkheads(h: History, db: Tables) -> Verdict:
    """Concurrent holders of a tier <= its slots, except holders whose lease had expired."""
    name = "bulkheads"
    tiers: dict[str, list[Execution]] = defaultdict(list)
    for ex in h.executions:
        if ex.ran and ex.field("tier") is not None:
            tiers[str(ex.field("tier"))].append(ex)
    if not tiers:
        if "bulkhead" in h.workloads():
            return Verdict(
                name,
                "no start carries a tier",
                1,
                "the bulkhead workload ran but no start event names its tier",
            )
        return _na(name, "no tier starts (bulkhead workload not run)")
    violations = excused = peak_all = 0
    example = ""
    parts: list[str] = []
    for tier, runs in sorted(tiers.items()):
        config = _config_for(h, "bulkhead", tier=tier)
        if config is None or config.get("slots") is None:
            violations += 1
            example = example or f"tier {tier}: no config event with slots"
            continue
        slots = int(config["slots"])
        ttl = float(
            config.get("slot_lease") or config.get("lease_ttl") or config.get("lock_ttl") or 0.0
        )
        runs.sort(key=lambda ex: ex.t0)
        active: list[Execution] = []
        peak = 0
        for ex in runs:
            active = [a for a in active if a.t1 > ex.t0]
            active.append(ex)
            peak = max(peak, len(active))
            if len(active) <= slots:
                continue
            holding = [a for a in active if not _lost_slot(h, a, ex.t0, ttl)]
            if len(holding) <= slots:
                excused += 1
                continue
            violations += 1
            example = example or (
                f"tier {tier}: {len(holding)} holders > {slots} slots at {ex.t0:.3f}: "
                + ", ".join(f"{a.task_id}@pid{a.pid}" for a in holding[: slots + 2])
            )
        peak_all = max(peak_all, peak)
        parts.append(f"{tier}: {len(runs)} runs, {slots} slots, peak {peak}")
    checked = "; ".join(parts) + f"; {excused} excess starts excused by an expired lease"
    return Verdict(name, checked, violations, example)


def _forever(lease: Event) -> bool:
    """PTTL's -1: a lock key with no expiry (other kinds' remaining is computed, -1 = expired)."""
    return lease["kind"] == "lock" and int(lease["remaining_ms"]) == -1


def leases(h: History, db: Tables) -> Verdict:
    """After healing, no lock, slot or probe is held longer than its TTL (or forever)."""
    name = "leases"
    snapshots = h.of("lease")
    if not snapshots and not h.of("phase"):
        return _na(name, "no lease snapshot taken (no phase events: the run did not reach it)")
    bad = [e for e in snapshots if _forever(e) or int(e["remaining_ms"]) > int(e["ttl_ms"])]
    kinds: dict[str, int] = defaultdict(int)
    for e in snapshots:
        kinds[str(e["kind"])] += 1
    example = ""
    if bad:
        e = bad[0]
        example = (
            f"{e['kind']} {e['key']}: remaining {e['remaining_ms']} ms, "
            f"ttl {e['ttl_ms']} ms" + (" (no expiry)" if _forever(e) else "")
        )
    held = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) or "none held"
    return Verdict(name, f"{len(snapshots)} leases held after healing ({held})", len(bad), example)


def dead_letters(h: History, db: Tables) -> Verdict:
    """No execution of a task id starts after its dead letter was recorded."""
    name = "dead letters"
    letters = h.of("deadletter")
    if not letters:
        return _na(name, "no dead letters recorded")
    first_at: dict[str, float] = {}
    for e in letters:
        tid = str(e["task_id"])
        first_at[tid] = min(first_at.get(tid, math.inf), float(e["at"]))
    late = [
        ex
        for ex in h.executions
        if ex.task_id in first_at and ex.ran and ex.t0 > first_at[ex.task_id]
    ]
    example = ""
    if late:
        ex = late[0]
        example = (
            f"{ex.task_id} started at {ex.t0:.3f} by pid {ex.pid}, dead-lettered at "
            f"{first_at[ex.task_id]:.3f}"
        )
    return Verdict(name, f"{len(first_at)} dead-lettered tasks", len(late), example)


def history_readable(h: History, db: Tables) -> Verdict:
    """Every line is a well-formed event, and the workers recorded what the results say ran.

    A recorder that silently lost the workers' events would leave every execution-based
    invariant vacuously held; so a task whose final state is SUCCESS must have at least one
    ``start``, unless it carries an idempotency key (a duplicate is answered from the stored
    result without running).
    """
    name = "history well-formed"
    if not h.events and not h.malformed:
        return Verdict(name, "no events", 1, "the history folder is empty or missing")
    examples: list[str] = []
    if h.malformed:
        f, n, why = h.malformed[0]
        examples.append(f"{f}:{n}: {why}")
    started = {ex.task_id for ex in h.executions}
    unseen = [
        tid
        for tid, final in _last_finals(h).items()
        if final["state"] == "SUCCESS"
        and tid not in started
        and h.submits.get(tid, {}).get("key") is None
    ]
    if unseen:
        examples.append(f"{unseen[0]}: SUCCESS but no start event was recorded")
    checked = (
        f"{len(h.events)} events in {len(h.pids)} processes' files; "
        f"{len(unseen)} unkeyed SUCCESS tasks without a start"
    )
    return Verdict(name, checked, len(h.malformed) + len(unseen), "; ".join(examples))


Invariant = Callable[[History, Tables], Verdict]

INVARIANTS: Mapping[str, Invariant] = {
    "history": history_readable,
    "fence-order": fence_order,
    "counter": counter_updates,
    "critical-sections": critical_sections,
    "idempotent-effects": idempotent_effects,
    "nothing-lost": nothing_lost,
    "buckets": buckets,
    "bulkheads": bulkheads,
    "windows": windows,
    "leases": leases,
    "dead-letters": dead_letters,
}


def passed(verdicts: Iterable[Verdict]) -> bool:
    """True when no verdict has a violation (not-applicable ones hold vacuously)."""
    return all(v.held for v in verdicts)


def check_history(h: History, db: Tables) -> list[Verdict]:
    """Every invariant over an already loaded history and table rows."""
    out: list[Verdict] = []
    for key, invariant in INVARIANTS.items():
        try:
            out.append(invariant(h, db))
        except Exception as exc:  # a checker bug must not pass as a held invariant
            out.append(Verdict(key, "checker raised", 1, f"{type(exc).__name__}: {exc}"))
    return out


def check(results_dir: Path, database_url: str | None) -> list[Verdict]:
    """Check every invariant over ``<results_dir>/history`` and the database at the URL."""
    tables = read_tables(database_url, results_dir)
    return check_history(History.from_scan(scan(results_dir)), tables)
