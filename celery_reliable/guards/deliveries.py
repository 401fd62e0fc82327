"""Guard ``D``: poison-message counting, and the dead-letter mark (``deliveries.lua``).

The key is a set of the execution owners of one task id's deliveries that started and
never finished; the member ``!dead`` marks a dead-lettered task id. The option
``max_redeliveries`` (:data:`CONFIG`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..metrics import MetricSpec
from ..options import Option, OptionSet, whole
from .base import Guard, Hooks, ms, register

if TYPE_CHECKING:
    import redis

    from ..admission import Outcome, Plan, Release
    from ..config import ReliableSettings


def policy_part(task_name: str, opts: Mapping[str, Any],
                settings: ReliableSettings | None) -> dict[str, Any]:
    """``TaskPolicy.max_redeliveries``."""
    return {"max_redeliveries": opts["max_redeliveries"]}


CONFIG = OptionSet(
    name="deliveries",
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
    prefixes=("max_redeliveries",),
    fields=True,
)

GUARD = Guard("D", "deliveries", admit=(1, 3), complete=(1, 1))

#: This guard's metrics (exported by ``celery_reliable.prometheus``); counted by the
#: pipeline (``pipeline.failure.dead_redelivery``) when this guard's dead-letter mark
#: refuses a delivery.
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("reliable_dead_redeliveries_total", "counter",
               "Redeliveries of a dead-lettered task id (its ack was lost) not run again.",
               ("task",)),
)


def plan(plan: Plan, key: str, max_redeliveries: int, ttl: float, owner: str) -> int:
    """Count this delivery; refuse (poison) past ``max_redeliveries`` unfinished ones.

    The count is a set of execution owners (deliveries that started and never
    finished), so an admission that is rolled back takes its own entry out.
    """
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


# ------------------------------------------------------------- pipeline hooks


#: How long (seconds) a task id's deliveries set lives after its last delivery started,
#: and its dead-letter mark after it was dead-lettered: longer than the brokers' default
#: redelivery windows (Redis visibility_timeout 1 h, RabbitMQ consumer_timeout 30 min);
#: twice the app's redelivery window when that is longer (a visibility_timeout raised
#: past a day): a redelivery comes at most one window after its delivery started.
DELIVERIES_TTL = 24 * 3600.0


def deliveries_ttl(runtime: Any) -> float:
    """Seconds a deliveries set and a dead-letter mark live (:data:`DELIVERIES_TTL`)."""
    window = runtime.settings.redelivery_window
    return max(DELIVERIES_TTL, 2 * window) if window is not None else DELIVERIES_TTL


class _Hooks(Hooks):
    """Poison-message counting in the task pipeline (``acks_late``, ``max_redeliveries``)."""

    order = 0

    def outcome(self, code: int, index: int, kind: str, reply: list[Any]) -> Outcome:
        from ..admission import DeadLettered, Poison

        if code == 5:  # delivered too often without finishing
            return Poison(index, int(reply[2]))
        if code == 7:  # the task id was dead-lettered: a redelivery
            return DeadLettered(index)
        return super().outcome(code, index, kind, reply)

    def plan(self, call: Any, plan_: Plan, execution: Any, arguments: dict[str, Any]) -> None:
        if not call.counts_deliveries:
            return
        runtime = call.runtime
        plan(plan_, runtime.keys.deliveries(str(call.request.id)), call.policy.max_redeliveries,
             deliveries_ttl(runtime), execution.owner)

    def hold(self, call: Any, plan: Plan, index: int, result: int, execution: Any,
             started: float) -> None:
        release(execution.release, plan.keys[plan.offsets[index]])

    def refused(self, call: Any, outcome: Any, plan: Plan, execution: Any) -> Any:
        from ..admission import DeadLettered
        from ..errors import PoisonMessage
        from ..pipeline import failure

        if isinstance(outcome, DeadLettered):
            failure.dead_redelivery(call)
        error = PoisonMessage(call.name, outcome.deliveries)
        failure.dead_letter(call, error, "worker lost")
        raise error


register(GUARD, _Hooks())
