"""The status reads of ``reliable status``/``locks``/``top`` (and the Prometheus scrape), made
in-process through the store seam: ``RedisStore``'s read-only methods against real Redis.

``test_cli.py`` checks what the commands print; this checks what the store returns.
"""

from __future__ import annotations

import time

import pytest
import redis

from celery_reliable import guards
from celery_reliable.admission import Admitted, Plan, Release
from celery_reliable.breaker import BreakerSpec
from celery_reliable.bulkhead import TierSpec, TierStats
from celery_reliable.guards.lock import LockInfo
from celery_reliable.keys import KeySpace
from celery_reliable.locks import FencedLock
from celery_reliable.ratelimit import BucketSpec
from celery_reliable.storage import RedisStore
from tests.conftest import free_port


def test_held_locks_lists_this_prefix_only_decoded(redis_client: redis.Redis,
                                                   prefix: str) -> None:
    store = RedisStore(redis_client)
    lock = FencedLock(redis_client, "order:1", ttl=30, prefix=prefix, label="orders")
    token = lock.acquire(owner="task-1/n1")
    assert token is not None
    bare = FencedLock(redis_client, "order:2", ttl=20, prefix=prefix)
    assert bare.acquire(owner="worker-7") is not None
    # A prefix with glob characters of its own, that would match ours unescaped.
    odd = FencedLock(redis_client, "order:1", ttl=30, prefix=prefix[:3] + "*")
    assert odd.acquire(owner="elsewhere/1") is not None

    found = {info.key: info for info in store.held_locks(KeySpace(prefix))}

    assert set(found) == {KeySpace(prefix).lock("order:1"), KeySpace(prefix).lock("order:2")}
    held = found[KeySpace(prefix).lock("order:1")]
    assert (held.token, held.owner, held.task_id, held.label) == (
        str(token), "task-1/n1", "task-1", "orders")
    assert 0 < held.ttl_ms <= 30_000
    assert held.digest == KeySpace(prefix).lock("order:1").rsplit(":", 1)[1]
    plain = found[KeySpace(prefix).lock("order:2")]
    assert (plain.owner, plain.task_id, plain.task, plain.label) == ("worker-7", "", "", "")
    assert [info.owner for info in store.held_locks(KeySpace(prefix[:3] + "*"))] == [
        "elsewhere/1"]
    for each in (lock, bare, odd):
        each.release()
    assert store.held_locks(KeySpace(prefix)) == []


def test_lock_info_parses_every_lease_format() -> None:
    new = LockInfo.parse("{p}:lock:abc", "12 id-1/h\ntasks.charge\norder:{order_id}\nnonce", 5)
    assert (new.token, new.owner, new.task_id, new.task, new.label, new.ttl_ms) == (
        "12", "id-1/h", "id-1", "tasks.charge", "order:{order_id}", 5)
    old = LockInfo.parse("{p}:lock:abc", "7 owner", -1)
    assert (old.token, old.owner, old.task_id, old.task, old.label, old.digest) == (
        "7", "owner", "", "", "", "abc")


def test_bucket_tokens_full_then_taken_then_refilling(redis_client: redis.Redis,
                                                      prefix: str) -> None:
    store = RedisStore(redis_client)
    spec = BucketSpec(rate=10.0, burst=20.0)
    key = KeySpace(prefix).queue_bucket("emails")
    assert store.bucket_tokens(key, spec) == 20.0  # never taken from
    plan = Plan()
    guards.bucket.plan(plan, key, spec, 15)
    assert isinstance(plan.admit(redis_client), Admitted)
    left = store.bucket_tokens(key, spec)
    assert 5.0 <= left < 7.0
    time.sleep(0.3)
    assert left + 2.0 <= store.bucket_tokens(key, spec) <= 20.0  # 10/s refill, capped


def test_bulkhead_stats_counts_live_slots(redis_client: redis.Redis, prefix: str) -> None:
    store = RedisStore(redis_client)
    keys = KeySpace(prefix)
    spec = TierSpec(concurrent=2, queue=3, timeout=60.0, policy="wait")
    tiers = {"payments": keys.bulkhead("payments"), "idle": keys.bulkhead("idle")}
    plan = Plan()
    guards.bulkhead.plan(plan, keys, "payments", spec, "slot-owner", "t1")
    assert isinstance(plan.admit(redis_client), Admitted)

    found = store.bulkhead_stats(tiers)

    assert found == {"payments": TierStats(active=1, waiting=0, rejected=0, timed_out=0,
                                           dropped=0),
                     "idle": TierStats(active=0, waiting=0, rejected=0, timed_out=0, dropped=0)}


def test_breaker_state_closed_open_then_half_open(redis_client: redis.Redis,
                                                  prefix: str) -> None:
    store = RedisStore(redis_client)
    spec = BreakerSpec(failure_threshold=2, window=4, min_calls=2, open_seconds=0.5)
    keys = KeySpace(prefix).breaker("partner")
    assert store.breaker_state(keys[0], spec) == 0
    for _ in range(2):
        entry = Plan()
        guards.breaker.plan(entry, keys, spec, "probe")
        assert isinstance(entry.admit(redis_client), Admitted)
        done = Release()
        guards.breaker.release(done, keys, spec, "probe")
        guards.breaker.settle(done, "f")
        done.run(redis_client)
    assert store.breaker_state(keys[0], spec) == 1
    time.sleep(0.6)
    assert store.breaker_state(keys[0], spec) == 2  # past its open time: the next is a probe


def test_ping_answers_or_raises_one_of_the_store_errors(redis_client: redis.Redis) -> None:
    assert RedisStore(redis_client).ping() is None
    down = redis.Redis(port=free_port(), socket_connect_timeout=1)
    store = RedisStore(down)
    with pytest.raises(store.errors):
        store.ping()
    down.close()
