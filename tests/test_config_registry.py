"""A guard is its module, its Lua fragment and one registry line: config.py needs no edit.

The toy guard (tests/toy_guard/: a gate, letter T, with a task option, an app
setting, a policy part, a Lua fragment and pipeline hooks) is dropped into a copy
of the package with its registry lines, and nothing else; a subprocess then runs
tasks through the real pipeline against Redis.
"""

from __future__ import annotations

import difflib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from celery_reliable import config
from celery_reliable.config import OPTION_SETS, TaskPolicy

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parent / "celery_reliable"
TOY = HERE / "toy_guard"


def _insert_before_close(text: str, opener: str, line: str) -> str:
    """``text`` with ``line`` added as the last entry of the tuple opened by ``opener``."""
    start = text.index(opener)
    close = text.index("\n)", start)
    return f"{text[:close]}\n{line}{text[close:]}"


def _add_toy(root: Path) -> None:
    """Register the toy guard in the copy at ``root``: its files and its registry lines."""
    guards = root / "guards"
    shutil.copy(TOY / "toy.py", guards / "toy.py")
    shutil.copy(TOY / "toy.lua", guards / "toy.lua")
    init = (guards / "__init__.py").read_text("utf-8")
    init, count = re.subn(r"^(from \. import [a-z_, ]+)$", r"\1, toy", init, count=1,
                          flags=re.MULTILINE)
    assert count == 1
    init = _insert_before_close(init, "GUARDS: tuple[Guard, ...] = (", "    toy.GUARD,")
    (guards / "__init__.py").write_text(init, "utf-8")
    cfg = (root / "config.py").read_text("utf-8")
    cfg = _insert_before_close(cfg, "OPTION_SETS: tuple[OptionSet[Any], ...] = (",
                               "    guards.toy.CONFIG,")
    (root / "config.py").write_text(cfg, "utf-8")


def _changes(before: Path, after: Path) -> dict[str, tuple[int, int]]:
    """Per changed or new file (relative path): lines added and removed."""
    out = {}
    for path in sorted(after.rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        rel = path.relative_to(after)
        new = path.read_text("utf-8").splitlines()
        old = (before / rel).read_text("utf-8").splitlines() if (before / rel).exists() else []
        diff = [d for d in difflib.unified_diff(old, new, lineterm="", n=0)
                if not d.startswith(("---", "+++", "@@"))]
        added = sum(d.startswith("+") for d in diff)
        removed = sum(d.startswith("-") for d in diff)
        if added or removed:
            out[str(rel)] = (added, removed)
    return out


def test_a_new_guard_needs_its_files_and_one_registry_line_each(
        tmp_path: Path, redis_url: str, prefix: str) -> None:
    root = tmp_path / "pkg" / "celery_reliable"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    _add_toy(root)
    toy_lines = len((TOY / "toy.py").read_text("utf-8").splitlines())
    lua_lines = len((TOY / "toy.lua").read_text("utf-8").splitlines())
    assert _changes(PACKAGE, root) == {
        "config.py": (1, 0),  # guards.toy.CONFIG, in OPTION_SETS
        "guards/__init__.py": (2, 1),  # the import names toy; toy.GUARD, in GUARDS
        "guards/toy.py": (toy_lines, 0),
        "guards/toy.lua": (lua_lines, 0),
    }

    run = subprocess.run(
        [sys.executable, str(TOY / "scenario.py"), str(root.parent), redis_url, prefix],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["package"].startswith(str(root))  # the copy, not the worktree
    assert out["part"] == "g1"  # policy.part(toy.CONFIG): what its OptionSet built
    assert out["guarded"] is True and out["plain_guarded"] is False
    assert out["attribute"] is None  # a ReliableTask attribute, from the registry
    assert out["in_reference"] is True  # the options reference lists its option and setting
    assert out["first"] == "ran" and out["passed"] == 1  # planned and admitted: T's apply ran
    # refused by its check: deferred by reliable_toy_retry (7 s, plus jitter), nothing applied
    assert out["refused_deferred"] is True
    assert 7.0 <= out["refused_when"] <= 9.0
    assert out["passed_after_refusal"] == 1
    assert out["plain"] == "plain"
    assert "unknown reliability option 'toy_gatr'" in out["bad {'toy_gatr': 'x'}"]
    assert "'toy_gate' must be a non-empty string" in out["bad {'toy_gate': ''}"]


def test_typo_prefixes_and_guarded_follow_from_the_registry() -> None:
    """``_OUR_PREFIXES`` is each OptionSet's prefixes (and the shared ones); ``guarded``
    asks each OptionSet's ``guards`` of its part; a part is read with ``part``."""
    from celery_reliable.guards import window

    assert set(config._OUR_PREFIXES) == {"fence", "reliable"} | {
        p for s in OPTION_SETS for p in s.prefixes}
    assert "rate_limit_window" in window.CONFIG.prefixes
    assert [s.name for s in OPTION_SETS] == [
        "lock", "idempotency", "bucket", "window", "bulkhead", "failures", "deliveries",
        "breaker", "deferral"]

    def policy(**values: object) -> TaskPolicy:
        return config.build_policy("t", values, None)

    assert policy().guarded is False
    keyed = policy(rate_limit_window="5/m")
    assert keyed.guarded is True
    part = keyed.part(window.CONFIG)
    assert isinstance(part, window.WindowPart) and part.key is not None
    assert part.key.window == window.WindowSpec(5, 60.0) and part.queues == {}
    for values in ({"lock": "x"}, {"idempotency_key": True}, {"bulkhead": "default"},
                   {"circuit_breaker": "b"},
                   {"rate_limit_key": "k", "rate_limit_key_spec": "10/s"}):
        assert policy(**values).guarded is True, values
    for values in ({"max_redeliveries": 3}, {"defer_delay": 2.0}, {"dead_letter": True}):
        assert policy(**values).guarded is False, values


@pytest.mark.parametrize(("queue", "guarded"), [("reports", True), ("other", False)])
def test_a_queue_window_guards_deliveries_from_its_queue(queue: str, guarded: bool) -> None:
    """``guards_delivery``: the window's part guards a delivery from a queue with a window."""
    from types import SimpleNamespace

    settings = config.ReliableSettings.from_conf({"reliable_queue_window_limits":
                                                  {"reports": "5/m"}})
    policy = config.build_policy("t", {}, None, settings)
    request = SimpleNamespace(delivery_info={"routing_key": queue})
    assert policy.guarded is False
    assert policy.guards_delivery(request) is guarded
    assert config.build_policy("t", {}, None).guards_delivery(request) is False
