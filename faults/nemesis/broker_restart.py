"""broker-restart: kill -9 the broker; at stop, start it again on the same ports and data.

Either broker keeps what it acknowledged: the Redis broker's append-only file
is fsynced on every write, and the RabbitMQ node's queues are durable, its
messages persistent, and every publish waits for the node's confirm (given once
the message is on disk). No queued message is lost: what is exercised is the
workers' and the producer's reconnection, and the redelivery of what was
unacknowledged when the broker died (a task that finishes while the broker is
down cannot be acknowledged: it runs again). With the Redis broker the results
(its database 1) go down with it; with RabbitMQ they live in a redis-server of
their own.
"""

from __future__ import annotations

import random
from typing import Any

from faults.nemesis.base import Context


class BrokerRestart:
    name = "broker-restart"

    def plan(self, rng: random.Random) -> dict[str, Any]:
        return {}

    def start(self, ctx: Context, plan: dict[str, Any]) -> str:
        pid = ctx.cluster.broker.pid
        ctx.cluster.broker.kill()
        return f"broker pid {pid}"

    def stop(self, ctx: Context, plan: dict[str, Any]) -> str:
        if not ctx.cluster.broker.running:
            ctx.cluster.broker.start()
        return "started"
