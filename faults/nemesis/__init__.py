"""The nemeses, one small module each (see each module's docstring)."""

from __future__ import annotations

from faults.nemesis.base import Context, Nemesis
from faults.nemesis.broker_restart import BrokerRestart
from faults.nemesis.clock import Clock
from faults.nemesis.failover import Failover
from faults.nemesis.kill import Kill
from faults.nemesis.pause import Pause
from faults.nemesis.pg_restart import PgRestart
from faults.nemesis.redis_restart import RedisRestart
from faults.nemesis.stall import Stall

NEMESES: dict[str, Nemesis] = {
    n.name: n
    for n in (Kill(), Pause(), Stall(), RedisRestart(), Failover(), PgRestart(), BrokerRestart(),
              Clock())
}

__all__ = ["NEMESES", "Context", "Nemesis"]
