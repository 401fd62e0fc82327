"""A minimal history recorder, interface-compatible with ``faults.history.Recorder``.

Used only until ``faults/history.py`` (branch campaign-check) is in the tree:
``Recorder(results_dir, role).emit(type, **fields)`` appends one JSON line to
``<results>/history/<pid>-<role>.jsonl`` with ``t``, ``mono`` and ``pid`` added.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class Recorder:
    """Appends events of this process to its own file (no locking: one writer per file)."""

    def __init__(self, results_dir: Path | str, role: str) -> None:
        self.pid = os.getpid()
        folder = Path(results_dir) / "history"
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{self.pid}-{role}.jsonl"
        # O_APPEND + one write per line: a kill -9 loses at most the line being written
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def emit(self, type: str, **fields: Any) -> None:
        event = {"t": time.time(), "mono": time.monotonic(), "pid": self.pid, "type": type}
        event.update({k: v for k, v in fields.items() if v is not None})
        os.write(self._fd, (json.dumps(event, default=str) + "\n").encode())

    def close(self) -> None:
        os.close(self._fd)
