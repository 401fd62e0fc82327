"""The resource side of fencing: refuse writes that carry a stale token.

A fencing token only helps if the *resource* checks it. Each guard here
records, per resource, the highest token it has accepted, and accepts a write
only if its token is not lower, **atomically with the write**:

* :func:`check_postgres` runs inside your SQLAlchemy transaction. It upserts
  the resource's row in ``reliable_fences`` and keeps that row locked until
  you commit, so a concurrent writer with another token waits, and a stale
  one is refused (``StaleFenceToken``) before your own statements run. Roll
  back on error, as with any exception in a transaction.
* :class:`RedisFence` keeps a value and its token in one Redis hash and
  writes both in one Lua script.

Within a task, ``self.fence`` binds these to the task's lock: it also refuses,
locally and before any I/O, once ``self.lock_lost`` (the holder's belief in its
lease ended by its own clock, or a renewal found the lock gone).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert

from . import metrics
from .errors import StaleFenceToken
from .schema import fences
from .scripts import script

__all__ = ["Fence", "RedisFence", "check_postgres"]


def check_postgres(conn: Any, resource: str, token: int) -> None:
    """Accept ``token`` for ``resource`` inside the caller's transaction, or raise.

    ``conn`` is a SQLAlchemy ``Connection`` or ``Session`` in an open
    transaction. On success the resource's fence row stays locked until that
    transaction ends, so the caller's writes commit together with the new
    highest token. Raises :class:`StaleFenceToken` if a higher token was
    already accepted.
    """
    ins = insert(fences).values(resource=resource, token=token)
    stmt = ins.on_conflict_do_update(
        index_elements=[fences.c.resource],
        set_={"token": ins.excluded.token, "updated_at": func.now()},
        where=fences.c.token <= ins.excluded.token,
    ).returning(fences.c.token)
    if conn.execute(stmt).first() is None:
        current = conn.execute(select(fences.c.token).where(fences.c.resource == resource)).scalar()
        metrics.inc("reliable_fence_rejections_total", store="postgres")
        raise StaleFenceToken(resource, token, current)


class RedisFence:
    """Fenced values in Redis: each key is a hash of the value and its highest token.

    Keys are used as given; in Redis Cluster each is one key, so any key works.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def set(self, key: str, value: str | bytes, token: int) -> None:
        """Write ``value`` if ``token`` is not lower than the last accepted; else raise."""
        ok, current = script("fenced_set")(self.client, [key], [token, value])
        if int(ok) != 1:
            metrics.inc("reliable_fence_rejections_total", store="redis")
            raise StaleFenceToken(key, token, int(current))

    def get(self, key: str) -> tuple[bytes | str | None, int | None]:
        """``(value, token)`` last written, or ``(None, None)``.

        The value is ``bytes`` unless the client decodes responses.
        """
        value, token = self.client.hmget(key, ["v", "t"])
        return value, (int(token) if token is not None else None)


class Fence:
    """A task's lock, seen from the resources it writes to (``self.fence``)."""

    def __init__(self, resource: str, token: int, lost: Callable[[], bool]) -> None:
        self.resource = resource
        self.token = token
        self._lost = lost

    @property
    def lost(self) -> bool:
        """Asked at every fenced call (it reads the clock): True refuses the write."""
        return bool(self._lost())

    def _refuse_if_lost(self, resource: str) -> None:
        if self.lost:
            metrics.inc("reliable_fence_rejections_total", store="lost-lock")
            raise StaleFenceToken(resource, self.token, None)

    def check_postgres(self, conn: Any, resource: str | None = None) -> None:
        """:func:`check_postgres` with this task's token (resource defaults to the lock's)."""
        resource = resource or self.resource
        self._refuse_if_lost(resource)
        check_postgres(conn, resource, self.token)

    def redis_set(self, client: redis.Redis, key: str, value: str | bytes) -> None:
        """:meth:`RedisFence.set` with this task's token."""
        self._refuse_if_lost(key)
        RedisFence(client).set(key, value, self.token)
