"""The campaign's history: JSON lines, one event per line, one file per writing process.

Every process (runner, producer, nemesis, each worker pool child) appends to its own file
``<results>/history/<pid>-<role>.jsonl``, so no file is shared and no locking is needed; the
checker reads the whole folder and merges the events by wall-clock time ``t``.

Each event is one JSON object with at least ``t`` (``time.time()``, seconds), ``mono``
(``time.monotonic()`` of the writing process, seconds; only comparable within one pid),
``pid`` and ``type``. The types and their fields are listed in :data:`SCHEMA`; fields whose
value is unknown are omitted (a ``None`` passed to :meth:`Recorder.record` is dropped).

What the checker needs recorded (``faults.checker``):

- ``start`` only once every guard admitted the execution (inside the body), ``end`` before the
  body returns (before the lock, slot or lease is released), from the same process; lock
  tasks carry ``resource`` and ``token``, bucketed ones ``bucket``, tier ones ``tier``.
- ``fenced_write`` for every fence check, refused ones too (``accepted`` false), with the
  execution's ``holder``; ``seq`` when the store gives an acceptance order.
- ``effect`` after the effect committed; ``submit`` with ``key`` for idempotent tasks.
- ``config`` with rate/burst/tolerance (buckets), slots/tier/slot_lease (bulkheads).
- ``nemesis`` start/stop with a ``target`` naming the pool child (``pid N``) or worker
  (its node name) it hit; a nemesis that injected nothing says ``skipped`` in its target.
- after healing: ``final`` per submitted task (``result`` as JSON), ``deadletter`` per row of
  reliable_dead_letters (``at`` in epoch seconds), ``lease`` snapshots, ``phase`` events.

Durability: each event is written with one ``write(2)`` on a descriptor opened with
``O_APPEND``, with no user-space buffer, so an event is in the kernel's page cache as soon as
:meth:`Recorder.record` returns and survives a ``kill -9`` of the writer. A line cut short
(the disk filled, the machine died) is skipped by :func:`load` and counted by :func:`scan`.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "EVENT_TYPES",
    "HISTORY_DIR",
    "SCHEMA",
    "TERMINAL_STATES",
    "Event",
    "Recorder",
    "Scan",
    "history_dir",
    "load",
    "scan",
]

Event = dict[str, Any]

HISTORY_DIR = "history"

# type -> (required fields, optional fields). Every event also carries t, mono, pid, type.
SCHEMA: Mapping[str, tuple[frozenset[str], frozenset[str]]] = {
    "submit": (
        frozenset({"task_id", "workload", "name"}),
        frozenset({"key", "resource", "queue", "tier", "duplicate_of", "args"}),
    ),
    "start": (
        frozenset({"task_id", "workload"}),
        frozenset({"worker", "attempt", "token", "resource", "key", "tier", "bucket", "windows"}),
    ),
    "end": (
        frozenset({"task_id", "workload", "outcome"}),
        frozenset({"error", "token", "resource", "key", "tier", "bucket", "result"}),
    ),
    "fenced_write": (
        frozenset({"task_id", "resource", "token", "accepted", "store"}),
        # seq: the store's acceptance order when it has one (fc_counter_writes.seq, a Redis
        # INCR in the fencing script); without it the checker orders by t
        frozenset({"holder", "value", "seq", "error"}),
    ),
    "effect": (frozenset({"task_id", "workload", "key"}), frozenset({"value"})),
    "nemesis": (frozenset({"name", "action", "target"}), frozenset({"detail"})),
    "phase": (frozenset({"name", "action"}), frozenset()),
    "final": (frozenset({"task_id", "state"}), frozenset({"result", "workload", "key"})),
    "deadletter": (frozenset({"task_id", "reason", "at"}), frozenset({"name"})),
    "lease": (frozenset({"kind", "key", "ttl_ms", "remaining_ms"}), frozenset()),
    "config": (
        frozenset({"workload"}),
        frozenset(
            {
                "rate",
                "burst",
                "window_s",
                "tolerance",
                "slots",
                "lock_ttl",
                "seed",
                "nemeses",
                "minutes",
                "bucket",
                "tier",
                "lease_ttl",
                "slot_lease",
                "breaker",
                "retry_budget",
                "prefix",
                "database_url",
                "broker",
                "kill_workers",
                "windows",
                "window_mode",
                "window_latency_s",
            }
        ),
    ),
}
EVENT_TYPES: frozenset[str] = frozenset(SCHEMA)

END_OUTCOMES = frozenset({"ok", "error", "stale", "deferred", "retry", "lost-lock"})
# Celery states (and the library's documented DROPPED/SKIPPED) that end a task for good.
TERMINAL_STATES = frozenset({"SUCCESS", "FAILURE", "SKIPPED", "DROPPED"})

# Bound at import: a clock nemesis that patches ``time.time``/``time.monotonic`` in a worker
# (to skew what the library believes) must not skew the history the checker orders by.
_wall = time.time
_mono = time.monotonic

_ROLE = re.compile(r"^[A-Za-z0-9_.-]+$")


def history_dir(results_dir: Path | str) -> Path:
    """The folder holding every process's ``.jsonl`` file."""
    return Path(results_dir) / HISTORY_DIR


def validate(event: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless ``event`` has a known type and that type's required fields."""
    kind = event.get("type")
    if not isinstance(kind, str) or kind not in SCHEMA:
        raise ValueError(f"unknown history event type {kind!r} (known: {sorted(SCHEMA)})")
    required, _ = SCHEMA[kind]
    missing = sorted(required - event.keys())
    if missing:
        raise ValueError(f"{kind} event lacks {', '.join(missing)}: {dict(event)!r}")
    if kind == "end" and event["outcome"] not in END_OUTCOMES:
        raise ValueError(f"end outcome {event['outcome']!r} not in {sorted(END_OUTCOMES)}")
    if kind == "fenced_write" and not isinstance(event["accepted"], bool):
        raise ValueError(f"fenced_write.accepted must be a bool: {dict(event)!r}")


class Recorder:
    """Appends events to ``<results>/history/<pid>-<role>.jsonl``, one ``write(2)`` each.

    Safe across ``fork``: a child (a prefork pool process) that records through a Recorder
    inherited from its parent opens its own file named after its own pid, so parent and child
    never interleave in one file. Safe across threads: one lock per Recorder.

    ``record`` validates against :data:`SCHEMA` (a typo in a field name of a required field
    fails loudly in the runner, not silently in the checker) and drops ``None`` values.
    """

    def __init__(self, results_dir: Path | str, role: str) -> None:
        if not _ROLE.match(role):
            raise ValueError(f"role {role!r} must match {_ROLE.pattern} (it names a file)")
        self.results_dir = Path(results_dir)
        self.role = role
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._fd_pid: int | None = None

    @property
    def path(self) -> Path:
        """This process's file (the pid is read now: it changes after a fork)."""
        return history_dir(self.results_dir) / f"{os.getpid()}-{self.role}.jsonl"

    def _descriptor(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._fd_pid != pid:
            # After a fork the inherited descriptor points at the parent's file: leave it
            # to the parent (closing it here would not affect the parent, but is not ours).
            path = self.path
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._fd_pid = pid
        return self._fd

    def record(self, kind: str, /, **fields: Any) -> Event:
        """Write one event of type ``kind`` now; returns it with ``t``, ``mono``, ``pid``."""
        event: Event = {
            "t": _wall(),
            "mono": _mono(),
            "pid": os.getpid(),
            "type": kind,
        }
        event.update({k: v for k, v in fields.items() if v is not None})
        validate(event)
        line = (json.dumps(event, default=repr, separators=(",", ":")) + "\n").encode()
        with self._lock:
            fd = self._descriptor()
            view = memoryview(line)
            while view:  # a regular file takes it all at once; loop only for partial writes
                view = view[os.write(fd, view) :]
        return event

    def emit(self, kind: str, /, **fields: Any) -> Event:
        """Same as :meth:`record` (the name RUN's interim stub used)."""
        return self.record(kind, **fields)

    # Typed shorthands for the common events: the keyword names are the schema's.
    def submit(self, task_id: str, workload: str, name: str, **optional: Any) -> Event:
        return self.record("submit", task_id=task_id, workload=workload, name=name, **optional)

    def start(self, task_id: str, workload: str, **optional: Any) -> Event:
        return self.record("start", task_id=task_id, workload=workload, **optional)

    def end(self, task_id: str, workload: str, outcome: str, **optional: Any) -> Event:
        return self.record("end", task_id=task_id, workload=workload, outcome=outcome, **optional)

    def fenced_write(
        self, task_id: str, resource: str, token: int, accepted: bool, store: str, **optional: Any
    ) -> Event:
        return self.record(
            "fenced_write",
            task_id=task_id,
            resource=resource,
            token=token,
            accepted=accepted,
            store=store,
            **optional,
        )

    def effect(self, task_id: str, workload: str, key: str, **optional: Any) -> Event:
        return self.record("effect", task_id=task_id, workload=workload, key=key, **optional)

    def nemesis(self, name: str, action: str, target: str, **optional: Any) -> Event:
        return self.record("nemesis", name=name, action=action, target=target, **optional)

    def phase(self, name: str, action: str) -> Event:
        return self.record("phase", name=name, action=action)

    def final(self, task_id: str, state: str, **optional: Any) -> Event:
        return self.record("final", task_id=task_id, state=state, **optional)

    def deadletter(self, task_id: str, reason: str, at: float, **optional: Any) -> Event:
        return self.record("deadletter", task_id=task_id, reason=reason, at=at, **optional)

    def lease(self, kind: str, key: str, ttl_ms: int, remaining_ms: int) -> Event:
        return self.record("lease", kind=kind, key=key, ttl_ms=ttl_ms, remaining_ms=remaining_ms)

    def config(self, workload: str, **optional: Any) -> Event:
        return self.record("config", workload=workload, **optional)

    def close(self) -> None:
        """Close this process's descriptor (a later ``record`` reopens it)."""
        with self._lock:
            if self._fd is not None and self._fd_pid == os.getpid():
                os.close(self._fd)
            self._fd = None
            self._fd_pid = None

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Scan:
    """Every event of a results folder, plus the lines that could not be read."""

    events: list[Event] = field(default_factory=list)
    # (file name, line number, why) for each unreadable or schema-invalid line
    malformed: list[tuple[str, int, str]] = field(default_factory=list)
    files: int = 0


def scan(results_dir: Path | str) -> Scan:
    """Read every ``*.jsonl`` file of ``<results>/history``; events sorted by ``t``.

    Ties in ``t`` keep file order (within one file, write order), so one process's events
    never swap. Malformed lines (a torn last line, an unknown type) are collected, not raised:
    the checker reports them as a verdict of their own.
    """
    out = Scan()
    folder = history_dir(results_dir)
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.jsonl")):
        out.files += 1
        with path.open(encoding="utf-8", errors="replace") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                    if not isinstance(event, dict):
                        raise ValueError("not a JSON object")
                    if not isinstance(event.get("t"), (int, float)):
                        raise ValueError("no numeric t")
                    validate(event)
                except ValueError as exc:  # json.JSONDecodeError is a ValueError
                    out.malformed.append((path.name, number, str(exc)[:200]))
                    continue
                out.events.append(event)
    out.events.sort(key=lambda e: float(e["t"]))  # stable: ties keep file/line order
    return out


def load(results_dir: Path | str) -> list[Event]:
    """Every well-formed event of the results folder, sorted by wall-clock ``t``."""
    return scan(results_dir).events
