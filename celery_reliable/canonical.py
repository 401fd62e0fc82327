"""Canonical JSON of task arguments, and fingerprints derived from it.

One spelling per value: keys sorted, no whitespace, integral floats written
as integers (``1.0`` and ``1`` compare equal in Python, so they fingerprint
equally), tuples as lists, and a tagged spelling for the few non-JSON types
Celery's JSON serializer carries (datetime, date, time, UUID, Decimal).
Anything else is refused: a key built from ``str()`` or ``repr()`` of an
object is neither stable nor bounded.
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import json
import math
import uuid
from collections.abc import Mapping
from typing import Any

__all__ = ["NotCanonical", "canonical_json", "fingerprint"]


class NotCanonical(TypeError):
    """A value has no canonical JSON form; ``path`` says where it is."""

    def __init__(self, path: str, value: Any) -> None:
        super().__init__(path, type(value).__name__)
        self.path = path
        self.type_name = type(value).__name__

    def __str__(self) -> str:
        return f"argument {self.path} of type {self.type_name} has no canonical JSON form"


def _normalise(value: Any, path: str) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise NotCanonical(path, value)
        return int(value) if value.is_integer() and abs(value) < 2**53 else value
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise NotCanonical(f"{path}[{key!r}] (a non-string key)", key)
            out[key] = _normalise(item, f"{path}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_normalise(item, f"{path}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dt.datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, dt.date):
        return {"$date": value.isoformat()}
    if isinstance(value, dt.time):
        return {"$time": value.isoformat()}
    if isinstance(value, uuid.UUID):
        return {"$uuid": str(value)}
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise NotCanonical(path, value)
        return {"$decimal": str(value.normalize())}
    raise NotCanonical(path, value)


def canonical_json(value: Any, path: str = "arguments") -> str:
    """The canonical JSON text of ``value``; raises NotCanonical."""
    return json.dumps(
        _normalise(value, path),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )


def fingerprint(value: Any, path: str = "arguments") -> str:
    """SHA-256 hex of the canonical JSON of ``value``."""
    return hashlib.sha256(canonical_json(value, path).encode("utf-8")).hexdigest()
