"""Which Recorder to use: CHECK's ``faults.history`` when present, else the stub."""

from __future__ import annotations

import importlib
from typing import Any


def _recorder_class() -> Any:
    try:
        return importlib.import_module("faults.history").Recorder
    except ImportError:  # until branch campaign-check is merged
        from faults._recorder_stub import Recorder

        return Recorder


Recorder = _recorder_class()

__all__ = ["Recorder"]
