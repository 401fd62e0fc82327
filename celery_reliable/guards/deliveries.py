"""Guard ``D``: poison-message counting, and the dead-letter mark (``deliveries.lua``).

The key is a set of the execution owners of one task id's deliveries that started and
never finished; the member ``!dead`` marks a dead-lettered task id. The option
``max_redeliveries`` (:data:`CONFIG`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..options import Option, OptionSet, whole
from .base import Guard, ms

if TYPE_CHECKING:
    import redis

    from ..admission import Plan, Release
    from ..config import ReliableSettings


def policy_part(task_name: str, opts: Mapping[str, Any],
                settings: ReliableSettings | None) -> dict[str, Any]:
    """``TaskPolicy.max_redeliveries``."""
    return {"max_redeliveries": opts["max_redeliveries"]}


CONFIG = OptionSet(
    options=(
        Option(
            "max_redeliveries",
            3,
            "deliveries",
            "With ``acks_late``: how many times a task whose worker died while running it "
            "(kill -9, out of memory) is redelivered; the next delivery is dead-lettered with "
            "reason \"worker lost\" instead of killing another worker.",
            whole(0),
        ),
    ),
    build=policy_part,
)

GUARD = Guard("D", "deliveries", admit=(1, 3), complete=(1, 1))


def plan(plan: Plan, key: str, max_redeliveries: int, ttl: float, owner: str) -> int:
    """Count this delivery (``Plan.add_deliveries``)."""
    return plan.add(GUARD, [key], [max_redeliveries, ms(ttl), owner], undo=(key, owner))


def release(release: Release, key: str) -> None:
    """The delivery finished: forget the unfinished ones (unless :func:`mark_dead_on`)."""
    release.add(GUARD, [key], [0])


def mark_dead_on(release: Release, ttl: float) -> None:
    """The task id was dead-lettered: completion keeps its mark for ``ttl`` seconds."""
    for args in release.entries(GUARD):
        args[0] = ms(ttl)


def mark_dead(client: redis.Redis, key: str, ttl: float) -> None:
    """Mark a task id's deliveries set ``key`` dead-lettered for ``ttl`` seconds (one round trip).

    The unfinished deliveries go (the task id is done: nothing of it is a lost
    delivery any more); the member ``!dead`` stays, and admit.lua refuses a
    redelivery of the task id while it is there. Safe to repeat.
    """
    pipe = client.pipeline(transaction=True)
    pipe.delete(key)
    pipe.sadd(key, "!dead")
    pipe.pexpire(key, ms(ttl))
    pipe.execute()
