"""A small shop on celery-reliable, and a runner that shows its guards at work.

``demo_project.app`` is the Celery app (``celery -A demo_project.app worker -Q demo,emails``);
``python -m demo_project`` starts a fleet of workers, injects faults and ends
with a PASS/FAIL table of each guarantee. The verdicts are pure functions of
what was observed (``demo_project.checks``).
"""
