"""Per-process state: Redis client, database engine, store and the lease heartbeat.

One :class:`Runtime` exists per (app, process). It is created lazily on first
use *in the process that uses it*, so nothing opened before a prefork fork is
shared with the children; ``worker_process_init`` drops whatever a child
inherited. It is never a module global configured by whichever app comes
first: two apps in one process get two runtimes. The leases and their heartbeat
are :mod:`celery_reliable.leases` (re-exported here).
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

import redis

from .classify import is_missing_table, sqlstate
from .config import ReliableSettings
from .errors import ConfigurationError
from .health import StoreHealth
from .keys import KeySpace
from .leases import Heartbeat, Lease, heartbeat_timeout, lease_margin
from .storage import store_for

__all__ = ["Heartbeat", "Lease", "Runtime", "heartbeat_timeout", "lease_margin", "runtime_for"]


class Runtime:
    """Connections and the heartbeat of one app in one process."""

    def __init__(self, app: Any) -> None:
        self.pid = os.getpid()
        self.settings = ReliableSettings.from_conf(app.conf)
        self.keys = KeySpace(self.settings.key_prefix)
        self.redis: redis.Redis = redis.Redis.from_url(
            self.settings.redis_url,
            socket_connect_timeout=5,
            socket_timeout=self.settings.redis_socket_timeout,
            health_check_interval=30,
        )
        self.heartbeat = Heartbeat(store_for(self))  # renews through the pipeline's store
        self.health = StoreHealth(self.settings)  # loud, rate-limited store outages
        self._engine: Any = None
        self._engine_mutex = threading.Lock()
        self._tables_ready = False
        self.migrate_command = f"celery -A {getattr(app, 'main', None) or 'proj'} reliable migrate"

    @property
    def engine(self) -> Any:
        """SQLAlchemy engine on ``reliable_database_url``, created on first use."""
        if self._engine is None:
            with self._engine_mutex:
                if self._engine is None:
                    from .schema import make_engine

                    self._engine = make_engine(
                        self.settings.database_url,
                        lock_timeout=self.settings.database_lock_timeout,
                        pool_size=self.settings.database_pool_size,
                        max_overflow=self.settings.database_pool_size,
                    )
        return self._engine

    def task_engine(self) -> Any:
        """:attr:`engine`, with celery-reliable's tables ready: for the task pipeline.

        On first use in this process (and again after :meth:`schema_problem` found one missing),
        ``reliable_create_tables`` (default on) creates the tables that do not
        exist yet (:func:`~celery_reliable.schema.create_tables`: one short
        transaction, serialised across processes by an advisory lock; threads
        racing here are serialised by it too). Raises SQLAlchemy's error while
        PostgreSQL is unreachable (the next use tries again), and
        ``ConfigurationError`` when PostgreSQL refuses to create them (grants).
        The CLI and ``DeadLetters`` use :attr:`engine`: they never create tables.
        """
        engine = self.engine
        if not self._tables_ready:
            if self.settings.create_tables:
                from sqlalchemy.exc import SQLAlchemyError

                from .schema import create_tables

                try:
                    create_tables(engine)
                except SQLAlchemyError as exc:
                    if (sqlstate(exc) or "").startswith("42"):  # permission, schema
                        detail = " ".join(str(getattr(exc, "orig", exc)).split())
                        raise ConfigurationError(
                            f"celery-reliable could not create its PostgreSQL tables ({detail}); "
                            "create them with "
                            f"`{self.migrate_command}` as a user allowed to, or set "
                            "reliable_create_tables=False and manage them yourself"
                        ) from exc
                    raise
            self._tables_ready = True
        return engine

    def schema_problem(self, exc: BaseException) -> bool:
        """Sort an error of the pipeline's own statement: False if it is no schema problem.

        A missing table (dropped, or never created) returns True when
        ``reliable_create_tables`` is on: the next :meth:`task_engine` creates
        it again. Otherwise a missing table, or any other error of class 42
        (permission, undefined column), raises ``ConfigurationError`` naming the
        migrate command: a schema problem is never waited out.
        """
        code = sqlstate(exc) or ""
        if is_missing_table(exc):
            self._tables_ready = False
            if self.settings.create_tables:
                return True
        elif not code.startswith("42"):
            return False
        detail = " ".join(str(getattr(exc, "orig", exc)).split())
        if is_missing_table(exc):
            message = (f"celery-reliable's PostgreSQL tables are missing ({detail}); create them "
                       f"with `{self.migrate_command}` (reliable_create_tables is False)")
        else:
            message = (f"PostgreSQL refused celery-reliable's statement on its tables ({detail}); "
                       f"create them with `{self.migrate_command}` and grant the user of "
                       "reliable_database_url access to them")
        raise ConfigurationError(message) from exc

    def close(self) -> None:
        self.heartbeat.stop()
        if self._engine is not None:
            self._engine.dispose()
        self.redis.close()


_runtimes: weakref.WeakKeyDictionary[Any, Runtime] = weakref.WeakKeyDictionary()
_runtimes_mutex = threading.Lock()


def runtime_for(app: Any) -> Runtime:
    """The runtime of ``app`` in this process, created after any fork."""
    rt = _runtimes.get(app)
    if rt is not None and rt.pid == os.getpid():
        return rt
    with _runtimes_mutex:
        rt = _runtimes.get(app)
        if rt is None or rt.pid != os.getpid():
            rt = Runtime(app)
            _runtimes[app] = rt
        return rt


def forget_inherited() -> None:
    """Drop runtimes inherited through fork without touching their sockets."""
    with _runtimes_mutex:
        for app in list(_runtimes):
            if _runtimes[app].pid != os.getpid():
                del _runtimes[app]


def close_all() -> None:
    with _runtimes_mutex:
        for app in list(_runtimes):
            rt = _runtimes.pop(app)
            if rt.pid == os.getpid():
                rt.close()
