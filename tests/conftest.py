"""Shared fixtures: a throwaway Redis server, a throwaway PostgreSQL database, workers.

Nothing here touches data the tests did not create: Redis is a private
``redis-server`` on a free port (so tests may flush it), and PostgreSQL is a
database created for this run and dropped at the end.
"""

from __future__ import annotations

import contextlib
import os
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
from typing import Any

import pytest
import redis
import sqlalchemy as sa

# One proxy and one free_port for the tests and the fault campaign (re-exported: tests import
# both from here).
from faults.cluster import TcpProxy as TcpProxy
from faults.cluster import free_port as free_port

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get(
    "RELIABLE_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def _missing(what: str) -> None:
    """Skip locally, fail in CI: a missing server is a broken CI machine."""
    if os.environ.get("CI"):
        pytest.fail(what)
    pytest.skip(what)


class RedisServer:
    """A private redis-server process on a free port."""

    def __init__(self, tmp: Path, *, save: bool = False, port: int | None = None) -> None:
        self.port = port or free_port()
        self.tmp = tmp
        self.save = save  # keep an RDB snapshot in tmp (SAVE / restart from it)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "3600 1" if self.save else "",
                "--appendonly",
                "no",
                "--dir",
                str(self.tmp),
                "--dbfilename",
                "dump.rdb",
                "--logfile",
                str(self.tmp / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def kill(self) -> None:
        """kill -9: nothing is written; a restart loads the last snapshot (if any)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def restart(self, *, empty: bool = False) -> None:
        """kill -9, then start again on the same port from the last snapshot (or empty)."""
        self.kill()
        if empty:
            (self.tmp / "dump.rdb").unlink(missing_ok=True)
        self.start()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own that keeps RDB snapshots (kill/restart it freely)."""
    if shutil.which("redis-server") is None:
        _missing("redis-server is not installed")
    server = RedisServer(tmp_path / "private-redis", save=True)
    server.tmp.mkdir()
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        _missing("redis-server is not installed")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return f"{redis_server.url}/0"


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@contextlib.contextmanager
def new_database(prefix: str) -> Iterator[str]:
    """The URL of a database of its own (no tables) on the local PostgreSQL, dropped on the
    way out; skips (fails in CI) when PostgreSQL is not reachable."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        _missing(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}")
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A database created for this run on the local PostgreSQL, dropped afterwards."""
    from celery_reliable import create_tables

    with new_database("reliable_test") as url:
        engine = sa.create_engine(url)
        create_tables(engine)
        engine.dispose()
        yield url


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(database_url)
    yield eng
    eng.dispose()


@pytest.fixture
def schema_engine(engine: sa.Engine) -> Iterator[sa.Engine]:
    """An engine whose search_path is a schema of this test's own (empty; dropped after),
    where a test creates tables of an older shape to see them upgraded."""
    schema = f"old_{secrets.token_hex(4)}"
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    scoped = sa.create_engine(engine.url, connect_args={"options": f"-csearch_path={schema}"})
    yield scoped
    scoped.dispose()
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))


def reliable_task(app: Any, name: str, **options: Any) -> Any:
    """``app.task`` for a bound ReliableTask of ``app`` only (not shared), named ``name``."""
    from celery_reliable import ReliableTask

    return app.task(base=ReliableTask, bind=True, shared=False, name=name, **options)


def create_tables_at_once(engine: sa.Engine, threads: int = 4) -> list[BaseException]:
    """Run ``create_tables(engine)`` from ``threads`` threads at once; what they raised."""
    from celery_reliable import create_tables

    errors: list[BaseException] = []

    def migrate() -> None:
        try:
            create_tables(engine)
        except BaseException as exc:  # returned to the caller, who asserts on it
            errors.append(exc)

    workers = [threading.Thread(target=migrate) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(60)
    return errors


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own."""
    return f"t{secrets.token_hex(4)}"


# ----------------------------------------------------- embedded worker (pytest-celery)


@pytest.fixture(scope="session")
def celery_config(redis_server: RedisServer, database_url: str) -> dict[str, Any]:
    return {
        "broker_url": f"{redis_server.url}/1",
        "result_backend": f"{redis_server.url}/2",
        "reliable_redis_url": f"{redis_server.url}/0",
        "reliable_database_url": database_url,
        "reliable_key_prefix": f"emb{secrets.token_hex(3)}",
        "broker_connection_retry_on_startup": True,
    }


@pytest.fixture(scope="session")
def celery_worker_pool() -> str:
    return "threads"


@pytest.fixture(scope="session")
def celery_worker_parameters() -> dict[str, Any]:
    return {"concurrency": 4, "perform_ping_check": False}


@pytest.fixture
def celery_worker(
    celery_app: Any, celery_worker_pool: str, celery_worker_parameters: dict[str, Any]
) -> Iterator[Any]:
    """Celery's embedded worker (celery.contrib.pytest).

    pytest-celery 1.x replaces this fixture with a Docker-based worker; no
    Docker engine runs here, so the in-process one from Celery is restored.
    """
    from celery.contrib.testing import worker

    with worker.start_worker(celery_app, pool=celery_worker_pool, **celery_worker_parameters) as w:
        yield w


# ------------------------------------------------------ worker subprocesses


class Fleet:
    """``celery worker`` subprocesses running tests/fleet_app.py, for kill/pause tests."""

    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        self.env = env
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, n: int = 2, concurrency: int = 2, timeout: float = 60, queues: str | None = None
    ) -> None:
        names = []
        for _ in range(n):
            name = f"w{len(self.procs)}-{secrets.token_hex(2)}"
            log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - lives with the process
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "tests.fleet_app",
                    "worker",
                    "-P",
                    "prefork",
                    "-c",
                    str(concurrency),
                    "-Q",
                    queues or self.env["FLEET_QUEUE"],
                    "-n",
                    f"{name}@%h",
                    "--without-mingle",
                    "--without-gossip",
                    "--without-heartbeat",
                    "--prefetch-multiplier",
                    "1",
                    "-l",
                    "info",
                ],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.procs.append(proc)
            names.append(name)
        deadline = time.monotonic() + timeout
        for name in names:
            ready = self.tmp / f"ready-{name}"
            while not ready.exists():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker {name} did not start:\n{self.logs()}")
                time.sleep(0.1)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-4000:] for p in self.tmp.glob("*.log"))

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGCONT)
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


@pytest.fixture
def fleet(
    redis_server: RedisServer, database_url: str, prefix: str, tmp_path: Path
) -> Iterator[Fleet]:
    env = dict(os.environ)
    env.update(
        FLEET_BROKER_URL=f"{redis_server.url}/3",
        FLEET_RESULT_URL=f"{redis_server.url}/4",
        FLEET_REDIS_URL=f"{redis_server.url}/0",
        FLEET_DATABASE_URL=database_url,
        FLEET_PREFIX=prefix,
        FLEET_QUEUE=f"q-{prefix}",
        FLEET_READY_DIR=str(tmp_path),
        PYTHONPATH=str(ROOT),
    )
    fl = Fleet(env, tmp_path)
    old = {k: os.environ.get(k) for k in env if k.startswith("FLEET_")}
    os.environ.update({k: v for k, v in env.items() if k.startswith("FLEET_")})
    try:
        yield fl
    finally:
        fl.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class LateProxy(TcpProxy):
    """A TcpProxy that delivers a request late, on its own connection only.

    ``hold(marker)``: the next request containing ``marker`` is kept until
    ``release()``, then reaches the server even if its client has given up and
    closed the connection meanwhile; every other connection flows. This is a
    lost TCP segment in retransmission backoff (RTO doubles: 0.2, 0.4, ...,
    3.2 s): data already written to the socket is still delivered after the
    client's ``close()``, followed by the FIN, while a new connection made after
    the network healed gets through at once. ``hold(marker, every=True)``: each
    request containing ``marker`` (on each new connection: a resend) is kept
    until ``release()``; ``delivered_count`` says how many reached the server
    since the ``hold``. TcpProxy's ``lose_replies`` works on held requests too.
    """

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self._late: bytes | None = None
        self._every = False
        self._release = threading.Event()
        self.delivered = threading.Event()
        self.delivered_count = 0

    def hold(self, marker: bytes, every: bool = False) -> None:
        self._release.clear()
        self.delivered.clear()
        self._every = every
        self.delivered_count = 0
        self._late = marker

    def release(self) -> None:
        self._release.set()

    def stop(self) -> None:
        self._release.set()
        super().stop()

    def _forward(self, request: bool, data: bytes, src: socket.socket, dst: socket.socket) -> None:
        late = self._late
        if not request or late is None or late not in data:
            super()._forward(request, data, src, dst)
            return
        if not self._every:
            self._late = None
        self._watch_marker(data, src)  # this request runs; with lose_replies its reply is lost
        self._release.wait(30)
        dst.sendall(data)
        time.sleep(0.2)  # let the server read it before the FIN follows
        with self._lock:
            self.delivered_count += 1
        self.delivered.set()


@pytest.fixture
def late_proxy(private_redis: RedisServer) -> Iterator[LateProxy]:
    tcp = LateProxy(private_redis.port)
    tcp.start()
    yield tcp
    tcp.stop()


@pytest.fixture
def pg_proxy() -> Iterator[TcpProxy]:
    proxy = TcpProxy(5432)
    proxy.start()
    yield proxy
    proxy.stop()


#: The keyword arguments redis-py 5.0's ``Connection`` takes (pyproject: ``redis>=5``);
#: 6.4 takes the same that matter here: neither has ``orig_socket_timeout``.
REDIS_50_CONNECTION_KWARGS = frozenset({
    "client_name", "command_packer", "credential_provider", "db", "decode_responses",
    "encoding", "encoding_errors", "health_check_interval", "host", "lib_name", "lib_version",
    "parser_class", "password", "port", "protocol", "redis_connect_func", "retry",
    "retry_on_error", "retry_on_timeout", "socket_connect_timeout", "socket_keepalive",
    "socket_keepalive_options", "socket_read_size", "socket_timeout", "socket_type",
    "username",
})


def redis50_client(url: str) -> redis.Redis:
    """A client whose pool and connections take only what redis-py 5.0's take.

    The installed redis-py is newer; this stands in for the oldest version
    pyproject accepts: its pool's connection settings are what a 5.0 pool
    holds (the newer keys it adds itself are left out), and a keyword 5.0's
    ``Connection`` does not know raises TypeError, as it does there.
    """

    class Redis50Connection(redis.Connection):
        def __init__(self, **kwargs: Any) -> None:
            extra = sorted(set(kwargs) - REDIS_50_CONNECTION_KWARGS)
            if extra:
                raise TypeError("AbstractConnection.__init__() got an unexpected keyword "
                                f"argument {extra[0]!r}")
            super().__init__(**kwargs)

    pool = redis.ConnectionPool.from_url(url, connection_class=Redis50Connection)
    pool.connection_kwargs = {name: value for name, value in pool.connection_kwargs.items()
                              if name in REDIS_50_CONNECTION_KWARGS}
    client = redis.Redis(connection_pool=pool)
    assert client.ping()  # the pool's own connections work
    return client
