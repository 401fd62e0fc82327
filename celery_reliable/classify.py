"""Which failures are worth retrying, and how long an upstream asked us to wait.

Retryable by default: connection errors, timeouts and their kin (the
builtin ``ConnectionError``/``TimeoutError``, redis-py's, kombu's and
SQLAlchemy's operational errors, ``requests``' and ``httpx``' transport
errors), and HTTP responses 408, 429, 500, 502, 503, 504 from ``requests``
or ``httpx`` (each imported only if installed). Every other exception is
retried only when a task lists it (``retry_for`` or Celery's
``autoretry_for``). Other 4xx responses are not retryable.

Separately, PostgreSQL errors met by the library's own statements and
transaction are sorted by :func:`is_outage` (the server or the path to it
failed: defer and run again once it is back) and :func:`is_missing_table`
(a schema problem: configuration, never waited out).
"""

from __future__ import annotations

import email.utils
import socket
import time
from typing import Any

__all__ = [
    "RETRYABLE_STATUS",
    "http_status",
    "is_missing_table",
    "is_outage",
    "is_retryable",
    "retry_after",
    "sqlstate",
]

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError, socket.timeout]
    try:
        import redis

        types += [redis.ConnectionError, redis.TimeoutError]
    except ImportError:  # pragma: no cover
        pass
    try:
        from kombu.exceptions import OperationalError

        types.append(OperationalError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from sqlalchemy.exc import OperationalError as SAOperationalError

        types.append(SAOperationalError)
    except ImportError:  # pragma: no cover
        pass
    try:
        import requests

        types += [requests.ConnectionError, requests.Timeout]
    except ImportError:
        pass
    try:
        import httpx

        types += [httpx.TransportError]
    except ImportError:
        pass
    return tuple(types)


_TRANSIENT = _transient_types()


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of a ``requests``/``httpx`` error carrying a response, else None."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def retry_after(exc: BaseException, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta seconds or HTTP date), else None."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    value: Any = headers.get("Retry-After") or headers.get("retry-after")
    if not value:
        return None
    value = str(value).strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def is_retryable(exc: BaseException, extra: tuple[type[BaseException], ...] = ()) -> bool:
    """True for transient failures (see the module docstring) and anything in ``extra``."""
    if extra and isinstance(exc, extra):
        return True
    status = http_status(exc)
    if status is not None:
        return status in RETRYABLE_STATUS
    return isinstance(exc, _TRANSIENT)


# ------------------------------------------------------------ PostgreSQL store errors

#: SQLSTATEs of a server that cannot serve, whatever the statement: connection
#: exceptions (08), insufficient resources (53: too many connections, disk full,
#: out of memory), system errors (58: I/O), and admin shutdown, crash shutdown,
#: "cannot connect now" (57P01-57P03: restart, failover, ``pg_terminate_backend``).
_OUTAGE_SQLSTATES = ("08", "53", "58", "57P01", "57P02", "57P03")

#: Undefined table, invalid schema name: the tables were never created (or dropped).
_MISSING_TABLE_SQLSTATES = frozenset({"42P01", "3F000"})


def _driver_error(exc: BaseException) -> BaseException:
    """The DB-API driver's exception under a SQLAlchemy wrapper (or ``exc`` itself)."""
    orig = getattr(exc, "orig", None)
    return orig if isinstance(orig, BaseException) else exc


def sqlstate(exc: BaseException) -> str | None:
    """The PostgreSQL SQLSTATE of an error (psycopg 3 ``sqlstate``, psycopg2 ``pgcode``).

    None when the server sent none: the driver failed on its own (connection
    refused, reset, closed, timed out), or the error is not PostgreSQL's.
    """
    orig = _driver_error(exc)
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return code if isinstance(code, str) else None


def is_outage(exc: BaseException) -> bool:
    """True when PostgreSQL, or the path to it, failed rather than the statement.

    Outages: an error whose SQLSTATE says the server cannot serve
    (``_OUTAGE_SQLSTATES``: e.g. psycopg's ``AdminShutdown``,
    ``ConnectionFailure``, ``TooManyConnections``), and a driver error with no
    SQLSTATE at all of the DB-API classes ``OperationalError``/``InterfaceError``
    or one after which SQLAlchemy invalidated the connection (refused, reset,
    closed: ``connection_invalidated``). Not outages: every other SQLSTATE
    (a constraint, a missing table, a permission, a lock or statement timeout,
    a serialization failure, an idle-in-transaction timeout): the statement or
    the task itself failed, and running it again later would not help by itself.
    """
    from sqlalchemy.exc import DisconnectionError

    if isinstance(exc, DisconnectionError):
        return True
    code = sqlstate(exc)
    if code is not None:
        return code.startswith(_OUTAGE_SQLSTATES)
    if getattr(exc, "connection_invalidated", False):
        return True
    # PEP 249 names these classes in every driver (and SQLAlchemy mirrors them).
    names = {cls.__name__ for cls in type(_driver_error(exc)).__mro__}
    return bool(names & {"OperationalError", "InterfaceError"}) and _is_database_error(exc)


def _is_database_error(exc: BaseException) -> bool:
    """A SQLAlchemy DBAPIError, or a DB-API driver's own error (not kombu's or redis-py's)."""
    from sqlalchemy.exc import DBAPIError

    if isinstance(exc, DBAPIError):
        return True
    names = {cls.__name__ for cls in type(exc).__mro__}
    return "DatabaseError" in names or "InterfaceError" in names


def is_missing_table(exc: BaseException) -> bool:
    """True when a statement named a table (or schema) that does not exist."""
    return sqlstate(exc) in _MISSING_TABLE_SQLSTATES
