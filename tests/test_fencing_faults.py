"""Fencing under the faults it exists for: Redis state loss, failover, two holders, old tables.

Each Redis test runs its own ``redis-server`` processes (RDB snapshots, a replica) and
kills them by PID. Tokens are minted both by ``FencedLock`` and by a task's admission
(``ReliableTask`` with ``lock=``, run through ``.apply()``), on the same resource.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from celery import Celery

from celery_reliable import (
    ConfigurationError,
    FencedLock,
    RedisFence,
    StaleFenceToken,
    SupersededWrite,
    check_postgres,
)
from celery_reliable.runtime import runtime_for
from celery_reliable.schema import create_tables
from celery_reliable.scripts import script

from .conftest import LateProxy, RedisServer, create_tables_at_once, reliable_task, wait_for

RESOURCE = "order:7"


class Minter:
    """Mints tokens for RESOURCE on one Redis server, alternating a FencedLock and a task."""

    def __init__(self, url: str, prefix: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.prefix = prefix
        self.app = Celery("fence-faults", broker="memory://", set_as_current=False)
        self.app.conf.reliable_redis_url = url
        self.app.conf.reliable_key_prefix = prefix

        @reliable_task(self.app, name="ff.locked", lock="order:{n}")
        def locked(self: Any, n: int) -> int:
            return int(self.fence_token)

        self.task = locked

    def lock(self) -> int:
        lock = FencedLock(self.client, RESOURCE, ttl=30, prefix=self.prefix)
        token = lock.acquire()
        assert token is not None and lock.release()
        return token

    def run_task(self) -> int:
        return int(self.task.apply(args=(7,)).get())

    def mint(self, n: int) -> list[int]:
        return [self.lock() if i % 2 else self.run_task() for i in range(n)]

    def close(self) -> None:
        runtime_for(self.app).close()
        self.client.close()


@pytest.fixture
def minters() -> Iterator[Callable[[str, str], Minter]]:
    made: list[Minter] = []

    def make(url: str, prefix: str) -> Minter:
        made.append(Minter(url, prefix))
        return made[-1]

    yield make
    for m in made:
        m.close()


def assert_increasing(tokens: list[int]) -> None:
    assert all(a < b for a, b in pairwise(tokens)), tokens


def test_tokens_never_repeat_after_a_restart_from_a_snapshot(
    private_redis: RedisServer, minters: Callable[[str, str], Minter], prefix: str
) -> None:
    """3 tokens, SAVE, 3 tokens, kill -9 + reload the snapshot: the next exceed all 6."""
    minter = minters(private_redis.url, prefix)
    before = minter.mint(3)
    minter.client.save()
    before += minter.mint(3)
    assert_increasing(before)
    private_redis.restart()  # the counter comes back as it was at SAVE: 3 tokens old
    after = minter.mint(4)
    assert min(after) > max(before), (before, after)
    assert_increasing(after)
    private_redis.restart(empty=True)  # no snapshot at all: the counter is gone
    again = minter.mint(4)
    assert min(again) > max(after), (after, again)
    assert_increasing(again)


def test_tokens_never_repeat_after_failover_to_a_lagging_replica(
    private_redis: RedisServer, minters: Callable[[str, str], Minter], prefix: str,
    tmp_path: Path,
) -> None:
    """Promote a replica that missed the last tokens: it mints above every earlier one."""
    (tmp_path / "replica").mkdir()
    replica = RedisServer(tmp_path / "replica")
    replica.start()
    try:
        primary_m = minters(private_redis.url, prefix)
        replica_m = minters(replica.url, prefix)
        replica_m.client.replicaof("127.0.0.1", private_redis.port)
        before = primary_m.mint(3)
        fence_key = f"{{{prefix}}}:fence:"
        counter = next(k for k in primary_m.client.scan_iter(match=fence_key + "*"))

        def synced() -> bool:
            info = replica_m.client.info("replication")
            return bool(info.get("master_link_status") == "up"
                        and replica_m.client.get(counter) == primary_m.client.get(counter))

        wait_for(synced, 30, "the replica to sync")
        replica_m.client.replicaof("NO", "ONE")  # cut and promote: it lags from now on
        before += primary_m.mint(3)  # never reach the replica
        assert replica_m.client.get(counter) != primary_m.client.get(counter)
        assert_increasing(before)
        after = replica_m.mint(4)  # the clients fail over to the promoted replica
        assert min(after) > max(before), (before, after)
        assert_increasing(after)
    finally:
        replica.kill()


def test_equal_token_is_accepted_only_from_the_same_holder_in_postgres(
    engine: sa.Engine, prefix: str
) -> None:
    """check_postgres: same token + same holder twice = accepted; other/unknown holder = stale."""
    resource = f"{prefix}:acct"
    with engine.begin() as conn:
        check_postgres(conn, resource, 10, holder="a")
    with engine.begin() as conn:
        check_postgres(conn, resource, 10, holder="a")  # the same holder writes again
    for other in ("b", None):
        with pytest.raises(StaleFenceToken) as info, engine.begin() as conn:
            check_postgres(conn, resource, 10, holder=other)
        assert info.value.current == 10
    with pytest.raises(StaleFenceToken), engine.begin() as conn:
        check_postgres(conn, resource, 9, holder="a")
    with engine.begin() as conn:
        check_postgres(conn, resource, 11)  # higher: accepted without a holder
    with pytest.raises(StaleFenceToken), engine.begin() as conn:
        check_postgres(conn, resource, 11)  # ... but an unknown holder never matches
    with engine.connect() as conn:
        row = conn.execute(sa.text("select token, holder from reliable_fences where resource = :r"),
                           {"r": resource}).one()
    assert tuple(row) == (11, None)


def test_equal_token_is_accepted_only_from_the_same_holder_in_redis(
    redis_client: redis.Redis, prefix: str
) -> None:
    """RedisFence: same token + same holder twice = written; other/unknown holder = stale."""
    fence = RedisFence(redis_client)
    key = f"{prefix}:value"
    fence.set(key, "a1", 10, holder="a")
    fence.set(key, "a2", 10, holder="a")
    for other in ("b", None):
        with pytest.raises(StaleFenceToken) as info:
            fence.set(key, "other", 10, holder=other)
        assert info.value.current == 10
    with pytest.raises(StaleFenceToken):
        fence.set(key, "lower", 9, holder="a")
    assert fence.get(key) == (b"a2", 10)
    fence.set(key, "anon", 11)
    with pytest.raises(StaleFenceToken):
        fence.set(key, "anon again", 11)
    assert fence.get(key) == (b"anon", 11)


def test_task_and_fenced_lock_holders_write_twice_and_an_equal_token_of_another_fails(
    redis_url: str, engine: sa.Engine, minters: Callable[[str, str], Minter], prefix: str
) -> None:
    """self.fence and a FencedLock pass their holder: each may write twice; a second
    acquisition carrying the same token (what a state loss made before minting used
    the clock) is refused by both fences."""
    minter = minters(redis_url, prefix)
    resource = f"{prefix}:{RESOURCE}"
    rkey = f"{prefix}:value"
    outcomes: list[str] = []

    @reliable_task(minter.app, name="ff.writer", lock="order:{n}")
    def writer(self: Any, n: int) -> int:
        for attempt in range(2):  # a task may write twice under one acquisition
            with engine.begin() as conn:
                self.fence.check_postgres(conn, resource)
            self.fence.redis_set(minter.client, rkey, f"task{attempt}")
            outcomes.append("written")
        return int(self.fence_token)

    token = writer.apply(args=(7,)).get()
    assert outcomes == ["written", "written"]
    for other in ("another acquisition", None):
        with pytest.raises(StaleFenceToken), engine.begin() as conn:
            check_postgres(conn, resource, token, holder=other)
        with pytest.raises(StaleFenceToken):
            RedisFence(minter.client).set(rkey, "other", token, holder=other)
    assert RedisFence(minter.client).get(rkey) == (b"task1", token)

    lock = FencedLock(minter.client, RESOURCE, prefix=prefix)
    lock_token = lock.acquire()
    assert lock_token is not None and lock_token > token and lock.holder is not None
    for attempt in range(2):
        with engine.begin() as conn:
            check_postgres(conn, resource, lock_token, holder=lock.holder)
        RedisFence(minter.client).set(rkey, f"lock{attempt}", lock_token, holder=lock.holder)
    with pytest.raises(StaleFenceToken), engine.begin() as conn:
        check_postgres(conn, resource, lock_token, holder="another acquisition")
    with pytest.raises(StaleFenceToken):
        RedisFence(minter.client).set(rkey, "other", lock_token)
    assert lock.release()
    assert RedisFence(minter.client).get(rkey) == (b"lock1", lock_token)


def test_a_holders_writes_are_ordered_by_their_write_number(
    redis_client: redis.Redis, prefix: str
) -> None:
    """RedisFence, one holder and token: a higher seq writes, the same seq is a no-op, a lower
    one raises SupersededWrite; seqs do not matter across tokens or without a holder."""
    fence = RedisFence(redis_client)
    key = f"{prefix}:seq"
    fence.set(key, "a1", 10, holder="a", seq=1)
    fence.set(key, "a3", 10, holder="a", seq=3)
    with pytest.raises(SupersededWrite) as info:
        fence.set(key, "a2 late", 10, holder="a", seq=2)  # issued before a3, arrived after
    assert (info.value.seq, info.value.current_seq, info.value.current) == (2, 3, 10)
    assert isinstance(info.value, StaleFenceToken)  # existing handlers still catch it
    fence.set(key, "a3", 10, holder="a", seq=3)  # a resend of a3 (or its delayed first copy)
    with pytest.raises(SupersededWrite) as twin:  # another write drew number 3: refused, loud
        fence.set(key, "a3 by another process", 10, holder="a", seq=3)
    assert (twin.value.seq, twin.value.current_seq) == (3, 3)
    assert redis_client.hmget(key, ["v", "t", "h", "s"]) == [b"a3", b"10", b"a", b"3"]
    with pytest.raises(StaleFenceToken) as stale:  # another holder: its seq does not help
        fence.set(key, "b", 10, holder="b", seq=99)
    assert not isinstance(stale.value, SupersededWrite)
    fence.set(key, "b", 11, holder="b", seq=1)  # a higher token starts the holder's count
    with pytest.raises(StaleFenceToken):
        fence.set(key, "a4", 10, holder="a", seq=4)  # the old token, however new the seq
    assert fence.get(key) == (b"b", 11)
    fence.set(key, "anon", 12)  # holder=None: a holder per call, numbered by the process
    with pytest.raises(StaleFenceToken) as anon:
        fence.set(key, "anon again", 12)
    assert not isinstance(anon.value, SupersededWrite)
    assert redis_client.hmget(key, ["v", "t"]) == [b"anon", b"12"]
    for bad in (0, -1, 2**53, True, 1.5):
        with pytest.raises(ValueError):
            fence.set(key, "x", 13, holder="a", seq=bad)  # type: ignore[arg-type]
    # the default numbers a holder's calls in the order this process issues them
    for n in range(3):
        fence.set(key, f"c{n}", 14, holder="c")
    assert fence.get(key) == (b"c2", 14)


def _write_in_child(url: str, key: str, value: str, token: int, holder: str) -> int:
    """Fork; the child writes ``value`` through RedisFence.set (default seq) and exits.

    Returns the child's exit code: 0 the write returned (accepted), 1 it raised
    StaleFenceToken/SupersededWrite, 2 anything else.
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 2
        try:
            client = redis.Redis.from_url(url)
            try:
                RedisFence(client).set(key, value, token, holder=holder)
                code = 0
            except StaleFenceToken:
                code = 1
            finally:
                client.close()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_forked_writers_of_one_holder_never_lose_a_write_silently(redis_url: str,
                                                                 prefix: str) -> None:
    """Forked children of one holder write in turn: each write is applied, none acked and dropped.

    A body that holds a FencedLock and fans its writes out to a fork-started
    ``multiprocessing`` pool: every child starts from the parent's copy of the
    write-number state. With a plain counter two children drew the same ``seq``
    and fenced_set.lua took the second write for a resend of the first
    (success returned, value unchanged). Now numbers follow the host's
    monotonic clock, so each child's write, issued after the previous one
    finished, is newer and applied, and so is the parent's write after them.
    """
    client = redis.Redis.from_url(redis_url)
    lock = FencedLock(client, f"{prefix}:res", prefix=prefix, ttl=30)
    token = lock.acquire()
    assert token is not None and lock.holder is not None
    key = f"{prefix}:fenced"
    fence = RedisFence(client)
    try:
        fence.set(key, "parent before", token, holder=lock.holder)
        for child in ("first child", "second child", "third child"):
            assert _write_in_child(redis_url, key, child, token, lock.holder) == 0, child
            value, _ = fence.get(key)
            assert value == child.encode(), (
                f"{child}'s write returned success but the value is {value!r}")
        fence.set(key, "parent after", token, holder=lock.holder)  # later: not superseded
        assert fence.get(key) == (b"parent after", token)
    finally:
        lock.release()
        client.delete(key)
        client.close()


def test_late_copy_of_a_tasks_first_fenced_write_is_refused(
    redis_url: str, minters: Callable[[str, str], Minter], prefix: str
) -> None:
    """self.fence numbers one execution's writes across fence objects: a replayed copy of its
    first write is refused once its second landed, and a copy of the second changes nothing."""
    minter = minters(redis_url, prefix)
    rkey = f"{prefix}:task-value"
    fields: list[list[Any]] = []

    @reliable_task(minter.app, name="ff.seq", lock="seq:{n}")
    def writer(self: Any, n: int) -> int:
        for attempt in range(2):  # a fresh Fence each time: the numbering is not per object
            self.fence.redis_set(minter.client, rkey, f"w{attempt}")
            fields.append(minter.client.hmget(rkey, ["t", "h", "s"]))
        return int(self.fence_token)

    token = writer.apply(args=(1,)).get()
    (t1, h1, s1), (t2, h2, s2) = fields
    assert t1 == t2 == str(token).encode() and h1 == h2 and int(s1) < int(s2)
    fenced_set = script("fenced_set")
    # the first write's request again, as a delayed copy of it would arrive
    status, current, current_seq = fenced_set(minter.client, [rkey], [token, "w0", h1, int(s1)])
    assert (int(status), int(current), int(current_seq)) == (-1, token, int(s2))
    status, _, _ = fenced_set(minter.client, [rkey], [token, "w1", h2, int(s2)])
    assert int(status) == 1  # the same write again: accepted, nothing changed
    assert minter.client.hmget(rkey, ["v", "s"]) == [b"w1", s2]


def test_late_duplicate_of_a_fenced_write_does_not_undo_a_later_write(
    private_redis: RedisServer, late_proxy: LateProxy
) -> None:
    """A delayed first copy of a holder's resent write never undoes that holder's later write.

    ``fenced_set`` is resent once after a timeout (the script channel; redis-py's
    ``retry`` on the pool path), and the first copy, delayed in the network,
    still arrives. Landing after the holder's next write (v2), the stale copy
    of v1 is refused (its write number is lower), so v2 stands; landing before
    the next write (v3), it is the same write again and changes nothing, and
    the holder's next write (v4) is accepted.
    """
    direct = redis.Redis(port=private_redis.port)
    direct.script_load(script("fenced_set").source)
    client = redis.Redis(port=late_proxy.port, socket_timeout=0.5)
    client.ping()
    key, token, holder = f"late:{secrets.token_hex(3)}", 1_000_000, "task-1/abcd"
    fence = RedisFence(client)
    late_proxy.hold(b"status-v1")
    fence.set(key, "status-v1", token, holder=holder)  # timed out, resent on a new connection
    fence.set(key, "status-v2", token, holder=holder)  # the holder moves on
    assert direct.hget(key, "v") == b"status-v2"
    seq_v2 = direct.hget(key, "s")
    late_proxy.release()  # the first copy of "v1" gets through at last
    assert late_proxy.delivered.wait(10)
    assert direct.hmget(key, ["v", "s"]) == [b"status-v2", seq_v2], \
        "a stale copy of an earlier write won"

    late_proxy.hold(b"status-v3")
    fence.set(key, "status-v3", token, holder=holder)  # timed out, resent: written once
    seq_v3 = direct.hget(key, "s")
    late_proxy.release()  # its first copy lands before the holder's next write
    assert late_proxy.delivered.wait(10)
    assert direct.hmget(key, ["v", "s"]) == [b"status-v3", seq_v3]
    fence.set(key, "status-v4", token, holder=holder)
    assert direct.hget(key, "v") == b"status-v4"
    client.close()
    direct.close()


OLD_FENCES = """
CREATE TABLE reliable_fences (
    resource text PRIMARY KEY,
    token bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
)
"""


@pytest.fixture
def old_schema_engine(schema_engine: sa.Engine) -> sa.Engine:
    """An engine whose search_path is a schema of this test's own holding an OLD-shape
    reliable_fences (as created by celery-reliable before the holder column), with a row."""
    with schema_engine.begin() as conn:
        conn.execute(sa.text(OLD_FENCES))
        conn.execute(sa.text("INSERT INTO reliable_fences (resource, token) VALUES ('r', 5)"))
    return schema_engine


def test_create_tables_upgrades_an_old_fences_table(old_schema_engine: sa.Engine) -> None:
    """create_tables adds the holder column to an existing table, also from 4 threads at once;
    the rows survive and the new rule applies to them."""
    with pytest.raises(ConfigurationError, match="reliable migrate"), \
            old_schema_engine.begin() as conn:
        check_postgres(conn, "r", 6, holder="h")  # before: a clear message, not SQL
    assert create_tables_at_once(old_schema_engine) == []
    create_tables(old_schema_engine)  # and again: idempotent
    with old_schema_engine.connect() as conn:
        columns = [c["name"] for c in sa.inspect(conn).get_columns("reliable_fences")]
    assert columns.count("holder") == 1
    with pytest.raises(StaleFenceToken), old_schema_engine.begin() as conn:
        check_postgres(conn, "r", 5, holder="h")  # the old row's holder is unknown
    for _ in range(2):
        with old_schema_engine.begin() as conn:
            check_postgres(conn, "r", 6, holder="h")
    with old_schema_engine.connect() as conn:
        row = conn.execute(sa.text("SELECT token, holder FROM reliable_fences")).one()
    assert tuple(row) == (6, "h")
