"""celery-reliable for Django projects (``pip install 'celery-reliable[django]'``).

Importing this module imports Django; nothing else in celery-reliable does.

* :func:`database_url_from_django` / :func:`database_url`: ``reliable_database_url``
  from a Django database alias (a SQLAlchemy ``postgresql+psycopg://`` URL).
* Setting ``reliable_django_database = "default"`` keeps each first execution's
  idempotency record on Django's own connection for that alias, in one
  ``transaction.atomic`` block around the task body (:mod:`.record`): the
  body's ORM writes on that alias, the record and the result commit together,
  or none of them does. ``self.idempotent_transaction()`` is then a nested
  ``transaction.atomic(using=alias)`` (a savepoint) yielding Django's connection.
* ``self.fence.check_django(using=alias)`` (or ``check_postgres(connections[alias], ...)``)
  fences the ORM writes of the enclosing ``transaction.atomic`` block.
* ``"celery_reliable.contrib.django"`` in ``INSTALLED_APPS`` adds
  ``python manage.py reliable_migrate [--database alias]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy.engine import URL

from ...errors import ConfigurationError

__all__ = ["POSTGRES_ENGINES", "database_url", "database_url_from_django"]

#: Django database backends on PostgreSQL.
POSTGRES_ENGINES = frozenset({
    "django.db.backends.postgresql",
    "django.contrib.gis.db.backends.postgis",
})

#: Keys of a DATABASES entry's OPTIONS that configure Django's backend, not libpq.
_DJANGO_OPTIONS = frozenset({
    "isolation_level", "pool", "server_side_binding", "assume_role", "cursor_factory",
})


def database_url(settings_dict: Mapping[str, Any], alias: str = "default") -> str:
    """The SQLAlchemy URL (``postgresql+psycopg://``) of one ``DATABASES`` entry.

    Pure: usable in ``settings.py`` itself
    (``CELERY_RELIABLE_DATABASE_URL = database_url(DATABASES["default"])``).
    ``OPTIONS`` that are libpq parameters (``sslmode``, ``connect_timeout``, ...)
    are kept as query parameters. Raises ``ConfigurationError`` for a backend
    other than PostgreSQL.
    """
    engine = settings_dict.get("ENGINE")
    if engine not in POSTGRES_ENGINES:
        raise ConfigurationError(
            f"Django database {alias!r} uses {engine!r}; celery-reliable needs PostgreSQL "
            f"({', '.join(sorted(POSTGRES_ENGINES))})"
        )
    port = settings_dict.get("PORT")
    options = settings_dict.get("OPTIONS") or {}
    query = {
        str(key): str(value)
        for key, value in options.items()
        if key not in _DJANGO_OPTIONS and isinstance(value, (str, int, float))
        and not isinstance(value, bool)
    }
    url = URL.create(
        "postgresql+psycopg",
        username=settings_dict.get("USER") or None,
        password=settings_dict.get("PASSWORD") or None,
        host=settings_dict.get("HOST") or None,
        port=int(port) if port else None,
        database=settings_dict.get("NAME") or None,
        query=query,
    )
    return url.render_as_string(hide_password=False)


def database_url_from_django(alias: str = "default") -> str:
    """:func:`database_url` of ``settings.DATABASES[alias]`` (Django must be configured)."""
    from django.conf import settings

    databases = settings.DATABASES
    if alias not in databases:
        raise ConfigurationError(
            f"Django database {alias!r} is not in settings.DATABASES "
            f"({', '.join(map(repr, databases)) or 'none'})"
        )
    return database_url(databases[alias], alias)
