"""Guard ``L``: a lock that mints fencing tokens (``lock.lua``); its lease value."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Guard, ms

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
