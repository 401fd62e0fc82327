"""``python manage.py reliable_migrate``: celery-reliable's tables in a Django database."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from sqlalchemy.engine import make_url

from celery_reliable.contrib.django import database_url_from_django
from celery_reliable.schema import create_tables, make_engine, metadata


class Command(BaseCommand):
    help = (
        "Create celery-reliable's PostgreSQL tables that do not exist yet in a Django "
        "database (safe to repeat; the same as `celery -A proj reliable migrate`)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--database", default="default",
            help="Django database alias to create the tables in (default: 'default').",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        url = database_url_from_django(options["database"])
        engine = make_engine(url)
        try:
            create_tables(engine)
        finally:
            engine.dispose()
        names = ", ".join(sorted(metadata.tables))
        shown = make_url(url).render_as_string(hide_password=True)
        self.stdout.write(f"tables ready in {shown}: {names}")
