"""A Jepsen-style fault campaign for celery-reliable (issue 13).

``python -m faults --minutes 3 --seed 1`` starts private servers and a fleet of
``celery worker`` processes on loopback, runs workloads under a seeded schedule
of faults, heals, waits for quiescence, records a history of JSON lines and
checks the library's guarantees against it (``faults.checker``).
"""
