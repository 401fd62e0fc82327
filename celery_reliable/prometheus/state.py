"""Fleet-wide gauges read from Redis when Prometheus scrapes: :class:`StateCollector`."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = ["StateCollector"]

log = logging.getLogger("celery_reliable")


class StateCollector:
    """Gauges read from Redis on every scrape: bulkhead tiers, breakers, buckets.

    Fleet-wide values (every worker shares them), so exactly one exporter
    needs it. A scrape that cannot reach Redis reports ``reliable_state_up 0``
    and no other gauge, instead of failing the whole scrape.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    def describe(self) -> list[Metric]:
        return []  # no Redis access when registering

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        from ..runtime import runtime_for
        from ..status import breaker_state, bucket_tokens, bulkhead_stats

        up = GaugeMetricFamily("reliable_state_up",
                               "1 if this scrape read celery-reliable's state from Redis.")
        active = GaugeMetricFamily("reliable_bulkhead_active",
                                   "Tasks holding a slot of the tier now, fleet-wide.",
                                   labels=["tier"])
        waiting = GaugeMetricFamily("reliable_bulkhead_waiting",
                                    "Tasks waiting for a slot of the tier now, fleet-wide.",
                                    labels=["tier"])
        state = GaugeMetricFamily("reliable_circuit_state",
                                  "Circuit breaker state: 0 closed, 1 open, 2 half-open.",
                                  labels=["breaker"])
        tokens = GaugeMetricFamily("reliable_bucket_tokens",
                                   "Tokens left in the queue's bucket now.", labels=["queue"])
        try:
            settings = runtime_for(self.app).settings
            for tier, stats in bulkhead_stats(self.app).items():
                active.add_metric([tier], stats.active)
                waiting.add_metric([tier], stats.waiting)
            for name in settings.circuit_breakers:
                state.add_metric([name], breaker_state(self.app, name))
            for queue in settings.queue_rate_limits:
                left = bucket_tokens(self.app, queue)
                if left is not None:
                    tokens.add_metric([queue], left)
        except Exception:
            log.warning("celery-reliable: could not read state from Redis for Prometheus",
                        exc_info=True)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield from (up, active, waiting, state, tokens)
