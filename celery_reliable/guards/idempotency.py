"""Guard ``I``: the idempotency record of one call, in Redis (``idempotency.lua``).

The durable side (PostgreSQL) is ``celery_reliable.idempotency``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Guard, ms

if TYPE_CHECKING:
    from ..admission import Plan, Release

GUARD = Guard("I", "idempotency", admit=(1, 4), complete=(1, 4))


def plan(plan: Plan, key: str, fingerprint: str, owner: str, lease: float, ttl: float) -> int:
    """Claim the record ``key`` for ``lease`` seconds (``Plan.add_idempotency``)."""
    return plan.add(GUARD, [key], [fingerprint, owner, ms(lease), ms(ttl)], undo=(key, owner),
                    lease=lease)


def release(release: Release, key: str, owner: str, ttl: float) -> None:
    """Settle the record at completion; forgotten (``X``) unless :func:`settle` says."""
    release.add(GUARD, [key], [owner, "X", "", ms(ttl)])


def settle(release: Release, outcome: str, payload: str) -> None:
    """``S`` with result JSON, ``F`` with error JSON, or ``X`` (forget)."""
    for args in release.entries(GUARD):
        args[1], args[2] = outcome, payload
