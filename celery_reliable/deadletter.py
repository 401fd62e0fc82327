"""Dead letters: tasks that will not be retried, kept in PostgreSQL to inspect and replay.

A task is dead-lettered when its retries are exhausted, its retry budget is
spent, its error is not retryable, its deadline passed, or its worker died
more than ``max_redeliveries`` times while running it ("worker lost").
Arguments are stored as JSON (non-JSON values as tagged ``repr`` strings,
which makes the letter not replayable); nothing is ever unpickled.
"""

from __future__ import annotations

import builtins
import json
import traceback as tb
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, delete, func, insert, select, update

from .schema import dead_letters

__all__ = ["DeadLetter", "DeadLetters", "to_json"]


def _tag(value: Any) -> Any:
    return {"$repr": repr(value)[:1000]}


def to_json(value: Any) -> tuple[str, bool]:
    """JSON text of ``value`` and whether it round-trips (replayable)."""
    try:
        return json.dumps(value, allow_nan=False), True
    except (TypeError, ValueError):
        return json.dumps(value, default=_tag), False


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered task."""

    id: int
    task_name: str
    task_id: str
    args: list[Any]
    kwargs: dict[str, Any]
    replayable: bool
    exc_type: str
    exc_message: str
    traceback: str
    attempts: int
    reason: str
    queue: str | None
    first_failure_at: datetime
    last_failure_at: datetime
    replayed_as: str | None


def record(engine: Engine, *, task_name: str, task_id: str, args: Any, kwargs: Any,
           exc: BaseException | None, attempts: int, reason: str, queue: str | None,
           first_failure_at: datetime | None) -> int:
    """Insert one dead letter; returns its id."""
    args_json, ok_args = to_json(list(args or ()))
    kwargs_json, ok_kwargs = to_json(dict(kwargs or {}))
    trace = "".join(tb.format_exception(exc)) if exc is not None else ""
    with engine.begin() as conn:
        row_id = conn.execute(
            insert(dead_letters).values(
                task_name=task_name, task_id=task_id, args_json=args_json,
                kwargs_json=kwargs_json, replayable=ok_args and ok_kwargs,
                exc_type=type(exc).__name__ if exc is not None else "",
                exc_message=str(exc)[:4000] if exc is not None else "",
                traceback=trace[-20000:], attempts=attempts, reason=reason, queue=queue,
                first_failure_at=first_failure_at or func.now(),
            ).returning(dead_letters.c.id)
        ).scalar_one()
    return int(row_id)


class DeadLetters:
    """List, inspect, replay and purge dead letters of one app."""

    def __init__(self, app: Any, engine: Engine | None = None) -> None:
        from .runtime import runtime_for

        self.app = app
        self.engine = engine if engine is not None else runtime_for(app).engine

    @staticmethod
    def _letter(row: Any) -> DeadLetter:
        return DeadLetter(
            id=row.id, task_name=row.task_name, task_id=row.task_id,
            args=json.loads(row.args_json), kwargs=json.loads(row.kwargs_json),
            replayable=row.replayable, exc_type=row.exc_type, exc_message=row.exc_message,
            traceback=row.traceback, attempts=row.attempts, reason=row.reason, queue=row.queue,
            first_failure_at=row.first_failure_at, last_failure_at=row.last_failure_at,
            replayed_as=row.replayed_as,
        )

    def list(self, *, task_name: str | None = None, reason: str | None = None,
             limit: int = 100) -> builtins.list[DeadLetter]:
        """Newest first."""
        query = select(dead_letters).order_by(dead_letters.c.id.desc()).limit(limit)
        if task_name is not None:
            query = query.where(dead_letters.c.task_name == task_name)
        if reason is not None:
            query = query.where(dead_letters.c.reason == reason)
        with self.engine.connect() as conn:
            return [self._letter(r) for r in conn.execute(query)]

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(dead_letters)).scalar_one())

    def get(self, letter_id: int) -> DeadLetter:
        """One letter; raises KeyError if there is none with that id."""
        with self.engine.connect() as conn:
            row = conn.execute(select(dead_letters).where(dead_letters.c.id == letter_id)).first()
        if row is None:
            raise KeyError(f"no dead letter with id {letter_id}")
        return self._letter(row)

    def replay(self, letter_id: int) -> str:
        """Re-publish the task with a new id and attempts reset; returns the new task id."""
        letter = self.get(letter_id)
        if not letter.replayable:
            raise ValueError(f"dead letter {letter_id} ({letter.task_name}) has arguments that "
                             "were not JSON; it cannot be replayed")
        options = {"queue": letter.queue} if letter.queue else {}
        result = self.app.send_task(letter.task_name, args=letter.args, kwargs=letter.kwargs,
                                    **options)
        with self.engine.begin() as conn:
            conn.execute(update(dead_letters).where(dead_letters.c.id == letter_id)
                         .values(replayed_as=result.id, replayed_at=func.now()))
        return str(result.id)

    def purge(self, *, older_than_days: float | None = None,
              ids: builtins.list[int] | None = None) -> int:
        """Delete letters (all, older than a number of days, or by id); returns how many."""
        stmt = delete(dead_letters)
        if ids is not None:
            stmt = stmt.where(dead_letters.c.id.in_(ids))
        if older_than_days is not None:
            stmt = stmt.where(dead_letters.c.last_failure_at
                              < func.now() - func.make_interval(0, 0, 0, 0, 0, 0,
                                                                older_than_days * 86400))
        with self.engine.begin() as conn:
            return int(conn.execute(stmt).rowcount or 0)
