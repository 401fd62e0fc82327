"""In-process counters of what the guards did.

Always on and cheap (a dict increment). They are readable from Python
(:func:`snapshot`) and are the source for the Prometheus exporter.
"""

from __future__ import annotations

import threading
from collections import Counter

__all__ = ["inc", "snapshot"]

_counts: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
_mutex = threading.Lock()


def inc(name: str, amount: int = 1, **labels: str) -> None:
    """Add ``amount`` to counter ``name`` with ``labels``."""
    key = (name, tuple(sorted(labels.items())))
    with _mutex:
        _counts[key] += amount


def snapshot() -> dict[tuple[str, tuple[tuple[str, str], ...]], int]:
    """A copy of every counter of this process."""
    with _mutex:
        return dict(_counts)


def value(name: str, **labels: str) -> int:
    """One counter's value in this process (0 if never incremented)."""
    with _mutex:
        return _counts[(name, tuple(sorted(labels.items())))]
