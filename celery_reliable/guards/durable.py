"""The idempotency guard's durable record (``idempotency_store="postgres"``): opened
when the execution is admitted, committed with its outcome at completion.

Called by the guard's hooks (:mod:`celery_reliable.guards.idempotency`: ``admitted``,
``finish``, ``abandon``); the record itself is :class:`celery_reliable.idempotency.
PostgresRecord`. With the Redis-only store none of this runs: the record is Redis'.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from celery.exceptions import Ignore, Reject, Retry
from sqlalchemy.exc import SQLAlchemyError

from ..admission import Replay
from ..classify import is_outage
from ..errors import IdempotencyKeyMismatch, ResultNotSerializable
from ..idempotency import dumps_result, open_record
from ..pipeline.complete import settle as settle_store
from ..pipeline.headers import log
from .idempotency import settle as record_outcome

if TYPE_CHECKING:
    from ..pipeline.call import Call, Execution

__all__ = ["claim_durably", "finish", "keep_failure"]


def claim_durably(call: Call, execution: Execution) -> bool:
    """Open this execution's PostgreSQL transaction; False if it deferred (eager only).

    A committed record found here means Redis had lost it: it is written
    back to Redis and replayed, or refused as a mismatch.
    """
    assert execution.idem_digest is not None
    runtime = call.runtime
    try:
        record = open_record(
            runtime.task_engine(),  # creates missing tables on first use
            call.name,
            execution.idem_digest,
            execution.fingerprint,
            call.policy.idempotency.ttl,
            runtime.settings,
        )
        existing = record.begin()
        runtime.health.postgres.ok()
    except SQLAlchemyError as exc:
        settle(call, execution, "X", "")
        # A schema problem is configuration: fixed now, or failed at once, never waited out.
        if runtime.schema_problem(exc):
            log.warning("celery-reliable: %s found celery-reliable's tables missing; "
                        "they are created again before it runs", call.describe)
            call.defer("PostgreSQL tables missing", cause=exc)
        else:
            runtime.health.postgres.failed(exc)  # a WARNING per interval, and the gauge
            call.defer("PostgreSQL unavailable", cause=exc)
        return False
    if existing is None:
        execution.pg = record
        return True
    if existing.fingerprint != record.fingerprint:
        settle(call, execution, "X", "")
        raise IdempotencyKeyMismatch(call.name, execution.idem_digest)
    settle(call, execution, existing.state, existing.payload)
    execution.replay = Replay(0, existing.state, existing.payload)
    return True


def finish(call: Call, execution: Execution, result: Any,
           failure: BaseException | None) -> None:
    """Record the outcome (PostgreSQL if durable, then the store's side)."""
    if failure is not None:
        _complete_failure(call, execution, failure)
    else:
        _complete_success(call, execution, result)


def _complete_failure(call: Call, execution: Execution, failure: BaseException) -> None:
    terminal = isinstance(failure, Exception) and not isinstance(
        failure, (Retry, Ignore, Reject))
    if terminal and call.policy.idempotency.keep_failures:
        keep_failure(call, execution, type(failure).__name__, str(failure))
        return
    if execution.pg is not None:
        execution.pg.abandon()
    settle(call, execution, "X", "")


def keep_failure(call: Call, execution: Execution, exc_type: str, message: str) -> None:
    """Record a terminal failure (Redis and PostgreSQL); duplicates raise ReplayedFailure."""
    payload = json.dumps({"type": exc_type, "message": message[:2000]})
    if execution.pg is not None:
        try:
            execution.pg.fail_kept(payload)
        except SQLAlchemyError:
            log.error("celery-reliable: %s could not record its kept failure in "
                      "PostgreSQL", call.describe, exc_info=True)
    settle(call, execution, "F", payload)


def _complete_success(call: Call, execution: Execution, result: Any) -> None:
    from ..pipeline import failure

    pg = execution.pg
    try:
        payload = dumps_result(result)
    except (TypeError, ValueError) as exc:
        # The body ran: forgetting the key would run its effects again on
        # every duplicate. Keep it as a failure that duplicates replay.
        error = ResultNotSerializable(call.name, str(exc))
        keep_failure(call, execution, type(error).__name__, str(error))
        raise error from exc
    if pg is not None:
        try:
            pg.succeed(payload)
        except SQLAlchemyError as exc:
            if pg.session_used:
                # The task's own rows were in this transaction: they did not
                # commit (or PostgreSQL will tell the redelivery they did).
                if is_outage(exc) or execution.outage is not None:
                    execution.release.deferred()  # nothing of it happened: not a run
                    settle(call, execution, "X", "")
                    call.defer("PostgreSQL commit failed", cause=exc)
                    return
                settle(call, execution, "X", "")
                # PostgreSQL refused the task's own rows (a deferred constraint):
                # the task failed, as if its body had raised this.
                final = failure.on_failure(call, exc)
                if final is exc:
                    raise
                raise final from exc
            try:  # the effect happened: make the record durable on its own
                pg.record_success(payload)
            except SQLAlchemyError:
                log.error("celery-reliable: %s ran but its durable record could not "
                          "be committed; only Redis remembers it", call.describe,
                          exc_info=True)
    settle(call, execution, "S", payload)


def settle(call: Call, execution: Execution, outcome: str, payload: str) -> None:
    """Settle with the record's ``outcome``: ``S`` with result JSON, ``F`` with error JSON,
    ``X`` forgotten (this guard's release entry), and everything else as the guards left it."""
    record_outcome(execution.release, outcome, payload)
    settle_store(call, execution)
