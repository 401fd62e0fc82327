"""In-process counters of what the guards did.

Always on and cheap (a dict increment). They are readable from Python
(:func:`snapshot`) and are the source for the Prometheus exporter, which
installs itself as this module's *sink* (:func:`set_sink`): every
:func:`inc`, :func:`observe` and :func:`gauge` is forwarded to it.

What the exporter exports is declared as :class:`MetricSpec` entries: each guard's in
its module (``METRICS`` in ``celery_reliable/guards/<name>.py``), the rest in
``celery_reliable.prometheus.exporter``, which composes them (:func:`collect`).
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

__all__ = ["MetricSpec", "Sink", "collect", "gauge", "gauge_value", "inc", "observe",
           "set_sink", "snapshot"]

#: ``sink(name, amount_or_value, labels)``: receives every increment and observation.
Sink = Callable[[str, float, Mapping[str, str]], None]



@dataclass(frozen=True)
class MetricSpec:
    """One exported metric (needs no ``prometheus_client``: the exporter reads it).

    ``labels``: the exported label names (a label passed to :func:`inc` that is not
    listed is summed away); ``relabel``: maps the labels the library passes to the
    exported ones before they are picked.
    """

    name: str  # exported name (counters end in _total)
    kind: str  # counter | histogram | gauge
    doc: str
    labels: tuple[str, ...] = ()
    relabel: Callable[[Mapping[str, str]], Mapping[str, str]] | None = None


def collect(specs: Iterable[MetricSpec]) -> tuple[MetricSpec, ...]:
    """``specs`` as a tuple, refusing a metric name declared twice."""
    out: dict[str, MetricSpec] = {}
    for spec in specs:
        if spec.name in out:
            raise ValueError(f"metric {spec.name!r} is declared twice")
        out[spec.name] = spec
    return tuple(out.values())


_counts: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
_gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
_mutex = threading.Lock()
_sink: Sink | None = None


def set_sink(sink: Sink | None) -> Sink | None:
    """Forward every :func:`inc`/:func:`observe` to ``sink`` (None: stop); returns the old one.

    A sink must be quick and thread-safe; whatever it raises is swallowed (a
    metric must never change what a task does).
    """
    global _sink
    old, _sink = _sink, sink
    return old


def _forward(name: str, amount: float, labels: Mapping[str, str]) -> None:
    sink = _sink
    if sink is not None:
        with contextlib.suppress(Exception):  # a metric never breaks the caller
            sink(name, amount, labels)


def inc(name: str, amount: int = 1, **labels: str) -> None:
    """Add ``amount`` to counter ``name`` with ``labels``."""
    key = (name, tuple(sorted(labels.items())))
    with _mutex:
        _counts[key] += amount
    _forward(name, amount, labels)


def observe(name: str, value: float, **labels: str) -> None:
    """One observation for histogram ``name`` (only forwarded to the sink; not counted here)."""
    _forward(name, value, labels)


def gauge(name: str, value: float, **labels: str) -> None:
    """Set gauge ``name`` with ``labels`` to ``value`` in this process."""
    with _mutex:
        _gauges[(name, tuple(sorted(labels.items())))] = value
    _forward(name, value, labels)


def gauge_value(name: str, **labels: str) -> float | None:
    """One gauge's value in this process (None if never set)."""
    with _mutex:
        return _gauges.get((name, tuple(sorted(labels.items()))))


def snapshot() -> dict[tuple[str, tuple[tuple[str, str], ...]], int]:
    """A copy of every counter of this process."""
    with _mutex:
        return dict(_counts)


def value(name: str, **labels: str) -> int:
    """One counter's value in this process (0 if never incremented)."""
    with _mutex:
        return _counts[(name, tuple(sorted(labels.items())))]
