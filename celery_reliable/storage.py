"""The storage seam of the task pipeline: :class:`Store`, and :class:`RedisStore`.

Everything the pipeline (:mod:`celery_reliable.pipeline`) asks of the guards' shared
state goes through one small interface, shaped after the storage classes of
``limits`` and the rate-limit backends of Dramatiq: admit a plan, roll it back,
complete a release, mark a task id dead, throttle buckets, spend a retry budget.
The pipeline's signatures carry no client type; a store says which exceptions
mean "unreachable" (:attr:`Store.errors`), which the pipeline fails closed on.

:class:`RedisStore` is today's implementation: the composed Lua scripts on the
process's dedicated script connection (``scripts.script``: EVALSHA, cached), one
round trip per admission and per completion, an admission never resent (its
rollback, bounded and resent, undoes it instead). Lease renewal stays with the
process heartbeat (``runtime.Heartbeat``), on its own connection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import redis

from .guards.deliveries import mark_dead
from .scripts import script

if TYPE_CHECKING:
    from .admission import Outcome, Plan, Release
    from .retrybudget import RetryBudget
    from .runtime import Runtime

__all__ = ["RedisStore", "Store", "store_for"]


class Store(Protocol):
    """Where the guards' state lives, as the pipeline uses it."""

    #: The exceptions meaning the store is unreachable or its reply was lost.
    errors: tuple[type[BaseException], ...]

    def admit(self, plan: Plan) -> Outcome:
        """Decide every guard of ``plan`` at once: all admitted, or nothing changed."""

    def rollback(self, plan: Plan, *, timeout: float | None = None) -> list[int]:
        """Undo what a failed :meth:`admit` of ``plan`` may have taken (by owner)."""

    def complete(self, release: Release) -> list[int]:
        """Settle what admission took; one result per entry of ``release``."""

    def mark_dead(self, key: str, ttl: float) -> None:
        """Mark a task id's deliveries set dead-lettered for ``ttl`` seconds."""

    def throttle(self, keys: list[str], args: list[Any]) -> None:
        """Empty the buckets ``keys`` for a while (``throttle.lua``'s arguments)."""

    def spend_retry_budget(self, key: str, budget: RetryBudget, deposits: int) -> bool:
        """Credit ``deposits`` first executions and take one retry; False if spent."""


class RedisStore:
    """:class:`Store` in Redis, through the composed Lua scripts (one round trip each)."""

    errors: tuple[type[BaseException], ...] = (redis.RedisError,)

    __slots__ = ("client",)

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def admit(self, plan: Plan) -> Outcome:
        return plan.admit(self.client)

    def rollback(self, plan: Plan, *, timeout: float | None = None) -> list[int]:
        if timeout is None:
            return plan.rollback(self.client)
        return plan.rollback(self.client, attempts=2, timeout=timeout)

    def complete(self, release: Release) -> list[int]:
        return release.run(self.client)

    def mark_dead(self, key: str, ttl: float) -> None:
        mark_dead(self.client, key, ttl)

    def throttle(self, keys: list[str], args: list[Any]) -> None:
        script("throttle")(self.client, keys, args)

    def spend_retry_budget(self, key: str, budget: RetryBudget, deposits: int) -> bool:
        from .retrybudget import spend

        granted, _ = spend(self.client, key, budget, deposits, True)
        return bool(granted)


def store_for(runtime: Runtime) -> Store:
    """The store of ``runtime`` (its Redis client), made once."""
    store: Store | None = runtime.__dict__.get("_store")
    if store is None:
        store = runtime.__dict__["_store"] = RedisStore(runtime.redis)
    return store
