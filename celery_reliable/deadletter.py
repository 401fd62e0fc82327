"""Dead letters: tasks that will not be retried, kept in PostgreSQL to inspect and replay.

A task is dead-lettered when its retries are exhausted, its retry budget is
spent, its error is not retryable, its deadline passed, or its worker died
more than ``max_redeliveries`` times while running it ("worker lost").
Arguments are stored as JSON (non-JSON values as tagged ``repr`` strings,
which makes the letter not replayable); nothing is ever unpickled. So are the
call's own message headers (:func:`call_headers`: the producer's
``idempotency_key`` and any other header it set) and the key of its
idempotency record: :meth:`DeadLetters.replay` is the same call again, under
the same key.
"""

from __future__ import annotations

import builtins
import json
import logging
import traceback as tb
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, and_, delete, func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import ProgrammingError

from .classify import sqlstate
from .schema import dead_letters, idempotency
from .scripts import script

__all__ = ["DeadLetter", "DeadLetters", "call_headers", "to_json"]

log = logging.getLogger("celery_reliable")

#: celery-reliable's own message headers are named ``reliable_*`` (deferral count,
#: first failure, previous retry delay, lock wait, bucket places, the dead-letter
#: mark): bookkeeping of one delivery, never part of the call.
_BOOKKEEPING_PREFIX = "reliable_"


def _tag(value: Any) -> Any:
    return {"$repr": repr(value)[:1000]}


def to_json(value: Any) -> tuple[str, bool]:
    """JSON text of ``value`` and whether it round-trips (replayable)."""
    try:
        return json.dumps(value, allow_nan=False), True
    except (TypeError, ValueError):
        return json.dumps(value, default=_tag), False


def call_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """The message headers that belong to the call: the ones its producer set.

    That is every custom header (Celery's ``request.headers``: the
    ``idempotency_key``, a trace or tenant id of yours) except celery-reliable's
    own ``reliable_*`` bookkeeping, which describes one delivery (a replay starts
    afresh). A header with no JSON form is left out.
    """
    kept: dict[str, Any] = {}
    for name, value in (headers or {}).items():
        if not isinstance(name, str) or name.startswith(_BOOKKEEPING_PREFIX):
            continue
        if to_json(value)[1]:
            kept[name] = value
    return kept


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
    #: The call's message headers (:func:`call_headers`), sent again by ``replay``.
    headers: dict[str, Any] = field(default_factory=dict)
    #: The key of the call's idempotency record (``keys.idempotency_digest``), if any.
    idempotency_digest: str | None = None


def record(engine: Engine, *, task_name: str, task_id: str, args: Any, kwargs: Any,
           exc: BaseException | None, attempts: int, reason: str, queue: str | None,
           first_failure_at: datetime | None, headers: Mapping[str, Any] | None = None,
           idempotency_digest: str | None = None) -> int:
    """Insert one dead letter; returns its id.

    ``headers``: the call's message headers (filtered by :func:`call_headers`);
    ``idempotency_digest``: the key of its idempotency record, so that a replay
    can take out a kept failure under it.
    """
    kept_headers = call_headers(headers)
    args_json, ok_args = to_json(list(args or ()))
    kwargs_json, ok_kwargs = to_json(dict(kwargs or {}))
    trace = "".join(tb.format_exception(exc)) if exc is not None else ""
    values: dict[str, Any] = dict(
        task_name=task_name, task_id=task_id, args_json=args_json,
        kwargs_json=kwargs_json, replayable=ok_args and ok_kwargs,
        exc_type=type(exc).__name__ if exc is not None else "",
        exc_message=str(exc)[:4000] if exc is not None else "",
        traceback=trace[-20000:], attempts=attempts, reason=reason, queue=queue,
        first_failure_at=first_failure_at or func.now(),
    )
    added = {"headers_json": json.dumps(kept_headers) if kept_headers else None,
             "idempotency_digest": idempotency_digest}
    try:
        return _insert(engine, {**values, **added})
    except ProgrammingError as exc:
        if sqlstate(exc) != "42703":  # undefined column
            raise
    # A table from before those columns (not migrated yet, reliable_create_tables off):
    # keep the letter without them rather than lose it.
    log.warning("celery-reliable: reliable_dead_letters lacks the headers_json and "
                "idempotency_digest columns; dead letter of %s[%s] recorded without them "
                "(run `celery -A proj reliable migrate`)", task_name, task_id)
    return _insert(engine, values)


def _insert(engine: Engine, values: dict[str, Any]) -> int:
    with engine.begin() as conn:
        row_id = conn.execute(
            insert(dead_letters).values(**values).returning(dead_letters.c.id)
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
            headers=json.loads(row.headers_json) if row.headers_json else {},
            idempotency_digest=row.idempotency_digest,
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

    def replay(self, letter_id: int, *, force: bool = False) -> str:
        """Re-publish the task with a new id and attempts reset; returns the new task id.

        A letter is replayed once: a second ``replay`` (two operators, a
        retried script) raises ``ValueError`` naming the earlier replay, since
        a task without an idempotency key would run twice. ``force=True``
        replays it again on purpose. Concurrent replays of one letter are
        serialised on its row (``SELECT ... FOR UPDATE``).

        The replay is the same call: the same arguments, the same message headers
        (:func:`call_headers`, so the producer's ``idempotency_key`` with them) and
        so the same idempotency key. A failure kept under that key
        (``idempotency_keep_failures``) is taken out first, in PostgreSQL and in
        Redis, so the replay runs instead of replaying it; a key that succeeded
        meanwhile replays its result (the effect already happened). Duplicates of
        the original stay safe: until the replay is published they replay the
        failure; after it, exactly one of them or the replay runs (they share the
        key), the others replay its outcome.

        The letter is marked ``replayed_as`` in the same PostgreSQL transaction
        as the kept failure is deleted, committed only once the broker took the
        message. If publishing fails, the failure is put back (the transaction
        rolls back; Redis gets it back unless the key was claimed meanwhile) and
        the error is raised: the letter stays unreplayed.
        """
        letter = self.get(letter_id)
        if not letter.replayable:
            raise ValueError(f"dead letter {letter_id} ({letter.task_name}) has arguments that "
                             "were not JSON; it cannot be replayed")
        options: dict[str, Any] = {"queue": letter.queue} if letter.queue else {}
        if letter.headers:
            options["headers"] = dict(letter.headers)
        with self.engine.begin() as conn:
            earlier = conn.execute(select(dead_letters.c.replayed_as)
                                   .where(dead_letters.c.id == letter_id)
                                   .with_for_update()).scalar()
            if earlier is not None and not force:
                raise ValueError(f"dead letter {letter_id} ({letter.task_name}) was already "
                                 f"replayed as task {earlier}; replay it again with force=True "
                                 "(`reliable dlq replay --force`)")
            restore = self._forget_kept_failure(conn, letter)
            try:
                result = self.app.send_task(letter.task_name, args=letter.args,
                                            kwargs=letter.kwargs, **options)
            except BaseException:
                restore()
                raise
            conn.execute(update(dead_letters).where(dead_letters.c.id == letter_id)
                         .values(replayed_as=result.id, replayed_at=func.now()))
        return str(result.id)

    def _forget_kept_failure(self, conn: Connection, letter: DeadLetter) -> Callable[[], None]:
        """Take out a failure kept under the letter's idempotency key; returns an undo.

        PostgreSQL: the row is deleted in ``conn``'s transaction (only a state
        ``F`` row), so a duplicate claiming the key waits for the outcome: the
        commit (it runs; the replay then replays its result) or the rollback (it
        replays the failure). Redis: ``forget_failure.lua`` (only an ``F``
        record). Deleting PostgreSQL's first means a duplicate that misses in
        Redis cannot fetch the failure back from PostgreSQL (its claim blocks).
        One window stays: a duplicate that read the failure from PostgreSQL just
        before (Redis had lost the record) may still write it back to Redis; the
        replay then raises ``ReplayedFailure``, and replaying again runs it.
        """
        digest = letter.idempotency_digest
        if digest is None:
            return lambda: None
        conn.execute(delete(idempotency).where(and_(
            idempotency.c.task == letter.task_name, idempotency.c.key_digest == digest,
            idempotency.c.state == "F")))
        from .runtime import runtime_for

        runtime = runtime_for(self.app)
        key = runtime.keys.idempotency_record(digest)
        taken = script("forget_failure")(runtime.redis, [key], [])

        def restore() -> None:
            if not taken:
                return
            try:
                script("restore_failure")(runtime.redis, [key], list(taken))
            except Exception:
                log.error("celery-reliable: could not put back the kept failure of dead letter "
                          "%d (%s) in Redis (with the PostgreSQL store, PostgreSQL still has "
                          "it)", letter.id, letter.task_name, exc_info=True)

        return restore

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
