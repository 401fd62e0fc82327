"""Idempotent payments: duplicate submissions of one key, one ``fc_payments`` row each key.

The row is inserted in ``idempotent_transaction()``: it commits with the
idempotency record and the result, or not at all. ``fc_payments`` has no
unique constraint on ``key``, so a duplicate effect shows as a second row.
The ``effect`` event is recorded from ``task_success`` (after the commit)
when the result names this execution as the payer.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from celery import Celery, signals

from celery_reliable import ReliableTask
from faults.workloads._common import Producer, recorded, recorder

NAME = "payments"
TASK = "fc.pay"
SETTINGS: dict[str, Any] = {}
CONFIG: dict[str, Any] = {}

meta = sa.MetaData()
payments = sa.Table(
    "fc_payments", meta,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
    sa.Column("key", sa.Text, nullable=False),  # deliberately not unique
    sa.Column("task_id", sa.Text, nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), server_default=sa.func.clock_timestamp()),
)

_recent: list[str] = []


def register(app: Celery) -> None:
    @app.task(base=ReliableTask, bind=True, shared=False, name=TASK,
              idempotency_key="pay:{key}", acks_late=True, reject_on_worker_lost=True,
              defer_delay=0.2, defer_max_delay=1.0)
    def pay(self: ReliableTask, key: str, amount: int, hold: float) -> dict[str, Any]:
        with recorded(self, NAME, key=key):
            time.sleep(hold)
            with self.idempotent_transaction() as session:
                session.execute(sa.insert(payments).values(
                    key=key, task_id=self.request.id, amount=amount))
            return {"key": key, "amount": amount, "paid_by": self.request.id}

    @signals.task_success.connect(sender=pay, weak=False, dispatch_uid="faults-pay-effect")
    def _effect(sender: Any = None, result: Any = None, **_: Any) -> None:
        task_id = sender.request.id if sender is not None else None
        if isinstance(result, dict) and result.get("paid_by") == task_id:
            recorder().emit("effect", task_id=task_id, workload=NAME, key=result.get("key"))


def produce(p: Producer) -> None:
    # a new payment, or (one time in three) a duplicate submission of a recent one
    if _recent and p.rng.random() < 0.35:
        key = p.rng.choice(_recent[-20:])
        dup = True
    else:
        key = f"k{len(_recent)}-{p.rng.getrandbits(24):06x}"
        _recent.append(key)
        dup = False
    # every copy of a key has the same arguments (else it is a different request:
    # IdempotencyKeyMismatch), so amount and hold derive from the key
    digits = int(key.split("-")[1], 16)
    amount = digits % 1000 + 1
    hold = 0.05 + (digits % 350) / 1000
    task_id = p.send(NAME, TASK, kwargs={"key": key, "amount": amount, "hold": hold},
                     key=key, duplicate_of=_first.get(key) if dup else None)
    _first.setdefault(key, task_id)


_first: dict[str, str] = {}
