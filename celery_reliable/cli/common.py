"""What every ``reliable`` command shares: one-line errors, the app, its runtime, a console.

Mistakes a user can make (a bad URL, a server that is down, no database
configured) become one line on stderr and exit status 1 (:func:`guarded`);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import click
import redis
from rich.console import Console
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, ProgrammingError, SQLAlchemyError

from ..errors import ConfigurationError
from ..runtime import Runtime, runtime_for

__all__ = ["current_app", "current_runtime", "database_engine", "describe", "guarded",
           "make_console", "one_line", "safe_url"]

F = TypeVar("F", bound=Callable[..., Any])


# ------------------------------------------------------------------ errors


def one_line(value: object) -> str:
    return " ".join(str(value).split())


def safe_url(url: str | None) -> str:
    """``url`` without its password (for messages)."""
    if not url:
        return "<unset>"
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
    except ValueError:
        return "<unparseable URL>"


def describe(exc: BaseException, app: Any) -> str | None:
    """One line for an error the user can cause (or fix); None for anything else (a bug)."""
    conf = app.conf
    if isinstance(exc, redis.RedisError):
        url = safe_url(conf.get("reliable_redis_url"))
        return f"Redis at {url} is unavailable: {one_line(exc)}"
    if isinstance(exc, ProgrammingError) and "UndefinedTable" in type(exc.orig).__name__:
        return ("celery-reliable's tables are missing in the database; create them with "
                f"`celery -A {app.main or 'proj'} reliable migrate`")
    if isinstance(exc, DBAPIError):
        url = safe_url(conf.get("reliable_database_url"))
        return f"PostgreSQL at {url} is unavailable: {one_line(exc.orig)}"
    if isinstance(exc, SQLAlchemyError):  # a malformed URL, an unknown driver
        url = safe_url(conf.get("reliable_database_url"))
        return f"reliable_database_url {url} is not usable: {one_line(exc)}"
    if isinstance(exc, ConfigurationError):
        return one_line(exc)
    try:
        from kombu.exceptions import OperationalError as BrokerError
    except ImportError:  # pragma: no cover - kombu comes with celery
        return None
    if isinstance(exc, BrokerError):
        return f"the broker is unavailable: {one_line(exc)}"
    return None


def guarded(func: F) -> F:
    """Turn errors a user can cause into one line on stderr and exit status 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except click.ClickException:
            raise
        except Exception as exc:
            message = describe(exc, current_app())
            if message is None:
                raise
            raise click.ClickException(message) from None

    return wrapper  # type: ignore[return-value]


# ------------------------------------------------------------------ context


def current_app() -> Any:
    """The app given to ``celery -A``."""
    ctx = click.get_current_context()
    app = getattr(ctx.find_root().obj, "app", None) or getattr(ctx.obj, "app", None)
    if app is None:
        raise click.ClickException("no Celery app: run this as `celery -A proj reliable ...`")
    return app


def current_runtime() -> Runtime:
    """The app's runtime (settings, key space, clients)."""
    app = current_app()
    try:
        return runtime_for(app)
    except ConfigurationError as exc:
        raise click.ClickException(one_line(exc)) from None
    except ValueError as exc:  # redis-py refuses the URL
        url = safe_url(app.conf.get("reliable_redis_url"))
        raise click.ClickException(f"reliable_redis_url {url} is not usable: "
                                   f"{one_line(exc)}") from None


def database_engine(runtime: Runtime) -> Engine:
    """The runtime's PostgreSQL engine; a one-line error if no database is configured."""
    if not runtime.settings.database_url:
        raise click.ClickException(
            "no database configured: set reliable_database_url (PostgreSQL) in the app's settings"
        )
    found: Engine = runtime.engine
    return found


def make_console() -> Console:
    """Where a command prints (no colours with ``celery --no-color``)."""
    ctx = click.get_current_context()
    no_color = bool(getattr(ctx.find_root().obj, "no_color", False))
    return Console(no_color=no_color, highlight=False)
