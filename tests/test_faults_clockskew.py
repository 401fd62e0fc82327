"""The clock nemesis's skewable ``time.monotonic`` (faults.clockskew), in child processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from faults import clockskew

ROOT = Path(__file__).resolve().parent.parent

# A process under the wrapper: prints (real, skewed) pairs on demand ("r" on stdin); "q" quits.
PROBE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from faults import clockskew
    real = time.monotonic
    clockskew.install(Path(sys.argv[1]))
    for line in sys.stdin:
        if line.startswith("q"):
            break
        readings = [(real(), time.monotonic()) for _ in range(int(line.split()[1]))]
        ordered = all(b[1] >= a[1] for a, b in zip(readings, readings[1:]))
        print(readings[0][0], readings[0][1], ordered, flush=True)
    """
)


class Probe:
    def __init__(self, folder: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PROBE, str(folder)], cwd=ROOT, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )

    def read(self, n: int = 1) -> tuple[float, float]:
        """(real, skewed) now; asserts the ``n`` readings taken never went back."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"r {n}\n")
        self.proc.stdin.flush()
        real, skewed, ordered = self.proc.stdout.readline().split()
        assert ordered == "True"
        return float(real), float(skewed)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("q\n")
        self.proc.stdin.flush()
        self.proc.wait(10)


def test_unskewed_process_reads_the_real_clock(tmp_path: Path) -> None:
    probe = Probe(tmp_path)
    try:
        real, skewed = probe.read()
        assert abs(skewed - real) < 0.01
        time.sleep(0.2)
        real2, skewed2 = probe.read()
        assert abs((skewed2 - skewed) - (real2 - real)) < 0.01
    finally:
        probe.close()


def test_rate_jump_and_a_segment_missed_while_stopped(tmp_path: Path) -> None:
    """Each segment counts from its ``since``, even when the process noticed it later."""
    probe = Probe(tmp_path)
    pid = probe.proc.pid
    try:
        probe.read()
        clockskew.skew(tmp_path, pid, rate=0.25)
        time.sleep(0.05)
        r0, s0 = probe.read(2000)
        time.sleep(0.4)
        r1, s1 = probe.read(2000)
        assert (s1 - s0) / (r1 - r0) == pytest.approx(0.25, abs=0.03)
        clockskew.skew(tmp_path, pid, rate=1.0, jump=2.0)
        time.sleep(0.05)
        r2, s2 = probe.read()
        # 2 s forward, plus the time since r1 (a quarter of it at most counted slowly)
        assert 2.0 < (s2 - s1) <= 2.0 + (r2 - r1) + 0.01
        # a stop at rate 0 and its end, both written while the process read nothing
        clockskew.skew(tmp_path, pid, rate=0.0)
        time.sleep(0.5)
        clockskew.skew(tmp_path, pid, rate=1.0)
        time.sleep(0.1)
        r3, s3 = probe.read(2000)
        assert (r3 - r2) - (s3 - s2) == pytest.approx(0.5, abs=0.05)
        assert len(json.loads((tmp_path / f"{pid}.json").read_text())["segments"]) == 4
    finally:
        probe.close()


def test_a_reused_pid_ignores_an_earlier_process_file(tmp_path: Path) -> None:
    probe = Probe(tmp_path)
    pid = probe.proc.pid
    try:
        clockskew.skew(tmp_path, pid, rate=0.0)
        path = tmp_path / f"{pid}.json"
        data = json.loads(path.read_text())
        data["start_time"] = "1"  # as if written for another process that had this pid
        path.write_text(json.dumps(data))
        r0, s0 = probe.read()
        time.sleep(0.2)
        r1, s1 = probe.read()
        assert (s1 - s0) == pytest.approx(r1 - r0, abs=0.01)
    finally:
        probe.close()


def test_launcher_installs_before_celery_reliable_binds_the_clock(tmp_path: Path) -> None:
    """celery_reliable's heartbeat binds time.monotonic at import: the launcher comes first."""
    code = textwrap.dedent(
        """
        import sys, time
        from faults import clockskew
        sys.argv = ["x", "--version"]
        try:
            clockskew.main()
        except SystemExit:
            pass
        from celery_reliable.runtime import Heartbeat
        import celery_reliable.cli  # the celery.commands entry point imported it already
        print(time.monotonic is clockskew.monotonic,
              Heartbeat.__init__.__defaults__[0] is clockskew.monotonic)
        """
    )
    env = dict(os.environ, **{clockskew.ENV: str(tmp_path)})
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, text=True,
                         capture_output=True, timeout=60, check=True).stdout
    assert out.split()[-2:] == ["True", "True"], out


THREADS = textwrap.dedent(
    """
    import sys, threading, time
    from pathlib import Path
    from faults import clockskew
    clockskew.install(Path(sys.argv[1]))
    def read(pause):
        last, lo, hi = time.monotonic(), 0.0, 0.0
        while True:
            time.sleep(pause)
            now = time.monotonic()
            lo, hi = min(lo, now - last), max(hi, now - last)
            last = now
            state[threading.get_ident()] = (lo, hi)
    state = {}
    for pause in (0.0, 0.0, 0.001, 0.05):
        threading.Thread(target=read, args=(pause,), daemon=True).start()
    sys.stdin.readline()
    print(min(lo for lo, hi in state.values()), max(hi for lo, hi in state.values()), flush=True)
    """
)


def test_threads_reading_across_a_stop_see_no_step(tmp_path: Path) -> None:
    """After SIGCONT, a thread never reads the clock as if the stop had counted (then back)."""
    import signal

    proc = subprocess.Popen([sys.executable, "-c", THREADS, str(tmp_path)], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        time.sleep(1.0)
        for _ in range(4):
            clockskew.skew(tmp_path, proc.pid, rate=0.0)
            os.kill(proc.pid, signal.SIGSTOP)
            time.sleep(1.0)
            clockskew.skew(tmp_path, proc.pid, rate=1.0)
            os.kill(proc.pid, signal.SIGCONT)
            time.sleep(0.3)
        proc.stdin.write("\n")
        proc.stdin.flush()
        lo, hi = (float(x) for x in proc.stdout.readline().split())
        assert lo >= 0.0, (lo, hi)  # never back
        assert hi < 0.5, (lo, hi)  # the 1 s stops did not count
    finally:
        proc.kill()
        proc.wait(10)
