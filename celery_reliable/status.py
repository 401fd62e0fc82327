"""Read-only views of fleet-wide state, for dashboards, the CLI and tests."""

from __future__ import annotations

from typing import Any

from .bulkhead import TierStats
from .runtime import runtime_for

__all__ = ["bucket_tokens", "bulkhead_stats"]


def bulkhead_stats(app: Any) -> dict[str, TierStats]:
    """Every configured tier: slots in use and tasks waiting now, counters since creation."""
    runtime = runtime_for(app)
    client = runtime.redis
    now_ms = _now_ms(client)
    out = {}
    for tier in runtime.settings.bulkheads:
        slots, waiting, stats = runtime.keys.bulkhead(tier)
        pipe = client.pipeline(transaction=False)
        pipe.zcount(slots, now_ms, "+inf")
        pipe.zcount(waiting, now_ms, "+inf")
        pipe.hmget(stats, ["rejected", "timed_out", "dropped"])
        active, waiters, (rejected, timed_out, dropped) = pipe.execute()
        out[tier] = TierStats(active=int(active), waiting=int(waiters),
                              rejected=int(rejected or 0), timed_out=int(timed_out or 0),
                              dropped=int(dropped or 0))
    return out


def bucket_tokens(app: Any, queue: str) -> float | None:
    """Tokens in ``queue``'s bucket now (refilled to the server clock); None if not limited."""
    runtime = runtime_for(app)
    spec = runtime.settings.queue_rate_limits.get(queue)
    if spec is None:
        return None
    tokens, ts = runtime.redis.hmget(runtime.keys.queue_bucket(queue), ["t", "ts"])
    if tokens is None:
        return spec.burst
    elapsed = max(0, _now_ms(runtime.redis) - int(float(ts or 0)))
    return float(min(spec.burst, float(tokens) + elapsed * spec.rate / 1000))


def _now_ms(client: Any) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000
