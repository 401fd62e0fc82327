"""A failed execution: retried or terminal; dead letters, and redeliveries of them."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, NoReturn

from celery import states
from celery.exceptions import Ignore, Reject, Retry

from .. import deadletter, metrics
from ..classify import is_outage, sqlstate
from ..errors import ReplayedFailure, StorageError
from ..guards import deliveries
from .headers import FIRST_FAILURE_HEADER, IDEMPOTENCY_HEADER, deliveries_ttl, header, log

if TYPE_CHECKING:
    from ..idempotency import PostgresRecord
    from .call import Call, Execution

__all__ = ["counts_deliveries", "dead_letter", "dead_redelivery", "defer_outage",
           "mark_dead", "on_failure", "outage_in"]


def counts_deliveries(call: Call) -> bool:
    """Poison-message counting: only where a dead worker's task is redelivered."""
    return bool(call.acks_late() and not call.request.is_eager
                and call.policy.max_redeliveries is not None)


def on_failure(call: Call, exc: Exception) -> BaseException:
    """What the body's exception becomes: a retry (``Retry``) or a terminal failure.

    Retries happen for classified failures when the task has a ``backoff``
    policy (Celery's ``autoretry_for`` retries on its own, through
    ``retry()``). Terminal failures are dead-lettered once, and a
    delivery whose failure is dead-lettered is done: it never retries.
    """
    if isinstance(exc, (Retry, Ignore, Reject)):
        return exc  # type: ignore[no-any-return]  # Celery is untyped
    request, policy = call.request, call.policy
    if getattr(request, "_reliable_retried", False):
        # self.retry(throw=False) already published this delivery's retry: the
        # failure is not terminal (Celery records FAILURE now and the retry runs
        # later, with its own guards), so neither retried twice nor dead-lettered,
        # which would also mark the task id and stop that retry (mark_dead).
        return exc
    if getattr(request, "_reliable_dead_lettered", False):
        # retry() (called by autoretry_for) already made this failure
        # terminal; retrying now would run a dead-lettered task again.
        return exc
    if policy.backoff is not None and call.retryable(exc):
        try:
            call.task.retry(exc=exc)
        except Retry as retry:
            return retry  # type: ignore[no-any-return]
        except Exception as final:  # retries exhausted, deadline or budget
            dead_letter(call, final, "retries exhausted")
            return final
    dead_letter(call, exc, "not retryable" if policy.backoff else "failed")
    return exc


def dead_letter(call: Call, exc: BaseException, reason: str) -> None:
    """Record a terminal failure once (PostgreSQL, optional queue, metric); never raises."""
    task, request = call.task, call.request
    if getattr(request, "_reliable_dead_lettered", False):
        return
    # The mark makes this delivery's failure terminal (see on_failure and
    # retry), whether or not a letter is recorded.
    request._reliable_dead_lettered = True
    if not call.policy.dead_letter:
        mark_dead(call)
        return
    metrics.inc("reliable_dead_letters_total", task=task.name, reason=reason)
    runtime = call.runtime
    first = header(request, FIRST_FAILURE_HEADER)
    info = getattr(request, "delivery_info", None) or {}
    queue = info.get("routing_key") or info.get("queue")
    # The call's own headers (the producer's idempotency_key, ...) and its record's
    # key go with the letter: a replay is the same call, under the same key.
    headers = deadletter.call_headers(getattr(request, "headers", None))
    header_key = header(request, IDEMPOTENCY_HEADER)
    if header_key is not None:
        headers[IDEMPOTENCY_HEADER] = header_key
    execution = getattr(request, "_reliable_execution", None)
    try:
        letter = deadletter.record(
            runtime.task_engine(), task_name=task.name, task_id=str(request.id),
            args=request.args, kwargs=request.kwargs, exc=exc,
            attempts=int(request.retries or 0) + 1, reason=reason, queue=queue,
            first_failure_at=(datetime.fromtimestamp(float(first), timezone.utc)
                              if first else None),
            headers=headers,
            idempotency_digest=execution.idem_digest if execution is not None else None,
        )
        log.warning("celery-reliable: %s dead-lettered (%s) as #%d: %r", call.describe,
                    reason, letter, exc)
    except Exception:
        log.error("celery-reliable: %s could not be dead-lettered (%s)", call.describe,
                  reason, exc_info=True)
    mark_dead(call)
    dlq = runtime.settings.dead_letter_queue
    if dlq:
        try:
            task.app.send_task(task.name, args=request.args, kwargs=request.kwargs,
                               queue=dlq, headers={**headers, "reliable_dead_letter": reason})
        except Exception:
            log.error("celery-reliable: %s could not be published to the dead-letter "
                      "queue %r", call.describe, dlq, exc_info=True)


def dead_redelivery(call: Call) -> NoReturn:
    """Admission found this task id dead-lettered: this delivery must not run.

    It is a redelivery of a delivery whose failure was final (its ack was
    lost: the broker died, or the connection broke, before it arrived). It
    ends with ``Ignore`` (acknowledged, nothing stored) when the result
    backend holds the task id's final state; otherwise with
    :class:`ReplayedFailure`, which Celery stores as ``FAILURE``: that
    failure never reached the backend (the worker was killed after the
    letter was recorded, or the backend was down), or Celery overwrote it
    with ``STARTED`` as this delivery began (``track_started``).
    """
    task, request = call.task, call.request
    metrics.inc("reliable_dead_redeliveries_total", task=task.name)
    if request.ignore_result or task.ignore_result or _result_ready(call):
        log.warning("celery-reliable: %s was dead-lettered; this redelivery of it "
                    "(its ack was lost) is not run", call.describe)
        raise Ignore()
    log.warning("celery-reliable: %s was dead-lettered; this redelivery of it (its "
                "ack was lost) is not run, and stores FAILURE (the backend no longer held "
                "a final state)", call.describe)
    raise ReplayedFailure(
        task.name, "DeadLettered",
        f"task id {request.id} was dead-lettered (reliable_dead_letters); a redelivery "
        "of it is not run, and its own failure was not in the result backend")


def _result_ready(call: Call) -> bool:
    """The result backend holds a final state of this task id (False if unreadable)."""
    try:
        meta = call.task.backend.get_task_meta(call.request.id, cache=False)
    except Exception:  # disabled or unreachable: let Celery try to store the failure
        log.debug("celery-reliable: %s could not read its result state", call.describe,
                  exc_info=True)
        return False
    return meta.get("status") in states.READY_STATES


def mark_dead(call: Call) -> None:
    """This task id's failure is final: a redelivery of it must not run (admit.lua, D).

    Where deliveries are counted (``acks_late``, ``max_redeliveries``), the
    deliveries set of the task id gets the mark ``!dead`` for
    :data:`~celery_reliable.pipeline.headers.DELIVERIES_TTL` (or twice the
    redelivery window), right after the letter is recorded (and again by
    completion, which keeps it, as does the completion of another delivery of
    the task id running at the same time): if the broker never gets this
    delivery's ack (it died first) and delivers the message again, admission
    ignores it. A replay is a new task id. Never raises: the mark is best effort
    (without it, such a redelivery runs again, as in plain Celery).
    """
    if not counts_deliveries(call):
        return
    runtime = call.runtime
    key = runtime.keys.deliveries(str(call.request.id))
    ttl = deliveries_ttl(runtime)
    execution = getattr(call.request, "_reliable_execution", None)
    if execution is not None:
        deliveries.mark_dead_on(execution.release, ttl)
    try:
        call.store.mark_dead(key, ttl)
    except call.store.errors:
        log.warning("celery-reliable: %s could not mark its task id dead-lettered in "
                    "Redis; a redelivery of it would run again", call.describe, exc_info=True)


def defer_outage(call: Call, execution: Execution) -> NoReturn:
    """PostgreSQL failed under ``idempotent_transaction()``: defer, like a failed commit.

    Nothing of this run committed. Every guard is released (the key is
    forgotten), no retry is consumed and nothing is dead-lettered; the
    redelivery waits for PostgreSQL in admission and runs once it is back.
    """
    from .call import Deferred
    from .complete import complete

    cause = execution.outage
    complete(call, execution, failure=Deferred())
    call.defer("PostgreSQL failed inside idempotent_transaction", cause=cause)
    raise StorageError(f"{call.name}: PostgreSQL failed") from cause  # pragma: no cover


def outage_in(exc: BaseException, record: PostgresRecord) -> bool:
    """``exc``, or an exception it was raised from or while handling, is an outage of the
    execution's own transaction: its connection was lost to one, or the server reported one.

    A client-side failure (no SQLSTATE) of some other connection the body uses leaves the
    execution's connection alive, and is the body's own failure.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if (isinstance(current, Exception) and is_outage(current)
                and (record.lost or sqlstate(current) is not None)):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False
