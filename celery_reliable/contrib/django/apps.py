"""The Django app: add ``"celery_reliable.contrib.django"`` to ``INSTALLED_APPS``."""

from __future__ import annotations

from django.apps import AppConfig


class ReliableConfig(AppConfig):
    """Gives Django projects ``python manage.py reliable_migrate``; it defines no models."""

    name = "celery_reliable.contrib.django"
    label = "celery_reliable"
    verbose_name = "celery-reliable"
