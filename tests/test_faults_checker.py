"""The fault campaign's history and checker (issue 13), tested on hand-made histories."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from faults import checker, selftest
from faults.checker import History, Tables, Verdict, check, check_history, read_tables
from faults.history import Recorder, load, scan
from faults.report import plot, print_verdicts, write_verdicts


def test_selftest_catches_every_planted_violation(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`scripts/faults --self-test`: each planted violation caught, the clean history passes."""
    monkeypatch.setenv("FAULTS_DATABASE_URL", database_url)
    assert selftest.main() == 0
    out = capsys.readouterr().out
    assert "PostgreSQL schemas" in out  # the DB-backed invariants read real tables
    assert "ok    clean history" in out
    for case in selftest.CASES:
        assert f"ok    {case.name}: {case.invariant} caught" in out


def test_selftest_fails_when_an_invariant_is_blind(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checker that stops seeing one kind of violation makes the self-test exit 1."""
    monkeypatch.setenv("FAULTS_DATABASE_URL", database_url)
    monkeypatch.setitem(checker.INVARIANTS, "buckets", lambda h, db: Verdict("buckets", "blind", 0))
    assert selftest.main() == 1
    assert "MISS  bucket overrun: buckets held" in capsys.readouterr().out


def test_workload_not_run_is_not_applicable_not_passed(tmp_path: Path) -> None:
    """Invariants of workloads that did not run say n/a; a run workload's missing table fails."""
    s = selftest.Scenario()
    s.add(0.0, 1, "submit", task_id="p1", workload="payments", name="pay", key="k")
    s.add(0.5, 7, "start", task_id="p1", workload="payments", key="k")
    s.add(1.0, 7, "end", task_id="p1", workload="payments", outcome="ok")
    s.add(2.0, 1, "final", task_id="p1", state="SUCCESS")
    selftest.write_history(s, tmp_path)
    verdicts = {v.invariant: v for v in check(tmp_path, None)}
    for name in (
        "fence order",
        "counter (no lost update)",
        "locked critical sections",
        "buckets",
        "bulkheads",
        "windows",
        "leases",
        "dead letters",
    ):
        assert verdicts[name].status == "n/a", verdicts[name]
    assert verdicts["nothing lost"].status == "held"
    # payments ran, but no database to read fc_payments from: not a silent pass
    assert verdicts["idempotent effects"].status == "VIOLATED"
    assert "fc_payments" in verdicts["idempotent effects"].example


def test_unreadable_database_fails_db_backed_invariants(tmp_path: Path) -> None:
    """A database the checker cannot reach fails the invariants of the workloads that ran."""
    s = selftest.clean()
    selftest.write_history(s, tmp_path)
    tables = read_tables("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2")
    assert tables.error is not None
    verdicts = {v.invariant: v for v in check_history(History.from_scan(scan(tmp_path)), tables)}
    assert verdicts["counter (no lost update)"].status == "VIOLATED"
    assert verdicts["idempotent effects"].status == "VIOLATED"
    assert verdicts["locked critical sections"].status == "held"  # history-only


def test_recorder_one_file_per_process_and_torn_lines(tmp_path: Path) -> None:
    """Forked children write their own files; load merges by t; a torn line is reported."""
    rec = Recorder(tmp_path, "worker")
    rec.submit("a", "locked", "t.locked", resource="r", key=None)
    pid = os.fork()
    if pid == 0:  # a pool child recording through the parent's Recorder
        try:
            rec.start("a", "locked", token=1, resource="r")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    rec.end("a", "locked", "ok", token=1)
    rec.close()
    files = sorted(p.name for p in (tmp_path / "history").iterdir())
    assert files == sorted([f"{os.getpid()}-worker.jsonl", f"{pid}-worker.jsonl"])
    events = load(tmp_path)
    assert [e["type"] for e in events] == ["submit", "start", "end"]
    assert "key" not in events[0]  # unknown fields are omitted, not null
    with pytest.raises(ValueError, match="lacks"):
        rec.record("fenced_write", task_id="a", resource="r", token=1)
    with pytest.raises(ValueError, match="unknown"):
        rec.record("strat", task_id="a")
    with (tmp_path / "history" / "9-runner.jsonl").open("w") as fh:
        fh.write(json.dumps({"t": 1.0, "mono": 1.0, "pid": 9, "type": "phase"})[:-5])
    result = scan(tmp_path)
    assert len(result.events) == 3 and len(result.malformed) == 1


def test_report_table_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The verdict table names every invariant; the plot is a PNG; verdicts.json is saved."""
    selftest.write_history(selftest.clean(), tmp_path)
    verdicts = check_history(History.from_scan(scan(tmp_path)), Tables())
    print_verdicts(verdicts)
    out = capsys.readouterr().out
    for v in verdicts:
        assert v.invariant in out
    saved = json.loads(write_verdicts(tmp_path, verdicts).read_text())
    assert saved["passed"] is False  # no database: the DB-backed invariants cannot pass
    path = plot(tmp_path)
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_recheck_from_the_runners_table_dumps(tmp_path: Path) -> None:
    """Without a URL, a saved run is checked against its `db/*.jsonl` dumps (lost update seen)."""
    s = selftest.clean()
    selftest.write_history(s, tmp_path)
    (tmp_path / "db").mkdir()
    s.tables["fc_counter"][0]["value"] = 2  # one accepted write did not count
    for table, rows in s.tables.items():
        with (tmp_path / "db" / f"{table}.jsonl").open("w") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in rows)
    verdicts = {v.invariant: v for v in check(tmp_path, None)}
    assert verdicts["fence order"].status == "held"
    assert "fc_counter_writes" in verdicts["fence order"].checked
    assert verdicts["counter (no lost update)"].status == "VIOLATED"
    assert verdicts["idempotent effects"].status == "held"
