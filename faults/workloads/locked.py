"""Locked counter: read-modify-write of a PostgreSQL row under ``lock=``, fenced.

Each run sleeps (its "work", where pauses and stalls land), checks its token
with ``self.fence.check_postgres`` in the transaction that writes, then reads
the counter, writes value + 1 and appends the accepted write to
``fc_counter_writes``. A holder that lost its lease is refused by the fence
(``fenced_write`` accepted=false) and writes nothing.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from celery import Celery
from sqlalchemy.dialects.postgresql import insert

from celery_reliable import ReliableTask, StaleFenceToken
from faults.workloads._common import Producer, engine, recorded, recorder

NAME = "locked"
TASK = "fc.locked"
LOCK_TTL = 3.0
RESOURCES = ("r0", "r1", "r2")
SETTINGS: dict[str, Any] = {}
CONFIG: dict[str, Any] = {"lock_ttl": LOCK_TTL}

meta = sa.MetaData()
counter = sa.Table(
    "fc_counter", meta,
    sa.Column("resource", sa.Text, primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False),
    sa.Column("token", sa.BigInteger, nullable=False),
)
writes = sa.Table(
    "fc_counter_writes", meta,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
    sa.Column("resource", sa.Text, nullable=False),
    sa.Column("token", sa.BigInteger, nullable=False),
    sa.Column("task_id", sa.Text, nullable=False),
    sa.Column("value", sa.BigInteger, nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), server_default=sa.func.clock_timestamp()),
)


def lock_resource(name: str) -> str:
    return f"counter:{name}"


def register(app: Celery) -> None:
    @app.task(base=ReliableTask, bind=True, shared=False, name=TASK,
              lock="counter:{resource}", lock_ttl=LOCK_TTL,
              acks_late=True, reject_on_worker_lost=True,
              defer_delay=0.1, defer_max_delay=0.5)
    def locked(self: ReliableTask, resource: str, hold: float) -> int:
        fenced = lock_resource(resource)
        token = self.fence_token
        holder = self.fence.holder
        rec = recorder()
        tid = self.request.id
        with recorded(self, NAME, token=token, resource=fenced):
            time.sleep(hold)
            with engine().begin() as conn:
                try:
                    self.fence.check_postgres(conn)
                except StaleFenceToken:
                    rec.emit("fenced_write", task_id=tid, resource=fenced, token=token,
                             holder=holder, accepted=False, store="postgres")
                    raise
                value = conn.execute(
                    sa.select(counter.c.value).where(counter.c.resource == fenced)
                ).scalar_one_or_none()
                new = (value or 0) + 1
                rec.emit("fenced_write", task_id=tid, resource=fenced, token=token,
                         holder=holder, accepted=True, store="postgres", value=new)
                conn.execute(
                    insert(counter).values(resource=fenced, value=new, token=token)
                    .on_conflict_do_update(index_elements=[counter.c.resource],
                                           set_={"value": new, "token": token})
                )
                conn.execute(sa.insert(writes).values(
                    resource=fenced, token=token, task_id=tid, value=new))
            return new


def produce(p: Producer) -> None:
    # often two at once on one resource: a contender waits on the lock, and takes it over
    # when a paused or stalled holder's lease expires (the case fencing exists for)
    resource = p.rng.choice(RESOURCES)
    for _ in range(p.rng.choice((1, 2, 2))):
        p.send(NAME, TASK,
               kwargs={"resource": resource, "hold": round(p.rng.uniform(0.1, 0.6), 3)},
               resource=lock_resource(resource))
