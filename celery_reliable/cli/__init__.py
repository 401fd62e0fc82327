"""``celery -A proj reliable ...``: inspect and operate the guards of one app.

Registered as a Celery CLI plugin (entry point group ``celery.commands``), so
every command runs with the app given to ``celery -A``, its settings and its
key prefix::

    celery -A proj reliable status              # one screen: locks, buckets, tiers, breakers, DLQ
    celery -A proj reliable top                 # the same, refreshed every second (Ctrl-C quits)
    celery -A proj reliable locks               # every lock held now: task, label, token, time left
    celery -A proj reliable dlq list|show ID|replay ID|purge [--older-than-days N|--id ID] [--yes]
    celery -A proj reliable purge-idempotency [--batch-size N]
    celery -A proj reliable migrate             # create the PostgreSQL tables (idempotent)

Mistakes a user can make (a bad URL, a server that is down, no database
configured, an unknown dead-letter id) print one line on stderr and exit 1.

Every table fits the terminal (80 columns too): its key columns (a lock's
token and time left, a dead letter's id) never wrap, and the other columns
wrap or end in "…" as rich's column settings say; no string is cut by hand.

One module per job: :mod:`.common` (errors, the app and its runtime),
:mod:`.snapshot` (reading what the guards hold), :mod:`.render` (the status
screen), and the commands: :mod:`.dashboard` (``status``, ``top``, ``locks``),
:mod:`.dlq` (``dlq ...``), :mod:`.database` (``migrate``, ``purge-idempotency``).
"""

from __future__ import annotations

import click

from .dashboard import locks, status, top
from .database import migrate, purge_idempotency
from .dlq import dlq
from .snapshot import LockInfo, Snapshot, collect, held_locks

__all__ = ["LockInfo", "Snapshot", "collect", "held_locks", "reliable"]


@click.group(name="reliable")
def reliable() -> None:
    """celery-reliable: locks, buckets, bulkheads, breakers and dead letters of this app."""


for _command in (status, top, locks, dlq, purge_idempotency, migrate):
    reliable.add_command(_command)
