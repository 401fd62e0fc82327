"""One delivery of a task in the pipeline: :class:`Call` (what the guards' hooks are
given) and :class:`Execution` (what one admitted execution holds)."""

from __future__ import annotations

import logging
import random
import secrets
import sys
import time
from typing import TYPE_CHECKING, Any

from celery.app.trace import LOG_RETRY
from celery.exceptions import Reject, Retry

from .. import metrics
from ..admission import Release
from ..breaker import STATE_NAMES
from ..classify import is_retryable
from ..errors import StorageError
from ..leases import Lease
from ..runtime import runtime_for
from ..storage import store_for
from .arguments import fingerprint_of
from .headers import BUCKET_SLOT_HEADER, DEFER_HEADER, LOCK_WAIT_HEADER, header, log

if TYPE_CHECKING:
    from ..admission import Replay
    from ..config import TaskPolicy
    from ..idempotency import PostgresRecord
    from ..ratelimit import BucketSpec

__all__ = ["Call", "Deferred", "Execution"]


class Deferred(Retry):  # type: ignore[misc]
    """A guard said "not now": the task was re-published with a countdown.

    Raised inside the worker only; Celery records the state RETRY, acks the
    message (the new one is already published) and does not count it
    against ``max_retries``. Its log line is celery-reliable's "deferred" line;
    Celery's tracer's "retry:" line is dropped (:class:`_DeferralLogFilter`).
    """


# Public as celery_reliable.Deferred / celery_reliable.task.Deferred: results (RETRY)
# name the exception's module, which a client of another version imports.
Deferred.__module__ = "celery_reliable.task"


class _DeferralLogFilter(logging.Filter):
    """Drops the tracer's ``Task ...[id] retry: ...`` line when the "retry" is a deferral.

    Celery logs every ``Retry`` it handles with ``celery.app.trace.LOG_RETRY``, from
    inside the ``except`` clause that caught it: a deferral is the ``Deferred`` being
    handled then. Its own line (:meth:`Call.defer`) already says "deferred",
    why, which guard and when. A real retry keeps Celery's line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == LOG_RETRY and isinstance(sys.exc_info()[1], Deferred))


_trace_log = logging.getLogger("celery.app.trace")
if not any(isinstance(f, _DeferralLogFilter) for f in _trace_log.filters):
    _trace_log.addFilter(_DeferralLogFilter())


class Execution:
    """What one admitted execution holds (kept on the request as ``_reliable_execution``)."""

    __slots__ = (
        "buckets",
        "done",
        "fingerprint",
        "idem_digest",
        "lease",
        "leases",
        "outage",
        "owner",
        "pg",
        "release",
        "replay",
        "resource",
        "started",
        "token",
    )

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.resource: str | None = None
        self.token: int | None = None
        self.lease: Lease | None = None  # the lock's lease
        self.buckets: list[tuple[str, BucketSpec, str]] = []  # key, spec, what it limits
        self.started = time.monotonic()
        self.leases: list[Lease] = []
        self.idem_digest: str | None = None
        self.fingerprint = ""
        self.pg: PostgresRecord | None = None
        # PostgreSQL failed under idempotent_transaction(): nothing of this run can commit
        self.outage: BaseException | None = None
        self.replay: Replay | None = None
        self.release = Release()
        self.done = False


class Call:
    """One delivery of ``task`` under ``policy``: the services the guards' hooks use."""

    __slots__ = ("counts_deliveries", "describe", "header_key", "name", "policy",
                 "queue_bucket", "request", "runtime", "store", "task")

    def __init__(self, task: Any, policy: TaskPolicy, *, header_key: Any = None,
                 queue_bucket: tuple[str, BucketSpec] | None = None,
                 counts_deliveries: bool = False) -> None:
        self.task = task
        self.policy = policy
        self.request = request = task.request
        self.name: str = task.name
        self.describe = f"{task.name}[{request.id}]"  # in log lines
        self.runtime = runtime_for(task.app)
        self.store = store_for(self.runtime)
        self.header_key = header_key
        self.queue_bucket = queue_bucket
        self.counts_deliveries = counts_deliveries

    def new_execution(self) -> Execution:
        return Execution(f"{self.request.id}/{secrets.token_hex(4)}")

    def lease(self, kind: str, key: str, value: str, ttl: float, started: float,
              what: str) -> Lease:
        """A lease of guard ``kind`` taken at ``started`` (``what`` it is, for log lines)."""
        return Lease(kind, key, value, ttl, started, f"{what} of {self.describe}")

    def header(self, name: str) -> Any:
        return header(self.request, name)

    def fingerprint(self, named: dict[str, Any]) -> str:
        return fingerprint_of(self.name, named)

    def acks_late(self) -> bool:
        value = getattr(self.request, "acks_late", None)
        return bool(self.task.acks_late if value is None else value)

    def retryable(self, exc: BaseException) -> bool:
        """``exc`` is retried (and counts as a breaker failure)."""
        task = self.task
        never = tuple(getattr(task, "dont_autoretry_for", None) or ())
        if never and isinstance(exc, never):
            return False
        extra = tuple(self.policy.retry_for) + tuple(getattr(task, "autoretry_for", None) or ())
        return is_retryable(exc, extra)

    def bucket_slots(self) -> dict[str, int]:
        """This delivery's places in bucket queues, by bucket key (:data:`BUCKET_SLOT_HEADER`)."""
        request = self.request
        slots: dict[str, int] | None = getattr(request, "_reliable_slots", None)
        if slots is None:
            raw = header(request, BUCKET_SLOT_HEADER)
            slots = {}
            if isinstance(raw, dict):  # anything else is not ours: start a fresh arrival
                slots = {key: int(slot) for key, slot in raw.items() if isinstance(key, str)
                         and isinstance(slot, (int, float)) and not isinstance(slot, bool)}
            request._reliable_slots = slots
        return slots

    def store_state(self, state: str, meta: dict[str, Any]) -> None:
        task, request = self.task, self.request
        if request.ignore_result or task.ignore_result:
            return
        try:
            task.backend.store_result(request.id, meta, state, request=request)
        except Exception:  # the backend's failure must not change the task's outcome
            log.warning("celery-reliable: could not store state %s for %s", state,
                        self.describe, exc_info=True)

    def breaker_changed(self, name: str, old: int, new: int) -> None:
        metrics.inc("reliable_circuit_transitions_total", breaker=name, state=STATE_NAMES[new])
        log.warning("celery-reliable: circuit breaker %r %s -> %s (seen by %s)", name,
                    STATE_NAMES[old], STATE_NAMES[new], self.describe)

    def defer(
        self,
        reason: str,
        *,
        not_after: float | None = None,
        not_before: float | None = None,
        cause: BaseException | None = None,
        lock_busy: bool = False,
        scheduled: float | None = None,
        due: float | None = None,
        guard: str = "store",
    ) -> None:
        """Re-publish this task with a jittered countdown and stop this delivery.

        The new message keeps the task id, arguments, options and ``retries``
        count (a deferral is not a retry). It is published *before* this
        delivery is acknowledged, so a crash in between duplicates the
        message (the guards absorb it) but never loses it. In eager mode the
        call sleeps and returns so the caller tries again.
        """
        task, request = self.task, self.request
        deferrals = int(header(request, DEFER_HEADER) or 0)
        countdown = self.policy.defer.countdown(
            deferrals, random.random(), not_after=not_after, not_before=not_before,
            scheduled=scheduled, due=due,
        )
        if request.is_eager:
            if cause is not None:  # nobody else can make it come back: do not spin
                raise StorageError(f"{task.name}: {reason}") from cause
            time.sleep(countdown)
            return
        headers = dict(request.headers or {})
        headers[DEFER_HEADER] = deferrals + 1
        slots = self.bucket_slots()
        if slots:
            headers[BUCKET_SLOT_HEADER] = dict(slots)
        else:
            headers.pop(BUCKET_SLOT_HEADER, None)
        if lock_busy:  # for reliable_lock_wait_seconds: when it first found the lock busy
            headers.setdefault(LOCK_WAIT_HEADER, time.time())
        try:
            task.signature_from_request(
                request, countdown=countdown, retries=request.retries, headers=headers
            ).apply_async()
        except Exception as exc:
            # The broker is unreachable too. With acks_late the message goes
            # back to the queue; without it there is nothing left to save.
            if self.acks_late():
                time.sleep(min(countdown, 5.0))
                raise Reject(f"{reason}; could not re-publish: {exc!r}", requeue=True) from exc
            raise StorageError(
                f"{task.name}: {reason} and the broker refused the deferred message"
            ) from exc
        # One line says it all (Celery's own "retry:" line is dropped for a deferral,
        # see _DeferralLogFilter): the countdown, the reason and the guard.
        log.info(
            "celery-reliable: %s[%s] deferred %.2fs: %s (guard %s, deferral %d)%s",
            task.name,
            request.id,
            countdown,
            reason,
            guard,
            deferrals + 1,
            f": {cause!r}" if cause else "",
        )
        raise Deferred(f"deferred: {reason}", when=countdown)
