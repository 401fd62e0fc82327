"""Settings of the test project: DATABASES derived from ``RELIABLE_DJANGO_DATABASE_URL``."""

from __future__ import annotations

import os

from sqlalchemy.engine import make_url

from celery_reliable.contrib.django import database_url

_url = make_url(os.environ["RELIABLE_DJANGO_DATABASE_URL"])

SECRET_KEY = "tests-only"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = ["celery_reliable.contrib.django", "tests.django_project.shop"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _url.database,
        "USER": _url.username or "",
        "PASSWORD": _url.password or "",
        "HOST": _url.host or "",
        "PORT": str(_url.port or ""),
    }
}

# Read by the Celery app with config_from_object("django.conf:settings", namespace="CELERY").
CELERY_RELIABLE_DATABASE_URL = database_url(DATABASES["default"])
CELERY_RELIABLE_DJANGO_DATABASE = "default"
