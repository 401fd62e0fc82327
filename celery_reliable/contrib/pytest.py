"""pytest fixtures for testing tasks that use celery-reliable's guards.

Installed with celery-reliable as a ``pytest11`` entry point (``-p
no:celery_reliable.contrib.pytest`` turns it off), or loaded explicitly with
``pytest_plugins = ["celery_reliable.contrib.pytest"]`` in your root
``conftest.py``. It is inert until a test requests one of its fixtures:
importing it opens no connection and starts nothing.

Fixtures (function scope; each test gets its own):

``reliable_guards``
    Isolates the app of Celery's ``celery_app`` fixture (Celery's test app
    configured by your ``celery_config`` fixture, or your own app if you
    override ``celery_app``): a Redis key prefix of this test's own under
    ``reliable_redis_url``, and, when ``reliable_database_url`` is set, a
    PostgreSQL schema of this test's own (created with celery-reliable's
    tables, selected through the URL's ``search_path``, dropped afterwards).
    Afterwards the keys under that prefix are deleted (SCAN + UNLINK, never a
    FLUSH), the schema is dropped and the app's settings restored. Returns a
    :class:`ReliableGuards`: ``assert_replayed(result)``, ``held_locks()``,
    ``dead_letters()``.
``reliable_app``
    That isolated app, made the current app for the test (``@shared_task``
    tasks resolve to it).
``reliable_worker``
    Celery's embedded worker (``celery.contrib.testing.worker.start_worker``,
    what Celery's ``celery_worker`` fixture runs) on ``reliable_app``, in this
    process, configured by Celery's ``celery_worker_pool`` and
    ``celery_worker_parameters`` fixtures. It does not go through the
    ``celery_worker`` fixture, which pytest-celery 1.x replaces with a
    Docker-based worker.

Celery's own fixtures come from ``celery.contrib.pytest``; pytest-celery
registers it, and this plugin registers it when nothing else did.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from celery_reliable.cli import LockInfo
    from celery_reliable.deadletter import DeadLetter

__all__ = ["ReliableGuards", "isolated", "reliable_app", "reliable_guards", "reliable_worker"]

_MISSING = object()

#: The settings an isolated app gets values of its own for.
_ISOLATED = ("reliable_key_prefix", "reliable_database_url")


def pytest_configure(config: pytest.Config) -> None:
    # Celery >= 5 no longer registers celery.contrib.pytest (celery_app, celery_config,
    # celery_worker_pool...) itself: pytest-celery does, as plugin "celery".
    manager = config.pluginmanager
    if not (manager.hasplugin("celery") or manager.hasplugin("celery.contrib.pytest")):
        manager.import_plugin("celery.contrib.pytest")


class _Replays(logging.Handler):
    """Task ids whose outcome ``ReliableTask`` replayed from a stored record (this process)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.task_ids: set[str] = set()
        self._mutex = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "reliable_event", None) == "replayed":
            with self._mutex:
                self.task_ids.add(str(getattr(record, "reliable_task_id", "")))

    def seen(self, task_id: str) -> bool:
        with self._mutex:
            return task_id in self.task_ids


class ReliableGuards:
    """One test's isolated guard state, and assertions on what the guards did.

    Replays are observed in this process (eager calls, ``.apply()``, the
    embedded ``reliable_worker``); a worker in another process is not seen.
    """

    def __init__(self, app: Any, prefix: str, schema: str | None, database_url: str | None,
                 replays: _Replays) -> None:
        self.app = app
        #: this test's ``reliable_key_prefix``
        self.prefix = prefix
        #: this test's PostgreSQL schema (None without ``reliable_database_url``)
        self.schema = schema
        #: ``reliable_database_url`` selecting that schema (your own engines may use it)
        self.database_url = database_url
        self._replays = replays

    def replayed(self, result: Any) -> bool:
        """True if the task's outcome came from a stored idempotency record (body not run).

        ``result``: an ``AsyncResult``/``EagerResult`` or a task id. A result
        not ready yet is not waited for (see :meth:`assert_replayed`).
        """
        return self._replays.seen(str(getattr(result, "id", result)))

    def assert_replayed(self, result: Any, timeout: float = 10.0) -> None:
        """Fail unless the task's outcome was replayed from its idempotency record.

        Waits up to ``timeout`` seconds for ``result`` to be ready. The signal is
        ``ReliableTask``'s own "replayed" log record for that task id (also
        counted as ``reliable_idempotent_replays_total``): a first execution, or
        a task without idempotency, fails this assertion.
        """
        task_id = str(getattr(result, "id", result))
        get = getattr(result, "get", None)
        if get is not None and not result.ready():
            with contextlib.suppress(Exception):  # its outcome is asserted on below
                get(timeout=timeout, propagate=False)
        if not self._replays.seen(task_id):
            state = getattr(result, "state", "unknown")
            raise AssertionError(
                f"task {task_id} (state {state}) was not replayed from a stored idempotency "
                "record: its body ran, or it did not finish"
            )

    def held_locks(self) -> list[LockInfo]:
        """Locks held now under this test's prefix, soonest expiry first (token, owner, ttl)."""
        from celery_reliable.cli import held_locks
        from celery_reliable.runtime import runtime_for

        return held_locks(runtime_for(self.app))[0]

    def dead_letters(self, task_name: str | None = None) -> list[DeadLetter]:
        """Dead letters recorded in this test's schema, newest first."""
        from celery_reliable.deadletter import DeadLetters

        if self.database_url is None:
            raise RuntimeError("dead_letters() needs reliable_database_url in the app's settings "
                               "(your celery_config fixture)")
        return DeadLetters(self.app).list(task_name=task_name, limit=10_000)


def _forget_runtime(app: Any) -> None:
    """Close the app's runtime in this process: the next use reads the settings again."""
    from celery_reliable import runtime

    with runtime._runtimes_mutex:
        current = runtime._runtimes.pop(app, None)
    if current is not None and current.pid == os.getpid():
        current.close()


def _with_search_path(url: str, schema: str, search_path: str) -> str:
    """``url`` with ``schema`` first on its ``search_path`` (libpq ``options``)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    # The server splits options on spaces: the path is written without any.
    path = ",".join(part for part in (schema, search_path.replace(" ", "")) if part)
    option = f"-csearch_path={path}"
    existing = parsed.query.get("options")
    if isinstance(existing, tuple):
        existing = " ".join(existing)
    options = f"{existing} {option}" if existing else option
    return parsed.update_query_dict({"options": options}).render_as_string(hide_password=False)


def _create_schema(database_url: str, schema: str) -> str:
    """Create ``schema``; returns the database's ``search_path``."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from celery_reliable.schema import make_engine

    admin = make_engine(database_url)
    try:
        with admin.begin() as conn:
            search_path = str(conn.execute(text("SHOW search_path")).scalar_one())
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except SQLAlchemyError as exc:
        shown = make_url(database_url).render_as_string(hide_password=True)
        detail = " ".join(str(getattr(exc, "orig", None) or exc).split())
        raise RuntimeError(
            f"celery-reliable's test fixtures could not create a schema in "
            f"reliable_database_url {shown} ({detail}); the database must be reachable and "
            "its user allowed to CREATE schemas in it"
        ) from exc
    finally:
        admin.dispose()
    return search_path


def _create_tables(database_url: str, schema: str) -> None:
    from celery_reliable.schema import create_tables, make_engine

    # With the schema alone on the path, so that tables of the same names elsewhere
    # on it (a development database that was migrated) are not taken for them.
    engine = make_engine(_with_search_path(database_url, schema, ""))
    try:
        create_tables(engine)
    finally:
        engine.dispose()


def _drop_schema(database_url: str, schema: str) -> None:
    from sqlalchemy import text

    from celery_reliable.schema import make_engine

    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("SET LOCAL lock_timeout = '30s'"))  # a connection left open
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    finally:
        engine.dispose()


def _delete_keys(redis_url: str, prefix: str) -> None:
    """Delete every key of ``prefix`` (``{prefix}:*``), and nothing else."""
    import redis

    pattern = "".join("\\" + c if c in "*?[]\\" else c for c in "{" + prefix + "}:") + "*"
    client = redis.Redis.from_url(redis_url)
    try:
        batch: list[Any] = []
        for key in client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 500:
                client.unlink(*batch)
                batch = []
        if batch:
            client.unlink(*batch)
    finally:
        client.close()


def _restore(conf: Any, saved: dict[str, Any]) -> None:
    for name, value in saved.items():
        if value is _MISSING:
            conf.changes.pop(name, None)
        else:
            conf[name] = value


@contextmanager
def isolated(app: Any) -> Iterator[ReliableGuards]:
    """Give ``app`` a key prefix and a PostgreSQL schema of its own for the block.

    What the ``reliable_guards`` fixture runs; usable without pytest. The app's
    ``reliable_redis_url`` and ``reliable_database_url`` say which servers;
    the prefix is the app's own ``reliable_key_prefix`` plus a random suffix.
    Nothing outside that prefix and that schema is touched.
    """
    from celery_reliable.config import ReliableSettings

    conf = app.conf
    settings = ReliableSettings.from_conf(conf)
    prefix = f"{settings.key_prefix[:48]}-t{secrets.token_hex(4)}"
    saved = {name: conf.changes.get(name, _MISSING) for name in _ISOLATED}
    replays = _Replays()
    logger = logging.getLogger("celery_reliable")
    with contextlib.ExitStack() as cleanup:
        # Registered in reverse order of execution: settings are restored last.
        cleanup.callback(_restore, conf, saved)
        schema = database_url = None
        if settings.database_url:
            schema = f"reliable_test_{secrets.token_hex(4)}"
            search_path = _create_schema(settings.database_url, schema)
            cleanup.callback(_drop_schema, settings.database_url, schema)
            _create_tables(settings.database_url, schema)
            # the schema first, then the usual path: your own tables stay visible
            database_url = _with_search_path(settings.database_url, schema, search_path)
        cleanup.callback(_delete_keys, settings.redis_url, prefix)
        cleanup.callback(_forget_runtime, app)
        conf["reliable_key_prefix"] = prefix
        if database_url is not None:
            conf["reliable_database_url"] = database_url
        _forget_runtime(app)  # a runtime built before now has the old settings
        # The "replayed" records are INFO: make sure they are created (a worker
        # sets the root level to its own, ERROR for the embedded one).
        level = logger.level
        logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
        logger.addHandler(replays)
        cleanup.callback(logger.setLevel, level)
        cleanup.callback(logger.removeHandler, replays)
        yield ReliableGuards(app, prefix, schema, database_url, replays)


@pytest.fixture
def reliable_guards(celery_app: Any) -> Iterator[ReliableGuards]:
    """``celery_app`` isolated for this test (prefix, schema), and assertions on its guards."""
    with isolated(celery_app) as guards:
        yield guards


@pytest.fixture
def reliable_app(reliable_guards: ReliableGuards) -> Iterator[Any]:
    """The app of ``celery_app``, with a Redis key prefix and a PostgreSQL schema of this test.

    It is the current app during the test, so ``@shared_task`` tasks (and their
    ``.delay()``/``.apply()``) resolve to it.
    """
    from celery import _state

    previous = _state._tls.current_app
    reliable_guards.app.set_current()
    yield reliable_guards.app
    _state._tls.current_app = previous


@pytest.fixture
def reliable_worker(
    reliable_app: Any,
    celery_includes: Any,
    celery_worker_pool: Any,
    celery_worker_parameters: Any,
) -> Iterator[Any]:
    """Celery's embedded worker on ``reliable_app``, in this process; stopped after the test."""
    from celery.contrib.testing import worker

    for module in celery_includes:
        reliable_app.loader.import_task_module(module)
    parameters = dict(celery_worker_parameters)
    if "celery.ping" not in reliable_app.tasks:
        # your own app may have been finalized before Celery's test ping task was declared
        parameters.setdefault("perform_ping_check", False)
    with worker.start_worker(reliable_app, pool=celery_worker_pool, **parameters) as w:
        yield w
