"""The message headers the pipeline reads and writes, and the TTL of delivery counts."""

from __future__ import annotations

import logging
from typing import Any

from ..guards.deliveries import DELIVERIES_TTL
from ..guards.deliveries import deliveries_ttl as deliveries_ttl
from ..guards.lock import LOCK_WAIT_HEADER

# The header names and result states: celery_reliable.task re-exports exactly these
# (``__all__ += headers.__all__``), so the list is kept here only. ``header`` and
# ``deliveries_ttl`` are for the pipeline, not re-exported.
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
]

log = logging.getLogger("celery_reliable")

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

#: Message header carrying a producer's own idempotency key.
IDEMPOTENCY_HEADER = "idempotency_key"

#: Message header: this task's places in the queues of the token buckets that
#: refused it, ``{bucket key: slot}`` (the queue's clock: Redis server epoch ms
#: until the bucket's rate changes). A task deferred before its turn (countdowns
#: are capped by the broker's redelivery window) keeps its place with it.
BUCKET_SLOT_HEADER = "reliable_bucket_slots"


def header(request: Any, name: str) -> Any:
    """Header ``name`` of the delivery ``request`` (None if absent)."""
    value = getattr(request, name, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(name)
    return value
