"""A Jepsen-style fault campaign for celery-reliable (issue 13).

A real fleet runs workloads under random, seeded faults (``faults.nemesis``), every process
records what it saw as JSON lines (``faults.history``), and ``faults.checker`` checks the
library's guarantees against that history and the workloads' own database rows.
"""
