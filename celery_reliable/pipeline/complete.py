"""Completion of one execution: the durable record (PostgreSQL), then ONE round trip
to the store releasing what admission took; and the replay of a finished record."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from celery.exceptions import Ignore, Reject, Retry
from sqlalchemy.exc import SQLAlchemyError

from .. import metrics
from ..classify import is_outage
from ..errors import ReplayedFailure, ResultNotSerializable
from ..guards import idempotency
from ..guards.base import HOOKS, overriding
from ..idempotency import dumps_result
from .headers import log

if TYPE_CHECKING:
    from ..admission import Replay
    from .call import Call, Execution

__all__ = ["complete", "replay", "settle"]


def complete(call: Call, execution: Execution, *, result: Any = None,
             failure: BaseException | None = None) -> None:
    """Settle what admission took: one PostgreSQL commit (if durable), one store call.

    Safe to call twice (``self.retry()`` completes early; the exception it
    raises then passes through here again). Whatever fails in here, the
    ``finally`` settles the store's side, so no lease outlives the delivery.
    """
    if execution.done:
        return
    completing = overriding("completing")
    for kind in execution.release.kinds:
        if kind in completing:
            HOOKS[kind].completing(call, execution, failure)
    try:
        if execution.idem_digest is None:
            settle(call, execution, "X", "")
        elif failure is not None:
            _complete_failure(call, execution, failure)
        else:
            _complete_success(call, execution, result)
    finally:
        if not execution.done:
            if execution.pg is not None:
                execution.pg.abandon()
            settle(call, execution, "X", "")


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
    from . import failure

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


def settle(call: Call, execution: Execution, outcome: str, payload: str) -> list[int]:
    """Complete the store's side in one round trip (idempotency ``outcome``, release the rest)."""
    if execution.done:
        return []
    execution.done = True
    heartbeat = call.runtime.heartbeat
    for lease in execution.leases:
        heartbeat.discard(lease)
    # Ran past the belief in a lease (the local clock says it may have expired)
    overran = [lease for lease in execution.leases
               if HOOKS[lease.kind].reports_overrun and lease.lost]
    # Letting go ends every belief, before the release is sent: once it runs another
    # holder may take the lock (higher token) while a body that goes on after
    # retry(throw=False) still runs, so lock_lost turns true and self.fence refuses.
    for lease in execution.leases:
        lease.end()
    release = execution.release
    idempotency.settle(release, outcome, payload)
    try:
        results = call.store.complete(release)
    except call.store.errors:
        log.warning("celery-reliable: %s could not settle its guards in Redis; leases "
                    "expire by their TTL", call.describe, exc_info=True)
        return []
    reported = set()
    settling = overriding("settled")
    for kind, result in zip(release.kinds, results, strict=True):
        if kind in settling and HOOKS[kind].settled(call, execution, result):
            reported.add(kind)  # said just now: not again below
    for lease in overran:
        if lease.kind not in reported:
            log.warning("celery-reliable: %s finished after the belief in its %s ended "
                        "(it may have expired and been taken over meanwhile)",
                        call.describe, lease.describe)
    return results


def replay(call: Call, stored: Replay) -> Any:
    """The stored outcome of a finished record: its result, or its kept failure raised."""
    metrics.inc("reliable_idempotent_replays_total", task=call.name)
    # Structured fields for log processors, and the signal the pytest plugin's
    # assert_replayed() reads: this task id's outcome came from a stored record.
    extra = {"reliable_event": "replayed", "reliable_task_id": str(call.request.id)}
    if stored.state == "F":
        error = json.loads(stored.payload or "{}")
        log.info("celery-reliable: %s replayed a kept failure", call.describe, extra=extra)
        raise ReplayedFailure(call.name, str(error.get("type")), str(error.get("message")))
    log.info("celery-reliable: %s replayed the stored result (duplicate not run)",
             call.describe, extra=extra)
    return json.loads(stored.payload)
