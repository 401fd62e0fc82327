"""What ``status``, ``top`` and ``locks`` show, read once: :func:`held_locks`, :func:`collect`.

Every read goes through the app's store (:mod:`celery_reliable.storage`); a
lock's lease decodes as :class:`~celery_reliable.guards.lock.LockInfo`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..breaker import BreakerSpec
from ..bulkhead import TierSpec, TierStats
from ..classify import is_missing_table
from ..deadletter import DeadLetters
from ..guards.lock import LockInfo
from ..ratelimit import BucketSpec
from ..runtime import Runtime
from ..storage import store_for
from .common import describe

__all__ = ["SECTIONS", "STATUS_LOCKS", "LockInfo", "Snapshot", "collect", "held_locks"]

#: Locks shown on the ``status``/``top`` screen (``locks`` lists all of them).
STATUS_LOCKS = 15


def held_locks(runtime: Runtime, limit: int | None = None) -> tuple[list[LockInfo], int]:
    """Locks of this prefix held now (the store SCANs, never KEYS), soonest expiry first;
    and how many in all."""
    found = store_for(runtime).held_locks(runtime.keys)
    found.sort(key=lambda lock: (lock.ttl_ms < 0, lock.ttl_ms, lock.key))
    total = len(found)
    return (found[:limit] if limit is not None else found), total


@dataclass
class Snapshot:
    """Everything ``status`` and ``top`` show, read once."""

    taken_at: datetime = field(default_factory=datetime.now)
    locks: list[LockInfo] = field(default_factory=list)
    locks_total: int = 0
    buckets: list[tuple[str, BucketSpec, float | None]] = field(default_factory=list)
    tiers: list[tuple[str, TierSpec, TierStats]] = field(default_factory=list)
    breakers: list[tuple[str, BreakerSpec, int]] = field(default_factory=list)
    dead_letters: int | None = None  # None: no database configured
    errors: dict[str, str] = field(default_factory=dict)


SECTIONS = ("locks", "buckets", "bulkheads", "breakers", "dead letters")


def collect(app: Any, runtime: Runtime, *, tolerant: bool = False) -> Snapshot:
    """Read every panel. ``tolerant``: keep a section's error in ``errors`` instead of raising."""
    from ..status import breaker_state, bucket_tokens, bulkhead_stats

    snap = Snapshot()
    settings = runtime.settings
    store_errors = store_for(runtime).errors
    redis_down: str | None = None

    def read_locks() -> None:
        snap.locks, snap.locks_total = held_locks(runtime, STATUS_LOCKS)

    def read_buckets() -> None:
        snap.buckets = [(queue, spec, bucket_tokens(app, queue))
                        for queue, spec in settings.queue_rate_limits.items()]

    def read_tiers() -> None:
        stats = bulkhead_stats(app)
        snap.tiers = [(tier, spec, stats[tier]) for tier, spec in settings.bulkheads.items()]

    def read_breakers() -> None:
        snap.breakers = [(name, spec, breaker_state(app, name))
                         for name, spec in settings.circuit_breakers.items()]

    def read_dead_letters() -> None:
        if settings.database_url:
            snap.dead_letters = DeadLetters(app, runtime.engine).count()

    readers = (read_locks, read_buckets, read_tiers, read_breakers, read_dead_letters)
    for section, read in zip(SECTIONS, readers, strict=True):
        uses_redis = section != "dead letters"
        if uses_redis and redis_down is not None:
            snap.errors[section] = redis_down
            continue
        try:
            read()
        except Exception as exc:
            message = describe(exc, app)
            # Tables not created yet (status before migrate) is a state to show, not a failure.
            if message is None or not (tolerant or is_missing_table(exc)):
                raise
            snap.errors[section] = message
            if isinstance(exc, store_errors):
                redis_down = message
    return snap
