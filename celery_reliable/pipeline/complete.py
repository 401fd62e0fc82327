"""Completion of one execution: the durable record (PostgreSQL), then ONE round trip
to the store releasing what admission took; and the replay of a finished record."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from .. import metrics
from ..errors import ReplayedFailure
from ..guards.base import HOOKS, overriding
from .headers import log

if TYPE_CHECKING:
    from ..admission import Replay
    from .call import Call, Execution

__all__ = ["complete", "replay", "settle"]


def complete(call: Call, execution: Execution, *, result: Any = None,
             failure: BaseException | None = None) -> None:
    """Settle what admission took: each guard's ``finish`` (the idempotency record's
    PostgreSQL commit, if durable), then one store call.

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
        finishing = overriding("finish")
        for kind in dict.fromkeys(execution.release.kinds):
            if kind in finishing and HOOKS[kind].finish(call, execution, result, failure):
                break
        else:
            settle(call, execution)
    finally:
        if not execution.done:
            abandoning = overriding("abandon")
            for kind in dict.fromkeys(execution.release.kinds):
                if kind in abandoning:
                    HOOKS[kind].abandon(call, execution)
            settle(call, execution)


def settle(call: Call, execution: Execution) -> list[int]:
    """Complete the store's side in one round trip: every release entry as the guards
    left it (the idempotency record forgotten unless its guard said otherwise)."""
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
