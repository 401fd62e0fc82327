"""The resource side of fencing: refuse writes that carry a stale token.

A fencing token only helps if the *resource* checks it. Each guard here
records, per resource, the highest token it has accepted and the holder that
sent it, and accepts a write only if its token is higher, or equal and sent by
the same holder (one acquisition writing twice), **atomically with the write**.
An equal token from another or an unknown holder is refused: two acquisitions
carry one token only when minting's clock assumption failed (see the README's
"What fencing guarantees"), and then only the first to write may keep it.

One holder's writes are ordered too, where a write can reach the resource out
of order. :class:`RedisFence` writes are resent once after a connection error
(the script channel, or redis-py's ``retry``), so the first copy of a write may
still arrive after the holder's next write. Each Redis write therefore carries
a write number (``seq``, see :func:`next_write_seq`: strictly increasing over
the writes of every holder in this process, and ordered by issue time across the
processes of one host, so a holder's writes from forked children are ordered
too); the fence accepts an equal token from the same holder only with a higher
number, treats the same number with the same value as the same write again
(accepted, nothing changed) and refuses a lower one, or the same number with
another value (:class:`SupersededWrite`): a write is applied or refused, never
acknowledged and dropped.

* :func:`check_postgres` runs inside your transaction (SQLAlchemy, psycopg 3 or
  Django, see its docstring). It upserts
  the resource's row in ``reliable_fences`` and keeps that row locked until
  you commit, so a concurrent writer waits, and a stale one is refused
  (``StaleFenceToken``) before your own statements run. Roll back on error, as
  with any exception in a transaction.
* :class:`RedisFence` keeps a value and its token in one Redis hash and
  writes both in one Lua script.

Within a task, ``self.fence`` binds these to the task's lock (its token, and
its execution as the holder): it also refuses, locally and before any I/O, once
``self.lock_lost`` (the holder's belief in its lease ended by its own clock, a
renewal found the lock gone, or the execution released it: ``self.retry()`` with
``throw=False`` lets the body go on). With a :class:`~celery_reliable.FencedLock`,
pass ``lock.token`` and ``holder=lock.holder``.
"""

from __future__ import annotations

import os
import secrets
import sys
import threading
import time
from collections.abc import Callable
from functools import cache
from typing import Any

import redis
from sqlalchemy import and_, bindparam, func, or_, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import ClauseElement

from . import metrics
from .classify import sqlstate
from .errors import ConfigurationError, StaleFenceToken, SupersededWrite
from .schema import fences
from .scripts import script

__all__ = ["Fence", "RedisFence", "check_postgres", "next_write_seq"]

_last_seq = 0
_writes_mutex = threading.Lock()


def _after_fork_in_child() -> None:
    # a thread of the parent may have held the mutex at the fork: the child has no such thread
    global _writes_mutex
    _writes_mutex = threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


def next_write_seq() -> int:
    """A write number for a fenced write: strictly greater than every one this process drew.

    Process-wide rather than per holder, so a holder's (one lock acquisition's)
    writes are numbered in the order it issued them, whichever ``Fence`` object,
    ``self.fence`` call or direct :meth:`RedisFence.set` they went through.

    The number is the host's monotonic clock in microseconds (shared by every
    process of the host), or the last number + 1 when that is higher. A counter
    alone would be copied by ``fork``: two children of a holder (a fork-started
    ``multiprocessing`` pool) would draw the same numbers, and each would
    number its writes from the parent's count, not by when it wrote. With the
    clock, writes of one holder from its forked children and from itself are
    ordered by when they were issued (to the microsecond, across processes);
    two processes that draw the same number in the same microsecond write
    different values at most, and the fence refuses the second of those
    (:class:`SupersededWrite`), never acknowledging it without writing.
    """
    global _last_seq
    with _writes_mutex:
        _last_seq = max(_last_seq + 1, time.monotonic_ns() // 1000)
        return _last_seq


#: The fence check, built once: accept a higher token, or an equal one from the same holder.
_ins = insert(fences).values(
    resource=bindparam("p_resource"), token=bindparam("p_token"), holder=bindparam("p_holder")
)
_CHECK = _ins.on_conflict_do_update(
    index_elements=[fences.c.resource],
    set_={"token": _ins.excluded.token, "holder": _ins.excluded.holder,
          "updated_at": func.now()},
    # NULL = NULL is not true: an unknown holder never matches
    where=or_(fences.c.token < _ins.excluded.token,
              and_(fences.c.token == _ins.excluded.token,
                   fences.c.holder == _ins.excluded.holder)),
).returning(fences.c.token)
_CURRENT = select(fences.c.token).where(fences.c.resource == bindparam("p_resource"))

ACCEPTED = (
    "a SQLAlchemy Connection or Session, a psycopg 3 connection, or a Django "
    "connection (django.db.connections[alias]) on PostgreSQL"
)


@cache
def driver_statement(statement: ClauseElement) -> tuple[str, dict[str, Any]]:
    """SQL text of a statement with psycopg's ``%(name)s`` placeholders, and the values of
    its constant parameters (compiled once).

    Runs on a psycopg 3 or psycopg2 cursor, and on Django's PostgreSQL cursor, with
    ``{**constants, **params}``.
    """
    compiled = statement.compile(dialect=psycopg_dialect())  # type: ignore[no-untyped-call]
    return compiled.string, dict(compiled.params)


def _is_django_connection(conn: Any) -> bool:
    # By module, so that nothing here imports Django.
    return type(conn).__module__.startswith("django.") and hasattr(conn, "in_atomic_block")


def _is_psycopg_connection(conn: Any) -> bool:
    psycopg = sys.modules.get("psycopg")
    return psycopg is not None and isinstance(conn, psycopg.Connection)


def _runner(conn: Any) -> Callable[[Any, dict[str, Any]], Any]:
    """How to run one statement in the caller's open transaction on ``conn``, or raise.

    A SQLAlchemy connection in AUTOCOMMIT mode, a psycopg connection in autocommit mode
    outside ``conn.transaction()``, or a Django connection outside ``transaction.atomic()``
    has no transaction to join: the check would commit on its own, apart from the
    caller's write. Refused.
    """
    if isinstance(conn, (Connection, Session)):
        connection = conn.connection() if isinstance(conn, Session) else conn
        # isolation_level="AUTOCOMMIT": SQLAlchemy's begin() is a no-op, nothing to join
        if getattr(connection.connection.driver_connection, "autocommit", False):
            raise ConfigurationError(
                "check_postgres: this SQLAlchemy connection is in AUTOCOMMIT mode, so the "
                "check could not commit with your write; use a connection in a transaction "
                "(engine.begin(), or without isolation_level='AUTOCOMMIT')"
            )
        return lambda statement, params: conn.execute(statement, params).first()
    if _is_psycopg_connection(conn):
        from psycopg.pq import TransactionStatus

        if conn.autocommit and conn.info.transaction_status == TransactionStatus.IDLE:
            raise ConfigurationError(
                "check_postgres: this psycopg connection is in autocommit mode outside a "
                "transaction, so the check could not commit with your write; call it inside "
                "`with conn.transaction():` (or with autocommit off)"
            )
        return lambda statement, params: _on_cursor(conn.cursor(), statement, params)
    if _is_django_connection(conn):
        if conn.vendor != "postgresql":
            raise ConfigurationError(
                f"check_postgres: Django database {conn.alias!r} is {conn.vendor}, not PostgreSQL"
            )
        if conn.get_autocommit():
            raise ConfigurationError(
                f"check_postgres: Django database {conn.alias!r} is in autocommit mode, so the "
                "check could not commit with your write; call it inside "
                f"`transaction.atomic(using={conn.alias!r})` (or idempotent_transaction())"
            )
        return lambda statement, params: _on_cursor(conn.cursor(), statement, params)
    raise TypeError(f"check_postgres: expected {ACCEPTED}, got {type(conn).__qualname__}")


def _on_cursor(cursor: Any, statement: ClauseElement, params: dict[str, Any]) -> Any:
    sql, constants = driver_statement(statement)
    with cursor:
        cursor.execute(sql, {**constants, **params})
        return cursor.fetchone()


def check_postgres(conn: Any, resource: str, token: int, *, holder: str | None = None) -> None:
    """Accept ``token`` for ``resource`` inside the caller's transaction, or raise.

    ``conn`` is where the caller writes, in an open transaction: a SQLAlchemy
    ``Connection`` or ``Session``; a psycopg 3 connection (autocommit off, or
    inside ``conn.transaction()``); or a Django connection
    (``django.db.connections[alias]``, PostgreSQL) inside ``transaction.atomic``.
    Anything else raises ``TypeError``; a connection with no transaction to join
    raises ``ConfigurationError``. On success the resource's fence row stays
    locked until that transaction ends, so the caller's writes commit together
    with the new highest token and its ``holder``. Raises :class:`StaleFenceToken`
    if a higher token was already accepted, or the same token with another holder
    or without one (``holder=None``: a second check with an equal token is
    refused). ``holder`` identifies the acquisition (``self.fence`` passes the
    task execution's; a :class:`~celery_reliable.FencedLock` has ``.holder``).

    Unlike :meth:`RedisFence.set`, no write number is needed: the check runs in
    the caller's transaction and this library never resends a statement (nor
    do SQLAlchemy and psycopg). A copy delivered late on a connection its
    client gave up on runs in a transaction that can only roll back (no COMMIT
    follows it), and a holder's transactions on one resource commit in the
    order they checked, since the row stays locked until commit. So one
    holder's checks cannot land out of order; a caller that retries a
    transaction itself retries before moving on, in its own program order.
    """
    run = _runner(conn)
    params = {"p_resource": resource, "p_token": token, "p_holder": holder}
    try:
        row = run(_CHECK, params)
    except Exception as exc:
        # undefined table / column: no table, or one from before the holder column
        # (Django wraps the driver's error: its SQLSTATE is on the cause)
        codes = {sqlstate(exc), sqlstate(exc.__cause__) if exc.__cause__ else None}
        if codes & {"42P01", "42703"}:
            raise ConfigurationError(
                f"check_postgres: table {fences.name!r} is missing or older than this "
                "library; run `celery -A proj reliable migrate` (or create_tables(engine)) "
                "on this database"
            ) from exc
        raise
    if row is None:
        current = run(_CURRENT, {"p_resource": resource})
        metrics.inc("reliable_fence_rejections_total", store="postgres")
        raise StaleFenceToken(resource, token, current[0] if current is not None else None)


class RedisFence:
    """Fenced values in Redis: each key is a hash of the value, its highest token, that
    token's holder and the number of that holder's last write.

    Keys are used as given; in Redis Cluster each is one key, so any key works.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def set(
        self, key: str, value: str | bytes, token: int, *, holder: str | None = None,
        seq: int | None = None,
    ) -> None:
        """Write ``value`` if ``token`` is higher than the last accepted, or equal, from the
        same ``holder`` and with a higher write number ``seq``; else raise.

        Raises :class:`StaleFenceToken` for a lower token, or an equal one from
        another or an unknown holder; :class:`SupersededWrite` (a subclass) when
        the same holder's later write (higher ``seq``) was accepted first, or
        one of its writes with the same ``seq`` and another value (two processes
        or callers drew one number: the first to arrive keeps it). The same
        token, holder, ``seq`` and value again (this call resent after a lost
        reply, or its first copy arriving late) is accepted and changes nothing.

        ``seq`` defaults to :func:`next_write_seq` (the order in which this
        process issues writes); pass your own, strictly increasing per holder,
        for all of a holder's writes or for none. Without a holder each call is
        its own holder: an equal token is refused.
        """
        holder = holder or f"call:{secrets.token_hex(8)}"
        if seq is None:
            seq = next_write_seq()
        elif isinstance(seq, bool) or not isinstance(seq, int) or not 0 < seq < 2**53:
            # Lua compares numbers as doubles: exact up to 2**53
            raise ValueError(f"RedisFence.set: seq must be an int in [1, 2**53), got {seq!r}")
        status, current, current_seq = script("fenced_set")(
            self.client, [key], [token, value, holder, seq])
        if int(status) == 1:
            return
        metrics.inc("reliable_fence_rejections_total", store="redis")
        if int(status) == -1:
            raise SupersededWrite(key, token, seq, int(current_seq))
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

    def check_django(self, using: str = "default", resource: str | None = None) -> None:
        """:meth:`check_postgres` on Django's connection ``using``, inside ``transaction.atomic``
        (or ``idempotent_transaction()``): fences the ORM writes of that transaction."""
        from django.db import connections

        self.check_postgres(connections[using], resource)

    def redis_set(self, client: redis.Redis, key: str, value: str | bytes) -> None:
        """:meth:`RedisFence.set` with this task's token and holder (and the next write number)."""
        self._refuse_if_lost(key)
        RedisFence(client).set(key, value, self.token, holder=self.holder)
