"""The pipeline of one task execution: plan -> admit -> (replay | refuse | run) -> complete.

:func:`run` is the whole of it, called by :meth:`ReliableTask.__call__
<celery_reliable.task.ReliableTask.__call__>` for a guarded delivery:

1. **plan**    :func:`make_plan`: every guard whose option (or the delivery) asks
   for it adds itself to an admission :class:`~celery_reliable.admission.Plan`
   (its hook ``plan``, in the guards' ``order``).
2. **admit**   :func:`admit`: one round trip to the store decides every guard,
   all-or-nothing. A refusal goes to the guard that refused (its hook
   ``refused``: a deferral re-published with a jittered countdown, a skip, a
   drop, an error, a replay); an admission goes to every guard (``hold``:
   leases for the heartbeat, entries for completion), then ``admitted`` (the
   idempotency record is opened in PostgreSQL when it is durable).
3. **run**     the task body, with ``self.fence_token`` / ``self.fence`` set and
   leases renewed by the process heartbeat.
4. **complete** :func:`~celery_reliable.pipeline.complete.complete`: one round trip
   releases what admission took, whether the body returned, raised, retried or
   was interrupted by a soft time limit. A killed process releases nothing: its
   leases expire by their TTL.

The pipeline calls the guards only through :class:`~celery_reliable.guards.base.Hooks`
and the store only through :class:`~celery_reliable.storage.Store`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from celery.exceptions import Ignore, Reject, Retry

from ..admission import INTERRUPTED_ROLLBACK_TIMEOUT, Admitted, Plan, RolledBack
from ..guards.base import HOOKS, overriding, planners
from . import complete, failure
from .arguments import arguments
from .call import Call, Deferred, Execution
from .headers import log

if TYPE_CHECKING:
    from ..config import TaskPolicy
    from ..ratelimit import BucketSpec

__all__ = ["Call", "Deferred", "Execution", "admit", "make_plan", "run"]


def run(task: Any, policy: TaskPolicy, args: tuple[Any, ...], kwargs: dict[str, Any],
        header_key: Any, queue_bucket: tuple[str, BucketSpec] | None,
        counts_deliveries: bool) -> Any:
    """One guarded execution of ``task``'s body: admitted, run and completed."""
    call = Call(task, policy, header_key=header_key, queue_bucket=queue_bucket,
                counts_deliveries=counts_deliveries)
    execution = admit(call, args, kwargs)
    if execution.replay is not None:
        return complete.replay(call, execution.replay)
    call.request._reliable_execution = execution
    try:
        result = task.run(*args, **kwargs)
    except Exception as exc:
        if execution.outage is not None and not isinstance(exc, (Retry, Ignore, Reject)):
            failure.defer_outage(call, execution)
        final = failure.on_failure(call, exc)
        complete.complete(call, execution, failure=final)
        if final is exc:
            raise
        raise final from exc
    except BaseException as exc:
        complete.complete(call, execution, failure=exc)
        raise
    complete.complete(call, execution, result=result)
    return result


def make_plan(call: Call, args: tuple[Any, ...], kwargs: dict[str, Any],
              execution: Execution) -> Plan:
    """Every guard of this call, as one admission plan (each guard's hook ``plan``).

    Idempotency goes first: a finished key replays even when another guard
    (a busy lock) would refuse.
    """
    plan = Plan()
    named = arguments(call.policy, args, kwargs)
    for hooks in planners():
        hooks.plan(call, plan, execution, named)
    return plan


def admit(call: Call, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Execution:
    """Admit this execution (one round trip), or defer/skip/fail it.

    Returns an execution that may run, or one carrying a replay. Raises
    Celery's ``Retry``/``Ignore`` (through the refusing guard's hook) or an
    error; loops only in eager mode, after sleeping out a deferral.
    """
    runtime, store = call.runtime, call.store
    while True:
        execution = call.new_execution()
        plan = make_plan(call, args, kwargs, execution)
        started = time.monotonic()
        # One guard from the request to the leases' registration: an interruption
        # (Celery's soft time limit, SystemExit on SIGTERM, KeyboardInterrupt) or an
        # error anywhere in between (metrics, the breaker's signal handlers: user
        # code) must not leave what admission took held until its TTL. Until hold
        # has registered it all, it is undone by owner (rollback.lua: nothing of
        # this execution's there, nothing changed); once registered, it is settled.
        taken = held = False  # admission may have taken something; hold registered it
        try:
            taken = True
            try:
                outcome = store.admit(plan)
            except store.errors as exc:
                # The script may have run and only its reply been lost: undo what it
                # may have taken (its lock, record, slot, probe and delivery count)
                # before deferring, so the deferral is not behind its own lock and is
                # not counted as a lost delivery. Then fail closed: an unguarded run
                # could break the guarantee.
                roll_back(call, plan)
                taken = False
                runtime.health.redis.failed(exc)  # a WARNING per interval, and the gauge
                call.defer("Redis unavailable", cause=exc)
                continue
            if not isinstance(outcome, Admitted):
                taken = False  # a refusal, replay, rejection or poison took nothing
            runtime.health.redis.ok()
            if isinstance(outcome, RolledBack):
                # Only a request its sender gave up on and rolled back gets this reply,
                # so it never comes here in practice; if it did, nothing was taken: defer.
                call.defer("admission rolled back")
                continue
            if not isinstance(outcome, Admitted):
                replay = HOOKS[plan.kinds[outcome.index]].refused(call, outcome, plan,
                                                                  execution)
                if replay is None:
                    continue  # an eager deferral slept: try again
                execution.replay = replay
                return execution
            call.bucket_slots().clear()  # admitted: the places were used
            hold(call, plan, outcome, execution, started)
            held = True
            if opened(call, execution):
                return execution
        except BaseException:
            if held:  # nothing admitted may outlive this delivery
                complete.settle(call, execution)
            elif taken:
                abandon(call, plan, execution)
            raise


def hold(call: Call, plan: Plan, admitted: Admitted, execution: Execution,
         started: float) -> None:
    """Register what admission took (each guard's hook ``hold``), leases with the heartbeat."""
    results, holding = admitted.results, overriding("hold")
    for index, kind in enumerate(plan.kinds):
        if kind in holding:
            HOOKS[kind].hold(call, plan, index, results[index], execution, started)
    heartbeat = call.runtime.heartbeat
    for lease in execution.leases:
        heartbeat.add(lease)
    execution.started = time.monotonic()


def abandon(call: Call, plan: Plan, execution: Execution) -> None:
    """Undo an admission cut short before :func:`hold` registered all it took.

    Whatever hold did register is let go (no renewal, no completion); the
    rollback is bounded (:data:`INTERRUPTED_ROLLBACK_TIMEOUT` per send, two
    sends) and raises nothing, so the interruption is what propagates.
    """
    execution.done = True  # no completion: the rollback removes it all, by owner
    for lease in execution.leases:
        call.runtime.heartbeat.discard(lease)
        lease.end()
    roll_back(call, plan, timeout=INTERRUPTED_ROLLBACK_TIMEOUT)


def roll_back(call: Call, plan: Plan, timeout: float | None = None) -> None:
    """Undo a failed admission (``Store.rollback``); on failure, leases expire by TTL.

    ``timeout``: at most this many seconds per send (two sends), for an
    interrupted task, which must not wait out the socket timeout; then no
    error (store or other) escapes, so the interruption is what propagates.
    """
    try:
        call.store.rollback(plan, timeout=timeout)
    except Exception as exc:
        if timeout is None and not isinstance(exc, call.store.errors):
            raise
        log.warning(
            "celery-reliable: %s could not undo an admission whose reply was lost; "
            "what it may have taken expires by its TTL",
            call.describe,
            exc_info=True,
        )


def opened(call: Call, execution: Execution) -> bool:
    """Admitted and held: each guard's hook ``admitted`` opens what the run needs (the
    idempotency record's PostgreSQL transaction); False if one deferred (eager: it slept)."""
    opening = overriding("admitted")
    return all(HOOKS[kind].admitted(call, execution)
               for kind in dict.fromkeys(execution.release.kinds) if kind in opening)


# The idempotency guard's durable side imports the pipeline, so the guard imports it
# lazily, in its hooks; it is loaded here, with the pipeline, so no task's first run
# imports it in a pool thread (see guards/idempotency.py: an import through pytest's
# assertion rewriter racing another thread's ast.parse fails on CPython 3.11).
from ..guards import durable as _durable  # noqa: E402, F401
