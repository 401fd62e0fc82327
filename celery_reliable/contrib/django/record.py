"""The idempotency record on Django's own connection (``reliable_django_database``).

:class:`~celery_reliable.idempotency.PostgresRecord` holds each first execution's
transaction on celery-reliable's SQLAlchemy pool, so Django's ORM, which has its
own connection, cannot write in it. :class:`DjangoRecord` keeps the same
contract on Django's connection for one alias instead: ``begin`` enters an
outermost ``transaction.atomic(using=alias)`` and claims the key in it, the task
body runs inside it (every ORM write on that alias joins it, as with
``ATOMIC_REQUESTS``; ``idempotent_transaction()`` is a nested atomic block),
and ``succeed`` writes the result and leaves the block, which commits. Any
other end rolls it back. A worker killed mid-task drops the connection, and
PostgreSQL rolls everything back.

Errors keep the record's contract: they surface as SQLAlchemy ``DBAPIError``
subclasses around the driver's exception (SQLSTATE and all), so the task
pipeline defers, replays and fails exactly as on its own pool.

Refused configurations (``ConfigurationError``): Django not set up, an alias
that is not PostgreSQL, or one whose ``reliable_idempotency`` is another table
(database, or schema on its search_path) than ``reliable_database_url``'s (the
CLI, purge, dead letters and table creation use that one).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from django.core.exceptions import ImproperlyConfigured
from django.db import Error as DjangoError
from django.db import connections, transaction
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.expression import ClauseElement

from ...errors import ConfigurationError
from ...fencing import driver_statement
from ...idempotency import _CLAIM, _LOOKUP, _SUCCEED, _UPSERT, Existing, PostgresRecord
from ...schema import idempotency

__all__ = ["DjangoRecord"]

T = TypeVar("T")

#: Aliases found to reach each engine's tables: checked once per engine and alias.
_same_tables: weakref.WeakKeyDictionary[Engine, set[str]] = weakref.WeakKeyDictionary()

#: Where a connection's statements on celery-reliable's records land: the server, the
#: database, and the table the name resolves to through its search_path.
_IDENTITY = ("SELECT current_database(), pg_postmaster_start_time(), "
             f"to_regclass('{idempotency.name}')::oid")


def _translated(sql: str, call: Callable[[], T]) -> T:
    """``call()``, with Django's database errors raised as SQLAlchemy's (``from`` them)."""
    try:
        return call()
    except DjangoError as exc:
        cause = exc.__cause__
        # The driver's own error (psycopg's, with its SQLSTATE) when Django wrapped one.
        orig = cause if isinstance(cause, Exception) else exc
        raise DBAPIError.instance(sql, None, orig, Exception) from exc


class DjangoRecord(PostgresRecord):
    """A :class:`PostgresRecord` whose transaction is Django's atomic block on ``alias``."""

    def __init__(self, engine: Engine, task: str, key_digest: str, fingerprint: str,
                 ttl: float, *, alias: str, lock_timeout: float | None) -> None:
        super().__init__(engine, task, key_digest, fingerprint, ttl)
        self.alias = alias
        self.lock_timeout = lock_timeout
        self.atomic: Any = None  # the outermost transaction.atomic, while open
        self.django_conn: Any = None  # Django's connection (this thread's) it is open on
        # Every ORM write of the body on this alias is in the record's transaction.
        self.session_used = True

    # ------------------------------------------------------------------ helpers

    def _connection(self) -> Any:
        try:
            conn = connections[self.alias]
            vendor = conn.vendor
        except ImproperlyConfigured as exc:
            raise ConfigurationError(
                f"reliable_django_database={self.alias!r}: Django is not set up in this "
                f"process ({exc}); call django.setup() where the Celery app is created "
                "(as Celery's Django guide shows), or unset reliable_django_database"
            ) from exc
        except Exception as exc:  # ConnectionDoesNotExist
            raise ConfigurationError(
                f"reliable_django_database={self.alias!r}: no such Django database ({exc})"
            ) from exc
        if vendor != "postgresql":
            raise ConfigurationError(
                f"reliable_django_database={self.alias!r} is {vendor}, not PostgreSQL"
            )
        return conn

    def _run(self, conn: Any, statement: ClauseElement, params: dict[str, Any]) -> Any:
        sql, constants = driver_statement(statement)

        def execute() -> Any:
            with conn.cursor() as cursor:
                cursor.execute(sql, {**constants, **params})
                return cursor.fetchone() if cursor.description is not None else None

        return _translated(sql, execute)

    def _check_same_database(self, conn: Any) -> None:
        """Refuse an alias reaching another table than the engine's (once per process)."""
        checked = _same_tables.setdefault(self.engine, set())
        if self.alias in checked:
            return

        def django_identity() -> Any:
            with conn.cursor() as cursor:
                cursor.execute(_IDENTITY)
                return tuple(cursor.fetchone())

        theirs = _translated(_IDENTITY, django_identity)
        with self.engine.connect() as ours_conn:
            ours = tuple(ours_conn.execute(text(_IDENTITY)).one())
        if theirs != ours:
            shown = self.engine.url.render_as_string(hide_password=True)
            where = "database" if theirs[:2] != ours[:2] else "schema (search_path)"
            raise ConfigurationError(
                f"reliable_django_database={self.alias!r} (database {theirs[0]!r}) and "
                f"reliable_database_url ({shown}) reach celery-reliable's tables in another "
                f"{where}: records would live apart from the tables the CLI, purge and "
                "dead letters use; set reliable_database_url = "
                f"database_url_from_django({self.alias!r})"
            )
        checked.add(self.alias)

    def _leave(self, atomic: Any, exc: BaseException | None) -> None:
        """Leave the outermost atomic block: commit when ``exc`` is None, else roll back."""
        if exc is None:
            _translated("COMMIT", lambda: atomic.__exit__(None, None, None))
        else:
            _translated("ROLLBACK", lambda: atomic.__exit__(type(exc), exc, exc.__traceback__))

    # ---------------------------------------------------------- the contract

    def begin(self) -> Existing | None:
        conn = self._connection()
        atomic = transaction.atomic(using=self.alias)
        _translated("BEGIN", atomic.__enter__)
        try:
            self._check_same_database(conn)
            if self.lock_timeout is not None:
                # As on celery-reliable's own connections: a duplicate blocked by a stalled
                # twin's uncommitted record gives up and defers. Local to this transaction.
                sql = "SELECT set_config('lock_timeout', %s, true)"
                millis = f"{int(self.lock_timeout * 1000)}ms"

                def set_timeout() -> None:
                    with conn.cursor() as cursor:
                        cursor.execute(sql, [millis])

                _translated(sql, set_timeout)
            claimed = self._run(conn, _CLAIM, self._params())
            found = None if claimed is not None else self._run(conn, _LOOKUP, self._params())
        except BaseException as exc:
            # Leaving the block rolls back; when the connection broke, Django's rollback
            # fails and Django closes it, so the next run connects afresh.
            try:
                self._leave(atomic, exc)
            except Exception:
                conn.close()
            raise
        self.django_conn = conn
        if found is not None:  # a committed record: nothing of this run goes on
            self.atomic = atomic
            self.abandon()
            state, fingerprint, payload = found
            return Existing(state, fingerprint, payload or "null")
        self.atomic = atomic
        return None

    @property
    def lost(self) -> bool:
        if self.atomic is None:
            return True
        raw = self.django_conn.connection
        return raw is None or bool(getattr(raw, "closed", False)) or bool(
            getattr(raw, "broken", False))

    def session(self) -> Any:
        raise ConfigurationError(
            f"reliable_django_database={self.alias!r}: the record is on Django's connection; "
            "write with the ORM inside idempotent_transaction() (no SQLAlchemy session)"
        )

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """A nested ``transaction.atomic(using=alias)`` (a savepoint); yields the connection."""
        with transaction.atomic(using=self.alias):
            yield self.django_conn

    def succeed(self, result_json: str) -> None:
        atomic, self.atomic = self.atomic, None
        assert atomic is not None
        conn = self.django_conn
        try:
            # On a transaction Django marked for rollback (an error caught without its own
            # atomic block) this raises TransactionManagementError: the run fails, loudly,
            # instead of Django rolling back silently on leaving the block.
            self._run(conn, _SUCCEED, {**self._params(), "p_result": result_json})
        except BaseException as exc:
            try:
                self._leave(atomic, exc)
            except Exception:
                conn.close()
            raise
        self._leave(atomic, None)

    def abandon(self) -> None:
        atomic, self.atomic = self.atomic, None
        if atomic is None:
            return
        try:
            self._leave(atomic, _Done())
        except Exception:
            # The server already ended the session: its transaction is gone.
            self.django_conn.close()

    def _upsert(self, state: str, payload: str) -> None:
        conn = self._connection()

        def upsert() -> None:
            with transaction.atomic(using=self.alias), conn.cursor() as cursor:
                sql, constants = driver_statement(_UPSERT)
                cursor.execute(sql, {**constants, **self._params(), "p_state": state,
                                     "p_result": payload})

        _translated("upsert", upsert)


class _Done(Exception):
    """Passed to ``Atomic.__exit__`` to roll back (nothing was raised)."""

