"""FencedLock and the admission scripts against a real Redis server."""

from __future__ import annotations

import secrets
import time

import redis

from celery_reliable import FencedLock, guards
from celery_reliable.admission import Admitted, Plan, Release
from celery_reliable.keys import KeySpace

from .conftest import wait_for


def test_tokens_strictly_increase_across_acquires(redis_client: redis.Redis, prefix: str) -> None:
    """Every acquire mints a larger token than the last, also after release."""
    tokens = []
    for _ in range(20):
        lock = FencedLock(redis_client, "order:1", prefix=prefix)
        token = lock.acquire()
        assert token is not None
        tokens.append(token)
        assert lock.release()
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)


def test_busy_lock_is_refused_and_nothing_changes(redis_client: redis.Redis, prefix: str) -> None:
    """A second holder gets None; the first holder's lease and the counter are untouched."""
    first = FencedLock(redis_client, "order:2", prefix=prefix)
    t1 = first.acquire()
    keys = KeySpace(prefix)
    before = (redis_client.get(keys.lock("order:2")), redis_client.get(keys.fence("order:2")))
    assert FencedLock(redis_client, "order:2", prefix=prefix).acquire() is None
    after = (redis_client.get(keys.lock("order:2")), redis_client.get(keys.fence("order:2")))
    assert before == after
    assert t1 is not None and first.release()


def test_release_is_safe_twice_and_never_frees_the_next_holder(
    redis_client: redis.Redis, prefix: str
) -> None:
    """An expired holder's release must not delete the new holder's lock (celery-once's bug)."""
    old = FencedLock(redis_client, "order:3", ttl=0.2, prefix=prefix)
    t_old = old.acquire()
    time.sleep(0.3)
    new = FencedLock(redis_client, "order:3", ttl=5, prefix=prefix)
    t_new = new.acquire()
    assert t_old is not None and t_new is not None and t_new > t_old
    assert old.release() is False
    assert old.release() is False
    assert FencedLock(redis_client, "order:3", prefix=prefix).acquire() is None
    assert new.release() is True
    assert new.release() is False


def test_extend_only_by_owner(redis_client: redis.Redis, prefix: str) -> None:
    lock = FencedLock(redis_client, "order:4", ttl=0.3, prefix=prefix)
    lock.acquire()
    assert lock.extend(5)
    time.sleep(0.4)
    assert FencedLock(redis_client, "order:4", prefix=prefix).acquire() is None
    stranger = FencedLock(redis_client, "order:4", prefix=prefix)
    assert stranger.extend() is False
    assert lock.release()


def test_tokens_keep_growing_after_redis_loses_the_counter(
    redis_client: redis.Redis, prefix: str
) -> None:
    """Tokens are floored at the server clock: losing the counter never makes them go back."""
    lock = FencedLock(redis_client, "order:5", prefix=prefix)
    for _ in range(50):  # push the counter a little ahead of the clock floor
        lock.acquire()
        lock.release()
    last = lock.token
    redis_client.flushdb()  # our private server: simulate a restart without persistence
    lock2 = FencedLock(redis_client, "order:5", prefix=prefix)
    assert lock2.acquire() is not None
    assert lock2.token is not None and last is not None and lock2.token > last


def test_fencing_counter_lives_while_its_resource_is_in_use(
    redis_client: redis.Redis, prefix: str
) -> None:
    """Every acquire resets the fencing counter's TTL: it expires only after fence_ttl idle."""
    keys = KeySpace(prefix)
    fence_ttl = 3.0
    counter = keys.fence("busy")

    def acquire_and_release() -> int:
        plan = Plan()
        index = guards.lock.plan_resource(plan, keys, "busy", secrets.token_hex(4), 5,
                                          fence_ttl=fence_ttl)
        admitted = plan.admit(redis_client)
        assert isinstance(admitted, Admitted)
        token = admitted.results[index]
        release = Release()
        guards.lock.release(release, keys.lock("busy"), guards.lock.lease_value(plan, index, token))
        assert release.run(redis_client) == [1]
        return token

    tokens = [acquire_and_release()]
    created = time.monotonic()
    while time.monotonic() - created < 2.5 * fence_ttl:  # well past the creation's TTL
        time.sleep(0.2)
        assert redis_client.get(counter) == str(tokens[-1]).encode(), (
            f"the counter expired {time.monotonic() - created:.1f} s after its creation, "
            "while its resource was acquired every 0.2 s")
        tokens.append(acquire_and_release())
        assert redis_client.pttl(counter) > (fence_ttl - 1) * 1000  # just reset
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    # Idle: it expires fence_ttl after the last acquire (tokens stay floored at the clock).
    wait_for(lambda: not redis_client.exists(counter), fence_ttl + 10, "the idle counter to expire")


def test_keys_never_contain_the_resource_name(redis_client: redis.Redis, prefix: str) -> None:
    secret = "customer-4111111111111111"
    lock = FencedLock(redis_client, secret, prefix=prefix)
    lock.acquire()
    keys = [k.decode() for k in redis_client.scan_iter(match=f"{{{prefix}}}:*")]
    assert keys and all(secret not in k for k in keys)
    assert all(k.startswith(f"{{{prefix}}}:") for k in keys)  # one cluster hash tag
    lock.release()


def test_acquire_and_release_are_one_round_trip_each(redis_url: str, prefix: str) -> None:
    """Counted on the client: exactly one command sent per acquire and per release."""
    sent: list[object] = []

    class Counting(redis.Connection):
        def send_packed_command(self, command: object, check_health: bool = True) -> None:
            sent.append(command)
            super().send_packed_command(command, check_health)

    pool = redis.ConnectionPool.from_url(redis_url, connection_class=Counting)
    client = redis.Redis(connection_pool=pool)
    warm = FencedLock(client, "warm", prefix=prefix)  # loads the scripts once
    warm.acquire()
    warm.release()
    sent.clear()
    lock = FencedLock(client, "order:6", prefix=prefix)
    lock.acquire()
    assert len(sent) == 1
    lock.release()
    assert len(sent) == 2
    pool.disconnect()
