"""What ``status``, ``top`` and ``locks`` show, read once: :func:`held_locks`, :func:`collect`."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis

from ..breaker import BreakerSpec
from ..bulkhead import TierSpec, TierStats
from ..classify import is_missing_table
from ..deadletter import DeadLetters
from ..ratelimit import BucketSpec
from ..runtime import Runtime
from .common import describe

__all__ = ["SECTIONS", "STATUS_LOCKS", "LockInfo", "Snapshot", "collect", "held_locks"]

#: Locks shown on the ``status``/``top`` screen (``locks`` lists all of them).
STATUS_LOCKS = 15


@dataclass(frozen=True)
class LockInfo:
    """One lock held now, as Redis has it."""

    key: str
    token: str
    owner: str
    task_id: str
    ttl_ms: int
    task: str = ""  # the task that holds it ("" for a FencedLock or an older version's lease)
    label: str = ""  # the lock template, a lock_label, or FencedLock(label=...)

    @classmethod
    def parse(cls, key: str, value: str, ttl_ms: int) -> LockInfo:
        """From the lease value ``"<token> <owner>[\\n<task>\\n<label>[\\n<nonce>]]"``.

        (:func:`~celery_reliable.admission.lock_holder`; a FencedLock's nonce is not shown.)
        """
        token, _, holder = value.partition(" ")
        owner, _, described = holder.partition("\n")
        task, _, label = described.partition("\n")
        label = label.partition("\n")[0]
        task_id = owner.rpartition("/")[0] if "/" in owner else ""
        return cls(key=key, token=token, owner=owner, task_id=task_id, ttl_ms=ttl_ms,
                   task=task, label=label)

    @property
    def digest(self) -> str:
        return self.key.rsplit(":", 1)[-1]


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def held_locks(runtime: Runtime, limit: int | None = None) -> tuple[list[LockInfo], int]:
    """Locks of this prefix held now (SCAN, never KEYS), by soonest expiry; and how many in all."""
    client = runtime.redis
    pattern = _glob_escape(runtime.keys.pattern("lock")[:-1]) + "*"
    keys = [k.decode() if isinstance(k, bytes) else str(k)
            for k in client.scan_iter(match=pattern, count=1000)]
    found: list[LockInfo] = []
    for start in range(0, len(keys), 500):
        chunk = keys[start:start + 500]
        pipe = client.pipeline(transaction=False)
        for key in chunk:
            pipe.get(key)
            pipe.pttl(key)
        replies = pipe.execute()
        for i, key in enumerate(chunk):
            value, ttl = replies[2 * i], replies[2 * i + 1]
            if value is None:
                continue  # released or expired since the SCAN
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            found.append(LockInfo.parse(key, text, int(ttl)))
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
            if isinstance(exc, redis.RedisError):
                redis_down = message
    return snap
