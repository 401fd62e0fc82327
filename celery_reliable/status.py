"""Read-only views of fleet-wide state, for dashboards, the CLI and tests.

Each reads through the app's store (:func:`celery_reliable.storage.store_for`).
"""

from __future__ import annotations

from typing import Any

from .bulkhead import TierStats
from .runtime import runtime_for
from .storage import store_for

__all__ = ["breaker_state", "bucket_tokens", "bulkhead_stats"]


def bulkhead_stats(app: Any) -> dict[str, TierStats]:
    """Every configured tier: slots in use and tasks waiting now, counters since creation."""
    runtime = runtime_for(app)
    tiers = {tier: runtime.keys.bulkhead(tier) for tier in runtime.settings.bulkheads}
    return store_for(runtime).bulkhead_stats(tiers)


def bucket_tokens(app: Any, queue: str) -> float | None:
    """Tokens in ``queue``'s bucket now (refilled to the server clock); None if not limited."""
    runtime = runtime_for(app)
    spec = runtime.settings.queue_rate_limits.get(queue)
    if spec is None:
        return None
    return store_for(runtime).bucket_tokens(runtime.keys.queue_bucket(queue), spec)


def breaker_state(app: Any, name: str) -> int:
    """0 closed, 1 open, 2 half-open (an open breaker past its open time reads 2)."""
    runtime = runtime_for(app)
    spec = runtime.settings.circuit_breakers.get(name)
    if spec is None:
        raise KeyError(f"no circuit breaker {name!r} in reliable_circuit_breakers")
    return store_for(runtime).breaker_state(runtime.keys.breaker(name)[0], spec)
