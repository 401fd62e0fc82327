"""Optional integrations (``celery_reliable.contrib.pytest``: fixtures for your tests)."""
