"""The guards' Lua fragments, composed into the admit, complete, rollback and renew scripts."""

from __future__ import annotations

import fnmatch
import re
import sys
from pathlib import Path

import pytest
import redis

from celery_reliable import guards
from celery_reliable.admission import Plan, Release
from celery_reliable.breaker import BreakerSpec
from celery_reliable.bulkhead import TierSpec
from celery_reliable.keys import KeySpace
from celery_reliable.ratelimit import BucketSpec
from celery_reliable.scripts import script

PACKAGE = Path(guards.__file__).resolve().parent.parent


TIER = TierSpec(concurrent=2, queue=1, timeout=60, policy="wait")


def _guard(letter: str) -> guards.Guard:
    return next(g for g in guards.GUARDS if g.letter == letter)


def test_every_guard_has_its_fragment_with_known_sections() -> None:
    for guard in guards.GUARDS:
        found = guards.sections(guard)
        assert set(found) <= set(guards.SECTIONS), guard
        assert "admit.check" in found and "admit.apply" in found, guard
        assert guards.fragment(guard).startswith(f"--[[ guards/{guard.name}.lua: {guard.letter},")


@pytest.mark.parametrize("name", sorted(guards.COMPOSED))
def test_composed_script_dispatches_every_guard_of_its_sections(name: str) -> None:
    source = script(name).source
    assert "--@guards" not in source
    for section in guards.SECTIONS:
        if section.split(".")[0] != name:
            continue
        for guard in guards.GUARDS:
            if section in guards.sections(guard):
                assert f"kind == '{guard.letter}' then" in source, (name, guard.letter)
    # the same text every time: one SHA across processes
    frame = (PACKAGE / "lua" / f"{name}.lua").read_text("utf-8")
    assert guards.compose(frame) == source


@pytest.mark.parametrize(("name", "keys", "args", "message"), [
    ("admit", ["marker"], ["Z"], "admit.lua: unknown guard Z"),
    ("complete", ["k"], ["B"], "complete.lua: unknown guard B"),  # buckets complete nothing
    ("rollback", ["k"], ["B", "owner"], "rollback.lua: unknown guard B"),
    ("renew", ["k"], ["D", "v", 1000], "renew.lua: unknown lease D"),
])
def test_a_letter_no_guard_handles_there_is_an_error(
    redis_client: redis.Redis, prefix: str, name: str, keys: list[str], args: list[object],
    message: str,
) -> None:
    with pytest.raises(redis.ResponseError, match=message):
        script(name)(redis_client, [f"{prefix}:{k}" for k in keys], args)


def test_plan_and_release_arguments_match_each_guards_layout(prefix: str) -> None:
    """What each guard's plan / release functions pass is what the composed scripts step past."""
    keys = KeySpace(prefix)
    plan, release = Plan(), Release()

    def step(letter: str, add_admit: object, add_complete: object = None) -> None:
        k, a = len(plan.keys), len(plan.admit_args)
        rk, ra = len(release.keys), sum(len(x) for x in release._args)
        add_admit()  # type: ignore[operator]
        if add_complete is not None:
            add_complete()  # type: ignore[operator]
        guard = _guard(letter)
        assert (len(plan.keys) - k, len(plan.admit_args) - a) == guard.admit, letter
        got = (len(release.keys) - rk, sum(len(x) for x in release._args) - ra)
        assert got == guard.complete, letter

    breaker = keys.breaker("b")
    step("I", lambda: guards.idempotency.plan(plan, f"{prefix}:i", "fp", "o", 5, 60),
         lambda: guards.idempotency.release(release, f"{prefix}:i", "o", 60))
    step("L", lambda: guards.lock.plan_resource(plan, keys, "r", "o", 5),
         lambda: guards.lock.release(release, "l", "1 o"))
    step("K", lambda: guards.bulkhead.plan(plan, keys, "t", TIER, "o", "w"),
         lambda: guards.bulkhead.release(release, "s", "o"))
    step("D", lambda: guards.deliveries.plan(plan, f"{prefix}:d", 3, 60, "o"),
         lambda: guards.deliveries.release(release, f"{prefix}:d"))
    step("C", lambda: guards.breaker.plan(plan, breaker, BreakerSpec(), "o"),
         lambda: guards.breaker.release(release, breaker, BreakerSpec(), "o"))
    step("B", lambda: guards.bucket.plan(plan, f"{prefix}:b", BucketSpec(10, 10), 1))
    assert "".join(plan.kinds) == "ILKDCB"


def test_every_guard_together_admits_and_completes(redis_client: redis.Redis,
                                                   prefix: str) -> None:
    """One plan with every guard, through the composed scripts against a real Redis."""
    keys = KeySpace(prefix)
    breaker = keys.breaker("b")
    plan = Plan()
    guards.deliveries.plan(plan, keys.deliveries("t1"), 3, 60, "o")
    guards.idempotency.plan(plan, f"{prefix}:i", "fp", "o", 5, 60)
    guards.lock.plan_resource(plan, keys, "r", "o", 5)
    guards.bulkhead.plan(plan, keys, "t", TIER, "o", "w")
    guards.breaker.plan(plan, breaker, BreakerSpec(), "o")
    guards.bucket.plan(plan, keys.queue_bucket("q"), BucketSpec(10, 10), 1)
    admitted = plan.admit(redis_client)
    assert type(admitted).__name__ == "Admitted"
    deliveries, existed, token, slots, probe, tokens = admitted.results  # type: ignore[union-attr]
    assert (deliveries, existed, slots, probe, tokens) == (1, 0, 1, 0, 9)
    assert token > 0
    # a second plan on the same lock is refused by the lock (guard index 0 of its plan)
    other = Plan()
    guards.lock.plan_resource(other, keys, "r", "o2", 5)
    refused = other.admit(redis_client)
    assert type(refused).__name__ == "Refused" and refused.kind == "L"  # type: ignore[union-attr]
    release = Release()
    guards.deliveries.release(release, keys.deliveries("t1"))
    guards.idempotency.release(release, f"{prefix}:i", "o", 60)
    guards.lock.release(release, keys.lock("r"), guards.lock.lease_value(plan, 2, token))
    guards.bulkhead.release(release, keys.bulkhead("t")[0], "o")
    guards.breaker.release(release, breaker, BreakerSpec(), "o")
    assert release.run(redis_client) == [1, 1, 1, 1, 0]
    assert release.run(redis_client) == [0, 0, 0, 0, 0]  # safe to run twice


def test_package_data_ships_every_lua_file() -> None:
    """pyproject's package-data covers every .lua file of the package (the wheel's content)."""
    if sys.version_info < (3, 11):
        pytest.skip("tomllib is 3.11+")
    import tomllib

    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text("utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["celery_reliable"]
    files = sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.lua"))
    assert any(f.startswith("guards/") for f in files)
    for f in files:
        assert any(fnmatch.fnmatch(f, pattern) for pattern in patterns), f


def test_compose_refuses_unknown_sections() -> None:
    with pytest.raises(ValueError, match="unknown guard section"):
        guards.compose("for g = 1, 2 do\n  --@guards admit.nothing\nend\n")


def test_shared_lease_code_exists_once_and_is_included(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bulkhead slots and breaker probes (zset leases) share their rollback and renewal:
    written once in ``_zset_lease.lua``, pulled in by ``--@include`` lines."""
    shared = guards._sections("_zset_lease")
    assert set(shared) == {"rollback", "renew"}
    for letter in ("K", "C"):
        found = guards.sections(_guard(letter))
        for section in ("rollback", "renew"):
            assert found[section] == shared[section], (letter, section)
    texts = [p.read_text("utf-8") for p in (PACKAGE / "guards").glob("*.lua")]
    assert sum("'ZADD', KEYS[g], 'XX'" in text for text in texts) == 1
    # an include is indented as its line; a missing section or a loop is an error
    fake = {"_a": "--@ rollback\n--@include _e\n",
            "_e": "--@ rollback\n--@include _a\n",
            "_c": "--@ renew\nif y then\n  --@include _b\nend\n",
            "_b": "--@ renew\n  x = 1\n",
            "_d": "--@ rollback\n--@include _b\n"}
    monkeypatch.setattr(guards, "_text", fake.__getitem__)
    guards._sections.cache_clear()
    try:
        assert guards._sections("_c")["renew"] == ["if y then", "    x = 1", "end"]
        with pytest.raises(ValueError, match=r"_a\.lua includes itself"):
            guards._sections("_a")
        with pytest.raises(ValueError, match=r"_b\.lua has no section 'rollback'"):
            guards._sections("_d")
    finally:
        guards._sections.cache_clear()
    with pytest.raises(ValueError, match="bad include"):
        guards._include("x", (), "renew", "--@include zset_lease")


def test_a_guard_registered_after_the_first_plan_is_planned() -> None:
    """Found in review (issue 14): the planners were cached apart from ``register``.

    A guard registered after a task already ran in the process got its hold,
    refused and settled hooks called, but never ``plan``.
    """
    from typing import Any

    from celery_reliable.guards.base import HOOKS, Guard, Hooks, overriding, planners, register

    class Late(Hooks):
        order = 5

        def plan(self, call: Any, plan: Any, execution: Any, arguments: dict[str, Any]) -> None:
            pass

    planners()  # a task already ran in this process
    register(Guard("Z", "late", admit=(0, 0)), Late())
    try:
        assert any(isinstance(hooks, Late) for hooks in planners())
    finally:
        del HOOKS["Z"]
        overriding.cache_clear()
        planners.cache_clear()
    assert not any(isinstance(hooks, Late) for hooks in planners())


#: ``metrics.inc("name"``, ``metrics.observe("name"`` or ``metrics.gauge("name"`` in source.
_COUNTED = re.compile(r"""\bmetrics\.(?:inc|observe|gauge)\(\s*["'](\w+)["']""")


def _counted(path: Path) -> set[str]:
    return set(_COUNTED.findall(path.read_text("utf-8")))


def test_every_metric_a_guard_counts_has_a_spec() -> None:
    from celery_reliable.prometheus.exporter import SPECS

    declared = {spec.name for spec in SPECS}
    by_guards = set().union(*(_counted(p) for p in (PACKAGE / "guards").glob("*.py")))
    assert {"reliable_lock_acquire_total", "reliable_rate_limited_total",
            "reliable_bulkhead_rejected_total"} <= by_guards  # the scan finds them
    assert by_guards - declared == set()
    anywhere = set().union(*(_counted(p) for p in PACKAGE.rglob("*.py")))
    assert len(anywhere) > len(by_guards)  # the pipeline's, fencing's, ...
    assert anywhere - declared == set()
    from celery_reliable import health

    assert health.GAUGE in declared  # the one counted through a constant


def test_guard_metrics_are_unique_and_exported() -> None:
    from celery_reliable.prometheus import exporter

    owned = [spec.name for spec in guards.metric_specs()]
    assert len(owned) == len(set(owned))
    assert set(owned).isdisjoint(spec.name for spec in exporter.SHARED)
    assert (*exporter.SHARED, *guards.metric_specs()) == exporter.SPECS
    assert "reliable_lock_acquire_total" in {spec.name for spec in guards.lock.METRICS}
    assert not hasattr(guards.window, "METRICS")  # counts the bucket's reliable_rate_limited


def test_a_metric_declared_twice_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from celery_reliable import metrics
    from celery_reliable.prometheus import exporter

    twice = metrics.MetricSpec("reliable_store_up", "gauge", "again")
    monkeypatch.setattr(guards.lock, "METRICS", (*guards.lock.METRICS, twice), raising=True)
    with pytest.raises(ValueError, match="'reliable_store_up' is declared twice"):
        metrics.collect((*exporter.SHARED, *guards.metric_specs()))


def test_a_guard_module_without_metrics_contributes_none(monkeypatch: pytest.MonkeyPatch) -> None:
    names = {spec.name for spec in guards.metric_specs()}
    monkeypatch.delattr(guards.lock, "METRICS")
    assert names - {spec.name for spec in guards.metric_specs()} == {
        "reliable_lock_acquire_total", "reliable_lock_wait_seconds"}
