"""Private servers on loopback for one campaign, each stopped by its PID.

- the broker (``--broker``): a ``redis-server`` (append-only file fsynced on
  every write, so a ``kill -9`` loses no queued message: the broker is not
  what is under test; the results live in its database 1), or a RabbitMQ node
  (:class:`RabbitMQServer`, durable queues, persistent messages and publisher
  confirms; the results then go to a ``redis-server`` of their own);
- the plugin's state: a primary ``redis-server`` with RDB snapshots and a
  replica (``REPLICAOF``, through a proxy of its own so that replication can
  be made to lag), reached by the workers through a :class:`TcpProxy` whose
  target a failover switches to the promoted replica;
- a private PostgreSQL cluster (``initdb`` / ``pg_ctl``), reached by the
  workers through another :class:`TcpProxy`.

The machine's own services (127.0.0.1:6379, :5432, RabbitMQ's :5672 and its
node and ``epmd``) are never touched.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import amqp  # type: ignore[import-untyped]  # py-amqp (kombu's AMQP client) has no hints
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
    """A loopback TCP proxy to a real server, to cut, freeze or slow a network path.

    ``stop()`` closes the listener and every live connection (the server looks
    down to its clients); ``start()`` brings the same address back.
    ``stall()`` keeps every connection open but forwards nothing (packets
    dropped on a live link: clients block until their socket timeout);
    ``lose_replies(marker)`` forwards every request but holds what the server
    answers on a connection from its first request containing ``marker`` on
    (the command runs, its reply is lost: the client times out, and a new
    connection works until it sends ``marker`` again); ``resume()`` delivers
    what was held and forwards again. ``retarget(port)`` closes every
    connection and forwards new ones to another server (how clients are
    pointed at a promoted replica).

    Subclasses change what happens to each chunk read by overriding
    :meth:`_forward`; :meth:`_pipe` owns reading and closing.
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

    @property
    def running(self) -> bool:
        return self._listener is not None

    @property
    def stalled(self) -> bool:
        return not self._flowing.is_set()

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
            replies = threading.Event()
            replies.set()
            with self._lock:
                self._conns += [client, upstream]
                self._replies[client] = self._replies[upstream] = replies
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        request = src.getsockname()[1] == self.port  # the client's side of the proxy
        try:
            while data := src.recv(65536):
                self._forward(request, data, src, dst)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            with self._lock:
                for s in (src, dst):
                    replies = self._replies.pop(s, None)
                    if replies is not None:
                        replies.set()  # a reply held for a closed connection: let it fail
                    if s in self._conns:
                        self._conns.remove(s)
                        s.close()

    def _forward(self, request: bool, data: bytes, src: socket.socket, dst: socket.socket) -> None:
        """Send one chunk read from ``src`` on to ``dst``; ``request``: it came from the client."""
        self._flowing.wait()  # stalled: hold the bytes, keep the connection
        if request:
            self._watch_marker(data, src)
        else:
            self._replies_of(src).wait()
        dst.sendall(data)

    def _watch_marker(self, request: bytes, src: socket.socket) -> None:
        """A request holding the ``lose_replies`` marker: hold its connection's replies."""
        marker = self._marker
        if marker is not None and marker in request:
            self._replies_of(src).clear()  # before the server can answer it

    def _replies_of(self, sock: socket.socket) -> threading.Event:
        with self._lock:
            replies = self._replies.get(sock)
        if replies is None:  # the connection was dropped meanwhile
            raise OSError("connection closed")
        return replies

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
            # shutdown() wakes the thread blocked in accept(); close() alone
            # would leave the socket accepting one more connection.
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


#: RabbitMQ's ``consumer_timeout`` on the private node, seconds: a consumer holding an
#: unacknowledged delivery longer than this has its channel closed and the delivery
#: requeued. RabbitMQ's own default (30 min), stated here so that the app can tell
#: celery-reliable (``reliable_redelivery_window``) what the node really does.
RABBITMQ_CONSUMER_TIMEOUT = 1800.0


def rabbitmq_server_script() -> str:
    """The start script of the rabbitmq-server package (raises RuntimeError if not installed)."""
    # Debian's /usr/sbin/rabbitmq-server is a wrapper that, run as root, starts the
    # node as the rabbitmq user under `su`: the real script runs as whoever we are
    found = sorted(glob.glob("/usr/lib/rabbitmq/bin/rabbitmq-server")) or sorted(
        glob.glob("/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin/rabbitmq-server"))
    if found:
        return found[-1]
    path = shutil.which("rabbitmq-server")
    if path is None:
        raise RuntimeError("rabbitmq-server not found (apt-get install rabbitmq-server)")
    return path


def _epmd() -> str:
    path = shutil.which("epmd")
    found = sorted(glob.glob("/usr/lib/erlang/erts-*/bin/epmd"))
    if path is None and not found:
        raise RuntimeError("Erlang's epmd not found (apt-get install rabbitmq-server)")
    return path or found[-1]


class RabbitMQServer:
    """A private RabbitMQ node on free ports, with an ``epmd`` of its own; stopped by PID.

    Its node name (``faults<port>@localhost``), AMQP port, distribution port and
    ``epmd`` port are its own, so the machine's node (``rabbit@...`` on :5672, and
    the machine's ``epmd`` on :4369) is never reached. Its data (Mnesia, message
    store), Erlang cookie and configuration live in a temporary folder that
    :meth:`destroy` removes; its logs go to ``folder``. No plugin is enabled; the
    default ``guest`` user connects from loopback. The VM runs without scheduler
    busy-waiting (``+sbwt none``): it shares two cores with the fleet.

    :meth:`kill` is ``kill -9`` of the Erlang VM (by its PID: the start script
    execs it) and :meth:`start` starts it again on the same ports and data:
    durable queues come back with their persistent messages (what publisher
    confirms acknowledged is on disk).
    """

    def __init__(self, folder: Path, *, name: str = "broker",
                 consumer_timeout: float = RABBITMQ_CONSUMER_TIMEOUT) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.name = name
        ports: set[int] = set()
        while len(ports) < 3:
            ports.add(free_port())
        self.port, self.dist_port, self.epmd_port = sorted(ports)
        self.node = f"faults{self.port}@localhost"
        self.home = Path(tempfile.mkdtemp(prefix="faults-rabbitmq-"))
        (self.home / "enabled_plugins").write_text("[].\n")
        (self.home / "rabbitmq-env.conf").write_text("")  # not the machine's /etc/rabbitmq one
        (self.home / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            f"consumer_timeout = {int(consumer_timeout * 1000)}\n"
            "log.console = false\n"
            "log.file.level = info\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.epmd: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def env(self) -> dict[str, str]:
        """The node's environment (``rabbitmqctl`` needs the same HOME and ERL_EPMD_PORT)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RABBITMQ_", "ERL_")) and k != "NOTIFY_SOCKET"}
        env.update(
            HOME=str(self.home),  # the Erlang cookie
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_CONF_ENV_FILE=str(self.home / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(self.home / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.home / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.home / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(self.home / "mnesia"),
            RABBITMQ_PID_FILE=str(self.home / "rabbitmq.pid"),
            RABBITMQ_LOG_BASE=str(self.folder),
            # the start script exec()s the VM (no signal-forwarding shell): its PID is the node's
            RUNNING_UNDER_SYSTEMD="true",
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=(
                "+sbwt none +sbwtdcpu none +sbwtdio none "
                "-kernel inet_dist_use_interface {127,0,0,1}"
            ),
        )
        return env

    def _start_epmd(self) -> None:
        if self.epmd is not None and self.epmd.poll() is None:
            return
        self.epmd = subprocess.Popen(
            [_epmd(), "-port", str(self.epmd_port), "-address", "127.0.0.1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        wait_port(self.epmd_port, 10)

    def start(self, timeout: float = 120) -> None:
        """Start the node and wait until it completes an AMQP handshake (raises if it cannot)."""
        self._start_epmd()
        log = self.folder / "rabbitmq-server.out"
        for attempt in range(3):
            with open(log, "ab") as out:
                self.proc = subprocess.Popen(
                    [rabbitmq_server_script()], cwd=self.home, env=self.env(), stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True,
                )
            if self._wait_amqp(timeout):
                return
            exited = not self.running
            self.kill()
            if not exited:
                raise RuntimeError(f"{self.name}: RabbitMQ node {self.node} accepted no AMQP "
                                   f"connection in {timeout:g} s (see {self.folder})")
            # it exited: e.g. epmd had not yet dropped the name of the node just killed
            time.sleep(1.0 + attempt)
        raise RuntimeError(f"{self.name}: RabbitMQ node {self.node} did not start "
                           f"(see {self.folder})")

    def _wait_amqp(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.running and time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError:
                time.sleep(0.1)
                continue
            conn = amqp.Connection(f"127.0.0.1:{self.port}", userid="guest", password="guest",
                                   connect_timeout=5)
            try:
                conn.connect()
                return True
            except Exception:  # the listener is up before the node accepts logins
                time.sleep(0.2)
            finally:
                with contextlib.suppress(Exception):
                    conn.close()
        return False

    def kill(self) -> None:
        """kill -9 of the node (its process group): what was not on disk is lost."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def destroy(self) -> None:
        """Kill the node and its epmd, and remove its data (the logs stay in ``folder``)."""
        self.kill()
        if self.epmd is not None:
            with contextlib.suppress(ProcessLookupError):
                self.epmd.kill()
            self.epmd.wait(10)
            self.epmd = None
        shutil.rmtree(self.home, ignore_errors=True)


#: the brokers a campaign can run on (``--broker``)
BROKERS = ("redis", "rabbitmq")


class Cluster:
    """Every server of one campaign, and the proxies the workers go through."""

    def __init__(self, folder: Path, broker: str = "redis") -> None:
        """``broker``: ``"redis"`` (a redis-server, results in its database 1) or
        ``"rabbitmq"`` (a RabbitMQ node, results in a redis-server of their own)."""
        if broker not in BROKERS:
            raise ValueError(f"broker must be one of {', '.join(BROKERS)}, got {broker!r}")
        self.folder = folder
        self.broker_kind = broker
        self.broker: RedisServer | RabbitMQServer
        if broker == "rabbitmq":
            self.broker = RabbitMQServer(folder / "broker")
            self.results: RedisServer = RedisServer(folder / "results", appendonly=True,
                                                    name="results")
        else:
            self.broker = self.results = RedisServer(folder / "broker", appendonly=True,
                                                     name="broker")
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
        if self.results is not self.broker:
            self.results.start()
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
        if isinstance(self.broker, RabbitMQServer):
            return self.broker.url
        return f"{self.broker.url}/0"

    @property
    def result_url(self) -> str:
        # beside the queues (database 1) when the broker is Redis
        return f"{self.results.url}/{1 if self.results is self.broker else 0}"

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
        if not self.results.running:
            self.results.start()
        if not self.state.running:
            self.state.start()
        self.rejoin()
        if not self.pg.running:
            self.pg.start()

    def stop(self) -> None:
        for proxy in (self.state_proxy, self.pg_proxy, self.repl_proxy):
            if proxy is not None:
                proxy.stop()
        if isinstance(self.broker, RabbitMQServer):
            self.broker.destroy()
        for server in (self.broker, self.results, self.state, self.replica):
            if server is not None:
                server.kill()
        self.pg.destroy()
