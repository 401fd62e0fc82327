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

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get(
    "RELIABLE_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A database created for this run on the local PostgreSQL, dropped afterwards."""
    name = f"reliable_test_{secrets.token_hex(4)}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        _missing(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}")
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    from celery_reliable import create_tables

    engine = sa.create_engine(url)
    create_tables(engine)
    engine.dispose()
    yield url
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(database_url)
    yield eng
    eng.dispose()


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


class TcpProxy:
    """A loopback TCP proxy to a real server, to cut and restore the network path.

    ``stop()`` closes the listener and every live connection (the server looks
    down to its clients); ``start()`` brings the same address back.
    ``stall()`` keeps every connection open but forwards nothing (packets
    dropped on a live link: clients block until their socket timeout);
    ``lose_replies(marker)`` forwards every request but holds what the server
    answers on a connection from its first request containing ``marker`` on
    (the command runs, its reply is lost: the client times out, and a new
    connection works until it sends ``marker`` again); ``resume()`` delivers
    what was held and forwards again.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()
        self._marker: bytes | None = None
        # per connection (both its sockets): may the server's replies pass?
        self._replies: dict[socket.socket, threading.Event] = {}

    def stall(self) -> None:
        self._flowing.clear()

    def lose_replies(self, marker: bytes) -> None:
        self._marker = marker

    def resume(self) -> None:
        self._marker = None
        self._flowing.set()
        with self._lock:
            for replies in self._replies.values():
                replies.set()

    @property
    def running(self) -> bool:
        return self._listener is not None

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            replies = threading.Event()
            replies.set()
            with self._lock:
                self._conns += [client, upstream]
                self._replies[client] = self._replies[upstream] = replies
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        replies = self._replies[src]
        request = src.getsockname()[1] == self.port  # the client's side of the proxy
        try:
            while data := src.recv(65536):
                self._flowing.wait()  # stalled: hold the bytes, keep the connection
                if request:
                    marker = self._marker
                    if marker is not None and marker in data:
                        replies.clear()  # before the server can answer it
                else:
                    replies.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self.resume()  # let stalled pipes see their sockets close
        if self._listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone
            # would leave the socket accepting one more connection.
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


class LateProxy(TcpProxy):
    """A TcpProxy that delivers one request late, on its own connection only.

    ``hold(marker)``: the next request containing ``marker`` is kept until
    ``release()``, then reaches the server even if its client has given up and
    closed the connection meanwhile; every other connection flows. This is a
    lost TCP segment in retransmission backoff (RTO doubles: 0.2, 0.4, ...,
    3.2 s): data already written to the socket is still delivered after the
    client's ``close()``, followed by the FIN, while a new connection made after
    the network healed gets through at once.
    """

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self._late: bytes | None = None
        self._release = threading.Event()
        self.delivered = threading.Event()

    def hold(self, marker: bytes) -> None:
        self._release.clear()
        self.delivered.clear()
        self._late = marker

    def release(self) -> None:
        self._release.set()

    def stop(self) -> None:
        self._release.set()
        super().stop()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        if src.getsockname()[1] != self.port:  # the server's replies: as usual
            super()._pipe(src, dst)
            return
        try:
            while data := src.recv(65536):
                late = self._late
                if late is not None and late in data:
                    self._late = None
                    self._release.wait(30)
                    dst.sendall(data)
                    time.sleep(0.2)  # let the server read it before the FIN follows
                    self.delivered.set()
                    continue
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


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
