"""A small Django project for the tests: settings on the run's PostgreSQL database.

:func:`project` points it at a database URL (``RELIABLE_DJANGO_DATABASE_URL``),
sets Django up in this process and creates the app's tables with ``migrate``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

SETTINGS_MODULE = "tests.django_project.settings"
URL_VARIABLE = "RELIABLE_DJANGO_DATABASE_URL"


@contextmanager
def project(database_url: str) -> Iterator[None]:
    """Django configured for ``database_url`` (set up once per process), its apps migrated.

    The environment variables are restored on leaving, so that worker subprocesses of
    other tests do not start Celery's Django fix-up.
    """
    saved = {name: os.environ.get(name) for name in (URL_VARIABLE, "DJANGO_SETTINGS_MODULE")}
    import django
    from django.apps import apps
    from django.conf import settings
    from django.core.management import call_command

    os.environ[URL_VARIABLE] = database_url
    os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS_MODULE
    if not apps.ready:
        django.setup()
    assert settings.DATABASES["default"]["NAME"] == database_url.rsplit("/", 1)[-1]
    call_command("migrate", verbosity=0)
    try:
        yield
    finally:
        from django.db import connections

        connections.close_all()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
