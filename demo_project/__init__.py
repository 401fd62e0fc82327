"""A small payments app on celery-reliable, and a runner that shows its guards at work.

``demo_project.app`` is the Celery app (``celery -A demo_project.app worker -Q demo``);
``python -m demo_project`` starts a fleet of workers and runs the scenarios.
"""
