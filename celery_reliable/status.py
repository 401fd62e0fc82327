"""Read-only views of fleet-wide state, for dashboards, the CLI and tests."""

from __future__ import annotations

from typing import Any

from .bulkhead import TierStats
from .runtime import runtime_for

__all__ = ["breaker_state", "bucket_tokens", "bulkhead_stats"]


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


def breaker_state(app: Any, name: str) -> int:
    """0 closed, 1 open, 2 half-open (an open breaker past its open time reads 2)."""
    runtime = runtime_for(app)
    spec = runtime.settings.circuit_breakers.get(name)
    if spec is None:
        raise KeyError(f"no circuit breaker {name!r} in reliable_circuit_breakers")
    state, opened = runtime.redis.hmget(runtime.keys.breaker(name)[0], ["s", "o"])
    value = int(state or 0)
    if value == 1 and _now_ms(runtime.redis) >= int(opened or 0) + spec.open_seconds * 1000:
        return 2
    return value


def _now_ms(client: Any) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000
