"""Guard ``L``: a lock that mints fencing tokens (``lock.lua``); its lease value."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .. import metrics
from .base import Guard, Hooks, ms, register

if TYPE_CHECKING:
    from ..admission import Plan, Release

GUARD = Guard("L", "lock", admit=(2, 3), complete=(1, 1))

#: Fencing counters live this long (seconds) after their last acquire, outliving every
#: lease by far (at least 10x the lock ttl); tokens are floored at the
#: server clock, so even an expired counter never lets tokens go backwards.
FENCE_TTL_MIN = 7 * 24 * 3600.0

#: Longest resource label kept with a lock's lease (characters); a longer one ends in "…".
LOCK_LABEL_MAX = 60
#: Longest task name kept with a lock's lease (characters).
LOCK_TASK_MAX = 200


def _printable(text: str, limit: int) -> str:
    """``text`` on one line (whitespace runs, newlines included, become one space), cut."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def lock_holder(owner: str, task: str = "", label: str = "", nonce: str = "") -> str:
    """What follows the fencing token in a lock's lease value.

    ``"<owner>\\n<task name>\\n<label>"``, or just ``"<owner>"`` (the format of
    older versions) when there is neither; ``nonce`` (a FencedLock's, one per
    acquire) follows on a fourth line: the holder rollback.lua compares is then
    one acquire's, even when callers reuse an owner. The task name and the label are for
    ``celery reliable locks``: kept in the lease itself, they are written by the
    same SET, renewed and released with it, and need no key of their own (their
    cost: their bytes, in the lease and in every admit, renew, release and
    rollback call of it). The label must never carry a secret: the task
    pipeline passes the ``lock`` template (argument names, not values).
    """
    task, label = _printable(task, LOCK_TASK_MAX), _printable(label, LOCK_LABEL_MAX)
    if nonce:
        return f"{owner}\n{task}\n{label}\n{nonce}"
    if not task and not label:
        return owner
    return f"{owner}\n{task}\n{label}"


def plan(
    plan: Plan, lock_key: str, fence_key: str, owner: str, ttl: float, *, task: str = "",
    label: str = "", fence_ttl: float | None = None, nonce: str = "",
) -> int:
    """Lock for ``ttl`` seconds, minting a token (``Plan.add_lock_keys``)."""
    holder = lock_holder(owner, task, label, nonce)
    if fence_ttl is None:
        fence_ttl = max(FENCE_TTL_MIN, 10 * ttl)
    index = plan.add(GUARD, [lock_key, fence_key], [holder, ms(ttl), ms(fence_ttl)],
                     undo=(lock_key, holder), lease=ttl)
    plan.lock_holders[index] = holder
    return index


def release(release: Release, lock_key: str, lease_value: str) -> None:
    """Release the lock if the lease is still ``lease_value`` ("<token> <holder>")."""
    release.add(GUARD, [lock_key], [lease_value])


# ------------------------------------------------------------- pipeline hooks


#: Message header: when this task first found its lock busy (epoch seconds).
LOCK_WAIT_HEADER = "reliable_lock_wait_since"


class _Hooks(Hooks):
    """The lock in the task pipeline: a lease renewed by the heartbeat, its token on hold."""

    order = 20

    def plan(self, call: Any, plan: Plan, execution: Any, arguments: dict[str, Any]) -> None:
        lock = call.policy.lock
        if lock is None:
            return
        execution.resource = lock.resource(call.name, arguments)
        plan.add_lock(call.runtime.keys, execution.resource, execution.owner, lock.ttl,
                      task=call.name, label=lock.label(call.name, arguments))

    def hold(self, call: Any, plan: Plan, index: int, result: int, execution: Any,
             started: float) -> None:
        metrics.inc("reliable_lock_acquire_total", result="acquired")
        since = call.header(LOCK_WAIT_HEADER)
        metrics.observe("reliable_lock_wait_seconds",
                        max(0.0, time.time() - float(since)) if since else 0.0)
        execution.token = result
        key, value = plan.keys[plan.offsets[index]], plan.lock_value(index, result)
        execution.lease = call.lease("L", key, value, call.policy.lock.ttl, started, "lock")
        execution.leases.append(execution.lease)
        release(execution.release, key, value)

    def refused(self, call: Any, outcome: Any, plan: Plan, execution: Any) -> Any:
        from celery.exceptions import Ignore

        from ..errors import LockNotAcquired
        from ..keys import digest
        from ..pipeline.headers import SKIPPED, log

        how = call.policy.lock.contention
        metrics.inc("reliable_lock_acquire_total", result=f"busy-{how}")
        if how == "skip":
            log.info("celery-reliable: %s skipped: lock %s is busy", call.describe,
                     digest(execution.resource))
            call.store_state(SKIPPED, {"reason": "lock busy", "lock": digest(execution.resource)})
            raise Ignore()
        if how == "fail":
            raise LockNotAcquired(call.name, execution.resource)
        call.defer("lock busy", not_after=outcome.retry_after, lock_busy=True, guard="lock")
        return None

    def settled(self, call: Any, execution: Any, result: int) -> bool:
        if not result:
            from ..pipeline.headers import log

            log.warning("celery-reliable: %s finished after its lock was lost", call.describe)
        return False


register(GUARD, _Hooks())
