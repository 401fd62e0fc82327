"""The Redis key space.

Every key is ``{<prefix>}:<kind>:<digest>``. The ``{prefix}`` hash tag puts
all keys of one prefix in one Redis Cluster slot, so a single Lua script may
touch any of them (admission is all-or-nothing across guards). User-supplied
values never appear raw in a key: resource names are hashed with SHA-256.
"""

from __future__ import annotations

import hashlib

__all__ = ["KeySpace", "digest", "hash_tag", "idempotency_digest"]


def digest(value: str) -> str:
    """128-bit hex digest of a resource name: stable, bounded, not reversible."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()[:32]


def idempotency_digest(task_name: str, key: str) -> str:
    """Digest of an idempotency key, scoped to its task (also the PostgreSQL row key)."""
    return hashlib.sha256(f"{task_name}\x00{key}".encode()).hexdigest()[:32]


def hash_tag(key: str) -> str:
    """What Redis Cluster hashes to place ``key``: its first ``{...}`` if not empty, else all of it.

    ``KeySpace(hash_tag(key))`` builds keys in the slot of ``key`` (for a
    key of this key space: the same prefix).
    """
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1:end]
    return key


class KeySpace:
    """Builds the keys of one ``reliable_key_prefix``."""

    __slots__ = ("prefix", "tag")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.tag = "{" + prefix + "}"

    def lock(self, resource: str) -> str:
        """The lease of the lock on ``resource`` (a string ``"<token> <holder>"``).

        ``holder``: the owner, then the task name, a label and (a FencedLock's)
        a nonce per acquire on lines of their own
        (:func:`celery_reliable.guards.lock.lock_holder`).
        """
        return f"{self.tag}:lock:{digest(resource)}"

    def fence(self, resource: str) -> str:
        """The last fencing token minted for ``resource``."""
        return f"{self.tag}:fence:{digest(resource)}"

    def idempotency(self, task_name: str, key: str) -> str:
        """The idempotency record of ``key`` for ``task_name``."""
        return self.idempotency_record(idempotency_digest(task_name, key))

    def idempotency_record(self, key_digest: str) -> str:
        """The idempotency record of an :func:`idempotency_digest` (a dead letter keeps it)."""
        return f"{self.tag}:idem:{key_digest}"

    def queue_bucket(self, queue: str) -> str:
        """The token bucket every task taken from ``queue`` draws from."""
        return f"{self.tag}:bucket:q:{digest(queue)}"

    def key_bucket(self, key: str) -> str:
        """The token bucket of a ``rate_limit_key`` (shared by every task using that key)."""
        return f"{self.tag}:bucket:k:{digest(key)}"

    def bulkhead(self, tier: str) -> tuple[str, str, str]:
        """A tier's slots (zset), waiting tasks (zset) and counters (hash)."""
        base = f"{self.tag}:bh:{tier}"
        return f"{base}:slots", f"{base}:waiting", f"{base}:stats"

    def deliveries(self, task_id: str) -> str:
        """Unfinished deliveries of one task id (poison-message detection)."""
        return f"{self.tag}:deliv:{digest(task_id)}"

    def breaker(self, name: str) -> tuple[str, str]:
        """A circuit breaker's state (hash) and its half-open probes (zset)."""
        return f"{self.tag}:cb:{name}", f"{self.tag}:cb:{name}:probes"

    def retry_budget(self, task_name: str) -> str:
        """The retry-budget bucket of one task name."""
        return f"{self.tag}:bucket:r:{digest(task_name)}"

    def retry_budget_window(self, task_name: str) -> str:
        """The ratio retry budget of one task name (a hash of time slices, budget.lua)."""
        return f"{self.tag}:budget:{digest(task_name)}"

    def undone(self, request: str) -> str:
        """The rollback marker of one admission request (``request``: random, per request).

        Written by ``rollback.lua``, checked first by ``admit.lua``: a request
        that reaches Redis after its rollback does nothing.
        """
        return f"{self.tag}:undone:{request}"

    def pattern(self, kind: str) -> str:
        """SCAN pattern for every key of one kind."""
        return f"{self.tag}:{kind}:*"
