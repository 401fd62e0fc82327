"""The message headers the pipeline reads and writes, and the TTL of delivery counts."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..runtime import Runtime

__all__ = [
    "BUCKET_SLOT_HEADER",
    "DEFER_HEADER",
    "DELIVERIES_TTL",
    "DROPPED",
    "FIRST_FAILURE_HEADER",
    "IDEMPOTENCY_HEADER",
    "LOCK_WAIT_HEADER",
    "PREV_DELAY_HEADER",
    "SKIPPED",
    "deliveries_ttl",
    "header",
]

log = logging.getLogger("celery_reliable")

#: How long (seconds) a task id's deliveries set lives after its last delivery started,
#: and its dead-letter mark after it was dead-lettered: longer than the brokers' default
#: redelivery windows (Redis visibility_timeout 1 h, RabbitMQ consumer_timeout 30 min);
#: twice the app's redelivery window when that is longer (a visibility_timeout raised
#: past a day): a redelivery comes at most one window after its delivery started.
DELIVERIES_TTL = 24 * 3600.0

#: Result state of a task dropped because its lock was busy (``lock_contention="skip"``).
#: Like Celery's IGNORED it is not a ready state: do not ``.get()`` a skippable task.
SKIPPED = "SKIPPED"

#: Result state of a task dropped by a full bulkhead tier with policy ``drop``.
DROPPED = "DROPPED"

#: Message header counting consecutive deferrals of one task id.
DEFER_HEADER = "reliable_deferrals"

#: Message header: when the first failure of this task happened (epoch seconds).
FIRST_FAILURE_HEADER = "reliable_first_failure"

#: Message header: the previous retry delay (decorrelated jitter), seconds.
PREV_DELAY_HEADER = "reliable_prev_delay"

#: Message header: when this task first found its lock busy (epoch seconds).
LOCK_WAIT_HEADER = "reliable_lock_wait_since"

#: Message header carrying a producer's own idempotency key.
IDEMPOTENCY_HEADER = "idempotency_key"

#: Message header: this task's places in the queues of the token buckets that
#: refused it, ``{bucket key: slot}`` (the queue's clock: Redis server epoch ms
#: until the bucket's rate changes). A task deferred before its turn (countdowns
#: are capped by the broker's redelivery window) keeps its place with it.
BUCKET_SLOT_HEADER = "reliable_bucket_slots"


def deliveries_ttl(runtime: Runtime) -> float:
    """Seconds a deliveries set and a dead-letter mark live (:data:`DELIVERIES_TTL`)."""
    window = runtime.settings.redelivery_window
    return max(DELIVERIES_TTL, 2 * window) if window is not None else DELIVERIES_TTL


def header(request: Any, name: str) -> Any:
    """Header ``name`` of the delivery ``request`` (None if absent)."""
    value = getattr(request, name, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(name)
    return value
