"""The checker's own test: hand-made histories, each planting one violation.

``main()`` writes a clean history (every workload, an explained lock overlap, an excused
bulkhead excess, a dead letter, a Redis state loss) and one mutation of it per planted
violation of every invariant, each into its own results folder under a temporary directory.
The workloads' tables go into a throwaway PostgreSQL schema per case: in the database named
by ``FAULTS_DATABASE_URL`` if set, else in a database created for the run on the local
server (``RELIABLE_TEST_PG_ADMIN_URL``, default ``postgres@127.0.0.1:5432``) and dropped
afterwards. Without a reachable PostgreSQL the same rows are fed to the checker directly
(and the output says so). Exit status 0 only if the clean history passes and every planted
violation is caught by the invariant it targets.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from faults.checker import History, Tables, Verdict, check, check_history
from faults.history import Event, history_dir, scan, validate

__all__ = ["CASES", "Case", "Scenario", "clean", "main", "run_case"]

T0 = 1_700_000_000.0
RUNNER = 1
ADMIN_URL = os.environ.get(
    "RELIABLE_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)

Row = dict[str, Any]


@dataclass
class Scenario:
    """A hand-made run: events (``t`` relative to T0) and the workloads' table rows."""

    events: list[Event] = field(default_factory=list)
    # table name -> rows; a table absent from the dict is not created
    tables: dict[str, list[Row]] = field(default_factory=dict)
    raw_lines: list[str] = field(default_factory=list)  # appended verbatim (torn lines)

    def add(self, t: float, pid: int, kind: str, /, **fields: Any) -> Event:
        event: Event = {"t": T0 + t, "mono": 1000.0 + t, "pid": pid, "type": kind, **fields}
        validate(event)
        self.events.append(event)
        return event

    def find(self, kind: str, **match: Any) -> Event:
        for event in self.events:
            if event["type"] == kind and all(event.get(k) == v for k, v in match.items()):
                return event
        raise KeyError(f"no {kind} event with {match}")

    def drop(self, kind: str, **match: Any) -> None:
        self.events.remove(self.find(kind, **match))


def _task(
    s: Scenario,
    task_id: str,
    workload: str,
    pid: int,
    t0: float,
    t1: float | None,
    *,
    outcome: str = "ok",
    state: str | None = "SUCCESS",
    result: Any = None,
    writes: tuple[tuple[float, bool], ...] = (),
    store: str = "postgres",
    **fields: Any,
) -> None:
    """A task submitted just before ``t0``, run by ``pid`` over [t0, t1], and its final state."""
    submit_fields = {k: v for k, v in fields.items() if k in ("key", "resource", "tier")}
    s.add(
        t0 - 0.05,
        RUNNER,
        "submit",
        task_id=task_id,
        workload=workload,
        name=f"faults.{workload}",
        queue=workload,
        **submit_fields,
    )
    s.add(
        t0,
        pid,
        "start",
        task_id=task_id,
        workload=workload,
        worker=f"w{pid % 10}@box",
        attempt=0,
        **fields,
    )
    for t, accepted in writes:
        s.add(
            t,
            pid,
            "fenced_write",
            task_id=task_id,
            resource=fields["resource"],
            token=fields["token"],
            holder=task_id,
            accepted=accepted,
            store=store,
        )
    if t1 is not None:
        end = {k: v for k, v in fields.items() if k in ("token", "resource")}
        s.add(t1, pid, "end", task_id=task_id, workload=workload, outcome=outcome, **end)
    if state is not None:
        extra = {"result": result} if result is not None else {}
        s.add(90.0, RUNNER, "final", task_id=task_id, state=state, **extra)


def clean() -> Scenario:
    """A run where every invariant holds, with the edge cases each tolerance allows."""
    s = Scenario()
    s.add(0.0, RUNNER, "config", workload="locked", lock_ttl=5, seed=1, nemeses="all")
    s.add(0.0, RUNNER, "config", workload="bucket", bucket="q", rate=10, burst=5, tolerance=1)
    s.add(0.0, RUNNER, "config", workload="bulkhead", tier="t", slots=2, lease_ttl=5)
    s.add(0.0, RUNNER, "config", workload="window", window_mode="exact", window_latency_s=0.5,
          windows={"wk:a": {"limit": 3, "seconds": 5.0}, "wk:b": {"limit": 3, "seconds": 5.0},
                   "wk:c": {"limit": 3, "seconds": 5.0}, "q:w": {"limit": 5, "seconds": 5.0}})
    s.add(0.0, RUNNER, "phase", name="workload", action="start")

    # locked counter on r1: L1, L2 in turn; L3 paused past its lease (pause 4.2..12), L4
    # takes the lock at 10 and writes; L3 resumes and its write is refused: an explained
    # overlap with a refused stale write
    _task(s, "L1", "locked", 101, 0.0, 1.0, writes=((0.5, True),), resource="r1", token=1)
    _task(s, "L2", "locked", 102, 2.0, 3.0, writes=((2.5, True),), resource="r1", token=2)
    s.add(4.2, RUNNER, "nemesis", name="pause", action="start", target="worker w3 child pid 103")
    s.add(12.0, RUNNER, "nemesis", name="pause", action="stop", target="worker w3 child pid 103")
    _task(
        s,
        "L3",
        "locked",
        103,
        4.0,
        12.2,
        outcome="stale",
        writes=((12.1, False),),
        resource="r1",
        token=3,
    )
    _task(s, "L4", "locked", 104, 10.0, 11.0, writes=((10.5, True),), resource="r1", token=4)
    # a Redis-fenced resource, checked from the history alone
    _task(
        s,
        "R1",
        "locked",
        105,
        13.0,
        13.5,
        writes=((13.2, True),),
        store="redis",
        resource="k1",
        token=1,
    )
    _task(
        s,
        "R2",
        "locked",
        106,
        14.0,
        14.5,
        writes=((14.2, True),),
        store="redis",
        resource="k1",
        token=2,
    )
    # r2: L5 runs through a stall of the workers' Redis link (lease lost, no write, no
    # verdict of its own), L6 takes the lock meanwhile: explained by the nemesis alone
    s.add(18.2, RUNNER, "nemesis", name="stall", action="start", target="proxy workers->redis")
    s.add(18.9, RUNNER, "nemesis", name="stall", action="stop", target="proxy workers->redis")
    _task(s, "L5", "locked", 107, 18.0, 19.5, resource="r2", token=1)
    _task(s, "L6", "locked", 108, 19.0, 19.2, writes=((19.1, True),), resource="r2", token=2)
    s.tables["fc_counter"] = [
        {"resource": "r1", "value": 3, "token": 4},
        {"resource": "r2", "value": 1, "token": 2},
    ]
    s.tables["fc_counter_writes"] = [
        {"seq": 1, "resource": "r1", "token": 1, "task_id": "L1", "value": 1},
        {"seq": 2, "resource": "r1", "token": 2, "task_id": "L2", "value": 2},
        {"seq": 3, "resource": "r1", "token": 4, "task_id": "L4", "value": 3},
        {"seq": 4, "resource": "r2", "token": 2, "task_id": "L6", "value": 1},
    ]

    # payments: P2 duplicates P1's key; one effect per key; equal results
    paid = {"paid": "k-a", "amount": 5}
    _task(s, "P1", "payments", 111, 15.0, 15.5, result=paid, key="k-a")
    s.add(15.4, 111, "effect", task_id="P1", workload="payments", key="k-a")
    _task(s, "P2", "payments", 112, 16.0, 16.5, result=paid, key="k-a")
    s.find("submit", task_id="P2")["duplicate_of"] = "P1"
    # the runner stores results as JSON text: the same payment, spelled another way
    s.find("final", task_id="P2")["result"] = json.dumps({"amount": 5, "paid": "k-a"})
    # P1 redelivered after its worker died past the commit: it replays its own stored result
    # and records the effect again, under the same task id (not a second payment)
    s.add(15.6, 114, "start", task_id="P1", workload="payments", worker="w4@box", key="k-a")
    s.add(15.7, 114, "effect", task_id="P1", workload="payments", key="k-a")
    s.add(15.8, 114, "end", task_id="P1", workload="payments", outcome="ok")
    _task(s, "P3", "payments", 113, 17.0, 17.5, result={"paid": "k-b", "amount": 7}, key="k-b")
    s.add(17.4, 113, "effect", task_id="P3", workload="payments", key="k-b")
    s.tables["fc_payments"] = [
        {"key": "k-a", "task_id": "P1", "amount": 5},
        {"key": "k-b", "task_id": "P3", "amount": 7},
    ]

    # bucket q at 10/s, burst 5: a burst of 5 at t=20, then 10/s; a Redis restart at 23.02
    # refills it (a second burst of 5 is allowed right after)
    n = 0
    for i in range(5):
        n += 1
        _task(s, f"Q{n}", "bucket", 121 + i % 4, 20.0 + i * 0.001, 20.01 + i * 0.001, bucket="q")
    for i in range(30):
        n += 1
        _task(s, f"Q{n}", "bucket", 121 + i % 4, 20.1 + i * 0.1, 20.15 + i * 0.1, bucket="q")
    s.add(
        23.02,
        RUNNER,
        "nemesis",
        name="redis-restart",
        action="start",
        target="redis-state",
        detail="from snapshot",
    )
    s.add(23.03, RUNNER, "nemesis", name="redis-restart", action="stop", target="redis-state")
    for i in range(5):
        n += 1
        _task(s, f"Q{n}", "bucket", 125, 23.04 + i * 0.001, 23.05 + i * 0.001, bucket="q")
    # two children admitted just before a SIGSTOP (25..28) record their starts after SIGCONT,
    # next to a fresh burst of 5: left out, the window holds its 5 (+1 tolerance)
    for pid in (126, 127):
        target = f"child of w{pid % 10} pid {pid}"
        s.add(25.0, RUNNER, "nemesis", name="pause", action="start", target=target)
        s.add(28.0, RUNNER, "nemesis", name="pause", action="stop", target=target)
    for i in range(5):
        n += 1
        _task(s, f"Q{n}", "bucket", 121 + i, 28.0 + i * 0.001, 28.01 + i * 0.001, bucket="q")
    _task(s, "Q-late1", "bucket", 126, 28.02, 28.05, bucket="q")
    _task(s, "Q-late2", "bucket", 127, 28.03, 28.06, bucket="q")

    # bulkhead t, 2 slots: B1, B2, then B3; B4 paused 40.5..50 (past its 5 s lease), so B5
    # and B6 may hold the slots from 46: 3 running, 2 holding
    _task(s, "B1", "bulkhead", 131, 30.0, 35.0, tier="t")
    _task(s, "B2", "bulkhead", 132, 31.0, 36.0, tier="t")
    _task(s, "B3", "bulkhead", 133, 36.5, 38.0, tier="t")
    s.add(40.5, RUNNER, "nemesis", name="pause", action="start", target="worker w4 child pid 134")
    s.add(50.0, RUNNER, "nemesis", name="pause", action="stop", target="worker w4 child pid 134")
    _task(s, "B4", "bulkhead", 134, 40.0, 50.5, tier="t")
    _task(s, "B5", "bulkhead", 135, 46.0, 48.0, tier="t")
    _task(s, "B6", "bulkhead", 136, 47.0, 49.0, tier="t")

    # clock faults on r3: C1's child is stopped 51..55 while its clock stands still (a
    # suspend): it resumes believing in its lock, and the fence refuses its write (stale); C2
    # took the lock at 54.2. C3's clock runs at a quarter of real time 56..59 (its renewals
    # come too late): C4 takes the lock at 58.2, C3 writes before C4 does (order kept)
    suspend = json.dumps({"mode": "suspend", "rate": 0.0, "child": 0.5})
    for action, t in (("start", 51.0), ("stop", 55.0)):
        s.add(t, RUNNER, "nemesis", name="clock", action=action, detail=suspend,
              target="child of w1 pid 151 (clock at rate 0, stopped)")
    _task(s, "C1", "locked", 151, 50.9, 55.1, outcome="stale", writes=((55.05, False),),
          resource="r3", token=1)
    _task(s, "C2", "locked", 152, 54.2, 54.5, writes=((54.4, True),), resource="r3", token=2)
    slow = json.dumps({"mode": "slow", "rate": 0.25, "child": 0.5})
    for action, t in (("start", 56.0), ("stop", 59.0)):
        s.add(t, RUNNER, "nemesis", name="clock", action=action, detail=slow,
              target="child of w3 pid 153 (clock at rate 0.25)")
    _task(s, "C3", "locked", 153, 55.9, 58.6, writes=((58.5, True),), resource="r3", token=3)
    _task(s, "C4", "locked", 154, 58.2, 58.9, writes=((58.8, True),), resource="r3", token=4)
    s.tables["fc_counter"].append({"resource": "r3", "value": 3, "token": 4})
    s.tables["fc_counter_writes"] += [
        {"seq": 5, "resource": "r3", "token": 2, "task_id": "C2", "value": 1},
        {"seq": 6, "resource": "r3", "token": 3, "task_id": "C3", "value": 2},
        {"seq": 7, "resource": "r3", "token": 4, "task_id": "C4", "value": 3},
    ]
    # bulkhead t: B7's clock steps 4 s forward at 56.2 (its belief ends, its slot is not
    # renewed): from 2/3 of the 5 s lease later, B9 may take its slot
    jump = json.dumps({"mode": "jump", "jump": 4.0, "child": 0.5})
    for action, t in (("start", 56.2), ("stop", 58.0)):
        s.add(t, RUNNER, "nemesis", name="clock", action=action, detail=jump,
              target="child of w7 pid 137 (clock stepped 4 s forward)")
    _task(s, "B7", "bulkhead", 137, 56.0, 59.8, tier="t")
    _task(s, "B8", "bulkhead", 138, 56.1, 59.7, tier="t")
    _task(s, "B9", "bulkhead", 139, 59.6, 59.9, tier="t")

    # windows wk:a, wk:b, wk:c (3 in any 5 s) and q:w (5 in any 5 s), every start in its
    # key's and the queue's; intervals of 5 - 0.5 s (the admission-to-start latency) checked
    def windowed(task_id: str, pid: int, t: float, key: str) -> None:
        _task(s, task_id, "window", pid, t, t + 0.02, windows=[f"wk:{key}", "q:w"])

    # wk:b full at 12; W-stalled, admitted before the Redis-link stall (18.2..18.9) held
    # the reply, records its start 0.05 s after the resume: admitted from 17.7 on
    for i, t in enumerate((12.0, 12.1, 12.2)):
        windowed(f"Wb{i}", 161 + i, t, "b")
    windowed("W-stalled", 164, 18.95, "b")
    # wk:a full at 21, the Redis restart at 23.02 forgets its log: full again at 23.1
    for i, t in enumerate((21.0, 21.1, 21.2, 23.1, 23.2, 23.3)):
        windowed(f"Wl{i}", 161 + i % 4, t, "a")
    # wk:a full at 30, then again once each admission left the window (5 s + latency)
    for i, t in enumerate((30.0, 30.1, 30.2, 35.05, 35.15, 35.25)):
        windowed(f"Wa{i}", 161 + i % 4, t, "a")
    # wk:b full at 42.9; W-late, admitted before its child was stopped (36..43), records
    # its start after SIGCONT: admitted from 35.5 on, not within 5 s of the others
    s.add(36.0, RUNNER, "nemesis", name="pause", action="start", target="worker w5 child pid 165")
    s.add(43.0, RUNNER, "nemesis", name="pause", action="stop", target="worker w5 child pid 165")
    for i, t in enumerate((42.9, 42.95, 43.0)):
        windowed(f"Wp{i}", 161 + i, t, "b")
    windowed("W-late", 165, 43.05, "b")

    # a flaky task that exhausted its retries: dead-lettered, FAILURE, never run again
    _task(s, "D1", "breaker", 141, 55.0, 55.5, outcome="error", state="FAILURE")
    s.add(56.0, RUNNER, "deadletter", task_id="D1", reason="retries exhausted", at=T0 + 56.0)

    s.add(60.0, RUNNER, "phase", name="workload", action="stop")
    s.add(60.0, RUNNER, "phase", name="heal", action="start")
    s.add(61.0, RUNNER, "phase", name="heal", action="stop")
    s.add(61.0, RUNNER, "phase", name="quiesce", action="start")
    s.add(89.0, RUNNER, "phase", name="quiesce", action="stop")
    s.add(89.5, RUNNER, "lease", kind="lock", key="lock:r1", ttl_ms=5000, remaining_ms=1200)
    # an expired slot member not yet swept: computed remaining -1 is past, not "forever"
    s.add(89.5, RUNNER, "lease", kind="slot", key="bh:t:slots B6", ttl_ms=5000, remaining_ms=-1)
    s.add(
        89.5, RUNNER, "lease", kind="idempotency", key="idem:k-a", ttl_ms=60000, remaining_ms=59000
    )
    s.add(95.0, RUNNER, "phase", name="check", action="start")
    return s


# ---------------------------------------------------------------------------------------------
# Planted violations: each mutates a fresh clean scenario


def _shift(s: Scenario, task_id: str, to: float, kinds: tuple[str, ...] = ("start",)) -> None:
    for event in s.events:
        if event.get("task_id") == task_id and event["type"] in kinds:
            event["t"] = T0 + to
            event["mono"] = 1000.0 + to


def torn_line(s: Scenario) -> None:
    s.raw_lines.append('{"t": 1700000070.0, "mono": 1070.0, "pid": 1, "type": "sta')


def unknown_type(s: Scenario) -> None:
    s.raw_lines.append(json.dumps({"t": T0 + 70, "mono": 1070.0, "pid": 1, "type": "strt"}))


def db_token_regression(s: Scenario) -> None:
    # the row of token 2 committed after token 4's: a stale holder's write went through
    w = s.tables["fc_counter_writes"]
    w[1]["seq"], w[2]["seq"] = 3, 2
    w[1]["value"], w[2]["value"] = 3, 2


def db_equal_token_other_holder(s: Scenario) -> None:
    s.tables["fc_counter_writes"].append(
        {"seq": 5, "resource": "r1", "token": 4, "task_id": "L9", "value": 4}
    )
    s.tables["fc_counter"][0]["value"] = 4


def redis_token_regression(s: Scenario) -> None:
    # R1's token-1 write recorded as accepted after R2's token 2 on the Redis resource
    write = s.find("fenced_write", task_id="R1")
    write["t"], write["mono"] = T0 + 14.3, 1014.3
    _shift(s, "R1", 14.4, kinds=("end",))


def lost_update(s: Scenario) -> None:
    s.tables["fc_counter"][0]["value"] = 2


def lost_update_per_write(s: Scenario) -> None:
    # L4 read the counter before L2 wrote: it wrote 2 over 2 (the total still adds up only
    # because the row was later fixed; the per-write values show it)
    s.tables["fc_counter_writes"][2]["value"] = 2
    s.tables["fc_counter"][0]["value"] = 3


def counter_row_missing(s: Scenario) -> None:
    s.tables["fc_counter"].pop()  # r2 was written, but its counter row is gone


def start_not_recorded(s: Scenario) -> None:
    # a worker's recorder lost its events: B3 succeeded with no start on record
    s.drop("start", task_id="B3")
    s.drop("end", task_id="B3")


def unexplained_overlap(s: Scenario) -> None:
    # L2 starts while L1 runs, and no fault reached L1: the lock let two holders in
    _shift(s, "L2", 0.6)


def overlap_fault_elsewhere(s: Scenario) -> None:
    # the pause hit another worker's child, not L1: still unexplained
    _shift(s, "L2", 0.6)
    s.add(0.2, RUNNER, "nemesis", name="pause", action="start", target="worker w3 child pid 103")
    s.add(0.8, RUNNER, "nemesis", name="pause", action="stop", target="worker w3 child pid 103")


def stall_of_postgres_only(s: Scenario) -> None:
    # the stall was of the PostgreSQL link: it cannot cost L5 its Redis lease
    for event in s.events:
        if event["type"] == "nemesis" and event["name"] == "stall":
            event["target"] = "proxy workers->postgres"


def overlap_with_inert_nemesis(s: Scenario) -> None:
    # a clock nemesis that injected nothing (skipped) does not explain the overlap
    _shift(s, "L2", 0.6)
    s.add(0.1, RUNNER, "nemesis", name="clock", action="start", target="none (skipped: no clock)")
    s.add(0.9, RUNNER, "nemesis", name="clock", action="stop", target="none (skipped: no clock)")


def overlap_slow_clock_renewing(s: Scenario) -> None:
    # C3's clock ran at 0.8: its renewals (every ttl/3 of its clock) kept the lock
    for event in s.events:
        if event["type"] == "nemesis" and "pid 153" in event["target"]:
            event["detail"] = json.dumps({"mode": "slow", "rate": 0.8, "child": 0.5})


def suspended_write_accepted(s: Scenario) -> None:
    # C1 resumed believing in its lock and its write was accepted after C2's at 54.4
    write = s.find("fenced_write", task_id="C1")
    write["accepted"] = True
    write["t"], write["mono"] = T0 + 54.45, 1054.45
    s.find("end", task_id="C1")["outcome"] = "ok"


def bulkhead_slow_clock(s: Scenario) -> None:
    # B7's clock only ran slow (0.6): its slot was renewed in time, B9 made 3 holders
    for event in s.events:
        if event["type"] == "nemesis" and "pid 137" in event["target"]:
            event["detail"] = json.dumps({"mode": "slow", "rate": 0.6, "child": 0.5})


def bulkhead_early_after_clock(s: Scenario) -> None:
    # B9 started 1.5 s after B7's clock jumped: its 5 s slot could not have expired yet
    _shift(s, "B9", 57.7)


def stale_write_accepted(s: Scenario) -> None:
    # L3 lost its lease (paused), but its write was accepted after L4's at 10.5
    write = s.find("fenced_write", task_id="L3")
    write["accepted"] = True
    write["t"], write["mono"] = T0 + 10.8, 1010.8
    s.find("end", task_id="L3")["outcome"] = "ok"


def duplicate_effect_row(s: Scenario) -> None:
    s.tables["fc_payments"].append({"key": "k-a", "task_id": "P2", "amount": 5})


def duplicate_effect_event(s: Scenario) -> None:
    s.add(16.4, 112, "effect", task_id="P2", workload="payments", key="k-a")


def success_without_effect(s: Scenario) -> None:
    s.tables["fc_payments"].pop()  # k-b's row is gone, yet P3 says SUCCESS


def unequal_results(s: Scenario) -> None:
    s.find("final", task_id="P2")["result"] = {"paid": "k-a", "amount": 6}


def missing_final(s: Scenario) -> None:
    s.drop("final", task_id="P3")


def pending_final(s: Scenario) -> None:
    s.find("final", task_id="Q7")["state"] = "PENDING"


def bucket_overrun(s: Scenario) -> None:
    # 8 extra starts within 0.1 s at t=27: the bucket let a second burst through
    for i in range(8):
        _task(s, f"X{i}", "bucket", 127, 27.0 + i * 0.01, 27.05 + i * 0.01, bucket="q")


def bucket_refill_without_loss(s: Scenario) -> None:
    # the second burst right after the stream, with no Redis state loss to refill the bucket
    for event in [e for e in s.events if e["type"] == "nemesis" and e["name"] == "redis-restart"]:
        s.events.remove(event)


def bucket_late_starts_without_pause(s: Scenario) -> None:
    # the same two late starts, but nobody paused them: a burst of 7 in 0.03 s
    paused = ("child of w6 pid 126", "child of w7 pid 127")
    for event in [e for e in s.events if e["type"] == "nemesis" and e["target"] in paused]:
        s.events.remove(event)


def bucket_without_config(s: Scenario) -> None:
    s.drop("config", workload="bucket")


def _windowed(s: Scenario, task_id: str, pid: int, t: float, key: str) -> None:
    _task(s, task_id, "window", pid, t, t + 0.02, windows=[f"wk:{key}", "q:w"])


def window_overrun(s: Scenario) -> None:
    _windowed(s, "WX", 162, 30.3, "a")  # a 4th start of wk:a within 0.3 s, no fault


def window_queue_overrun(s: Scenario) -> None:
    # wk:c's own 3 are within its limit, but q:w then holds 6 in 0.5 s
    for i, t in enumerate((30.3, 30.4, 30.5)):
        _windowed(s, f"WC{i}", 162 + i, t, "c")


def window_refill_without_loss(s: Scenario) -> None:
    # wk:a full again 1 s after it filled, before the Redis restart: nothing forgot its log
    for i, t in enumerate((22.0, 22.1, 22.2)):
        _shift(s, f"Wl{3 + i}", t, kinds=("start", "end"))


def window_late_start_without_pause(s: Scenario) -> None:
    # the same late start, but nobody stopped its process: 4 starts of wk:b in 0.15 s
    for event in [e for e in s.events
                  if e["type"] == "nemesis" and e["target"] == "worker w5 child pid 165"]:
        s.events.remove(event)


def window_second_start_after_pause(s: Scenario) -> None:
    # the resumed child's next task: admitted after its first one started (one task at a
    # time), so within the window of the 3 others, not before the pause
    _windowed(s, "W-late2", 165, 43.1, "b")


def window_clock_jump(s: Scenario) -> None:
    # a child's clock jumped 4 s forward: the window runs on the Redis server's clock, so a
    # 4th start of wk:a within 0.3 s is not excused
    jump = json.dumps({"mode": "jump", "jump": 4.0, "child": 0.5})
    for action, t in (("start", 29.5), ("stop", 31.0)):
        s.add(t, RUNNER, "nemesis", name="clock", action=action, detail=jump,
              target="child of w6 pid 166 (clock stepped 4 s forward)")
    _windowed(s, "WJ", 166, 30.3, "a")


def bulkhead_overrun(s: Scenario) -> None:
    _shift(s, "B3", 32.0)  # a third holder while B1 and B2 run, no fault


def bulkhead_short_pause(s: Scenario) -> None:
    # B4's pause is shorter than 2/3 of its lease (renewed every lease / 3): its slot was
    # still held when B5 and B6 ran
    s.find("nemesis", name="pause", action="stop", target="worker w4 child pid 134")["t"] = (
        T0 + 43.5
    )


def bulkhead_early_after_pause(s: Scenario) -> None:
    # B5 and B6 started 2-2.5 s into B4's pause: B4's 5 s slot, renewed at most 5/3 s
    # before the pause, could not have run out yet
    _shift(s, "B5", 42.5)
    _shift(s, "B6", 43.0)


def lease_outlives_ttl(s: Scenario) -> None:
    s.add(89.6, RUNNER, "lease", kind="slot", key="tier:t:B4", ttl_ms=5000, remaining_ms=7000)


def lease_never_expires(s: Scenario) -> None:
    s.add(89.6, RUNNER, "lease", kind="lock", key="lock:orphan", ttl_ms=5000, remaining_ms=-1)


def run_after_dead_letter(s: Scenario) -> None:
    s.add(57.0, 142, "start", task_id="D1", workload="breaker", worker="w2@box", attempt=3)
    s.add(57.5, 142, "end", task_id="D1", workload="breaker", outcome="error")


def locked_table_missing(s: Scenario) -> None:
    del s.tables["fc_counter_writes"]


@dataclass(frozen=True)
class Case:
    name: str
    invariant: str  # the Verdict.invariant that must report it
    plant: Callable[[Scenario], None]


CASES: tuple[Case, ...] = (
    Case("torn line", "history well-formed", torn_line),
    Case("unknown event type", "history well-formed", unknown_type),
    Case("DB: token 2 committed after token 4", "fence order", db_token_regression),
    Case("DB: equal token from another holder", "fence order", db_equal_token_other_holder),
    Case("Redis: token 1 accepted after token 2", "fence order", redis_token_regression),
    Case("counter value below accepted writes", "counter (no lost update)", lost_update),
    Case("a write not previous+1", "counter (no lost update)", lost_update_per_write),
    Case(
        "writes to a resource with no counter row", "counter (no lost update)", counter_row_missing
    ),
    Case("SUCCESS with no start recorded", "history well-formed", start_not_recorded),
    Case("locked workload ran, table missing", "counter (no lost update)", locked_table_missing),
    Case("overlap with no fault", "locked critical sections", unexplained_overlap),
    Case("overlap, fault on another pid", "locked critical sections", overlap_fault_elsewhere),
    Case("overlap, only a PostgreSQL stall", "locked critical sections", stall_of_postgres_only),
    Case("overlap, a skipped nemesis", "locked critical sections", overlap_with_inert_nemesis),
    Case("stale holder's write accepted", "locked critical sections", stale_write_accepted),
    Case("overlap, slow clock still renewing", "locked critical sections",
         overlap_slow_clock_renewing),
    Case("suspended holder's write accepted late", "locked critical sections",
         suspended_write_accepted),
    Case("two fc_payments rows for a key", "idempotent effects", duplicate_effect_row),
    Case("two effect events for a key", "idempotent effects", duplicate_effect_event),
    Case("SUCCESS without its effect row", "idempotent effects", success_without_effect),
    Case("SUCCESS results of a key differ", "idempotent effects", unequal_results),
    Case("submitted task with no final", "nothing lost", missing_final),
    Case("task left PENDING", "nothing lost", pending_final),
    Case("bucket overrun", "buckets", bucket_overrun),
    Case("second burst without a state loss", "buckets", bucket_refill_without_loss),
    Case("7 starts in 0.03 s, no pause", "buckets", bucket_late_starts_without_pause),
    Case("bucket ran without a config", "buckets", bucket_without_config),
    Case("3 holders in 2 slots, no fault", "bulkheads", bulkhead_overrun),
    Case("pause shorter than 2/3 of the slot lease", "bulkheads", bulkhead_short_pause),
    Case("3 holders, 2.5 s into a pause (5 s lease)", "bulkheads", bulkhead_early_after_pause),
    Case("3 holders, one under a slow clock", "bulkheads", bulkhead_slow_clock),
    Case("3 holders, 1.5 s after a clock jump", "bulkheads", bulkhead_early_after_clock),
    Case("4 starts in a 3/5s key window", "windows", window_overrun),
    Case("6 starts in the 5/5s queue window", "windows", window_queue_overrun),
    Case("window full twice, no state loss", "windows", window_refill_without_loss),
    Case("window late start, no pause", "windows", window_late_start_without_pause),
    Case("4 starts in a key window, clock jump", "windows", window_clock_jump),
    Case("a resumed child's second start", "windows", window_second_start_after_pause),
    Case("lease remaining > ttl", "leases", lease_outlives_ttl),
    Case("lease without expiry", "leases", lease_never_expires),
    Case("started after its dead letter", "dead letters", run_after_dead_letter),
)


# ---------------------------------------------------------------------------------------------
# Writing a scenario out and checking it


def write_history(s: Scenario, results: Path) -> None:
    """One ``<pid>-<role>.jsonl`` per pid, as the campaign's processes write them."""
    folder = history_dir(results)
    folder.mkdir(parents=True, exist_ok=True)
    per_pid: dict[int, list[Event]] = defaultdict(list)
    for event in s.events:
        per_pid[int(event["pid"])].append(event)
    for pid, events in per_pid.items():
        role = "runner" if pid == RUNNER else "worker"
        events.sort(key=lambda e: float(e["mono"]))
        with (folder / f"{pid}-{role}.jsonl").open("w") as fh:
            fh.writelines(json.dumps(e) + "\n" for e in events)
    if s.raw_lines:
        with (folder / f"{RUNNER}-runner.jsonl").open("a") as fh:
            fh.writelines(line + "\n" for line in s.raw_lines)


_DDL = {
    "fc_counter": "CREATE TABLE fc_counter (resource text PRIMARY KEY, value bigint, token bigint)",
    "fc_counter_writes": (
        "CREATE TABLE fc_counter_writes (seq bigint, resource text, token bigint, task_id text,"
        " value bigint, at timestamptz DEFAULT clock_timestamp())"
    ),
    "fc_payments": (
        "CREATE TABLE fc_payments (key text, task_id text, amount bigint,"
        " at timestamptz DEFAULT clock_timestamp())"
    ),
}


class Database:
    """Throwaway schemas, one per case, in a database given or created for the run."""

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        self.url = url
        self.engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")

    @contextmanager
    def schema(self, tables: dict[str, list[Row]]) -> Iterator[str]:
        """Create the tables in a new schema; yield a URL whose search_path is that schema."""
        import sqlalchemy as sa

        name = f"faults_selftest_{secrets.token_hex(4)}"
        with self.engine.connect() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{name}"'))
            for table, rows in tables.items():
                conn.execute(sa.text(_DDL[table].replace(table, f'"{name}".{table}', 1)))
                for row in rows:
                    cols = ", ".join(row)
                    params = ", ".join(f":{c}" for c in row)
                    conn.execute(
                        sa.text(f'INSERT INTO "{name}".{table} ({cols}) VALUES ({params})'), row
                    )
        url = sa.make_url(self.url).update_query_dict({"options": f"-csearch_path={name}"})
        try:
            yield url.render_as_string(hide_password=False)
        finally:
            with self.engine.connect() as conn:
                conn.execute(sa.text(f'DROP SCHEMA "{name}" CASCADE'))

    def dispose(self) -> None:
        self.engine.dispose()


@contextmanager
def database() -> Iterator[Database | None]:
    """FAULTS_DATABASE_URL, else a database created on the local server; None if unreachable."""
    import sqlalchemy as sa

    given = os.environ.get("FAULTS_DATABASE_URL")
    if given:
        db = Database(given)
        try:
            yield db
        finally:
            db.dispose()
        return
    name = f"faults_selftest_{secrets.token_hex(4)}"
    admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.SQLAlchemyError as exc:
        print(f"PostgreSQL unreachable ({type(exc).__name__}): tables fed to the checker directly")
        admin.dispose()
        yield None
        return
    db = Database(admin.url.set(database=name).render_as_string(hide_password=False))
    try:
        yield db
    finally:
        db.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def run_case(s: Scenario, results: Path, db: Database | None) -> list[Verdict]:
    """Write ``s`` under ``results`` and check it (its tables in PostgreSQL when given)."""
    write_history(s, results)
    if db is None:
        rows = Tables(
            counter=s.tables.get("fc_counter"),
            counter_writes=sorted(
                s.tables.get("fc_counter_writes", []), key=lambda r: int(r["seq"])
            )
            or None,
            payments=s.tables.get("fc_payments"),
            source="rows fed directly",
        )
        if "fc_counter_writes" not in s.tables:
            rows.counter_writes = None
        return check_history(History.from_scan(scan(results)), rows)
    with db.schema(s.tables) as url:
        return check(results, url)


def _fresh(plant: Callable[[Scenario], None] | None) -> Scenario:
    s = copy.deepcopy(_CLEAN)
    if plant is not None:
        plant(s)
    return s


_CLEAN = clean()


def main() -> int:
    """Run the clean history and every planted case; 0 only if all behave."""
    ok = True
    with tempfile.TemporaryDirectory(prefix="faults-selftest-") as tmp, database() as db:
        where = "PostgreSQL schemas" if db is not None else "rows fed directly"
        print(f"faults self-test: {len(CASES)} planted violations + a clean history ({where})")
        verdicts = run_case(_fresh(None), Path(tmp) / "clean", db)
        bad = [v for v in verdicts if not v.held]
        if bad:
            ok = False
            for v in bad:
                print(f"FAIL  clean history violates {v.invariant}: {v.example}")
        else:
            held = sum(1 for v in verdicts if v.applicable)
            print(f"ok    clean history: {held} invariants held, none violated")
            for v in verdicts:
                print(f"        {v.invariant}: {v.checked}")
        for number, case in enumerate(CASES, 1):
            verdicts = run_case(_fresh(case.plant), Path(tmp) / f"case{number}", db)
            by_name = {v.invariant: v for v in verdicts}
            target = by_name.get(case.invariant)
            others = [v.invariant for v in verdicts if not v.held and v.invariant != case.invariant]
            also = f" (also: {', '.join(others)})" if others else ""
            if target is None or target.held:
                ok = False
                print(f"MISS  {case.name}: {case.invariant} held{also}")
            else:
                print(
                    f"ok    {case.name}: {case.invariant} caught {target.violations}: "
                    f"{target.example}{also}"
                )
    print("self-test passed" if ok else "self-test FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
