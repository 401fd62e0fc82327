"""Guard ``I``: the idempotency record of one call, in Redis (``idempotency.lua``).

The durable side (PostgreSQL) is ``celery_reliable.idempotency``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import metrics
from ..keys import idempotency_digest
from .base import Guard, Hooks, ms, register

if TYPE_CHECKING:
    from ..admission import Outcome, Plan, Release

GUARD = Guard("I", "idempotency", admit=(1, 4), complete=(1, 4))


def plan(plan: Plan, key: str, fingerprint: str, owner: str, lease: float, ttl: float) -> int:
    """Claim the record ``key`` for ``lease`` seconds (``Plan.add_idempotency``)."""
    return plan.add(GUARD, [key], [fingerprint, owner, ms(lease), ms(ttl)], undo=(key, owner),
                    lease=lease)


def release(release: Release, key: str, owner: str, ttl: float) -> None:
    """Settle the record at completion; forgotten (``X``) unless :func:`settle` says."""
    release.add(GUARD, [key], [owner, "X", "", ms(ttl)])


def settle(release: Release, outcome: str, payload: str) -> None:
    """``S`` with result JSON, ``F`` with error JSON, or ``X`` (forget)."""
    for args in release.entries(GUARD):
        args[1], args[2] = outcome, payload


# ------------------------------------------------------------- pipeline hooks


class _Hooks(Hooks):
    """The record in the task pipeline: first in the plan, a lease, replays and mismatches."""

    order = 10
    reports_overrun = True

    def outcome(self, code: int, index: int, kind: str, reply: list[Any]) -> Outcome:
        from ..admission import Mismatch, Replay, text

        if code == 2:  # finished: replay its state (S/F) and payload
            return Replay(index, text(reply[2]), text(reply[3]))
        if code == 3:  # recorded with another fingerprint
            return Mismatch(index)
        return super().outcome(code, index, kind, reply)

    def plan(self, call: Any, plan: Plan, execution: Any, arguments: dict[str, Any]) -> None:
        idem = call.policy.idempotency
        if idem.spec is None and call.header_key is None:
            return
        fp = execution.fingerprint = call.fingerprint(arguments)
        key = idem.key(call.name, arguments, call.header_key, fp)
        assert key is not None
        execution.idem_digest = idempotency_digest(call.name, key)
        plan.add_idempotency(call.runtime.keys.idempotency(call.name, key), fp,
                             execution.owner, idem.lease, idem.ttl)

    def hold(self, call: Any, plan: Plan, index: int, result: int, execution: Any,
             started: float) -> None:
        idem = call.policy.idempotency
        key = plan.keys[plan.offsets[index]]
        execution.leases.append(call.lease("I", key, execution.owner, idem.lease, started,
                                           "idempotency lease"))
        release(execution.release, key, execution.owner, idem.ttl)

    def refused(self, call: Any, outcome: Any, plan: Plan, execution: Any) -> Any:
        from ..admission import Mismatch, Replay
        from ..errors import IdempotencyKeyMismatch

        if isinstance(outcome, Replay):
            return outcome
        if isinstance(outcome, Mismatch):
            assert execution.idem_digest is not None
            raise IdempotencyKeyMismatch(call.name, execution.idem_digest)
        # A twin is executing this key right now: wait for its result.
        call.defer("duplicate in progress", not_after=outcome.retry_after,
                   guard="idempotency_key")
        return None

    def settled(self, call: Any, execution: Any, result: int) -> bool:
        if result:
            return False
        from ..pipeline.headers import log

        # The lease expired while this execution ran (a stalled worker, a
        # heartbeat that could not reach Redis): a duplicate may have
        # taken the key over and run the body too. With the Redis-only
        # store nothing else prevents that; with PostgreSQL the duplicate
        # waited on this execution's uncommitted record instead.
        metrics.inc("reliable_idempotency_lease_lost_total", task=call.name)
        log.warning(
            "celery-reliable: %s finished after its idempotency lease was lost (expired "
            "or taken over); its outcome was not recorded in Redis%s",
            call.describe,
            "" if call.runtime.settings.idempotency_store == "postgres"
            else " and a duplicate may have run the task too (Redis-only store)",
        )
        return True


register(GUARD, _Hooks())
