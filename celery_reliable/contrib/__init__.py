"""Optional integrations, each imported only when you import it:
``celery_reliable.contrib.pytest`` (fixtures for your tests) and
``celery_reliable.contrib.django`` (Django's connection, settings and ``manage.py``)."""
