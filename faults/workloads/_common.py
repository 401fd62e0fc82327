"""What every workload shares: the per-process recorder and engine, and start/end events."""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from celery.exceptions import Retry

from celery_reliable import StaleFenceToken
from faults.history import Recorder

_recorders: dict[int, Recorder] = {}
_engines: dict[int, sa.Engine] = {}


def recorder() -> Recorder:
    """This process's recorder (a prefork child gets its own file after the fork)."""
    pid = os.getpid()
    if pid not in _recorders:
        _recorders[pid] = Recorder(Path(os.environ["FAULTS_RESULTS"]), "worker")
    return _recorders[pid]


def engine() -> sa.Engine:
    """This process's engine to the workloads' tables (through the workers' proxy)."""
    pid = os.getpid()
    if pid not in _engines:
        _engines[pid] = sa.create_engine(
            os.environ["FAULTS_DATABASE_URL"],
            pool_pre_ping=True,
            connect_args={"connect_timeout": 5},
        )
    return _engines[pid]


@contextmanager
def recorded(task: Any, workload: str, **fields: Any) -> Iterator[dict[str, Any]]:
    """``start`` on entry, ``end`` with the outcome on exit (the body's own view)."""
    rec = recorder()
    request = task.request
    rec.emit("start", task_id=request.id, workload=workload, worker=request.hostname,
             attempt=request.retries, **fields)
    end_fields = {k: fields[k] for k in ("token", "resource") if k in fields}
    out: dict[str, Any] = {}
    try:
        yield out
    except StaleFenceToken as exc:
        lost = bool(fields.get("token") is not None and task.lock_lost)
        rec.emit("end", task_id=request.id, workload=workload,
                 outcome="lost-lock" if lost else "stale", error=repr(exc), **end_fields)
        raise
    except Retry:
        rec.emit("end", task_id=request.id, workload=workload, outcome="retry", **end_fields)
        raise
    except BaseException as exc:
        rec.emit("end", task_id=request.id, workload=workload, outcome="error",
                 error=repr(exc), **end_fields)
        raise
    rec.emit("end", task_id=request.id, workload=workload, outcome="ok", **end_fields)


@dataclass
class Producer:
    """What a workload's ``produce`` gets: the app, a seeded RNG and the runner's recorder."""

    app: Any
    rng: random.Random
    recorder: Any
    submitted: dict[str, str] = field(default_factory=dict)  # task id -> workload
    publish: Callable[..., None] | None = None

    def send(self, workload: str, name: str, *, queue: str = "fc",
             kwargs: dict[str, Any], **fields: Any) -> str:
        """Publish one task (its id chosen here), recording ``submit`` once it was accepted."""
        task_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        assert self.publish is not None
        self.publish(name, task_id=task_id, queue=queue, kwargs=kwargs)
        self.recorder.emit("submit", task_id=task_id, workload=workload, name=name,
                           queue=queue, **fields)
        self.submitted[task_id] = workload
        return task_id
