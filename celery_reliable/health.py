"""Loud store failures: a check of every configured store when a worker starts, and
rate-limited warnings (with the ``reliable_store_up`` gauge) while one stays unreachable.

A Redis or PostgreSQL outage does not fail tasks: the pipeline defers them
(fail closed) until the store answers again. Without this module that is
nearly silent; with it, an operator sees:

* at worker start (:func:`report_startup`, from the ``worker_ready`` signal):
  one ERROR per store that cannot be used, with its URL (password masked)
  and what to do, or one INFO line saying it answers;
* while a store stays unreachable (:class:`StoreReporter`, called by the
  pipeline at each admission or durable claim): at most one WARNING per
  :data:`REPORT_INTERVAL` per process, with the URL, the error and how many
  tasks this process deferred since the previous report, and one WARNING when
  it answers again;
* ``reliable_store_up{store}``: 0 or 1, set at each change of state.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import metrics
from .config import ReliableSettings
from .errors import ConfigurationError
from .storage import RedisStore

__all__ = [
    "CHECK_TIMEOUT",
    "REPORT_INTERVAL",
    "Finding",
    "StoreHealth",
    "StoreReporter",
    "check_stores",
    "mask_url",
    "report_startup",
]

log = logging.getLogger("celery_reliable")

#: Seconds between two WARNINGs about one unreachable store, per process.
REPORT_INTERVAL = 30.0

#: Seconds the start-up check gives each store (connect and answer) before it says so.
CHECK_TIMEOUT = 3.0

GAUGE = "reliable_store_up"


def mask_url(url: str | None) -> str:
    """``url`` with its password (user-info or ``?password=``) replaced by ``***``."""
    if not url:
        return "<unset>"
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            host = netloc.rsplit("@", 1)[1]
            netloc = f"{parts.username or ''}:***@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(key.lower() == "password" for key, _ in pairs):
                query = urlencode([(k, "***" if k.lower() == "password" else v)
                                   for k, v in pairs], safe="*")
        return urlunsplit(parts._replace(netloc=netloc, query=query))
    except ValueError:
        return "<unparseable URL>"


def _one_line(exc: BaseException, limit: int = 300) -> str:
    # SQLAlchemy's errors carry the statement and a link; the driver's message is the news.
    text = " ".join(str(getattr(exc, "orig", None) or exc).split()).rstrip(".")
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class _Store:
    name: str  # gauge label: redis | postgres
    title: str  # Redis | PostgreSQL
    setting: str
    port: int  # the default port, to say where it should run


REDIS = _Store("redis", "Redis", "reliable_redis_url", 6379)
POSTGRES = _Store("postgres", "PostgreSQL", "reliable_database_url", 5432)


class StoreReporter:
    """What one process says about one store while the pipeline uses it.

    :meth:`failed` is called for each task deferred because the store could not
    be reached, :meth:`ok` after each call that reached it (cheap when nothing
    changed: one attribute read). A WARNING is logged at the first failure and
    then at most once per ``interval`` seconds (by ``clock``, monotonic) while
    failures go on, with the count of tasks deferred since the previous one;
    another when the store answers again after a reported failure. The gauge
    ``reliable_store_up{store}`` is set at each change of state. Thread-safe.
    """

    def __init__(self, store: _Store, url: str | None, *, interval: float = REPORT_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.url = mask_url(url)
        self.where = _host_port(url or "", store.port)
        self.interval = interval
        self._clock = clock
        self._mutex = threading.Lock()
        self._up: bool | None = None  # None: not used yet in this process
        self._deferred = 0  # tasks deferred since the last WARNING
        self._reported_at: float | None = None  # the last WARNING about a failure
        self._outage_reported = False

    def failed(self, exc: BaseException) -> None:
        """A task is deferred because the store did not answer (``exc``)."""
        now = self._clock()
        with self._mutex:
            changed = self._up is not False
            self._up = False
            self._deferred += 1
            due = self._reported_at is None or now - self._reported_at >= self.interval
            if due:
                count, self._deferred = self._deferred, 0
                previous, self._reported_at = self._reported_at, now
                first = not self._outage_reported
                self._outage_reported = True
        if changed:
            metrics.gauge(GAUGE, 0, store=self.store.name)
        if not due:
            return
        since = ("so far" if first or previous is None
                 else f"in the last {now - previous:.0f}s")
        log.warning(
            "celery-reliable: %s at %s (%s) is unreachable (%s): %d task(s) deferred by this "
            "process %s; they run once it answers. Check that %s is running at %s and that %s "
            "is right.", self.store.title, self.url, self.store.setting, _one_line(exc), count,
            since, self.store.title, self.where, self.store.setting)

    def ok(self) -> None:
        """A call reached the store."""
        if self._up:  # the hot path: nothing changed
            return
        with self._mutex:
            if self._up:
                return
            self._up = True
            recovered = self._outage_reported
            count = self._deferred if recovered else 0
            if recovered:
                self._deferred = 0
                self._outage_reported = False
        metrics.gauge(GAUGE, 1, store=self.store.name)
        if recovered:
            more = (f"; {count} more task(s) were deferred by this process since the last report"
                    if count else "")
            log.warning("celery-reliable: %s at %s answers again%s", self.store.title, self.url,
                        more)

    @property
    def up(self) -> bool | None:
        """The last state seen by this process (None: not used yet)."""
        return self._up


class StoreHealth:
    """The reporters of one :class:`~celery_reliable.runtime.Runtime`."""

    def __init__(self, settings: ReliableSettings, *, interval: float = REPORT_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = StoreReporter(REDIS, settings.redis_url, interval=interval, clock=clock)
        self.postgres = StoreReporter(POSTGRES, settings.database_url, interval=interval,
                                      clock=clock)


# ------------------------------------------------------------------ start-up check


@dataclass(frozen=True)
class Finding:
    """One line of the start-up check: ``level`` (logging), the store, the message."""

    level: int
    store: str
    message: str
    up: bool | None = None  # the store answered (None: not a reachability finding)


def _check_redis(url: str, timeout: float) -> Finding:
    shown = mask_url(url)
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout,
                                      socket_timeout=timeout, retry=Retry(NoBackoff(), 0))
    except ValueError as exc:
        return Finding(logging.ERROR, "redis",
                       f"reliable_redis_url {shown} is not a usable Redis URL ({_one_line(exc)}):"
                       " fix reliable_redis_url (e.g. redis://127.0.0.1:6379/0)", up=False)
    try:
        RedisStore(client).ping()
    except redis.AuthenticationError as exc:
        return Finding(logging.ERROR, "redis",
                       f"Redis at {shown} (reliable_redis_url) refused the credentials "
                       f"({_one_line(exc)}): fix the user/password in reliable_redis_url",
                       up=False)
    except redis.RedisError as exc:
        where = _host_port(url, 6379)
        return Finding(logging.ERROR, "redis",
                       f"Redis at {shown} (reliable_redis_url) is unreachable ({_one_line(exc)})."
                       " Every ReliableTask is deferred until it answers: start Redis at "
                       f"{where}, or fix reliable_redis_url", up=False)
    finally:
        client.close()
    return Finding(logging.INFO, "redis", f"Redis at {shown} (reliable_redis_url) answers",
                   up=True)


def _host_port(url: str, default_port: int) -> str:
    try:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            return parts.path
        return f"{parts.hostname or '127.0.0.1'}:{parts.port or default_port}"
    except ValueError:
        return "the configured address"


def _check_postgres(url: str, create_tables: bool, migrate: str, timeout: float) -> Finding:
    from sqlalchemy import create_engine, inspect
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.pool import NullPool

    from .schema import metadata, normalise_url

    shown = mask_url(url)
    try:
        engine = create_engine(normalise_url(url), poolclass=NullPool,
                               connect_args={"connect_timeout": max(2, math.ceil(timeout))})
    except (SQLAlchemyError, ValueError, ImportError) as exc:
        return Finding(logging.ERROR, "postgres",
                       f"reliable_database_url {shown} is not a usable database URL "
                       f"({_one_line(exc)}): fix reliable_database_url "
                       "(e.g. postgresql://user:password@127.0.0.1:5432/proj)", up=False)
    try:
        with engine.connect() as conn:
            inspector = inspect(conn)
            missing = [table.name for table in metadata.sorted_tables
                       if not inspector.has_table(table.name, schema=table.schema)]
    except SQLAlchemyError as exc:
        return Finding(logging.ERROR, "postgres",
                       f"PostgreSQL at {shown} (reliable_database_url) is unreachable "
                       f"({_one_line(exc)}). Idempotent tasks are deferred until it answers and "
                       "dead letters cannot be recorded: start PostgreSQL at "
                       f"{_host_port(url, 5432)}, or fix reliable_database_url", up=False)
    finally:
        engine.dispose()
    if not missing:
        return Finding(logging.INFO, "postgres",
                       f"PostgreSQL at {shown} (reliable_database_url) answers; tables present",
                       up=True)
    names = ", ".join(missing)
    if create_tables:
        return Finding(logging.INFO, "postgres",
                       f"PostgreSQL at {shown} (reliable_database_url) answers; tables {names} "
                       "are created when first needed (reliable_create_tables)", up=True)
    return Finding(logging.ERROR, "postgres",
                   f"celery-reliable's tables {names} are missing in {shown} and "
                   f"reliable_create_tables is False: tasks that need them fail until you run "
                   f"`{migrate}`", up=True)


def _concurrently(checks: dict[str, Callable[[], Finding]], deadline: float) -> list[Finding]:
    """Run each check in a daemon thread, all at once; wait at most ``deadline`` s in all.

    A check still running then gives a finding saying so (its thread is left to
    finish on its own and is ignored).
    """
    found: dict[str, Finding] = {}

    def run(store: str, check: Callable[[], Finding]) -> None:
        try:
            found[store] = check()
        except Exception as exc:  # a bug in a check must not stop the worker
            found[store] = Finding(logging.WARNING, store,
                                   f"could not check {store}: {_one_line(exc)}")

    threads = [threading.Thread(target=run, args=(store, check), daemon=True,
                                name=f"celery-reliable-check-{store}")
               for store, check in checks.items()]
    for thread in threads:
        thread.start()
    end = time.monotonic() + deadline
    for thread in threads:
        thread.join(max(0.0, end - time.monotonic()))
    return [found.get(store) or Finding(
        logging.ERROR, store,
        f"{'Redis' if store == 'redis' else 'PostgreSQL'} did not answer the start-up check "
        f"within {deadline:g}s (a stalled network or server); tasks that need it are "
        "deferred until it answers", up=False) for store in checks]


def check_stores(app: Any, *, timeout: float = CHECK_TIMEOUT) -> list[Finding]:
    """Check every store ``app`` configures, once: Redis (PING), PostgreSQL and its tables.

    The stores are checked at the same time, each with socket timeouts of
    ``timeout`` seconds; the whole check returns within ``2 * timeout + 1``
    seconds whatever the network does. Nothing is kept open. Returns one
    finding per store (or one for settings that cannot be read).
    """
    try:
        settings = ReliableSettings.from_conf(app.conf)
    except ConfigurationError as exc:
        return [Finding(logging.ERROR, "settings", _one_line(exc))]
    checks: dict[str, Callable[[], Finding]] = {
        "redis": lambda: _check_redis(settings.redis_url, timeout)}
    if settings.database_url:
        migrate = f"celery -A {getattr(app, 'main', None) or 'proj'} reliable migrate"
        database_url = settings.database_url
        checks["postgres"] = lambda: _check_postgres(database_url, settings.create_tables,
                                                     migrate, timeout)
    return _concurrently(checks, 2 * timeout + 1)


def uses_reliable_tasks(app: Any) -> bool:
    """True if ``app`` declares at least one ReliableTask.

    A copy of a shared task that another app declared (Celery gives every app
    one) does not count: this app never said it needs the stores.
    """
    from .task import ReliableTask

    for task in app.tasks.values():
        if isinstance(task, ReliableTask):
            binding = type(task)._bound().get(app)
            if binding is None or not binding.foreign:
                return True
    return False


def report_startup(app: Any, *, timeout: float = CHECK_TIMEOUT) -> list[Finding]:
    """Log :func:`check_stores` of ``app`` (nothing for an app without a ReliableTask)."""
    if not uses_reliable_tasks(app):
        return []
    findings = check_stores(app, timeout=timeout)
    for finding in findings:
        log.log(finding.level, "celery-reliable: %s", finding.message)
        if finding.up is not None:
            metrics.gauge(GAUGE, 1 if finding.up else 0, store=finding.store)
    return findings
