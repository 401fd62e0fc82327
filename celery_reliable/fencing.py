"""The resource side of fencing: refuse writes that carry a stale token.

A fencing token only helps if the *resource* checks it. Each guard here
records, per resource, the highest token it has accepted and the holder that
sent it, and accepts a write only if its token is higher, or equal and sent by
the same holder (one acquisition writing twice), **atomically with the write**.
An equal token from another or an unknown holder is refused: two acquisitions
carry one token only when minting's clock assumption failed (see the README's
"What fencing guarantees"), and then only the first to write may keep it.

* :func:`check_postgres` runs inside your SQLAlchemy transaction. It upserts
  the resource's row in ``reliable_fences`` and keeps that row locked until
  you commit, so a concurrent writer waits, and a stale one is refused
  (``StaleFenceToken``) before your own statements run. Roll back on error, as
  with any exception in a transaction.
* :class:`RedisFence` keeps a value and its token in one Redis hash and
  writes both in one Lua script.

Within a task, ``self.fence`` binds these to the task's lock (its token, and
its execution as the holder): it also refuses, locally and before any I/O, once
``self.lock_lost`` (the holder's belief in its lease ended by its own clock, or a
renewal found the lock gone). With a :class:`~celery_reliable.FencedLock`, pass
``lock.token`` and ``holder=lock.holder``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import redis
from sqlalchemy import and_, func, or_, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import ProgrammingError

from . import metrics
from .errors import ConfigurationError, StaleFenceToken
from .schema import fences
from .scripts import script

__all__ = ["Fence", "RedisFence", "check_postgres"]


def check_postgres(conn: Any, resource: str, token: int, *, holder: str | None = None) -> None:
    """Accept ``token`` for ``resource`` inside the caller's transaction, or raise.

    ``conn`` is a SQLAlchemy ``Connection`` or ``Session`` in an open
    transaction. On success the resource's fence row stays locked until that
    transaction ends, so the caller's writes commit together with the new
    highest token and its ``holder``. Raises :class:`StaleFenceToken` if a
    higher token was already accepted, or the same token with another holder
    or without one (``holder=None``: a second check with an equal token is
    refused). ``holder`` identifies the acquisition (``self.fence`` passes the
    task execution's; a :class:`~celery_reliable.FencedLock` has ``.holder``).
    """
    ins = insert(fences).values(resource=resource, token=token, holder=holder)
    stmt = ins.on_conflict_do_update(
        index_elements=[fences.c.resource],
        set_={"token": ins.excluded.token, "holder": ins.excluded.holder,
              "updated_at": func.now()},
        # NULL = NULL is not true: an unknown holder never matches
        where=or_(fences.c.token < ins.excluded.token,
                  and_(fences.c.token == ins.excluded.token,
                       fences.c.holder == ins.excluded.holder)),
    ).returning(fences.c.token)
    try:
        row = conn.execute(stmt).first()
    except ProgrammingError as exc:
        # undefined table / column: no table, or one from before the holder column
        if getattr(exc.orig, "sqlstate", None) in ("42P01", "42703"):
            raise ConfigurationError(
                f"check_postgres: table {fences.name!r} is missing or older than this "
                "library; run `celery -A proj reliable migrate` (or create_tables(engine)) "
                "on this database"
            ) from exc
        raise
    if row is None:
        current = conn.execute(select(fences.c.token).where(fences.c.resource == resource)).scalar()
        metrics.inc("reliable_fence_rejections_total", store="postgres")
        raise StaleFenceToken(resource, token, current)


class RedisFence:
    """Fenced values in Redis: each key is a hash of the value and its highest token.

    Keys are used as given; in Redis Cluster each is one key, so any key works.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def set(self, key: str, value: str | bytes, token: int, *, holder: str | None = None) -> None:
        """Write ``value`` if ``token`` is higher than the last accepted, or equal and from
        the same ``holder``; else raise :class:`StaleFenceToken`.

        Without a holder each call is its own holder: an equal token is refused
        (a resend of this very call after a lost reply is still accepted).
        """
        holder = holder or f"call:{secrets.token_hex(8)}"
        ok, current = script("fenced_set")(self.client, [key], [token, value, holder])
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

    def __init__(
        self, resource: str, token: int, lost: Callable[[], bool], holder: str | None = None
    ) -> None:
        self.resource = resource
        self.token = token
        #: the execution that holds the lock: its writes with an equal token are accepted
        self.holder = holder
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
        check_postgres(conn, resource, self.token, holder=self.holder)

    def redis_set(self, client: redis.Redis, key: str, value: str | bytes) -> None:
        """:meth:`RedisFence.set` with this task's token."""
        self._refuse_if_lost(key)
        RedisFence(client).set(key, value, self.token, holder=self.holder)
