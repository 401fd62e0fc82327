"""A lost admission reply: never resent, undone by owner, deferred, never counted as lost."""

from __future__ import annotations

import logging
import secrets
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from celery_reliable import ConfigurationError, FencedLock, ReliableTask
from celery_reliable.admission import Admitted, Plan, Poison
from celery_reliable.breaker import BreakerSpec
from celery_reliable.bulkhead import TierSpec
from celery_reliable.keys import KeySpace
from celery_reliable.ratelimit import BucketSpec
from celery_reliable.runtime import Runtime
from celery_reliable.scripts import _channel, script

from .conftest import RedisServer, TcpProxy, free_port, wait_for


def evalsha_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats").get("cmdstat_evalsha")
    return int(stats["calls"]) if stats else 0


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
        direct.config_resetstat()
        proxy.lose_replies(script(name).sha.encode())
        try:
            with pytest.raises(redis.TimeoutError):
                call()
        finally:
            proxy.resume()
        return evalsha_calls(direct)

    def admit() -> Any:
        plan = Plan()
        plan.add_lock(keys, f"r{secrets.token_hex(2)}", secrets.token_hex(4), 30)
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
    port = free_port()
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
        plan.add_lock(KeySpace("cl"), "res", "owner", 30)
        direct.config_resetstat()
        proxy.lose_replies(script("admit").sha.encode())
        try:
            with pytest.raises(redis.RedisError):
                plan.admit(cluster)
        finally:
            proxy.resume()
        assert evalsha_calls(direct) == 1
        assert plan.rollback(cluster) == [1]  # it ran: its lock is undone
    finally:
        if cluster is not None:
            cluster.close()
        direct.close()
        server.kill()
        server.wait(10)
        proxy.stop()


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
    plan.add_lock(KeySpace("rb"), "r", "owner", 30)
    direct.config_resetstat()
    proxy.lose_replies(script("rollback").sha.encode())
    try:
        with pytest.raises(redis.TimeoutError):
            plan.rollback(client)
    finally:
        proxy.resume()
    assert evalsha_calls(direct) == 3
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
        p.add_deliveries(deliveries, 3, 3600, owner)
        p.add_idempotency(keys.idempotency("t", "k"), "fp", owner, 30, 3600)
        p.add_lock(keys, "res", owner, 30)
        p.add_bulkhead(keys, "tier", tier, owner, "waiter")
        p.add_breaker(keys.breaker("b"), breaker, owner)
        p.add_bucket(keys.key_bucket("k"), bucket, 1)
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
    p.add_idempotency(record, "fp", "task-1/cccc", 30, 3600)
    assert p.rollback(redis_client) == [0] and redis_client.hget(record, "s") == b"S"


def test_an_older_delivery_counter_is_kept(redis_client: redis.Redis, prefix: str) -> None:
    """A counter left by an older version keeps its count; rollback leaves it alone."""
    key = KeySpace(prefix).deliveries("old")
    redis_client.set(key, 2)
    p = Plan()
    p.add_deliveries(key, 2, 3600, "old/1")
    assert p.rollback(redis_client) == [0] and redis_client.get(key) == b"2"
    result = p.admit(redis_client)
    assert isinstance(result, Admitted) and result.results == (3,)
    assert redis_client.scard(key) == 3
    p2 = Plan()
    p2.add_deliveries(key, 2, 3600, "old/2")
    assert isinstance(p2.admit(redis_client), Poison)


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
    worker_app: tuple[Celery, KeySpace], proxy: TcpProxy, private_redis: RedisServer
) -> None:
    """The reply is lost after admission took everything: all undone, deferred, runs once."""
    app, keys = worker_app
    ran: list[str] = []

    @app.task(base=ReliableTask, bind=True, shared=False, name="t.guarded",
              lock="acct:{n}", idempotency_key="pay:{n}", bulkhead="critical",
              rate_limit_key="k:{n}", rate_limit_key_spec={"rate": 1 / 3600, "burst": 10},
              max_redeliveries=2, defer_delay=4.0, defer_max_delay=4.0)
    def guarded(self: Any, n: int) -> int:
        ran.append(self.request.id)
        return int(self.request.get("reliable_deferrals") or 0)

    direct = redis.Redis(port=private_redis.port)
    monitor = Monitor(private_redis.port, script("admit").sha)
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("celery_reliable")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        with start_worker(app, pool="threads", concurrency=1, perform_ping_check=False):
            proxy.lose_replies(script("admit").sha.encode())
            result = guarded.delay(1)
            wait_for(lambda: monitor.seen >= 1, 20, "the admission to run on the server")
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
            assert monitor.seen == deferrals + 1  # one admission per delivery, never resent
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        proxy.resume()
        monitor.close()
        direct.close()


def test_five_lost_replies_do_not_dead_letter(
    worker_app: tuple[Celery, KeySpace], proxy: TcpProxy, private_redis: RedisServer
) -> None:
    """Five admissions in a row lose their reply; max_redeliveries=2; it still runs, once."""
    app, keys = worker_app
    ran: list[str] = []

    @app.task(base=ReliableTask, bind=True, shared=False, name="t.counted",
              max_redeliveries=2, defer_delay=0.1, defer_max_delay=0.2)
    def counted(self: Any) -> str:
        ran.append(self.request.id)
        return "ok"

    monitor = Monitor(private_redis.port, script("admit").sha)
    try:
        with start_worker(app, pool="threads", concurrency=1, perform_ping_check=False):
            proxy.lose_replies(script("admit").sha.encode())
            result = counted.delay()
            wait_for(lambda: monitor.seen >= 5, 90, "five admissions with lost replies")
            proxy.resume()
            assert result.get(timeout=60) == "ok"
            assert ran == [result.id]
            assert not redis.Redis(port=private_redis.port).exists(keys.deliveries(result.id))
    finally:
        proxy.resume()
        monitor.close()
