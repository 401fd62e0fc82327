"""Private servers on loopback for one campaign, each stopped by its PID.

- a broker ``redis-server`` (append-only file fsynced on every write, so a
  ``kill -9`` loses no queued message: the broker is not what is under test);
- the plugin's state: a primary ``redis-server`` with RDB snapshots and a
  replica (``REPLICAOF``, through a proxy of its own so that replication can
  be made to lag), reached by the workers through a :class:`TcpProxy` whose
  target a failover switches to the promoted replica;
- a private PostgreSQL cluster (``initdb`` / ``pg_ctl``), reached by the
  workers through another :class:`TcpProxy`.

The machine's own services (127.0.0.1:6379, :5432) are never touched.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing answers on 127.0.0.1:{port}") from None
            time.sleep(0.1)


class TcpProxy:
    """A loopback TCP proxy (ported from tests/conftest.py) to cut or freeze a network path.

    ``stall()`` keeps every connection open but forwards nothing (a frozen
    link: clients block until their socket timeout); ``resume()`` forwards
    again, delivering what was held. ``stop()`` closes the listener and every
    connection; ``start()`` brings the same address back. ``retarget(port)``
    closes every connection and forwards new ones to another server (how
    clients are pointed at a promoted replica).
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()

    @property
    def stalled(self) -> bool:
        return not self._flowing.is_set()

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def retarget(self, port: int) -> None:
        self.target_port = port
        self.drop_connections()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self._flowing.wait()  # stalled: hold the bytes, keep the connection
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            with self._lock:
                for s in (src, dst):
                    if s in self._conns:
                        self._conns.remove(s)
                        s.close()

    def drop_connections(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def stop(self) -> None:
        self.resume()  # let stalled pipes see their sockets close
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        self.drop_connections()


class RedisServer:
    """A private redis-server on a free port, in its own folder."""

    def __init__(
        self, folder: Path, *, save: str = "", appendonly: bool = False, name: str = "redis"
    ) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.save = save  # e.g. "2 1": snapshot every 2 s when at least one key changed
        self.appendonly = appendonly
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.replicaof: int | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)

    def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", self.save, "--dir", str(self.folder), "--dbfilename", "dump.rdb",
                "--logfile", str(self.folder / "redis.log"),
                # a replica's full sync starts at once, not after the default 5 s wait
                "--repl-diskless-sync-delay", "0"]
        if self.appendonly:
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            argv += ["--appendonly", "no"]
        if self.replicaof is not None:
            argv += ["--replicaof", "127.0.0.1", str(self.replicaof)]
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        client = self.client()
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name}: redis-server did not start") from None
                time.sleep(0.05)
            except redis.ResponseError:  # LOADING
                time.sleep(0.05)
        client.close()

    def wait_synced(self, timeout: float) -> bool:
        """A replica: wait until its link to the primary is up (initial sync done)."""
        deadline = time.monotonic() + timeout
        client = self.client()
        try:
            while time.monotonic() < deadline:
                try:
                    if client.info("replication").get("master_link_status") == "up":
                        return True
                except redis.RedisError:
                    pass
                time.sleep(0.1)
            return False
        finally:
            client.close()

    def kill(self) -> None:
        """kill -9: nothing more is written; a restart loads the last snapshot (or AOF)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def restart(self, *, empty: bool = False) -> None:
        self.kill()
        if empty:
            (self.folder / "dump.rdb").unlink(missing_ok=True)
            shutil.rmtree(self.folder / "appendonlydir", ignore_errors=True)
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]  # the newest major version
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"PostgreSQL's {name} not found (apt-get install postgresql)")
    return path


class PostgresCluster:
    """A private PostgreSQL cluster (``initdb``), started and stopped with ``pg_ctl``.

    ``initdb`` refuses to run as root: as root, every PostgreSQL binary runs as
    the ``postgres`` system user (``runuser``) on a data folder it owns.
    """

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.data = Path(tempfile.mkdtemp(prefix="faults-pg-"))
        # the server's log lives beside its data (the postgres user may not reach
        # log_dir); destroy() copies it to log_dir
        self.log = self.data / "postgres.log"
        self.log_dir = log_dir
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.data, "postgres", "postgres")

    @property
    def url(self) -> str:
        return self.url_on(self.port)

    @staticmethod
    def url_on(port: int) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"

    def _run(self, *argv: str, timeout: float = 120) -> None:
        cmd = list(argv)
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, timeout=timeout, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, cwd="/", start_new_session=True)

    def init(self) -> None:
        self._run(_pg_bin("initdb"), "-D", str(self.data / "db"), "-A", "trust", "-U", "postgres",
                  "--no-sync", "-E", "UTF8")

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 "
                "-c fsync=off -c max_connections=200 -c shared_buffers=32MB")
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data / "db"), "-l", str(self.log), "-w",
                  "-t", "60", "-o", opts, "start")

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m fast|immediate`` (immediate: no checkpoint, crash recovery at start)."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run(_pg_bin("pg_ctl"), "-D", str(self.data / "db"), "-m", mode, "-w", "stop")

    @property
    def running(self) -> bool:
        return (self.data / "db" / "postmaster.pid").exists()

    def destroy(self) -> None:
        if self.running:
            self.stop("immediate")
        with contextlib.suppress(OSError):
            self.log_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.log, self.log_dir / "postgres.log")
        shutil.rmtree(self.data, ignore_errors=True)


class Cluster:
    """Every server of one campaign, and the proxies the workers go through."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.broker = RedisServer(folder / "broker", appendonly=True, name="broker")
        # snapshots every 2 s when anything changed: a kill -9 restarts from older state
        self.state = RedisServer(folder / "state-a", save="2 1", name="state-a")
        self.replica: RedisServer | None = RedisServer(
            folder / "state-b", save="2 1", name="state-b"
        )
        self.pg = PostgresCluster(folder)
        self.state_proxy: TcpProxy | None = None
        self.pg_proxy: TcpProxy | None = None
        # the replica replicates through this proxy: stalling it makes replication lag
        self.repl_proxy: TcpProxy | None = None

    def start(self) -> None:
        self.broker.start()
        self.state.start()
        if self.replica is not None:
            self.repl_proxy = TcpProxy(self.state.port)
            self.repl_proxy.start()
            self.replica.replicaof = self.repl_proxy.port
            self.replica.start()
            self.replica.wait_synced(30)
        self.pg.init()
        self.pg.start()
        self.state_proxy = TcpProxy(self.state.port)
        self.state_proxy.start()
        self.pg_proxy = TcpProxy(self.pg.port)
        self.pg_proxy.start()

    # what the workers use (through the proxies) and what the runner uses (direct)
    @property
    def broker_url(self) -> str:
        return f"{self.broker.url}/0"

    @property
    def result_url(self) -> str:
        return f"{self.broker.url}/1"

    @property
    def worker_state_url(self) -> str:
        assert self.state_proxy is not None
        return f"redis://127.0.0.1:{self.state_proxy.port}/0"

    @property
    def worker_database_url(self) -> str:
        assert self.pg_proxy is not None
        return PostgresCluster.url_on(self.pg_proxy.port)

    @property
    def database_url(self) -> str:
        return self.pg.url

    def failover(self, lag: float = 0.0) -> str:
        """Promote the replica (REPLICAOF NO ONE) and point the workers' proxy at it.

        Replication is stalled for ``lag`` seconds first, then the old primary is
        killed (it is the one that failed): what it had not yet replicated, at
        least the last ``lag`` seconds of writes, is lost. Returns a description.
        ``rejoin()`` brings the old primary back as the new primary's replica.
        """
        assert self.replica is not None and self.state_proxy is not None
        assert self.repl_proxy is not None
        old, new = self.state, self.replica
        if lag > 0:
            self.repl_proxy.stall()
            time.sleep(lag)
        old.kill()
        self.repl_proxy.retarget(new.port)  # for the old primary, once it rejoins
        self.repl_proxy.resume()
        client = new.client()
        client.replicaof("NO", "ONE")
        client.close()
        new.replicaof = None
        self.state, self.replica = new, old
        self.state_proxy.retarget(new.port)
        return (f"{new.name} promoted (port {new.port}) after {lag:.2f}s of replication lag; "
                f"{old.name} killed")

    def rejoin(self) -> None:
        """Start the failed old primary again, empty, as a replica of the current primary."""
        if self.replica is not None and not self.replica.running:
            assert self.repl_proxy is not None
            self.repl_proxy.retarget(self.state.port)
            self.replica.replicaof = self.repl_proxy.port
            self.replica.restart(empty=True)
            # a failover right after this promotes what the replica has: wait for a full copy
            self.replica.wait_synced(30)

    def heal(self) -> None:
        """Every server up and every path forwarding (idempotent)."""
        for proxy in (self.state_proxy, self.pg_proxy, self.repl_proxy):
            if proxy is not None:
                proxy.resume()
        if not self.broker.running:
            self.broker.start()
        if not self.state.running:
            self.state.start()
        self.rejoin()
        if not self.pg.running:
            self.pg.start()

    def stop(self) -> None:
        for proxy in (self.state_proxy, self.pg_proxy, self.repl_proxy):
            if proxy is not None:
                proxy.stop()
        for server in (self.broker, self.state, self.replica):
            if server is not None:
                server.kill()
        self.pg.destroy()
