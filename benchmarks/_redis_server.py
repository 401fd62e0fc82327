"""Redis helpers of the benchmarks: a throwaway redis-server, and round-trip counting.

Shared by locks.py, limits.py and backoff.py (run as ``python benchmarks/<name>.py``,
so this directory is first on ``sys.path``).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

__all__ = [
    "CountingConnection",
    "counting_connection_class",
    "free_port",
    "server_calls",
    "stop",
    "throwaway_redis",
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def throwaway_redis(binary: str, prefix: str = "bench-") -> Iterator[tuple[int, str]]:
    """A private redis-server on a free port: no persistence, its own temp dir."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        for _attempt in range(3):
            port = free_port()
            log = Path(tmp) / "redis.log"
            proc = subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    tmp,
                    "--logfile",
                    str(log),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
            )
            probe = redis.Redis(port=port, socket_connect_timeout=0.2)
            try:
                deadline = time.monotonic() + 10
                while proc.poll() is None and time.monotonic() < deadline:
                    try:
                        version = str(probe.info("server")["redis_version"])
                        break
                    except redis.ConnectionError:
                        time.sleep(0.05)
                else:
                    tail = log.read_text(errors="replace")[-400:] if log.exists() else ""
                    stop(proc)
                    print(f"redis-server on port {port} did not start: {tail}", file=sys.stderr)
                    continue
            finally:
                probe.close()
            try:
                yield port, version
            finally:
                stop(proc)
            return
        raise SystemExit("error: could not start a throwaway redis-server (3 attempts)")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class CountingConnection(redis.Connection):
    """A redis-py connection that counts requests written (= round trips) and connects."""

    sends = 0
    connects = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).sends += 1
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]

    def _connect(self) -> Any:  # opens the socket; connect() is called per checkout
        type(self).connects += 1
        return super()._connect()  # type: ignore[no-untyped-call]


def counting_connection_class() -> type[CountingConnection]:
    """A fresh subclass, so every contender's counters are its own."""
    return type("CountingConnectionFor", (CountingConnection,), {"sends": 0, "connects": 0})


def server_calls(admin: redis.Redis) -> dict[str, int]:
    """``INFO commandstats`` as {command: calls}, without ``info`` itself."""
    stats: dict[str, Any] = admin.info("commandstats")
    out: dict[str, int] = {}
    for name, value in stats.items():
        command = name.removeprefix("cmdstat_")
        if command != "info" and isinstance(value, dict):
            out[command] = int(value["calls"])
    return out
