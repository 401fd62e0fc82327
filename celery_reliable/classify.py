"""Which failures are worth retrying, and how long an upstream asked us to wait.

Retryable by default: connection errors, timeouts and their kin (the
builtin ``ConnectionError``/``TimeoutError``, redis-py's, kombu's and
SQLAlchemy's operational errors, ``requests``' and ``httpx``' transport
errors), and HTTP responses 408, 429, 500, 502, 503, 504 from ``requests``
or ``httpx`` (each imported only if installed). Every other exception is
retried only when a task lists it (``retry_for`` or Celery's
``autoretry_for``). Other 4xx responses are not retryable.
"""

from __future__ import annotations

import email.utils
import socket
import time
from typing import Any

__all__ = ["RETRYABLE_STATUS", "http_status", "is_retryable", "retry_after"]

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
