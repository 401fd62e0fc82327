"""The Celery app run by ``celery worker`` subprocesses in the fleet tests.

Configured from FLEET_* environment variables (set by the ``fleet`` fixture),
so each test has its own broker DB, queue and key prefix.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa
from celery import Celery, signals
from sqlalchemy.dialects.postgresql import insert

from celery_reliable import Backoff, RedisFence, ReliableTask, StaleFenceToken, check_postgres

accounts = sa.Table(
    "fleet_accounts",
    sa.MetaData(),
    sa.Column("account", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("token", sa.BigInteger, nullable=False),
)


effects = sa.Table(
    "fleet_effects",
    accounts.metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("order_id", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
)


def env(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def build_app() -> Celery:
    app = Celery(
        "fleet",
        broker=env("FLEET_BROKER_URL", "memory://"),
        backend=env("FLEET_RESULT_URL", "cache+memory://"),
    )
    app.conf.update(
        reliable_redis_url=env("FLEET_REDIS_URL", "redis://127.0.0.1:6379/0"),
        reliable_database_url=env("FLEET_DATABASE_URL") or None,
        reliable_key_prefix=env("FLEET_PREFIX", "fleet"),
        task_default_queue=env("FLEET_QUEUE", "fleet"),
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        result_expires=600,
        reliable_bulkheads={"tier3": {"concurrent": 3, "queue": 1000, "timeout": 300, "lease": 3}},
    )
    app.conf.reliable_circuit_breakers = {
        "partner": {
            "failure_threshold": 2,
            "window": 4,
            "min_calls": 2,
            "open_seconds": 2.0,
            "success_threshold": 1,
            "half_open_max": 1,
        }
    }
    if env("FLEET_RATE"):
        app.conf.reliable_queue_rate_limits = {env("FLEET_QUEUE", "fleet"): env("FLEET_RATE")}
    if env("FLEET_WINDOW"):
        app.conf.reliable_queue_window_limits = {env("FLEET_QUEUE", "fleet"): env("FLEET_WINDOW")}
    register(app)
    return app


_engines: dict[tuple[int, str], sa.Engine] = {}


def engine() -> sa.Engine:
    key = (os.getpid(), env("FLEET_DATABASE_URL"))
    if key not in _engines:
        _engines[key] = sa.create_engine(key[1].replace("postgresql://", "postgresql+psycopg://"))
    return _engines[key]


def client() -> redis.Redis:
    return redis.Redis.from_url(env("FLEET_REDIS_URL"))


def rkey(*parts: Any) -> str:
    return ":".join([env("FLEET_PREFIX"), "test", *map(str, parts)])


def register(app: Celery) -> None:
    def reliable(name: str, **options: Any) -> Any:
        """``app.task`` for a bound ReliableTask of this app only, named ``name``."""
        return app.task(base=ReliableTask, bind=True, shared=False, name=name, **options)

    @reliable(name="fleet.exclusive", lock="excl:{key}", lock_ttl=10, defer_delay=0.05,
              defer_max_delay=0.3)
    def exclusive(self: ReliableTask, key: str, hold: float) -> int:
        start = time.time()
        time.sleep(hold)
        end = time.time()
        client().rpush(
            rkey("records", key),
            json.dumps(
                {
                    "token": self.fence_token,
                    "start": start,
                    "end": end,
                    "pid": os.getpid(),
                    "id": self.request.id,
                }
            ),
        )
        return self.fence_token

    @reliable(name="fleet.long_holder", lock="long:{key}", lock_ttl=60,
              idempotency_key="long:{key}", idempotency_lease=60)
    def long_holder(self: ReliableTask, key: str, hold: float) -> None:
        # Holds its lock for ``hold`` seconds (revoke tests).
        client().set(rkey("pid", key), os.getpid())
        time.sleep(hold)

    # acks_late: the paused holder keeps its prefetch slot
    @reliable(name="fleet.fenced_writer", lock="acct:{account}", lock_ttl=2, acks_late=True)
    def fenced_writer(self: ReliableTask, account: str, label: str) -> dict[str, Any]:
        r = client()
        r.set(rkey("pid", label), os.getpid())
        r.set(rkey("token", label), self.fence_token)
        deadline = time.monotonic() + 60
        while not r.exists(rkey("gate", label)) and time.monotonic() < deadline:
            time.sleep(0.02)
        outcome: dict[str, Any] = {"label": label, "token": self.fence_token}
        # The resource-side checks alone (not self.fence, which would also
        # refuse on a lost lease): the resource itself must reject A.
        try:
            RedisFence(r).set(rkey("acct", account), label, self.fence_token)
            outcome["redis"] = "written"
        except StaleFenceToken as exc:
            outcome["redis"] = f"stale:{exc.current}"
        try:
            with engine().begin() as conn:
                check_postgres(conn, f"acct:{account}", self.fence_token)
                conn.execute(
                    insert(accounts)
                    .values(account=account, value=label, token=self.fence_token)
                    .on_conflict_do_update(
                        index_elements=[accounts.c.account],
                        set_={"value": label, "token": self.fence_token},
                    )
                )
            outcome["postgres"] = "written"
        except StaleFenceToken as exc:
            outcome["postgres"] = f"stale:{exc.current}"
        outcome["lock_lost"] = self.lock_lost
        r.set(rkey("outcome", label), json.dumps(outcome))
        return outcome

    @reliable(name="fleet.crashy", lock="crash:{key}", lock_ttl=3, acks_late=True,
              reject_on_worker_lost=True, defer_delay=0.2, defer_max_delay=1.0)
    def crashy(self: ReliableTask, key: str) -> str:
        r = client()
        r.rpush(
            rkey("attempts", key),
            json.dumps(
                {
                    "pid": os.getpid(),
                    "token": self.fence_token,
                    "at": time.time(),
                    "retries": self.request.retries,
                }
            ),
        )
        if r.set(rkey("first", key), 1, nx=True):
            time.sleep(60)  # the test kills this process meanwhile
        return "done"

    @reliable(name="fleet.charge", idempotency_key="charge:{order_id}", defer_delay=0.05,
              defer_max_delay=0.3)
    def charge(self: ReliableTask, order_id: str, amount: int) -> dict[str, Any]:
        with self.idempotent_transaction() as session:
            session.execute(sa.insert(effects).values(order_id=order_id, pid=os.getpid()))
        time.sleep(0.2)
        return {"order": order_id, "amount": amount, "pid": os.getpid(), "at": time.time()}

    @reliable(name="fleet.charge_slow", acks_late=True, reject_on_worker_lost=True,
              idempotency_key="slow:{order_id}", idempotency_lease=2, defer_delay=0.2,
              defer_max_delay=1.0)
    def charge_slow(self: ReliableTask, order_id: str, transactional: bool) -> str:
        r = client()
        r.rpush(rkey("attempts", order_id), json.dumps({"pid": os.getpid()}))
        if transactional:
            with self.idempotent_transaction() as session:
                session.execute(sa.insert(effects).values(order_id=order_id, pid=os.getpid()))
        else:  # the effect commits on its own: at-least-once across a crash
            with engine().begin() as conn:
                conn.execute(sa.insert(effects).values(order_id=order_id, pid=os.getpid()))
        if r.set(rkey("first", order_id), 1, nx=True):
            time.sleep(60)  # the test kills this process meanwhile
        return "done"

    @reliable(name="fleet.tick", ignore_result=True, defer_delay=0.25, defer_max_delay=2.0)
    def tick(self: ReliableTask) -> None:
        client().rpush(rkey("ticks"), time.time())

    @app.task(
        shared=False,
        name="fleet.plain_tick",
        ignore_result=True,
        rate_limit=env("FLEET_RATE") or None,
    )
    def plain_tick() -> None:
        client().rpush(rkey("plain_ticks"), time.time())

    @reliable(name="fleet.bulk", bulkhead="tier3", defer_delay=0.1, defer_max_delay=0.5)
    def bulk(self: ReliableTask, hold: float) -> int:
        r = client()
        now = r.eval(_ENTER, 2, rkey("active"), rkey("max_active"))
        r.hset(rkey("holders"), self.request.id, os.getpid())
        try:
            time.sleep(hold)
        finally:
            r.hdel(rkey("holders"), self.request.id)
            r.decr(rkey("active"))
        r.rpush(rkey("bulk_starts"), json.dumps({"at": time.time() - hold, "pid": os.getpid()}))
        return int(now)

    @reliable(name="fleet.suicide", acks_late=True, reject_on_worker_lost=True, max_redeliveries=2,
              defer_delay=0.1)
    def suicide(self: ReliableTask, key: str) -> None:
        client().rpush(rkey("suicide", key), os.getpid())
        os.kill(os.getpid(), signal.SIGKILL)  # out of memory, a segfault: the worker is lost

    @reliable(name="fleet.flaky", backoff=Backoff.exponential(0.05, 0.2, max_attempts=6))
    def flaky(self: ReliableTask, key: str, k: int) -> dict[str, Any]:
        r = client()
        r.rpush(rkey("flaky", key), os.getpid())
        if r.incr(rkey("flaky-n", key)) <= k:
            raise ConnectionError("partner reset the connection")
        return {
            "retries": self.request.retries,
            "pids": [int(p) for p in r.lrange(rkey("flaky", key), 0, -1)],
        }

    @reliable(name="fleet.partner", circuit_breaker="partner", defer_delay=0.2, defer_max_delay=0.5)
    def partner(self: ReliableTask, mode: str) -> dict[str, Any]:
        client().rpush(
            rkey("partner"),
            json.dumps({"mode": mode, "at": time.time(), "host": self.request.hostname}),
        )
        if mode == "down":
            raise ConnectionError("partner unreachable")
        return {"host": self.request.hostname}


# count concurrent executions and keep the maximum, atomically
_ENTER = """
local v = redis.call('INCR', KEYS[1])
if v > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], v) end
return v
"""

app = build_app()


@signals.worker_ready.connect
def _ready(sender: Any = None, **_: Any) -> None:
    ready_dir = env("FLEET_READY_DIR")
    if ready_dir and sender is not None:
        name = str(sender.hostname).split("@", 1)[0]
        Path(ready_dir, f"ready-{name}").touch()
