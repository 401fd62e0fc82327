"""Token buckets and bulkhead tiers: parsing, the Lua guards, and task behaviour."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import TestWorkController

from celery_reliable import (
    DROPPED,
    BulkheadFull,
    ConfigurationError,
    FencedLock,
    ReliableTask,
    bulkhead_stats,
    guards,
    metrics,
)
from celery_reliable.admission import Admitted, Plan, Refused
from celery_reliable.bulkhead import DEFAULT_TIERS, TierSpec, parse_bulkheads
from celery_reliable.keys import KeySpace
from celery_reliable.ratelimit import BucketSpec, parse_bucket

from .conftest import wait_for

# ------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("raw", "rate", "burst"),
    [
        ("50/s", 50, 50),
        ("300/m", 5, 5),
        ("1000/h", 1000 / 3600, 1),
        ("0.5/s", 0.5, 1),
        ({"rate": 25, "burst": 50}, 25, 50),
        ({"rate": "120/m"}, 2, 2),
    ],
)
def test_bucket_specs(raw: Any, rate: float, burst: float) -> None:
    """Rates in /s, /m, /h or a mapping; burst defaults to max(1, rate per second)."""
    spec = parse_bucket("q", raw)
    assert spec.rate == pytest.approx(rate) and spec.burst == pytest.approx(burst)


@pytest.mark.parametrize(
    "raw",
    ["50", "50/d", "fast", -1, 0, {"burst": 5}, {"rate": 5, "x": 1}, {"rate": 5, "burst": 0}, True],
)
def test_malformed_queue_limit_names_the_queue(raw: Any) -> None:
    app = Celery("lim", broker="memory://", set_as_current=False)
    app.conf.reliable_queue_rate_limits = {"emails": raw}

    def noop() -> None:
        return None

    with pytest.raises(ConfigurationError, match="reliable_queue_rate_limits' queue 'emails'"):
        app.task(base=ReliableTask, shared=False, name="m")(noop)._get_current_object()


def test_bulkhead_defaults_config_and_environment() -> None:
    tiers = parse_bulkheads(
        "s",
        "reliable_bulkheads",
        {"payments": {"concurrent": 2}, "standard": {"queue": 3}},
        environ={
            "RELIABLE_BULKHEAD_CRITICAL_CONCURRENT": "7",
            "RELIABLE_BULKHEAD_PAYMENTS_TIMEOUT": "9.5",
        },
    )
    assert tiers["critical"] == TierSpec(7, 10, 180.0, "wait")
    assert tiers["standard"] == TierSpec(8, 3, 120.0, "wait")
    assert tiers["optional"] == DEFAULT_TIERS["optional"] and tiers["optional"].policy == "drop"
    assert tiers["payments"].concurrent == 2 and tiers["payments"].timeout == 9.5


@pytest.mark.parametrize(
    ("conf", "env", "fragment"),
    [
        ({"x": {"queue": 1}}, {}, "a new tier needs 'concurrent'"),
        ({"critical": {"concurrent": 0}}, {}, "out of range"),
        ({"critical": {"policy": "queue"}}, {}, "'policy' must be one of"),
        ({"critical": {"size": 3}}, {}, "unknown keys"),
        ({}, {"RELIABLE_BULKHEAD_CRITICAL_QUEUE": "many"}, "RELIABLE_BULKHEAD_CRITICAL_QUEUE"),
    ],
)
def test_bad_bulkheads(conf: Any, env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        parse_bulkheads("s", "reliable_bulkheads", conf, environ=env)


def test_unknown_tier_and_key_bucket_options_fail_at_bind() -> None:
    app = Celery("lim", broker="memory://", set_as_current=False)

    def job(tenant: str) -> None:
        return None

    with pytest.raises(ConfigurationError, match=r"^b1: option 'bulkhead' names tier 'gold'"):
        app.task(base=ReliableTask, shared=False, name="b1", bulkhead="gold")(
            job
        )._get_current_object()
    with pytest.raises(ConfigurationError, match="needs 'rate_limit_key_spec'"):
        app.task(base=ReliableTask, shared=False, name="b2", rate_limit_key="t:{tenant}")(
            job
        )._get_current_object()
    with pytest.raises(ConfigurationError, match=r"'rate_cost' .* exceeds"):
        app.task(
            base=ReliableTask,
            shared=False,
            name="b3",
            rate_limit_key="t:{tenant}",
            rate_limit_key_spec="1/s",
            rate_cost=5,
        )(job)._get_current_object()


# ------------------------------------------------------------------ the Lua guards


def test_bucket_take_and_retry_after(redis_client: redis.Redis, prefix: str) -> None:
    """A 10/s bucket with burst 3 admits 3 at once, then says when the next token comes."""
    key = KeySpace(prefix).queue_bucket("q")
    spec = BucketSpec(rate=10, burst=3)
    outcomes = []
    for _ in range(4):
        plan = Plan()
        guards.bucket.plan(plan, key, spec, 1)
        outcomes.append(plan.admit(redis_client))
    assert [type(o) for o in outcomes] == [Admitted] * 3 + [Refused]
    refused = outcomes[-1]
    assert isinstance(refused, Refused) and refused.kind == "B"
    assert refused.retry_after is not None and 0.05 < refused.retry_after <= 0.1
    time.sleep(0.12)
    plan = Plan()
    guards.bucket.plan(plan, key, spec, 1, slot=refused.slot)  # the refused task, back at its slot
    assert isinstance(plan.admit(redis_client), Admitted)
    assert 0 < redis_client.pttl(key) <= 1000 + 300  # idle buckets expire once full again


def test_busy_lock_burns_no_token_and_takes_no_slot(redis_client: redis.Redis, prefix: str) -> None:
    """All-or-nothing: with the lock busy, the bucket and the bulkhead are untouched."""
    keys = KeySpace(prefix)
    holder = FencedLock(redis_client, "acct:1", prefix=prefix)
    assert holder.acquire() is not None
    spec = BucketSpec(rate=1, burst=5)
    tier = TierSpec(concurrent=2, queue=5, timeout=10, policy="wait")
    for _ in range(3):
        plan = Plan()
        guards.bucket.plan(plan, keys.queue_bucket("q"), spec, 1)
        guards.bulkhead.plan(plan, keys, "t", tier, "me", "task-1")
        guards.lock.plan_resource(plan, keys, "acct:1", "me", 5)
        outcome = plan.admit(redis_client)
        assert isinstance(outcome, Refused) and outcome.kind == "L"
    assert not redis_client.exists(keys.queue_bucket("q"))  # still a full, untouched bucket
    assert redis_client.zcard(keys.bulkhead("t")[0]) == 0
    holder.release()
    plan = Plan()
    guards.bucket.plan(plan, keys.queue_bucket("q"), spec, 1)
    guards.bulkhead.plan(plan, keys, "t", tier, "me", "task-1")
    guards.lock.plan_resource(plan, keys, "acct:1", "me", 5)
    assert isinstance(plan.admit(redis_client), Admitted)
    assert float(redis_client.hget(keys.queue_bucket("q"), "t")) == pytest.approx(4, abs=0.01)
    assert redis_client.zcard(keys.bulkhead("t")[0]) == 1


def test_empty_bucket_takes_no_slot(redis_client: redis.Redis, prefix: str) -> None:
    keys = KeySpace(prefix)
    spec = BucketSpec(rate=0.1, burst=1)
    tier = TierSpec(concurrent=5, queue=5, timeout=10, policy="wait")
    for i in range(2):
        plan = Plan()
        guards.bulkhead.plan(plan, keys, "t", tier, f"o{i}", f"task-{i}")
        guards.bucket.plan(plan, keys.queue_bucket("q"), spec, 1)
        outcome = plan.admit(redis_client)
    assert isinstance(outcome, Refused) and outcome.kind == "B"
    assert redis_client.zcard(keys.bulkhead("t")[0]) == 1  # only the admitted one's slot


# ------------------------------------------------------------------ tasks in a worker


@pytest.fixture
def tiers(celery_app: Celery) -> Celery:
    celery_app.conf.reliable_bulkheads = {
        "optional": {"concurrent": 1},
        "solo": {"concurrent": 1, "queue": 1, "timeout": 30, "policy": "wait"},
        "strict": {"concurrent": 1, "policy": "fail"},
        "brief": {"concurrent": 1, "queue": 5, "timeout": 0.6, "policy": "wait"},
    }
    return celery_app


def bulk_task(app: Celery, name: str, tier: str) -> Any:
    @app.task(
        base=ReliableTask,
        bind=True,
        shared=False,
        name=name,
        bulkhead=tier,
        defer_delay=0.1,
        defer_max_delay=0.2,
    )
    def job(self: Any, hold: float) -> str:
        time.sleep(hold)
        return "ran"

    return job


def test_optional_tier_drops_when_full(tiers: Celery, celery_worker: TestWorkController) -> None:
    job = bulk_task(tiers, "t.opt", "optional")
    celery_worker.reload()
    before = metrics.value("reliable_bulkhead_rejected_total", tier="optional", reason="drop")
    first = job.delay(1.0)
    wait_for(lambda: bulkhead_stats(tiers)["optional"].active == 1, 5, "the slot to be taken")
    dropped = job.delay(0)
    wait_for(lambda: dropped.state == DROPPED, 5, "the drop")
    assert first.get(timeout=10) == "ran"
    assert (
        metrics.value("reliable_bulkhead_rejected_total", tier="optional", reason="drop")
        == before + 1
    )
    assert bulkhead_stats(tiers)["optional"].dropped >= 1


def test_fail_policy_raises(tiers: Celery, celery_worker: TestWorkController) -> None:
    job = bulk_task(tiers, "t.strict", "strict")
    celery_worker.reload()
    first = job.delay(1.0)
    wait_for(lambda: bulkhead_stats(tiers)["strict"].active == 1, 5, "the slot to be taken")
    with pytest.raises(BulkheadFull, match=r"t\.strict: bulkhead 'strict' .* policy is 'fail'"):
        job.delay(0).get(timeout=10)
    assert first.get(timeout=10) == "ran"


def test_wait_is_bounded_by_queue_size(tiers: Celery, celery_worker: TestWorkController) -> None:
    """Tier 'solo': 1 slot, 1 waiter. The waiter runs after; a third is refused."""
    job = bulk_task(tiers, "t.solo", "solo")
    celery_worker.reload()
    first = job.delay(1.5)
    wait_for(lambda: bulkhead_stats(tiers)["solo"].active == 1, 5, "the slot to be taken")
    second = job.delay(0)
    wait_for(lambda: bulkhead_stats(tiers)["solo"].waiting == 1, 5, "a waiter")
    with pytest.raises(BulkheadFull, match="waiting queue too"):
        job.delay(0).get(timeout=10)
    assert first.get(timeout=10) == "ran" and second.get(timeout=10) == "ran"
    stats = bulkhead_stats(tiers)["solo"]
    assert stats.active == 0 and stats.waiting == 0 and stats.rejected >= 1


def test_wait_times_out(tiers: Celery, celery_worker: TestWorkController) -> None:
    job = bulk_task(tiers, "t.brief", "brief")
    celery_worker.reload()
    first = job.delay(2.0)
    wait_for(lambda: bulkhead_stats(tiers)["brief"].active == 1, 5, "the slot to be taken")
    with pytest.raises(BulkheadFull, match="longer than the tier's timeout"):
        job.delay(0).get(timeout=10)
    assert bulkhead_stats(tiers)["brief"].timed_out >= 1
    first.get(timeout=10)


def test_slot_is_released_on_failure_and_retry(
    tiers: Celery, celery_worker: TestWorkController
) -> None:
    @tiers.task(
        base=ReliableTask,
        bind=True,
        shared=False,
        name="t.rel",
        bulkhead="strict",
        max_retries=1,
        default_retry_delay=0.05,
    )
    def rel(self: Any) -> str:
        if self.request.retries == 0:
            raise self.retry()
        if self.request.retries == 1:
            raise ValueError("boom")
        return "x"

    celery_worker.reload()
    with pytest.raises(ValueError):
        rel.delay().get(timeout=10)
    assert bulkhead_stats(tiers)["strict"].active == 0


def test_throttle_pauses_the_queue_fleet_wide(
    celery_app: Celery, celery_worker: TestWorkController
) -> None:
    """self.throttle(1) empties the queue's bucket: nothing from that queue runs for 1 s."""
    celery_app.conf.reliable_queue_rate_limits = {"celery": "100/s"}
    starts: list[tuple[str, float]] = []
    lock = threading.Lock()

    @celery_app.task(
        base=ReliableTask,
        bind=True,
        shared=False,
        name="t.api",
        defer_delay=0.05,
        defer_max_delay=0.2,
    )
    def api(self: Any, n: int) -> int:
        with lock:
            starts.append((f"{n}:{self.request.retries}", time.monotonic()))
        if n == 0 and len([s for s in starts if s[0].startswith("0:")]) == 1:
            self.throttle(1.0)  # the upstream said 429, Retry-After: 1
        return n

    celery_worker.reload()
    first = api.delay(0)
    wait_for(lambda: starts, 5, "the first call")
    t_throttle = starts[0][1]
    time.sleep(0.1)
    others = [api.delay(n) for n in range(1, 4)]
    assert [r.get(timeout=15) for r in others] == [1, 2, 3]
    assert first.get(timeout=15) == 0
    later = [t for name, t in starts[1:]]
    assert min(later) - t_throttle >= 0.95  # everything waited out the pause
