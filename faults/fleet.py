"""N ``celery worker`` processes (prefork) running :mod:`faults.app`, each restartable.

A worker slot keeps its node name across restarts; each worker is started in
its own session so a whole worker (parent and pool children) can be killed as
a process group, by PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from faults.clockskew import ENV as CLOCK_ENV
from faults.workloads import QUEUES

ROOT = Path(__file__).resolve().parent.parent


class Worker:
    def __init__(self, name: str, env: dict[str, str], logs: Path, concurrency: int) -> None:
        self.name = name
        self.env = env
        self.logs = logs
        self.concurrency = concurrency
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        #: killed on purpose (a nemesis restarts it): the supervisor leaves it down
        self.held_down = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self.held_down = False
        self.starts += 1
        log = open(self.logs / f"{self.name}.log", "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            # faults.clockskew: celery with a skewable time.monotonic (the clock nemesis)
            [sys.executable, "-m", "faults.clockskew" if self.env.get(CLOCK_ENV) else "celery",
             "-A", "faults.app", "worker", "-P", "prefork",
             "-c", str(self.concurrency), "-Q", ",".join(QUEUES), "-n", f"{self.name}@%h",
             "--without-mingle", "--without-gossip", "--without-heartbeat",
             "--prefetch-multiplier", "1", "-l", self.env.get("FAULTS_LOG_LEVEL", "warning")],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def children(self) -> list[int]:
        """PIDs of the pool's children (the processes that run tasks)."""
        if not self.alive or self.pid is None:
            return []
        pids: list[int] = []
        for children in Path(f"/proc/{self.pid}/task").glob("*/children"):
            try:
                pids += [int(p) for p in children.read_text().split()]
            except OSError:  # the thread ended meanwhile
                continue
        return sorted(pids)

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.children()) >= self.concurrency:
                return True
            time.sleep(0.2)
        return False

    def kill(self) -> None:
        """kill -9 of the whole worker: parent and pool children (its process group)."""
        self.held_down = True
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def stop(self, timeout: float = 20) -> None:
        """Warm shutdown (SIGTERM), kill -9 after ``timeout``."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGCONT)
            os.killpg(self.proc.pid, signal.SIGTERM)
        pid = self.proc.pid
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        # a pool child left behind (its parent gone): end it too, by the worker's group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        self.proc = None


class Fleet:
    def __init__(self, n: int, concurrency: int, env: dict[str, str], logs: Path) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.workers = [Worker(f"w{i}", env, logs, concurrency) for i in range(n)]

    def start(self, timeout: float = 120) -> None:
        for w in self.workers:
            w.start()
        for w in self.workers:
            if not w.wait_ready(timeout):
                raise RuntimeError(f"worker {w.name} did not start (see its log)")

    def heal(self) -> None:
        """Every worker running, none stopped (SIGCONT to every group)."""
        for w in self.workers:
            if w.alive and w.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(w.pid, signal.SIGCONT)
            else:
                w.start()

    def supervise(self) -> list[str]:
        """Restart every worker that died on its own (as systemd's Restart=always would).

        Celery 5's worker can exit on a lost broker connection (kombu's Redis
        transport raises AttributeError on 'hostname' while restoring unacked
        messages): production runs workers under a supervisor, so does the fleet.
        """
        restarted = []
        for w in self.workers:
            if w.proc is not None and not w.alive and not w.held_down:
                code, pid = w.proc.returncode, w.proc.pid
                w.start()
                restarted.append(f"{w.name} pid {pid} (exit {code})")
        return restarted

    def stop(self) -> None:
        for w in self.workers:
            w.held_down = True
            w.stop()
