"""A lost admission reply: never resent, undone by owner, deferred, never counted as lost."""

from __future__ import annotations

import contextlib
import logging
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from celery.exceptions import Retry as CeleryRetry
from celery.exceptions import SoftTimeLimitExceeded
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from celery_reliable import ConfigurationError, FencedLock, guards
from celery_reliable.admission import ROLLBACK_MARK_MIN, Admitted, Plan, Poison
from celery_reliable.breaker import BreakerSpec
from celery_reliable.bulkhead import TierSpec
from celery_reliable.keys import KeySpace
from celery_reliable.ratelimit import BucketSpec
from celery_reliable.runtime import Runtime, runtime_for
from celery_reliable.scripts import _channel, script

from .conftest import (
    LateProxy,
    RedisServer,
    TcpProxy,
    free_port,
    redis50_client,
    reliable_task,
    wait_for,
)


def evalsha_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats").get("cmdstat_evalsha")
    return int(stats["calls"]) if stats else 0


def sends_losing_replies(
    proxy: TcpProxy, direct: redis.Redis, name: str, call: Any,
    error: type[Exception] = redis.TimeoutError,
) -> int:
    """How many times script ``name`` ran on the server (``direct``) during ``call()``, which
    must raise ``error``, while ``proxy`` loses the replies to it."""
    direct.config_resetstat()
    proxy.lose_replies(script(name).sha.encode())
    try:
        with pytest.raises(error):
            call()
    finally:
        proxy.resume()
    return evalsha_calls(direct)


@pytest.fixture
def proxy(private_redis: RedisServer) -> Iterator[TcpProxy]:
    tcp = TcpProxy(private_redis.port)
    tcp.start()
    yield tcp
    tcp.stop()


def test_admission_is_sent_once_on_every_path(
    private_redis: RedisServer, proxy: TcpProxy
) -> None:
    """Reply lost: admission runs once server-side on the channel and the pool path alike."""
    direct = redis.Redis(port=private_redis.port)
    for name in ("admit", "complete", "rollback"):
        direct.script_load(script(name).source)
    # A client with its own retry policy: admission ignores it, other commands keep it.
    client = redis.Redis(port=proxy.port, socket_timeout=0.5, retry=Retry(NoBackoff(), 2))
    client.ping()
    keys = KeySpace("once")

    def lost(name: str, call: Any) -> int:
        return sends_losing_replies(proxy, direct, name, call)

    def admit() -> Any:
        plan = Plan()
        guards.lock.plan_resource(plan, keys, f"r{secrets.token_hex(2)}", secrets.token_hex(4), 30)
        return plan.admit(client)

    assert lost("admit", admit) == 1  # the dedicated channel
    channel = _channel(client)
    assert channel is not None
    with channel.busy:  # another thread of this process is on the channel: the pool path
        assert lost("admit", admit) == 1
        # a script safe to run twice keeps the client's retry: 1 + 2 sends
        assert lost("complete", lambda: script("complete")(client, ["k"], ["K", "o"])) == 3
    assert client.get_retry() == Retry(NoBackoff(), 2)
    # A FencedLock whose acquire lost its reply raises and leaves the lock free.
    lock = FencedLock(client, "fl", ttl=30, prefix="once")
    assert lost("admit", lock.acquire) == 2  # the admission, then its rollback
    assert direct.exists(keys.lock("fl")) == 0
    assert lock.acquire() is not None
    client.close()


def test_admission_is_sent_once_on_redis_cluster(tmp_path: Path) -> None:
    """RedisCluster (its own retry loop): a lost admission reply is not resent either."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    port = _cluster_port()
    proxy = TcpProxy(port)  # the node announces the proxy: every client path goes through it
    proxy.start()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
         "--cluster-config-file", str(tmp_path / "nodes.conf"), "--cluster-announce-ip",
         "127.0.0.1", "--cluster-announce-port", str(proxy.port), "--dir", str(tmp_path),
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    direct = redis.Redis(port=port)
    cluster: RedisCluster | None = None
    try:
        wait_for(lambda: _pings(direct), 30, "the cluster node")
        direct.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        wait_for(lambda: direct.cluster("info")["cluster_state"] == "ok", 30, "cluster ok")
        direct.script_load(script("admit").source)
        cluster = RedisCluster(host="127.0.0.1", port=proxy.port, socket_timeout=0.5)
        plan = Plan()
        guards.lock.plan_resource(plan, KeySpace("cl"), "res", "owner", 30)
        assert sends_losing_replies(
            proxy, direct, "admit", lambda: plan.admit(cluster), redis.RedisError) == 1
        assert plan.rollback(cluster) == [1]  # it ran: its lock is undone
    finally:
        if cluster is not None:
            cluster.close()
        direct.close()
        server.kill()
        server.wait(10)
        proxy.stop()


def _cluster_port() -> int:
    """A free port whose cluster-bus port (port + 10000) is valid and free too.

    Ephemeral ports run up to 60999: one above 55535 has no cluster bus and
    redis-server refuses to start (this made the test flaky).
    """
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_rollback_is_resent_a_few_times_then_gives_up(
    private_redis: RedisServer, proxy: TcpProxy
) -> None:
    """Rollback is idempotent: its lost replies are resent (3 sends), then it raises."""
    direct = redis.Redis(port=private_redis.port)
    direct.script_load(script("rollback").source)
    client = redis.Redis(port=proxy.port, socket_timeout=0.3)
    plan = Plan()
    guards.lock.plan_resource(plan, KeySpace("rb"), "r", "owner", 30)
    assert sends_losing_replies(proxy, direct, "rollback", lambda: plan.rollback(client)) == 3
    assert plan.rollback(client) == [0]
    client.close()


def test_rollback_undoes_only_its_own_admission(redis_client: redis.Redis, prefix: str) -> None:
    """Owner-checked, safe to repeat, safe when nothing was taken; tokens stay taken."""
    keys = KeySpace(prefix)
    tier = TierSpec(concurrent=3, queue=3, timeout=60, policy="wait")
    breaker = BreakerSpec(open_seconds=1)
    bucket = BucketSpec(rate=1 / 3600, burst=5)
    breaker_key, probes = keys.breaker("b")
    redis_client.hset(breaker_key, mapping={"s": 1, "o": 0})  # open long ago: half-opens now
    deliveries = keys.deliveries("task-1")

    def plan(owner: str) -> Plan:
        p = Plan()
        guards.deliveries.plan(p, deliveries, 3, 3600, owner)
        guards.idempotency.plan(p, keys.idempotency("t", "k"), "fp", owner, 30, 3600)
        guards.lock.plan_resource(p, keys, "res", owner, 30)
        guards.bulkhead.plan(p, keys, "tier", tier, owner, "waiter")
        guards.breaker.plan(p, keys.breaker("b"), breaker, owner)
        guards.bucket.plan(p, keys.key_bucket("k"), bucket, 1)
        return p

    mine = plan("task-1/aaaa")
    assert isinstance(mine.admit(redis_client), Admitted)
    slots = keys.bulkhead("tier")[0]
    assert redis_client.exists(keys.lock("res"), keys.idempotency("t", "k")) == 2
    assert redis_client.zcard(slots) == redis_client.zcard(probes) == 1
    assert redis_client.smembers(deliveries) == {b"task-1/aaaa"}
    assert mine.undo_kinds == ["D", "I", "L", "K", "C"]  # no bucket: not refunded
    assert mine.rollback(redis_client) == [1, 1, 1, 1, 1]
    assert redis_client.exists(keys.lock("res"), keys.idempotency("t", "k"), deliveries) == 0
    assert redis_client.zcard(slots) == redis_client.zcard(probes) == 0
    # The token stays taken (no marker could tell a refund from a double refund).
    assert float(redis_client.hget(keys.key_bucket("k"), "t") or 0) == pytest.approx(4, abs=0.01)
    assert mine.rollback(redis_client) == [0, 0, 0, 0, 0]  # repeated: nothing of ours left

    # Another execution holds everything now: rolling back ours (never admitted) leaves it.
    theirs = plan("task-1/bbbb")
    assert isinstance(theirs.admit(redis_client), Admitted)
    before = {k: redis_client.dump(k) for k in (keys.lock("res"), keys.idempotency("t", "k"),
                                                  slots, probes, deliveries)}
    assert plan("task-1/aaaa").rollback(redis_client) == [0, 0, 0, 0, 0]
    assert {k: redis_client.dump(k) for k in before} == before
    # A finished record is a result, not a lease: never rolled back, even with our owner.
    record = keys.idempotency("t", "done")
    redis_client.hset(record, mapping={"s": "S", "f": "fp", "o": "task-1/cccc", "r": "1"})
    p = Plan()
    guards.idempotency.plan(p, record, "fp", "task-1/cccc", 30, 3600)
    assert p.rollback(redis_client) == [0] and redis_client.hget(record, "s") == b"S"


def test_a_rollback_sent_again_after_its_first_send_ran_changes_nothing(
    redis_client: redis.Redis, prefix: str,
) -> None:
    """Only the first send of a rollback to arrive acts: a later one leaves a newer admission.

    The same owner admits again after its rollback ran (a FencedLock retried
    with a stable owner, a task whose owner a caller reuses); a second send of
    the first rollback (a resend whose first send arrived, reaching Redis late)
    finds its marker and takes nothing of the newer admission, whatever its
    owner.
    """
    keys = KeySpace(prefix)
    tier = TierSpec(concurrent=3, queue=3, timeout=60, policy="wait")

    def plan() -> Plan:
        p = Plan()
        guards.lock.plan_resource(p, keys, "res", "owner-1", 30)
        guards.bulkhead.plan(p, keys, "tier", tier, "owner-1", "waiter")
        return p

    first = plan()
    assert isinstance(first.admit(redis_client), Admitted)
    assert first.rollback(redis_client) == [1, 1]
    again = plan()
    assert isinstance(again.admit(redis_client), Admitted)  # the owner's next admission
    assert first.rollback(redis_client) == [0, 0]  # the first rollback, sent again
    assert redis_client.exists(keys.lock("res")) == 1
    assert redis_client.zcard(keys.bulkhead("tier")[0]) == 1
    assert again.rollback(redis_client) == [1, 1]


def test_an_older_delivery_counter_is_kept(redis_client: redis.Redis, prefix: str) -> None:
    """A counter left by an older version keeps its count; rollback leaves it alone."""
    key = KeySpace(prefix).deliveries("old")
    redis_client.set(key, 2)
    p = Plan()
    guards.deliveries.plan(p, key, 2, 3600, "old/1")
    assert p.rollback(redis_client) == [0] and redis_client.get(key) == b"2"
    result = p.admit(redis_client)
    assert isinstance(result, Admitted) and result.results == (3,)
    assert redis_client.scard(key) == 3
    p2 = Plan()
    guards.deliveries.plan(p2, key, 2, 3600, "old/2")
    assert isinstance(p2.admit(redis_client), Poison)


# ------------------------------------------------- a request that arrives after its rollback


def test_admission_arriving_after_its_rollback_leaves_nothing_behind(
    private_redis: RedisServer, late_proxy: LateProxy
) -> None:
    """An admission delayed in the network past its rollback does nothing when it lands.

    The client times out, the rollback (a new connection) finds nothing of the
    owner's and leaves the request's marker; then the delayed admission reaches
    Redis and, finding the marker first, takes no lock, token, record, slot or
    delivery entry (without it: a ghost lock for ``lock_ttl`` and a delivery
    counted as lost for 24 h). The marker outlives every lease of the plan.
    """
    direct = redis.Redis(port=private_redis.port)
    for name in ("admit", "rollback"):
        direct.script_load(script(name).source)
    client = redis.Redis(port=late_proxy.port, socket_timeout=0.5)
    client.ping()
    keys = KeySpace(f"late{secrets.token_hex(3)}")
    task_id = secrets.token_hex(8)
    tier = TierSpec(concurrent=3, queue=3, timeout=60, policy="wait")

    def plan(owner: str) -> Plan:  # as pipeline.make_plan builds it
        p = Plan()
        guards.deliveries.plan(p, keys.deliveries(task_id), 3, 24 * 3600.0, owner)
        guards.idempotency.plan(p, keys.idempotency("t", "k"), "fp", owner, 30, 3600)
        guards.lock.plan_resource(p, keys, "order:1", owner, 30)
        guards.bulkhead.plan(p, keys, "tier", tier, owner, task_id)
        return p

    late = plan(f"{task_id}/{secrets.token_hex(4)}")  # an owner as pipeline.admit makes
    late_proxy.hold(script("admit").sha.encode())
    with pytest.raises(redis.TimeoutError):
        late.admit(client)
    # What pipeline.admit does next: undo by owner (nothing there yet), then defer.
    assert late.rollback(client) == [0, 0, 0, 0]
    assert late.marker is not None
    assert direct.pttl(late.marker) > (ROLLBACK_MARK_MIN - 60) * 1000
    late_proxy.release()  # the network heals: the admission's segment gets through
    assert late_proxy.delivered.wait(10), "the delayed admission never reached the server"

    lock_key = keys.lock("order:1")
    assert direct.get(lock_key) is None, (
        f"phantom lock {direct.get(lock_key)!r} held for {direct.pttl(lock_key)} ms by a "
        "rolled-back owner")
    assert direct.exists(keys.fence("order:1")) == 0, "it minted a token"
    assert direct.scard(keys.deliveries(task_id)) == 0, "a rolled-back admission counted as a " \
        "lost delivery"
    assert direct.exists(keys.idempotency("t", "k")) == 0
    assert direct.zcard(keys.bulkhead("tier")[0]) == 0
    # The same request, sent again as it was: refused as rolled back (code 6), nothing written.
    again = script("admit")(direct, [*late.keys, late.marker], ["".join(late.kinds),
                                                                 *late.admit_args])
    assert [int(x) for x in again] == [6]
    assert direct.exists(lock_key) == 0
    # The task's next delivery (a new owner) is admitted at once.
    assert isinstance(plan(f"{task_id}/{secrets.token_hex(4)}").admit(direct), Admitted)
    client.close()
    direct.close()


def test_fenced_lock_acquire_arriving_after_its_rollback_does_not_hold_the_lock(
    private_redis: RedisServer, late_proxy: LateProxy
) -> None:
    """FencedLock.acquire times out, rolls back and raises; its request lands later: no lock.

    The caller was told the acquire failed (and it rolled back): the request
    that arrives afterwards must not take the lock and refuse every other
    acquirer until the ttl.
    """
    direct = redis.Redis(port=private_redis.port)
    for name in ("admit", "rollback"):
        direct.script_load(script(name).source)
    client = redis.Redis(port=late_proxy.port, socket_timeout=0.5)
    client.ping()
    prefix = f"late{secrets.token_hex(3)}"
    late_proxy.hold(script("admit").sha.encode())
    with pytest.raises(redis.TimeoutError):
        FencedLock(client, "invoice:7", ttl=60, prefix=prefix).acquire()  # rolls back, raises
    late_proxy.release()
    assert late_proxy.delivered.wait(10)
    assert direct.exists(KeySpace(prefix).lock("invoice:7")) == 0
    other = FencedLock(direct, "invoice:7", ttl=60, prefix=prefix)
    assert other.acquire() is not None, "locked by an acquire that already failed and rolled back"
    client.close()
    direct.close()


# ------------------------------------------------- an interrupted admission


def deliver(task: Any, *args: Any) -> Any:
    """Run ``task(*args)`` as a worker would for one delivery; the outcome (or the Retry)."""
    task.push_request(id=secrets.token_hex(8), args=list(args), kwargs={},
                      called_directly=False, is_eager=False, retries=0,
                      delivery_info={"exchange": "",
                                     "routing_key": task.app.conf.task_default_queue},
                      headers={})
    try:
        return task(*args)
    except CeleryRetry as retry:
        return retry
    finally:
        task.pop_request()


def test_soft_time_limit_during_admission_still_rolls_back(
    private_redis: RedisServer, proxy: TcpProxy
) -> None:
    """A soft time limit that interrupts the wait for admission's reply: undone, then raised, fast.

    Billiard raises ``SoftTimeLimitExceeded`` from a signal handler
    (``SystemExit`` on revoke's SIGTERM) in the middle of the blocked read.
    The admission did take the lock: it is rolled back before the exception
    goes on, not left to a ghost owner for ``lock_ttl``. With Redis stalled
    altogether the rollback gives up after two sends of one second each, not
    after the 10 s socket timeout, and the exception still goes on.
    """
    direct = redis.Redis(port=private_redis.port)
    for name in ("admit", "rollback"):
        direct.script_load(script(name).source)
    prefix = f"soft{secrets.token_hex(3)}"
    app = Celery("soft", broker="memory://", set_as_current=False)
    app.conf.update(reliable_redis_url=f"redis://127.0.0.1:{proxy.port}/0",
                    reliable_key_prefix=prefix, reliable_idempotency_store="redis")

    @reliable_task(app, name="adm.soft", lock="report:{n}",
                   lock_ttl=60, idempotency_key="report:{n}", soft_time_limit=1)
    def report(self: Any, n: int) -> str:
        return "ran"

    def interrupted(n: int) -> float:
        """Deliver report(n), interrupted 1 s in; seconds from the interruption to the raise."""
        fired: list[float] = []

        def soft_limit(signum: int, frame: Any) -> None:  # as billiard's soft_timeout_sighandler
            fired.append(time.monotonic())
            raise SoftTimeLimitExceeded()

        previous = signal.signal(signal.SIGALRM, soft_limit)
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        try:
            with pytest.raises(SoftTimeLimitExceeded):
                deliver(report, n)
            return time.monotonic() - fired[0]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    keys = KeySpace(prefix)
    proxy.lose_replies(script("admit").sha.encode())  # Redis stalls after running it
    try:
        interrupted(1)
    finally:
        proxy.resume()
    assert direct.get(keys.lock("report:1")) is None, (
        f"ghost lock held {direct.pttl(keys.lock('report:1'))} ms more by an admission nobody "
        "rolled back")
    assert direct.exists(keys.idempotency("adm.soft", "report:1")) == 0
    assert direct.exists(keys.fence("report:1")) == 1  # it did run: a token was minted

    proxy.stall()  # nothing gets through now, the rollback neither
    try:
        waited = interrupted(2)
    finally:
        proxy.resume()
    assert waited < 5.0, f"the interrupted task waited {waited:.1f} s for its rollback"
    direct.close()


def _interrupt_at(module: str, function: str, caller: str | None = None) -> Any:
    """Raise SoftTimeLimitExceeded when ``module``'s ``function`` is entered (from ``caller``).

    Celery's soft time limit is a signal handler raising at whatever bytecode the
    main thread is running; this delivers it at a chosen one, deterministically.
    Returns the trace function it replaced (a coverage tracer), to put back.
    """
    previous = sys.gettrace()

    def tracer(frame: FrameType, event: str, arg: Any) -> None:
        if (event == "call" and frame.f_code.co_name == function
                and frame.f_globals.get("__name__") == module
                and (caller is None or (frame.f_back is not None
                                        and frame.f_back.f_code.co_name == caller))):
            sys.settrace(previous)
            raise SoftTimeLimitExceeded("soft time limit (test)")

    sys.settrace(tracer)
    return previous


@pytest.mark.parametrize("where", [
    ("celery_reliable.pipeline.call", "bucket_slots", "admit"),  # admitted, before hold
    ("celery_reliable.pipeline", "hold", None),  # nothing registered yet
    ("celery_reliable.metrics", "inc", "hold"),  # mid-hold: the record's lease registered
], ids=["before-hold", "hold", "mid-hold"])
def test_interruption_between_admission_and_hold_leaks_nothing(
    redis_url: str, redis_client: redis.Redis, prefix: str,
    where: tuple[str, str, str | None],
) -> None:
    """A soft time limit landing after admission and before its leases are registered leaks nothing.

    Between admit.lua's reply and hold's end run health bookkeeping, metrics and
    the breaker's signal handlers (user code): an interruption there propagates,
    and what admission took (lock, in-progress record, delivery entry) is undone
    by owner first. Before, it was held until its TTL (300 s here): the next
    delivery was deferred behind its predecessor's ghost lock, and the
    heartbeat kept renewing what hold had registered.
    """
    app = Celery("interrupted", broker="memory://", set_as_current=False)
    app.conf.update(reliable_redis_url=redis_url, reliable_key_prefix=prefix,
                    reliable_idempotency_store="redis")

    @reliable_task(app, name="adm.interrupted",
                   lock="acct:{n}", lock_ttl=300, idempotency_key="acct:{n}",
                   idempotency_lease=300)
    def guarded(self: Any, n: int) -> str:
        return "ran"

    keys = KeySpace(prefix)
    previous = _interrupt_at(*where)
    try:
        with pytest.raises(SoftTimeLimitExceeded):
            deliver(guarded, 1)
    finally:
        sys.settrace(previous)
    assert redis_client.exists(keys.fence("acct:1")) == 1  # it was admitted: a token minted
    assert redis_client.exists(keys.lock("acct:1")) == 0, (
        f"the lock leaked ({redis_client.pttl(keys.lock('acct:1'))} ms left)")
    assert redis_client.exists(keys.idempotency("adm.interrupted", "acct:1")) == 0
    assert runtime_for(app).heartbeat.held() == 0  # nothing renewed on behalf of it
    again = deliver(guarded, 1)
    assert again == "ran", f"the next delivery did not run: {again!r} (the lock leaked)"


def test_interrupted_fenced_lock_acquire_rolls_back(
    private_redis: RedisServer, proxy: TcpProxy
) -> None:
    """FencedLock.acquire interrupted (KeyboardInterrupt) while its reply is late: lock undone."""
    direct = redis.Redis(port=private_redis.port)
    for name in ("admit", "rollback"):
        direct.script_load(script(name).source)
    client = redis.Redis(port=proxy.port, socket_timeout=30)
    client.ping()
    prefix = f"intr{secrets.token_hex(3)}"

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    proxy.lose_replies(script("admit").sha.encode())
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        with pytest.raises(KeyboardInterrupt):
            FencedLock(client, "invoice:8", ttl=60, prefix=prefix).acquire()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        proxy.resume()
    keys = KeySpace(prefix)
    assert direct.exists(keys.fence("invoice:8")) == 1  # the acquire ran
    assert direct.exists(keys.lock("invoice:8")) == 0, "an interrupted acquire kept the lock"
    client.close()
    direct.close()


def test_interrupted_rollback_works_with_the_oldest_supported_redis_py(redis_url: str,
                                                                     prefix: str) -> None:
    """With redis-py 5.0's connection keywords the bounded rollback undoes the admission.

    ``Plan.rollback(timeout=...)`` (what pipeline.admit and FencedLock.acquire
    run on SoftTimeLimitExceeded/SystemExit) builds its own connection from the
    pool's settings, setting only keywords the pool passes: redis-py 7's
    ``orig_*`` keywords made 5.0.8 and 6.4.0 raise TypeError (swallowed by the
    callers: the lock stayed held until its TTL, no marker stopped a late request).
    """
    client = redis50_client(redis_url)
    keys = KeySpace(prefix)
    plan = Plan()
    guards.lock.plan_resource(plan, keys, "interrupted", "owner-1", 300)
    try:
        assert isinstance(plan.admit(client), Admitted)  # the lock is taken
        try:
            undone = plan.rollback(client, attempts=2, timeout=1.0)
        except TypeError as exc:
            raise AssertionError(f"the bounded rollback failed: {exc}") from exc
        assert undone == [1]
        assert client.exists(keys.lock("interrupted")) == 0
    finally:
        client.delete(keys.lock("interrupted"), keys.fence("interrupted"))
        client.close()


@pytest.mark.parametrize("late", ["first send", "every send"])
def test_late_rollback_never_frees_a_later_acquire_of_the_same_owner(
    private_redis: RedisServer, prefix: str, late: str,
) -> None:
    """A rollback send arriving after the owner's next acquire (same owner) leaves its lock alone.

    FencedLock.acquire(owner=...) with a stable owner (a host:pid). Acquire #1
    runs but its reply is lost; its rollback's first send (or every send) is
    delayed in the network. "first send": the resend gets through, undoes #1
    and writes the request's marker; the late first send, arriving after
    acquire #2 took the lock, finds the marker and does nothing. "every send":
    nothing undoes #1 in time (its lease is let expire, here deleted by hand),
    #2 takes the lock, and the late sends compare the whole holder, whose
    per-acquire nonce is not #2's. Either way #2 keeps the lock: a third client
    is refused.
    """
    direct = redis.Redis(port=private_redis.port)
    for name in ("admit", "rollback", "complete", "renew"):
        direct.script_load(script(name).source)
    proxy = LateProxy(private_redis.port)
    proxy.start()
    client = redis.Redis(port=proxy.port, socket_timeout=0.5)
    keys = KeySpace(prefix)
    try:
        lock = FencedLock(client, "account-7", prefix=prefix, ttl=60)
        proxy.lose_replies(script("admit").sha.encode())
        proxy.hold(script("rollback").sha.encode(), every=late == "every send")
        with pytest.raises(redis.TimeoutError):
            lock.acquire(owner="worker-a:4242")  # #1 ran; its rollback sends are late
        proxy.resume()
        sends = 1
        if late == "every send":
            sends = 3  # FencedLock's rollback: three sends, each timed out
            assert direct.exists(keys.lock("account-7")) == 1  # #1's lock: nothing undid it
            direct.delete(keys.lock("account-7"))  # #1's lease expires
        token = lock.acquire(owner="worker-a:4242")  # the caller retries: #2 holds the lock
        assert token is not None
        proxy.release()  # the late rollback send(s) of #1 reach Redis
        wait_for(lambda: proxy.delivered_count >= sends, timeout=10,
                 what=f"{sends} late rollback send(s) delivered")
        time.sleep(0.2)
        other = FencedLock(direct, "account-7", prefix=prefix, ttl=60).acquire(owner="worker-b")
        assert other is None, (
            f"a second holder got the lock (token {other}) while acquire #2 (token {token}) "
            "holds it: #1's late rollback deleted it")
        assert lock.release()
    finally:
        proxy.stop()
        client.close()
        direct.close()


def test_socket_timeout_setting_is_validated_and_used() -> None:
    """reliable_redis_socket_timeout: seconds > 0, named in the error; the runtime uses it."""
    app = Celery("sock", broker="memory://", set_as_current=False)
    app.conf.reliable_redis_socket_timeout = 0
    with pytest.raises(ConfigurationError, match="'reliable_redis_socket_timeout'"):
        Runtime(app)
    app.conf.reliable_redis_socket_timeout = 2.5
    runtime = Runtime(app)
    assert runtime.redis.connection_pool.connection_kwargs["socket_timeout"] == 2.5
    runtime.close()


# ------------------------------------------------------------- in a worker


class Monitor:
    """Counts the EVALSHAs of one script the server executes (MONITOR, not through the proxy)."""

    def __init__(self, port: int, sha: str) -> None:
        self.needle = f'"EVALSHA" "{sha}"'.encode()
        self.seen = 0
        self._conn = redis.Connection(port=port, socket_timeout=None)  # may be idle a while
        self._conn.send_command("MONITOR")
        assert self._conn.read_response() in (b"OK", "OK")
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            while True:  # raw lines: '<time> [<db> <client>] "EVALSHA" "<sha>" ...'
                line = self._conn.read_response()
                if isinstance(line, bytes) and self.needle in line and b" lua] " not in line:
                    self.seen += 1
        except (redis.RedisError, OSError, ValueError):
            return

    def close(self) -> None:
        self._conn.disconnect()


@pytest.fixture
def admit_monitor(private_redis: RedisServer) -> Iterator[Monitor]:
    """Counts the admissions (EVALSHA of admit.lua) the server executes."""
    monitor = Monitor(private_redis.port, script("admit").sha)
    yield monitor
    monitor.close()


@contextlib.contextmanager
def worker_losing_admit_replies(app: Celery, proxy: TcpProxy) -> Iterator[None]:
    """An embedded worker for ``app`` whose admissions' replies are lost until
    ``proxy.resume()`` (resumed on the way out in any case)."""
    try:
        with start_worker(app, pool="threads", concurrency=1, perform_ping_check=False):
            proxy.lose_replies(script("admit").sha.encode())
            yield
    finally:
        proxy.resume()


@pytest.fixture
def worker_app(
    private_redis: RedisServer, proxy: TcpProxy, redis_server: RedisServer, database_url: str
) -> Iterator[tuple[Celery, KeySpace]]:
    """An app whose guard state goes through the proxy (0.5 s socket timeout); broker direct."""
    prefix = f"al{secrets.token_hex(3)}"
    app = Celery(prefix, broker=f"{redis_server.url}/7", backend=f"{redis_server.url}/8",
                 set_as_current=False)
    app.conf.update(
        reliable_redis_url=f"redis://127.0.0.1:{proxy.port}/0",
        reliable_redis_socket_timeout=0.5,
        reliable_database_url=database_url,
        reliable_key_prefix=prefix,
        task_default_queue=f"q-{prefix}",
        broker_connection_retry_on_startup=True,
        task_acks_late=True,
    )
    direct = redis.Redis(port=private_redis.port)
    for name in ("admit", "complete", "rollback", "renew"):
        direct.script_load(script(name).source)  # no NOSCRIPT round: one EVALSHA per attempt
    yield app, KeySpace(prefix)
    direct.close()
    app.close()


def test_lost_admission_reply_leaves_nothing_and_defers(
    worker_app: tuple[Celery, KeySpace], proxy: TcpProxy, private_redis: RedisServer,
    admit_monitor: Monitor,
) -> None:
    """The reply is lost after admission took everything: all undone, deferred, runs once."""
    app, keys = worker_app
    ran: list[str] = []

    @reliable_task(app, name="t.guarded",
                   lock="acct:{n}", idempotency_key="pay:{n}", bulkhead="critical",
                   rate_limit_key="k:{n}", rate_limit_key_spec={"rate": 1 / 3600, "burst": 10},
                   max_redeliveries=2, defer_delay=4.0, defer_max_delay=4.0)
    def guarded(self: Any, n: int) -> int:
        ran.append(self.request.id)
        return int(self.request.get("reliable_deferrals") or 0)

    direct = redis.Redis(port=private_redis.port)
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("celery_reliable")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        with worker_losing_admit_replies(app, proxy):
            result = guarded.delay(1)
            wait_for(lambda: admit_monitor.seen >= 1, 20, "the admission to run on the server")
            wait_for(lambda: result.state == "RETRY", 20, "the deferral")
            # deferred because Redis failed, not "lock busy" behind its own lock
            assert any("deferred" in m and "Redis unavailable" in m for m in messages)
            # Deferred 2-4 s: nothing of that admission is left meanwhile.
            assert direct.exists(keys.lock("acct:1")) == 0
            assert direct.exists(keys.idempotency("t.guarded", "pay:1")) == 0
            assert direct.zcard(keys.bulkhead("critical")[0]) == 0
            assert direct.scard(keys.deliveries(result.id)) == 0
            # Its bucket token stays taken: it errs toward admitting fewer.
            assert float(direct.hget(keys.key_bucket("k:1"), "t") or 0) < 10
            assert ran == []
            proxy.resume()
            deferrals = result.get(timeout=60)
            assert ran == [result.id]
            assert deferrals >= 1
            assert admit_monitor.seen == deferrals + 1  # one admission per delivery, never resent
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        direct.close()


def test_five_lost_replies_do_not_dead_letter(
    worker_app: tuple[Celery, KeySpace], proxy: TcpProxy, private_redis: RedisServer,
    admit_monitor: Monitor,
) -> None:
    """Five admissions in a row lose their reply; max_redeliveries=2; it still runs, once."""
    app, keys = worker_app
    ran: list[str] = []

    @reliable_task(app, name="t.counted", max_redeliveries=2, defer_delay=0.1, defer_max_delay=0.2)
    def counted(self: Any) -> str:
        ran.append(self.request.id)
        return "ok"

    with worker_losing_admit_replies(app, proxy):
        result = counted.delay()
        wait_for(lambda: admit_monitor.seen >= 5, 90, "five admissions with lost replies")
        proxy.resume()
        assert result.get(timeout=60) == "ok"
        assert ran == [result.id]
        assert not redis.Redis(port=private_redis.port).exists(keys.deliveries(result.id))
