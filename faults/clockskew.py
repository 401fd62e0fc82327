"""A skewable ``time.monotonic`` for the campaign's workers (the ``clock`` nemesis).

The machine's clock is never touched. Instead every worker of a campaign that runs the
``clock`` nemesis is started as ``python -m faults.clockskew <celery arguments>``: this
replaces ``time.monotonic`` with :func:`monotonic` *before* Celery, kombu or celery_reliable
are imported (celery_reliable's heartbeat binds ``time.monotonic`` as a default argument when
``celery_reliable.leases`` is imported, through ``celery_reliable.runtime``, which Celery's
command line imports through the ``celery.commands`` entry point; a wrapper installed later
from the app module would leave the heartbeat on the real clock and the leases' belief on
the skewed one), then runs Celery's
command line. Pool children are forked from that process and inherit the wrapper.

Without a control file the wrapper returns the real clock unchanged. A nemesis skews one
process by writing ``<FAULTS_CLOCK_DIR>/<pid>.json`` (:func:`skew`): a list of segments, each
``{"since": s, "rate": r, "jump": j}`` meaning "from real monotonic time ``s`` (the host's
``CLOCK_MONOTONIC``, shared by every process) this process's clock advances ``r`` seconds per
real second, after stepping ``j`` seconds forward". The wrapper looks at the file's ``stat``
at most every :data:`POLL_S` seconds (of real time) and applies each new segment once, at
``since`` or, if the process read its clock after ``since`` and before noticing, at the first
moment it could have noticed: the skewed clock stays continuous and never goes back.

Only ``time.monotonic`` is skewed: ``time.time``, ``time.monotonic_ns`` (celery_reliable's
write numbers for Redis fences), ``time.perf_counter``, timed waits (``time.sleep``,
``threading.Event.wait``) and socket timeouts run on real time, and so does the Redis server's
clock, which times every lease's expiry. The history's ``mono`` is the real clock
(:mod:`faults.history` is imported before the wrapper is installed).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ENV", "POLL_S", "Segment", "install", "main", "monotonic", "read", "skew"]

#: the environment variable naming the folder of control files; unset: no wrapper installed
ENV = "FAULTS_CLOCK_DIR"
#: seconds of real time between two looks at a process's control file
POLL_S = 0.02

_real = time.monotonic
_dir: Path | None = None
# the clock now: skewed(t) = _base + _rate * (t - _anchor), t the real clock; swapped whole
_state: tuple[float, float, float] = (0.0, 0.0, 1.0)
_applied = 0  # segments of this process's control file already applied
_next_poll = 0.0
_last_poll = -1.0
_proc: tuple[int, str] | None = None  # (pid, kernel start time) of this process
_seen: tuple[int, int] | None = None  # (inode, mtime) of the control file last read
_poll_lock = threading.RLock()
_polling = False  # a poll is running (in the thread holding _poll_lock)


@dataclass(frozen=True)
class Segment:
    """From real monotonic time ``since``: step ``jump`` s forward, then ``rate`` s per second."""

    since: float
    rate: float
    jump: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 100.0:
            raise ValueError(f"rate {self.rate} must be within [0, 100] (a clock never goes back)")
        if self.jump < 0.0:
            raise ValueError(f"jump {self.jump} s must be >= 0 (a monotonic clock steps forward)")


def _start_time(pid: int) -> str:
    """The kernel's start time of ``pid`` (field 22 of /proc/<pid>/stat): tells a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]


def _control(folder: Path, pid: int) -> Path:
    return folder / f"{pid}.json"


def read(folder: Path, pid: int) -> list[Segment]:
    """The segments written for ``pid`` so far (none: its clock was never skewed)."""
    try:
        data = json.loads(_control(folder, pid).read_text())
    except (OSError, ValueError):
        return []
    return [Segment(**s) for s in data.get("segments", [])]


def skew(folder: Path, pid: int, *, rate: float = 1.0, jump: float = 0.0) -> Segment:
    """From now on, ``pid``'s clock steps ``jump`` seconds forward and runs at ``rate``.

    ``rate=1, jump=0`` ends a skew (the offset built up so far stays: a monotonic clock does
    not step back). The file is replaced atomically; returns the segment written.
    """
    segment = Segment(since=_real(), rate=rate, jump=jump)
    folder.mkdir(parents=True, exist_ok=True)
    segments = [*read(folder, pid), segment]
    data = {"pid": pid, "start_time": _start_time(pid),
            "segments": [vars(s) for s in segments]}
    tmp = folder / f".{pid}.json.{os.getpid()}"
    tmp.write_text(json.dumps(data))
    os.replace(tmp, _control(folder, pid))
    return segment


def _poll(now: float) -> None:
    """Apply the control file's new segments, if any (at most every POLL_S of real time).

    Another thread that finds a poll due meanwhile waits for this one (the state it would
    read may be about to move by a whole stop's length); a nested call in the polling thread
    (a signal handler reading the clock) returns at once and reads the state as it was.
    """
    global _state, _applied, _next_poll, _last_poll, _proc, _seen, _polling
    if _dir is None:
        return
    with _poll_lock:
        if _polling or now < _next_poll:  # nested, or another thread polled meanwhile
            return
        _polling = True
        # every earlier reading was before _last_poll + POLL_S (a later one would have
        # polled): a segment applied from there on cannot make the clock step back
        noticed = _last_poll + POLL_S
        try:
            pid = os.getpid()
            if _proc is None or _proc[0] != pid:
                _proc = (pid, _start_time(pid))
            path = _control(_dir, pid)
            try:
                st = os.stat(path)
                if (st.st_ino, st.st_mtime_ns) == _seen:
                    return  # unchanged since it was applied
                data: dict[str, Any] = json.loads(path.read_text())
            except (OSError, ValueError):
                return  # no file (not skewed), or replaced while read: next poll
            if data.get("start_time") != _proc[1]:
                return  # written for an earlier process with this pid
            segments = data.get("segments", [])
            anchor, base, rate = _state
            for raw in segments[_applied:]:
                segment = Segment(**raw)
                if segment.since > now:
                    break  # written after ``now`` was read (this thread was stopped between)
                at = max(segment.since, noticed, anchor)
                base = base + rate * (at - anchor) + segment.jump
                anchor, rate = at, segment.rate
                _applied += 1
            _state = (anchor, base, rate)
            if _applied == len(segments):
                _seen = (st.st_ino, st.st_mtime_ns)
        finally:
            # only now: a thread that sees the next poll not yet due reads the new state
            _last_poll, _next_poll = now, now + POLL_S
            _polling = False


def monotonic() -> float:
    """``time.monotonic()`` as this process's control file skews it (real time without one)."""
    now = _real()
    if now >= _next_poll:
        _poll(now)
        now = _real()  # not before the anchor the poll (this thread's or another's) set
    anchor, base, rate = _state
    # ``now`` read before a poll (of another thread) moved the anchor past it: the clock there
    return base + rate * max(0.0, now - anchor)


def _after_fork_in_child() -> None:
    # the child is a new process: its own file, from the clock it inherited (continuous)
    global _applied, _next_poll, _poll_lock, _seen, _polling
    _poll_lock = threading.RLock()  # a thread of the parent may have held it at the fork
    _polling = False
    _applied = 0
    _seen = None
    _next_poll = 0.0


def install(folder: Path) -> None:
    """Replace ``time.monotonic`` in this process and the children it forks (:func:`monotonic`)."""
    global _dir, _state
    _dir = folder
    now = _real()
    _state = (now, now, 1.0)
    time.monotonic = monotonic
    os.register_at_fork(after_in_child=_after_fork_in_child)


def main() -> None:
    """``python -m faults.clockskew ARGS``: ``celery ARGS`` with a skewable monotonic clock."""
    import faults.history  # noqa: F401 - binds the real clock for the history's ``mono``
    from faults import clockskew  # not this ``__main__`` copy: the one others can import

    folder = os.environ.get(ENV)
    if folder:
        clockskew.install(Path(folder))
    from celery.__main__ import main as celery

    sys.argv[0] = "celery"
    celery()


if __name__ == "__main__":
    main()
