"""``ReliableTask``: the Celery task base that enforces every guard.

The pipeline of one execution, all inside :meth:`ReliableTask.__call__`
(the task's own execution path; Celery's ``Retry``/``Ignore`` are handled by
its tracer, which a signal receiver could never influence):

1. **plan**   :meth:`ReliableTask._plan` turns the task's options and this
   call's arguments into an admission :class:`~celery_reliable.admission.Plan`.
   *This is where every guard plugs in.*
2. **admit**  one Redis round trip decides every guard, all-or-nothing.
   A refusal becomes a deferral (re-published with a jittered countdown, no
   retry consumed), a skip (state ``SKIPPED``) or an error.
3. **run**    the task body, with ``self.fence_token`` / ``self.fence`` set and
   leases renewed by the process heartbeat.
4. **complete** one Redis round trip releases what admission took, whether
   the body returned, raised, retried or was interrupted by a soft time limit.
   A killed process releases nothing: its leases expire by their TTL.
"""

from __future__ import annotations

import inspect
import logging
import random
import secrets
import time
from typing import Any, ClassVar

import redis
from celery import Task
from celery.exceptions import Ignore, Reject, Retry

from .admission import Admitted, Plan, Refused, Release
from .config import (
    TASK_OPTIONS,
    ReliableSettings,
    TaskPolicy,
    build_policy,
    task_signature,
    unknown_options,
)
from .errors import LockNotAcquired, StorageError
from .fencing import Fence
from .keys import digest
from .runtime import Lease, runtime_for

__all__ = ["DEFER_HEADER", "SKIPPED", "Deferred", "ReliableTask"]

log = logging.getLogger("celery_reliable")

#: Result state of a task dropped because its lock was busy (``lock_contention="skip"``).
#: Like Celery's IGNORED it is not a ready state: do not ``.get()`` a skippable task.
SKIPPED = "SKIPPED"

#: Message header counting consecutive deferrals of one task id.
DEFER_HEADER = "reliable_deferrals"


class Deferred(Retry):  # type: ignore[misc]
    """A guard said "not now": the task was re-published with a countdown.

    Raised inside the worker only; Celery records the state RETRY, acks the
    message (the new one is already published) and does not count it
    against ``max_retries``.
    """


class _Execution:
    """What one admitted execution holds (kept on the request)."""

    __slots__ = ("lease", "owner", "release", "resource", "token")

    def __init__(self) -> None:
        self.owner = ""
        self.resource: str | None = None
        self.token: int | None = None
        self.lease: Lease | None = None
        self.release = Release()


class ReliableTask(Task):  # type: ignore[misc]
    """Celery task base with fleet-wide guards.

    Use as ``@app.task(base=ReliableTask, bind=True, lock="order:{order_id}")``.
    Each option below is a class attribute settable in the decorator; its
    documentation, unit and validation live in
    :data:`celery_reliable.config.TASK_OPTIONS`. Options are validated when
    the task is bound to the app; a bad one raises ``ConfigurationError``.
    """

    #: Resource to lock while running: template over the arguments, or callable.
    lock: ClassVar[Any] = TASK_OPTIONS["lock"].default
    #: Lock lease in seconds, renewed about every ``lock_ttl / 3``.
    lock_ttl: ClassVar[Any] = TASK_OPTIONS["lock_ttl"].default
    #: ``"defer"`` | ``"skip"`` | ``"fail"`` when the lock is busy.
    lock_contention: ClassVar[Any] = TASK_OPTIONS["lock_contention"].default
    #: Base countdown of a deferral, seconds.
    defer_delay: ClassVar[Any] = TASK_OPTIONS["defer_delay"].default
    #: Cap of one deferral's countdown, seconds.
    defer_max_delay: ClassVar[Any] = TASK_OPTIONS["defer_max_delay"].default

    _reliable_policy: ClassVar[TaskPolicy | None] = None

    # ---------------------------------------------------------------- binding

    @classmethod
    def bind(cls, app: Any) -> Any:
        result = super().bind(app)
        cls._reliable_policy = cls._build_reliable_policy(app)
        return result

    @classmethod
    def _build_reliable_policy(cls, app: Any) -> TaskPolicy:
        name = cls.name or cls.__qualname__
        if cls is not ReliableTask:
            unknown_options(name, dict(vars(cls)), set(dir(ReliableTask)))
        values = {}
        for option in TASK_OPTIONS:
            value = inspect.getattr_static(cls, option)
            if isinstance(value, staticmethod):
                value = value.__func__
            values[option] = value
        raw_run = inspect.getattr_static(cls, "run")
        bound = not isinstance(raw_run, staticmethod)
        run = raw_run.__func__ if isinstance(raw_run, staticmethod) else raw_run
        policy = build_policy(name, values, task_signature(run, bound))
        ReliableSettings.from_conf(app.conf)  # a bad setting fails at bind too
        return policy

    def _policy(self) -> TaskPolicy:
        policy = type(self)._reliable_policy
        if policy is None:  # registered without bind (app.register_task)
            policy = type(self)._reliable_policy = self._build_reliable_policy(self.app)
        return policy

    # --------------------------------------------------------------- pipeline

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly:  # a plain function call: no guards
            return super().__call__(*args, **kwargs)
        policy = self._policy()
        if policy.lock is None:
            return self.run(*args, **kwargs)
        execution = self._admit(policy, args, kwargs)
        request._reliable_execution = execution
        try:
            return self.run(*args, **kwargs)
        finally:
            self._complete(execution)

    def _arguments(
        self, policy: TaskPolicy, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        if policy.signature is None:
            return dict(kwargs)
        bound = policy.signature.bind_partial(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        for param in policy.signature.parameters.values():
            if param.kind is param.VAR_KEYWORD:
                arguments.update(arguments.pop(param.name, {}))
        return arguments

    def _plan(
        self,
        policy: TaskPolicy,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        execution: _Execution,
    ) -> Plan:
        """Every guard of this call, as one admission plan. Guards plug in here."""
        runtime = runtime_for(self.app)
        plan = Plan()
        if policy.lock is not None:
            execution.resource = policy.lock.resource(
                self.name, self._arguments(policy, args, kwargs)
            )
            execution.owner = f"{self.request.id}/{secrets.token_hex(4)}"
            plan.add_lock(runtime.keys, execution.resource, execution.owner, policy.lock.ttl)
        return plan

    def _admit(
        self, policy: TaskPolicy, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> _Execution:
        runtime = runtime_for(self.app)
        while True:
            execution = _Execution()
            plan = self._plan(policy, args, kwargs, execution)
            started = time.monotonic()
            try:
                outcome = plan.admit(runtime.redis)
            except redis.RedisError as exc:
                # Fail closed: an unguarded run could break the guarantee.
                self._defer(policy, "Redis unavailable", cause=exc)
                continue
            if isinstance(outcome, Admitted):
                break
            self._refused(policy, outcome, execution)
        for index, kind in enumerate(plan.kinds):
            if kind == "L":
                assert policy.lock is not None and execution.resource is not None
                execution.token = outcome.results[index]
                key = runtime.keys.lock(execution.resource)
                value = f"{execution.token} {execution.owner}"
                execution.lease = Lease(
                    "L",
                    key,
                    value,
                    policy.lock.ttl,
                    started,
                    f"lock of {self.name}[{self.request.id}]",
                )
                execution.release.add_lock(key, value)
                runtime.heartbeat.add(execution.lease)
        return execution

    def _refused(self, policy: TaskPolicy, refusal: Refused, execution: _Execution) -> None:
        """Translate a refusal into Celery's control flow (returns only in eager mode)."""
        if refusal.kind == "L":
            assert policy.lock is not None and execution.resource is not None
            how = policy.lock.contention
            if how == "skip":
                log.info(
                    "celery-reliable: %s[%s] skipped: lock %s is busy",
                    self.name,
                    self.request.id,
                    digest(execution.resource),
                )
                self._store_state(
                    SKIPPED, {"reason": "lock busy", "lock": digest(execution.resource)}
                )
                raise Ignore()
            if how == "fail":
                raise LockNotAcquired(self.name, execution.resource)
            self._defer(policy, "lock busy", not_after=refusal.retry_after)
            return
        raise AssertionError(f"unknown guard {refusal.kind!r}")  # pragma: no cover

    def _defer(
        self,
        policy: TaskPolicy,
        reason: str,
        *,
        not_after: float | None = None,
        not_before: float | None = None,
        cause: BaseException | None = None,
    ) -> None:
        """Re-publish this task with a jittered countdown and stop this delivery.

        The new message keeps the task id, arguments, options and ``retries``
        count (a deferral is not a retry). It is published *before* this
        delivery is acknowledged, so a crash in between duplicates the
        message (the guards absorb it) but never loses it. In eager mode the
        call sleeps and returns so the caller tries again.
        """
        request = self.request
        deferrals = int(
            getattr(request, DEFER_HEADER, None) or (request.headers or {}).get(DEFER_HEADER) or 0
        )
        countdown = policy.defer.countdown(
            deferrals, random.random(), not_after=not_after, not_before=not_before
        )
        if request.is_eager:
            if cause is not None and not isinstance(cause, redis.ConnectionError):
                raise StorageError(f"{self.name}: {reason}") from cause
            time.sleep(countdown)
            return
        headers = dict(request.headers or {})
        headers[DEFER_HEADER] = deferrals + 1
        try:
            self.signature_from_request(
                request, countdown=countdown, retries=request.retries, headers=headers
            ).apply_async()
        except Exception as exc:
            # The broker is unreachable too. With acks_late the message goes
            # back to the queue; without it there is nothing left to save.
            if self._acks_late():
                time.sleep(min(countdown, 5.0))
                raise Reject(f"{reason}; could not re-publish: {exc!r}", requeue=True) from exc
            raise StorageError(
                f"{self.name}: {reason} and the broker refused the deferred message"
            ) from exc
        log.info(
            "celery-reliable: %s[%s] deferred %.2fs (%s, deferral %d)%s",
            self.name,
            request.id,
            countdown,
            reason,
            deferrals + 1,
            f": {cause!r}" if cause else "",
        )
        raise Deferred(f"deferred: {reason}", when=countdown)

    def _acks_late(self) -> bool:
        value = getattr(self.request, "acks_late", None)
        return bool(self.acks_late if value is None else value)

    def _store_state(self, state: str, meta: dict[str, Any]) -> None:
        if self.request.ignore_result or self.ignore_result:
            return
        try:
            self.backend.store_result(self.request.id, meta, state, request=self.request)
        except Exception:  # the backend's failure must not change the task's outcome
            log.warning(
                "celery-reliable: could not store state %s for %s[%s]",
                state,
                self.name,
                self.request.id,
                exc_info=True,
            )

    def _complete(self, execution: _Execution) -> None:
        """Release what admission took, in one round trip; safe to call twice."""
        runtime = runtime_for(self.app)
        if execution.lease is not None:
            runtime.heartbeat.discard(execution.lease)
        if not execution.release:
            return
        release, execution.release = execution.release, Release()
        try:
            results = release.run(runtime.redis)
        except redis.RedisError:
            log.warning(
                "celery-reliable: %s[%s] could not release its guards; they expire by their TTL",
                self.name,
                self.request.id,
                exc_info=True,
            )
            return
        if execution.lease is not None and results and not results[0]:
            log.warning(
                "celery-reliable: %s[%s] finished after its lock was lost",
                self.name,
                self.request.id,
            )

    def retry(self, *args: Any, **kwargs: Any) -> Any:
        """Celery's ``retry``, releasing this execution's guards first.

        The retried message may start on another worker at once; holding the
        lock until this delivery's bookkeeping ends would make it defer on
        its own lock.
        """
        execution = getattr(self.request, "_reliable_execution", None)
        if execution is not None:
            self._complete(execution)
        return super().retry(*args, **kwargs)

    # ---------------------------------------------------------- inside a run

    def _execution(self) -> _Execution:
        execution = getattr(self.request, "_reliable_execution", None)
        if execution is None or execution.token is None or execution.resource is None:
            raise RuntimeError(
                f"{self.name}: no lock is held (set the 'lock' option, and "
                "read this only while the task runs)"
            )
        return execution  # type: ignore[no-any-return]

    @property
    def fence_token(self) -> int:
        """The fencing token of this execution's lock (strictly increasing per resource)."""
        token = self._execution().token
        assert token is not None
        return token

    @property
    def lock_resource(self) -> str:
        """The resource name this execution locked (the formatted ``lock`` option)."""
        resource = self._execution().resource
        assert resource is not None
        return resource

    @property
    def lock_lost(self) -> bool:
        """True once the heartbeat found this execution's lock expired or taken over."""
        lease = self._execution().lease
        return bool(lease is not None and lease.lost)

    @property
    def fence(self) -> Fence:
        """Fenced writes with this execution's token; refused once the lock is lost."""
        execution = self._execution()
        assert execution.token is not None and execution.resource is not None
        lease = execution.lease
        return Fence(execution.resource, execution.token, lambda: lease is not None and lease.lost)
