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
import json
import logging
import random
import secrets
import sys
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from types import CodeType, FrameType
from typing import Any, ClassVar, NoReturn

import celery.app
import redis
from celery import Task, _state, states
from celery.app.autoretry import add_autoretry_behaviour
from celery.app.trace import LOG_RETRY
from celery.exceptions import Ignore, Reject, Retry
from sqlalchemy.exc import SQLAlchemyError

from . import deadletter, metrics
from .admission import (
    INTERRUPTED_ROLLBACK_TIMEOUT,
    Admitted,
    DeadLettered,
    Mismatch,
    Plan,
    Poison,
    Refused,
    Rejected,
    Release,
    Replay,
    RolledBack,
    mark_dead,
)
from .breaker import HALF_OPEN, OPEN, STATE_NAMES
from .canonical import NotCanonical, fingerprint
from .classify import is_outage, is_retryable, retry_after, sqlstate
from .config import (
    TASK_OPTIONS,
    ReliableSettings,
    TaskPolicy,
    build_policy,
    check_bound,
    task_signature,
    unknown_options,
)
from .errors import (
    ArgumentsNotCanonical,
    BulkheadFull,
    ConfigurationError,
    IdempotencyKeyMismatch,
    LockNotAcquired,
    PoisonMessage,
    ReplayedFailure,
    ResultNotSerializable,
    StorageError,
)
from .fencing import Fence
from .guards import window
from .idempotency import PostgresRecord, dumps_result, open_record
from .keys import digest, idempotency_digest
from .ratelimit import BucketSpec
from .retrybudget import RetryBudget, deposits_for, spend
from .runtime import Lease, Runtime, runtime_for
from .scripts import script

__all__ = [
    "BUCKET_SLOT_HEADER",
    "DEFER_HEADER",
    "DROPPED",
    "IDEMPOTENCY_HEADER",
    "SKIPPED",
    "Deferred",
    "ReliableTask",
]

log = logging.getLogger("celery_reliable")

#: How long (seconds) a task id's deliveries set lives after its last delivery started,
#: and its dead-letter mark after it was dead-lettered: longer than the brokers' default
#: redelivery windows (Redis visibility_timeout 1 h, RabbitMQ consumer_timeout 30 min);
#: twice the app's redelivery window when that is longer (a visibility_timeout raised
#: past a day): a redelivery comes at most one window after its delivery started.
DELIVERIES_TTL = 24 * 3600.0

#: Result state of a task dropped because its lock was busy (``lock_contention="skip"``).
#: Like Celery's IGNORED it is not a ready state: do not ``.get()`` a skippable task.
SKIPPED = "SKIPPED"

#: Result state of a task dropped by a full bulkhead tier with policy ``drop``.
DROPPED = "DROPPED"

#: Message header counting consecutive deferrals of one task id.
DEFER_HEADER = "reliable_deferrals"

#: Message header: when the first failure of this task happened (epoch seconds).
FIRST_FAILURE_HEADER = "reliable_first_failure"

#: Message header: the previous retry delay (decorrelated jitter), seconds.
PREV_DELAY_HEADER = "reliable_prev_delay"

#: Message header: when this task first found its lock busy (epoch seconds).
LOCK_WAIT_HEADER = "reliable_lock_wait_since"

#: Message header carrying a producer's own idempotency key.
IDEMPOTENCY_HEADER = "idempotency_key"

#: Message header: this task's places in the queues of the token buckets that
#: refused it, ``{bucket key: slot}`` (the queue's clock: Redis server epoch ms
#: until the bucket's rate changes). A task deferred before its turn (countdowns
#: are capped by the broker's redelivery window) keeps its place with it.
BUCKET_SLOT_HEADER = "reliable_bucket_slots"

#: The code of the ``run`` wrapper that Celery's ``autoretry_for`` installs
#: (``celery/app/autoretry.py``): a countdown passed to ``retry()`` from it, with
#: ``retry_backoff``, is a delay Celery computed, not one the caller wrote.
_AUTORETRY_RUN = next((const for const in add_autoretry_behaviour.__code__.co_consts
                       if getattr(const, "co_name", None) == "run"), None)
#: How many frames above ``retry()`` the autoretry wrapper is looked for: its
#: own call, plus ``retry()`` overrides in a few base classes.
_AUTORETRY_DEPTH = 8


def _deliveries_ttl(runtime: Runtime) -> float:
    """Seconds a deliveries set and a dead-letter mark live (:data:`DELIVERIES_TTL`)."""
    window = runtime.settings.redelivery_window
    return max(DELIVERIES_TTL, 2 * window) if window is not None else DELIVERIES_TTL


def _header(request: Any, name: str) -> Any:
    value = getattr(request, name, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(name)
    return value


class Deferred(Retry):  # type: ignore[misc]
    """A guard said "not now": the task was re-published with a countdown.

    Raised inside the worker only; Celery records the state RETRY, acks the
    message (the new one is already published) and does not count it
    against ``max_retries``. Its log line is celery-reliable's "deferred" line;
    Celery's tracer's "retry:" line is dropped (:class:`_DeferralLogFilter`).
    """


class _DeferralLogFilter(logging.Filter):
    """Drops the tracer's ``Task ...[id] retry: ...`` line when the "retry" is a deferral.

    Celery logs every ``Retry`` it handles with ``celery.app.trace.LOG_RETRY``, from
    inside the ``except`` clause that caught it: a deferral is the ``Deferred`` being
    handled then. Its own line (:meth:`ReliableTask._defer`) already says "deferred",
    why, which guard and when. A real retry keeps Celery's line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == LOG_RETRY and isinstance(sys.exc_info()[1], Deferred))


_trace_log = logging.getLogger("celery.app.trace")
if not any(isinstance(f, _DeferralLogFilter) for f in _trace_log.filters):
    _trace_log.addFilter(_DeferralLogFilter())


def _outage_in(exc: BaseException, record: PostgresRecord) -> bool:
    """``exc``, or an exception it was raised from or while handling, is an outage of the
    execution's own transaction: its connection was lost to one, or the server reported one.

    A client-side failure (no SQLSTATE) of some other connection the body uses leaves the
    execution's connection alive, and is the body's own failure.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if (isinstance(current, Exception) and is_outage(current)
                and (record.lost or sqlstate(current) is not None)):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


class _Execution:
    """What one admitted execution holds (kept on the request)."""

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


_NO_DEFAULT = inspect.Parameter.empty


class _Binding:
    """A task class bound to one app: its policy there, or why it has none."""

    __slots__ = ("error", "foreign", "policy")

    def __init__(self, policy: TaskPolicy | None, error: str | None,
                 foreign: bool = False) -> None:
        self.policy = policy
        self.error = error
        self.foreign = foreign  # a shared copy the app did not declare


# Which app declared a task: Celery records it nowhere, so ReliableTask.bind
# tells it from the Celery function that is binding the task (one walk up the
# stack): an app's finalize giving it the process's shared tasks, or
# ``@shared_task`` pushing its task into the apps already finalized.
_FINALIZE_CALLBACKS = ("celery._state", "_announce_app_finalized")
_SHARED_TASK_DECORATOR = ("celery.app", "__inner")


def _code_names(code: CodeType) -> set[str]:
    names = {code.co_name}
    for const in code.co_consts:
        if isinstance(const, CodeType):
            names |= _code_names(const)
    return names


#: Both functions are where this Celery has them. If not, a binding is taken for
#: the declaration only when the app holds the task's pending promise: a bad
#: setting elsewhere then surfaces when the task is used, and never breaks an app
#: that did not declare the task.
_CELERY_KNOWN = (
    callable(getattr(_state, _FINALIZE_CALLBACKS[1], None))
    and getattr(celery.app.shared_task, "__module__", None) == _SHARED_TASK_DECORATOR[0]
    and _SHARED_TASK_DECORATOR[1] in _code_names(celery.app.shared_task.__code__)
)


def _celery_caller(app: Any) -> tuple[str, bool]:
    """The Celery code binding a task into ``app``, and whether it came from ``@shared_task``.

    ``("finalize", shared)``: ``app.finalize()`` runs the process's finalize
    callbacks (``shared``: the callback is ``@shared_task``'s, not ``app.task``'s);
    ``("decorator", True)``: ``@shared_task`` is giving its new task to ``app``,
    finalized before the task existed; ``("direct", False)``: anything else (a
    decorator on an app already finalized or ``lazy=False``, a promise evaluated
    early, ``register_task`` then finalize).
    """
    frame: FrameType | None = sys._getframe(2)
    child: FrameType | None = None
    while frame is not None:
        where = (frame.f_globals.get("__name__"), frame.f_code.co_name)
        if where == _FINALIZE_CALLBACKS and frame.f_locals.get("app") is app:
            shared = child is not None and child.f_globals.get("__name__") == "celery.app"
            return "finalize", shared
        if where == _SHARED_TASK_DECORATOR and frame.f_locals.get("app") is app:
            return "decorator", True
        child, frame = frame, frame.f_back
    return "direct", False


#: The app each ``@shared_task`` (by decorated function) was declared for.
_shared_task_apps: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _shared_task_app(fun: Any) -> Any:
    """The app a ``@shared_task`` belongs to: the current app when it was first bound.

    That is the app current at its declaration when ``@shared_task`` gives the
    task to apps already finalized (it does so from the decorator), else the app
    current when the first app is finalized with it: the one ``set_as_current``
    (Celery's default for a new app) made current, which ``task.delay()`` also
    resolves to. An app built with ``set_as_current=False`` and made current by
    hand (``celery.contrib.pytest``'s ``celery_session_app`` does so before it
    finalizes) never declares: with it current nothing is recorded, and the
    next bind under an app that made itself current decides (None until then).
    """
    try:
        ref = _shared_task_apps.get(fun)
    except TypeError:  # a callable that takes no weak reference: not recorded
        ref = None
    if ref is None:
        # not get_current_app(): it would create Celery's default app when none is current
        current = getattr(_state._tls, "current_app", None) or _state.default_app
        if current is not None and not getattr(current, "set_as_current", True):
            return None
        ref = weakref.ref(current) if current is not None else _no_app
        with suppress(TypeError):
            _shared_task_apps[fun] = ref
    return ref()


def _no_app() -> None:
    return None


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
    #: What ``celery reliable locks`` shows (default: the ``lock`` template, no values).
    lock_label: ClassVar[Any] = TASK_OPTIONS["lock_label"].default
    #: Idempotency key: template, callable, or True (task name + canonical arguments).
    idempotency_key: ClassVar[Any] = TASK_OPTIONS["idempotency_key"].default
    #: How long finished records are kept and replayed, seconds.
    idempotency_ttl: ClassVar[Any] = TASK_OPTIONS["idempotency_ttl"].default
    #: Lease of an execution in progress, seconds, renewed by the heartbeat.
    idempotency_lease: ClassVar[Any] = TASK_OPTIONS["idempotency_lease"].default
    #: Keep terminal failures so duplicates raise ReplayedFailure instead of running.
    idempotency_keep_failures: ClassVar[Any] = TASK_OPTIONS["idempotency_keep_failures"].default
    #: Per-key token bucket: template or callable over the arguments.
    rate_limit_key: ClassVar[Any] = TASK_OPTIONS["rate_limit_key"].default
    #: The per-key bucket's rate ("10/s") or {"rate", "burst"}.
    rate_limit_key_spec: ClassVar[Any] = TASK_OPTIONS["rate_limit_key_spec"].default
    #: Tokens one execution takes from each bucket.
    rate_cost: ClassVar[Any] = TASK_OPTIONS["rate_cost"].default
    #: Sliding-window limit ("1000/d"), its key and mode (guards/window.py).
    rate_limit_window: ClassVar[Any] = TASK_OPTIONS["rate_limit_window"].default
    rate_limit_window_key: ClassVar[Any] = TASK_OPTIONS["rate_limit_window_key"].default
    rate_limit_window_mode: ClassVar[Any] = TASK_OPTIONS["rate_limit_window_mode"].default
    #: Bulkhead tier holding a fleet-wide slot while the task runs.
    bulkhead: ClassVar[Any] = TASK_OPTIONS["bulkhead"].default
    #: Retry delay policy (celery_reliable.Backoff); None keeps Celery's own.
    backoff: ClassVar[Any] = TASK_OPTIONS["backoff"].default
    #: Exceptions retried besides the transient ones.
    retry_for: ClassVar[Any] = TASK_OPTIONS["retry_for"].default
    #: Fleet-wide retry budget of this task (RetryBudget or a rate); None: reliable_retry_budget.
    retry_budget: ClassVar[Any] = TASK_OPTIONS["retry_budget"].default
    #: Record terminal failures as dead letters; None: when a database is configured.
    dead_letter: ClassVar[Any] = TASK_OPTIONS["dead_letter"].default
    #: Redeliveries after the worker died mid-task before dead-lettering (acks_late).
    max_redeliveries: ClassVar[Any] = TASK_OPTIONS["max_redeliveries"].default
    #: Shared circuit breaker name (reliable_circuit_breakers).
    circuit_breaker: ClassVar[Any] = TASK_OPTIONS["circuit_breaker"].default
    #: Base countdown of a deferral, seconds.
    defer_delay: ClassVar[Any] = TASK_OPTIONS["defer_delay"].default
    #: Cap of one deferral's countdown, seconds.
    defer_max_delay: ClassVar[Any] = TASK_OPTIONS["defer_max_delay"].default

    # --------------------------------------------------------------- binding
    #
    # A task class may be bound to several apps: Celery shares tasks by
    # default, so every app finalized in the process (a test app, a second
    # broker) gets a copy of each shared task. The policy is therefore kept
    # per (class, app), validated against *that* app's settings. The app that
    # declared the task fails at bind over a setting it lacks (a tier, a
    # breaker, a database); an app that only received a copy does not: the
    # error is kept, logged once, and raised if that app runs or sends the
    # task. Errors in the task's own options fail at bind in every app: no
    # app could run it.

    @classmethod
    def bind(cls, app: Any) -> Any:
        result = super().bind(app)
        bound = cls._bound()
        foreign = bound[app].foreign if app in bound else not cls._declared_in(app)
        if foreign:
            cls._build_reliable_policy(app, declaration_only=True)  # no app could run it
        try:
            policy = cls._build_reliable_policy(app)
        except ConfigurationError as error:
            if not foreign:
                raise
            if app not in bound or bound[app].error != str(error):
                log.warning("celery-reliable: shared task %s does not fit app %r: %s; the "
                            "app raises ConfigurationError if it runs or sends the task",
                            cls.name, getattr(app, "main", app), error)
            bound[app] = _Binding(None, str(error), foreign=True)
        else:
            bound[app] = _Binding(policy, None, foreign=foreign)
        cls._reliable_last = None  # rebound: _policy() looks the app up again
        return result

    @classmethod
    def _bound(cls) -> weakref.WeakKeyDictionary[Any, _Binding]:
        """This class's bindings, one per app (never inherited from a base class)."""
        bound = cls.__dict__.get("_reliable_bindings")
        if bound is None:
            bound = weakref.WeakKeyDictionary()
            cls._reliable_bindings = bound
        return bound

    @classmethod
    def _declared_in(cls, app: Any) -> bool:
        """True if this binding declares the task in ``app``, False for a copy it receives.

        * ``@app.task``: declared in ``app``, whether its decorator builds the
          task at once (``app`` already finalized, ``lazy=False``) or ``app``
          holds its pending promise when it finalizes.
        * ``@shared_task``: declared in the app current when it was declared
          (see :func:`_shared_task_app`), unless that app was finalized
          before the task existed (pytest-celery's module-level app, a test
          app): Celery pushes the task into such apps from the decorator, as a
          copy. Then no app declares it.
        * Any other app gets a copy from its finalize callbacks.
        """
        fun = cls._decorated_function()
        path, shared = _celery_caller(app) if _CELERY_KNOWN else ("finalize", False)
        if path == "decorator":
            _shared_task_app(fun)  # its declaration is now: note the current app
            return False
        if path == "direct":
            return True
        if fun is not None and cls._pending_in(app, fun):
            return True  # @app.task on this app, finalizing now
        return shared and fun is not None and _shared_task_app(fun) is app

    @classmethod
    def _decorated_function(cls) -> Any:
        """The function the task was made from (None for a Task subclass)."""
        # Celery >= 5.7 keeps it as _decorated_fun; before, __wrapped__ is it (a
        # staticmethod for bind=False tasks).
        fun = inspect.getattr_static(cls, "_decorated_fun", None)
        if fun is None:
            fun = cls.__dict__.get("__wrapped__")
        return fun.__func__ if isinstance(fun, staticmethod) else fun

    @staticmethod
    def _pending_in(app: Any, fun: Any) -> bool:
        """``app`` holds the lazy promise of an ``@app.task`` over ``fun``, not yet evaluated."""
        for promise in getattr(app, "_pending", ()):
            try:
                args = object.__getattribute__(promise, "_Proxy__args")
            except AttributeError:  # already evaluated
                continue
            if args and args[0] is fun:
                return True
        return False

    @classmethod
    def _build_reliable_policy(cls, app: Any, *, declaration_only: bool = False) -> TaskPolicy:
        """Validate the options against ``app``'s settings (or none: the declaration only)."""
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
        check_bound(name, run, bound)  # `def f(self, ...)` without bind=True
        if declaration_only:
            return build_policy(name, values, task_signature(run, bound), None)
        settings = ReliableSettings.from_conf(app.conf)  # a bad setting fails at bind too
        return build_policy(name, values, task_signature(run, bound), settings)

    @classmethod
    def policy_for(cls, app: Any) -> TaskPolicy:
        """This task's validated policy in ``app`` (built now if the task was never bound).

        Raises ``ConfigurationError`` if the task's options do not fit that
        app's settings (a shared copy in an app that cannot run it).
        """
        bound = cls._bound()
        binding = bound.get(app)
        if binding is None:  # registered without bind (app.register_task)
            binding = bound[app] = _Binding(cls._build_reliable_policy(app), None)
        if binding.policy is None:
            raise ConfigurationError(str(binding.error))
        return binding.policy

    def _policy(self) -> TaskPolicy:
        app = self.app
        last = type(self).__dict__.get("_reliable_last")
        if last is not None and last[0] is app:  # the common case: one app
            return last[1]  # type: ignore[no-any-return]
        policy = type(self).policy_for(app)
        type(self)._reliable_last = (app, policy)
        return policy

    # --------------------------------------------------------------- pipeline

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly or getattr(request, "_reliable_execution", None) is not None:
            # A plain function call (also one made from inside a running task): no guards.
            return super().__call__(*args, **kwargs)
        policy = self._policy()
        if type(policy.retry_budget) is RetryBudget and not request.retries:
            self._deposit_retry_budget(policy.retry_budget)
        header_key = _header(request, IDEMPOTENCY_HEADER)
        queue_bucket = self._queue_bucket(request)
        counts_deliveries = self._counts_deliveries(policy)
        if not (policy.guarded or header_key is not None or queue_bucket is not None
                or counts_deliveries or (policy.queue_windows and window.queue_window(
                    runtime_for(self.app).settings.queue_window_limits, request))):
            if policy.backoff is None and not policy.dead_letter:
                return self.run(*args, **kwargs)
            try:
                return self.run(*args, **kwargs)
            except Exception as exc:
                final = self._on_failure(policy, exc)
                if final is exc:
                    raise
                raise final from exc
        execution = self._admit(policy, args, kwargs, header_key, queue_bucket,
                                counts_deliveries)
        if execution.replay is not None:
            return self._replay(execution.replay)
        request._reliable_execution = execution
        try:
            result = self.run(*args, **kwargs)
        except Exception as exc:
            if execution.outage is not None and not isinstance(exc, (Retry, Ignore, Reject)):
                self._defer_outage(execution, policy)
            final = self._on_failure(policy, exc)
            self._complete(execution, policy, failure=final)
            if final is exc:
                raise
            raise final from exc
        except BaseException as exc:
            self._complete(execution, policy, failure=exc)
            raise
        self._complete(execution, policy, result=result)
        return result

    def _counts_deliveries(self, policy: TaskPolicy) -> bool:
        """Poison-message counting: only where a dead worker's task is redelivered."""
        return bool(self._acks_late() and not self.request.is_eager
                    and policy.max_redeliveries is not None)

    def _on_failure(self, policy: TaskPolicy, exc: Exception) -> BaseException:
        """What the body's exception becomes: a retry (``Retry``) or a terminal failure.

        Retries happen for classified failures when the task has a ``backoff``
        policy (Celery's ``autoretry_for`` retries on its own, through
        :meth:`retry`). Terminal failures are dead-lettered once, and a
        delivery whose failure is dead-lettered is done: it never retries.
        """
        if isinstance(exc, (Retry, Ignore, Reject)):
            return exc  # type: ignore[no-any-return]  # Celery is untyped
        if getattr(self.request, "_reliable_retried", False):
            # self.retry(throw=False) already published this delivery's retry: the
            # failure is not terminal (Celery records FAILURE now and the retry runs
            # later, with its own guards), so neither retried twice nor dead-lettered,
            # which would also mark the task id and stop that retry (_mark_dead).
            return exc
        if getattr(self.request, "_reliable_dead_lettered", False):
            # retry() (called by autoretry_for) already made this failure
            # terminal; retrying now would run a dead-lettered task again.
            return exc
        if policy.backoff is not None and self._retryable(policy, exc):
            try:
                self.retry(exc=exc)
            except Retry as retry:
                return retry  # type: ignore[no-any-return]
            except Exception as final:  # retries exhausted, deadline or budget
                self._dead_letter(policy, final, "retries exhausted")
                return final
        self._dead_letter(policy, exc, "not retryable" if policy.backoff else "failed")
        return exc

    def _retryable(self, policy: TaskPolicy, exc: BaseException) -> bool:
        never = tuple(getattr(self, "dont_autoretry_for", None) or ())
        if never and isinstance(exc, never):
            return False
        extra = tuple(policy.retry_for) + tuple(getattr(self, "autoretry_for", None) or ())
        return is_retryable(exc, extra)

    def apply_async(self, args: Any = None, kwargs: Any = None, *rest: Any,
                    **options: Any) -> Any:
        """Celery's ``apply_async``; an idempotent call's arguments are checked here first.

        An argument with no canonical JSON form raises ``ArgumentsNotCanonical``
        in the caller, before anything is published.
        """
        policy = self._policy()
        headers = options.get("headers") or {}
        if policy.idempotency.spec is not None or IDEMPOTENCY_HEADER in headers:
            self._fingerprint(self._arguments(policy, tuple(args or ()), dict(kwargs or {})))
        return super().apply_async(args, kwargs, *rest, **options)

    def _arguments(
        self, policy: TaskPolicy, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        if policy.signature is None:
            return dict(kwargs)
        simple = policy.plain_parameters
        if simple is not None and len(args) <= len(simple[0]):
            # The common shape (named parameters, no *args/**kwargs/keyword-only):
            # what bind_partial + apply_defaults would give, without their cost.
            names, defaults = simple
            given = dict(zip(names, args, strict=False))
            for name, value in kwargs.items():
                if name not in defaults or name in given:
                    break  # unknown or given twice: let bind_partial raise its TypeError
                given[name] = value
            else:
                # in signature order, as bind_partial gives them (a callable key may
                # depend on the order, whatever order the caller spelled them in)
                return {
                    name: given[name] if name in given else defaults[name]
                    for name in names
                    if name in given or defaults[name] is not _NO_DEFAULT
                }
        bound = policy.signature.bind_partial(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        for param in policy.signature.parameters.values():
            if param.kind is param.VAR_KEYWORD:
                arguments.update(arguments.pop(param.name, {}))
        return arguments

    def _queue_bucket(self, request: Any) -> tuple[str, BucketSpec] | None:
        """The queue this delivery came from and its bucket, if the queue is rate limited.

        The queue is the message's routing key (with Celery's default direct
        routing, the queue name).
        """
        limits = runtime_for(self.app).settings.queue_rate_limits
        if not limits:
            return None
        info = getattr(request, "delivery_info", None) or {}
        queue = info.get("routing_key") or info.get("queue")
        if queue is None or queue not in limits:
            return None
        return queue, limits[queue]

    def _bucket_slots(self) -> dict[str, int]:
        """This delivery's places in bucket queues, by bucket key (:data:`BUCKET_SLOT_HEADER`)."""
        request = self.request
        slots: dict[str, int] | None = getattr(request, "_reliable_slots", None)
        if slots is None:
            raw = _header(request, BUCKET_SLOT_HEADER)
            slots = {}
            if isinstance(raw, dict):  # anything else is not ours: start a fresh arrival
                slots = {key: int(slot) for key, slot in raw.items() if isinstance(key, str)
                         and isinstance(slot, (int, float)) and not isinstance(slot, bool)}
            request._reliable_slots = slots
        return slots

    def _fingerprint(self, arguments: dict[str, Any]) -> str:
        try:
            return fingerprint(arguments)
        except NotCanonical as exc:
            raise ArgumentsNotCanonical(self.name, str(exc)) from exc

    def _plan(
        self,
        policy: TaskPolicy,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        header_key: Any,
        queue_bucket: tuple[str, BucketSpec] | None,
        execution: _Execution,
        runtime: Runtime,
        counts_deliveries: bool = False,
    ) -> Plan:
        """Every guard of this call, as one admission plan. Guards plug in here.

        Idempotency goes first: a finished key replays even when another guard
        (a busy lock) would refuse.
        """
        plan = Plan()
        if counts_deliveries:
            plan.add_deliveries(runtime.keys.deliveries(str(self.request.id)),
                                policy.max_redeliveries, _deliveries_ttl(runtime),
                                execution.owner)
        arguments = self._arguments(policy, args, kwargs)
        idem = policy.idempotency
        if idem.spec is not None or header_key is not None:
            fp = execution.fingerprint = self._fingerprint(arguments)
            key = idem.key(self.name, arguments, header_key, fp)
            assert key is not None
            execution.idem_digest = idempotency_digest(self.name, key)
            plan.add_idempotency(
                runtime.keys.idempotency(self.name, key), fp, execution.owner, idem.lease, idem.ttl
            )
        if policy.lock is not None:
            execution.resource = policy.lock.resource(self.name, arguments)
            plan.add_lock(runtime.keys, execution.resource, execution.owner, policy.lock.ttl,
                          task=self.name, label=policy.lock.label(self.name, arguments))
        if policy.bulkhead is not None and policy.tier is not None:
            plan.add_bulkhead(runtime.keys, policy.bulkhead, policy.tier, execution.owner,
                              str(self.request.id))
        if policy.breaker is not None and policy.circuit_breaker is not None:
            plan.add_breaker(runtime.keys.breaker(policy.circuit_breaker), policy.breaker,
                             execution.owner)
        if queue_bucket is not None:
            queue, spec = queue_bucket
            if policy.rate_cost > spec.burst:
                raise ConfigurationError(
                    f"{self.name}: option 'rate_cost' ({policy.rate_cost}) exceeds the burst of "
                    f"queue {queue!r} ({spec.burst}); the task could never run"
                )
            key = runtime.keys.queue_bucket(queue)
            execution.buckets.append((key, spec, f"queue {queue!r}"))
            plan.add_bucket(key, spec, policy.rate_cost, slot=self._bucket_slots().get(key))
        if policy.key_bucket is not None:
            name = policy.key_bucket.key(self.name, arguments)
            key = runtime.keys.key_bucket(name)
            execution.buckets.append((key, policy.key_bucket.bucket, "rate_limit_key"))
            plan.add_bucket(key, policy.key_bucket.bucket, policy.rate_cost,
                            slot=self._bucket_slots().get(key))
        window.plan_task(plan, runtime.keys, runtime.settings.queue_window_limits, self.request,
                         policy.window, self.name, arguments, execution.owner)
        return plan

    def _admit(
        self,
        policy: TaskPolicy,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        header_key: Any,
        queue_bucket: tuple[str, BucketSpec] | None,
        counts_deliveries: bool = False,
    ) -> _Execution:
        """Admit this execution (one Redis round trip), or defer/skip/fail it.

        Returns an execution that may run, or one carrying a replay. Raises
        Celery's ``Retry``/``Ignore`` (through :meth:`_defer`/:meth:`_refused`)
        or an error; loops only in eager mode, after sleeping out a deferral.
        """
        runtime = runtime_for(self.app)
        while True:
            execution = _Execution(f"{self.request.id}/{secrets.token_hex(4)}")
            plan = self._plan(policy, args, kwargs, header_key, queue_bucket, execution,
                              runtime, counts_deliveries)
            started = time.monotonic()
            # One guard from the request to the leases' registration: an interruption
            # (Celery's soft time limit, SystemExit on SIGTERM, KeyboardInterrupt) or an
            # error anywhere in between (metrics, the breaker's signal handlers: user
            # code) must not leave what admission took held until its TTL. Until _hold
            # has registered it all, it is undone by owner (rollback.lua: nothing of
            # this execution's there, nothing changed); once registered, it is settled.
            taken = held = False  # admission may have taken something; _hold registered it
            try:
                taken = True
                try:
                    outcome = plan.admit(runtime.redis)
                except redis.RedisError as exc:
                    # The script may have run and only its reply been lost: undo what it
                    # may have taken (its lock, record, slot, probe and delivery count)
                    # before deferring, so the deferral is not behind its own lock and is
                    # not counted as a lost delivery. Then fail closed: an unguarded run
                    # could break the guarantee.
                    self._roll_back(plan, runtime)
                    taken = False
                    runtime.health.redis.failed(exc)  # a WARNING per interval, and the gauge
                    self._defer(policy, "Redis unavailable", cause=exc)
                    continue
                if not isinstance(outcome, Admitted):
                    taken = False  # a refusal, replay, rejection or poison took nothing
                runtime.health.redis.ok()
                if isinstance(outcome, RolledBack):
                    # Only a request its sender gave up on and rolled back gets this reply,
                    # so it never comes here in practice; if it did, nothing was taken: defer.
                    self._defer(policy, "admission rolled back")
                    continue
                if isinstance(outcome, Replay):
                    execution.replay = outcome
                    return execution
                if isinstance(outcome, Mismatch):
                    assert execution.idem_digest is not None
                    raise IdempotencyKeyMismatch(self.name, execution.idem_digest)
                if isinstance(outcome, Refused):
                    self._refused(policy, outcome, execution, plan)
                    continue
                if isinstance(outcome, Rejected):
                    self._rejected(policy, outcome)
                if isinstance(outcome, DeadLettered):
                    self._dead_redelivery()
                if isinstance(outcome, Poison):
                    error = PoisonMessage(self.name, outcome.deliveries)
                    self._dead_letter(policy, error, "worker lost")
                    raise error
                self._bucket_slots().clear()  # admitted: the places were used
                self._hold(policy, plan, outcome, execution, runtime, started)
                held = True
                if (execution.idem_digest is None
                        or runtime.settings.idempotency_store != "postgres"):
                    return execution
                if self._claim_durably(policy, execution, runtime):
                    return execution
            except BaseException:
                if held:  # nothing admitted may outlive this delivery
                    self._settle(execution, runtime, "X", "")
                elif taken:
                    self._abandon(plan, execution, runtime)
                raise

    def _abandon(self, plan: Plan, execution: _Execution, runtime: Runtime) -> None:
        """Undo an admission cut short before :meth:`_hold` registered all it took.

        Whatever _hold did register is let go (no renewal, no completion); the
        rollback is bounded (:data:`INTERRUPTED_ROLLBACK_TIMEOUT` per send, two
        sends) and raises nothing, so the interruption is what propagates.
        """
        execution.done = True  # no completion: the rollback removes it all, by owner
        for lease in execution.leases:
            runtime.heartbeat.discard(lease)
            lease.end()
        self._roll_back(plan, runtime, timeout=INTERRUPTED_ROLLBACK_TIMEOUT)

    def _roll_back(self, plan: Plan, runtime: Runtime, timeout: float | None = None) -> None:
        """Undo a failed admission (:meth:`Plan.rollback`); on failure, leases expire by TTL.

        ``timeout``: at most this many seconds per send (two sends), for an
        interrupted task, which must not wait out the socket timeout; then no
        error (Redis or other) escapes, so the interruption is what propagates.
        """
        try:
            if timeout is None:
                plan.rollback(runtime.redis)
            else:
                plan.rollback(runtime.redis, attempts=2, timeout=timeout)
        except Exception as exc:
            if timeout is None and not isinstance(exc, redis.RedisError):
                raise
            log.warning(
                "celery-reliable: %s[%s] could not undo an admission whose reply was lost; "
                "what it may have taken expires by its TTL",
                self.name,
                self.request.id,
                exc_info=True,
            )

    def _hold(
        self,
        policy: TaskPolicy,
        plan: Plan,
        admitted: Admitted,
        execution: _Execution,
        runtime: Runtime,
        started: float,
    ) -> None:
        """Register what admission took: leases for the heartbeat, entries for completion."""
        describe = f"{self.name}[{self.request.id}]"
        for index, kind in enumerate(plan.kinds):
            key = plan.keys[plan.offsets[index]]
            if kind == "I":
                idem = policy.idempotency
                execution.leases.append(
                    Lease(
                        "I",
                        key,
                        execution.owner,
                        idem.lease,
                        started,
                        f"idempotency lease of {describe}",
                    )
                )
                execution.release.add_idempotency(key, execution.owner, idem.ttl)
            elif kind == "D":
                execution.release.add_deliveries(key)
            elif kind == "C":
                assert policy.breaker is not None and policy.circuit_breaker is not None
                execution.release.add_breaker(runtime.keys.breaker(policy.circuit_breaker),
                                              policy.breaker, execution.owner)
                if admitted.results[index] == 2:
                    self._breaker_changed(policy.circuit_breaker, OPEN, HALF_OPEN)
                if admitted.results[index] in (1, 2):
                    # A half-open probe: renewed like any lease, so a probe slower than
                    # probe_lease stays the probe and its outcome still counts.
                    execution.leases.append(Lease(
                        "C", plan.keys[plan.offsets[index] + 1], execution.owner,
                        policy.breaker.probe_lease, started, f"breaker probe of {describe}"))
            elif kind == "K":
                assert policy.tier is not None
                execution.leases.append(Lease("K", key, execution.owner, policy.tier.lease,
                                              started, f"bulkhead slot of {describe}"))
                execution.release.add_bulkhead(key, execution.owner)
            elif kind == "L":
                assert policy.lock is not None
                metrics.inc("reliable_lock_acquire_total", result="acquired")
                since = _header(self.request, LOCK_WAIT_HEADER)
                metrics.observe("reliable_lock_wait_seconds",
                                max(0.0, time.time() - float(since)) if since else 0.0)
                execution.token = admitted.results[index]
                value = plan.lock_value(index, execution.token)
                execution.lease = Lease(
                    "L", key, value, policy.lock.ttl, started, f"lock of {describe}"
                )
                execution.leases.append(execution.lease)
                execution.release.add_lock(key, value)
        for lease in execution.leases:
            runtime.heartbeat.add(lease)
        execution.started = time.monotonic()

    def _claim_durably(self, policy: TaskPolicy, execution: _Execution, runtime: Runtime) -> bool:
        """Open this execution's PostgreSQL transaction; False if it deferred (eager only).

        A committed record found here means Redis had lost it: it is written
        back to Redis and replayed, or refused as a mismatch.
        """
        assert execution.idem_digest is not None
        try:
            record = open_record(
                runtime.task_engine(),  # creates missing tables on first use
                self.name,
                execution.idem_digest,
                execution.fingerprint,
                policy.idempotency.ttl,
                runtime.settings,
            )
            existing = record.begin()
            runtime.health.postgres.ok()
        except SQLAlchemyError as exc:
            self._settle(execution, runtime, "X", "")
            # A schema problem is configuration: fixed now, or failed at once, never waited out.
            if runtime.schema_problem(exc):
                log.warning("celery-reliable: %s[%s] found celery-reliable's tables missing; "
                            "they are created again before it runs", self.name, self.request.id)
                self._defer(policy, "PostgreSQL tables missing", cause=exc)
            else:
                runtime.health.postgres.failed(exc)  # a WARNING per interval, and the gauge
                self._defer(policy, "PostgreSQL unavailable", cause=exc)
            return False
        if existing is None:
            execution.pg = record
            return True
        if existing.fingerprint != record.fingerprint:
            self._settle(execution, runtime, "X", "")
            raise IdempotencyKeyMismatch(self.name, execution.idem_digest)
        self._settle(execution, runtime, existing.state, existing.payload)
        execution.replay = Replay(0, existing.state, existing.payload)
        return True

    def _settle(
        self, execution: _Execution, runtime: Runtime, outcome: str, payload: str
    ) -> list[int]:
        """Complete the Redis side in one round trip (idempotency ``outcome``, release the rest)."""
        if execution.done:
            return []
        execution.done = True
        for lease in execution.leases:
            runtime.heartbeat.discard(lease)
        # Ran past the belief in a lease (the local clock says it may have expired)
        overran = [lease for lease in execution.leases if lease.kind in "IK" and lease.lost]
        # Letting go ends every belief, before the release is sent: once it runs another
        # holder may take the lock (higher token) while a body that goes on after
        # retry(throw=False) still runs, so lock_lost turns true and self.fence refuses.
        for lease in execution.leases:
            lease.end()
        execution.release.settle_idempotency(outcome, payload)
        try:
            results = execution.release.run(runtime.redis)
        except redis.RedisError:
            log.warning(
                "celery-reliable: %s[%s] could not settle its guards in Redis; leases "
                "expire by their TTL",
                self.name,
                self.request.id,
                exc_info=True,
            )
            return []
        kinds = execution.release.kinds
        if "C" in kinds:
            code = results[kinds.index("C")]
            old, new = divmod(code, 10)
            if old != new:
                self._breaker_changed(str(self._policy().circuit_breaker), old, new)
        if "L" in kinds and not results[kinds.index("L")]:
            log.warning(
                "celery-reliable: %s[%s] finished after its lock was lost",
                self.name,
                self.request.id,
            )
        if "I" in kinds and not results[kinds.index("I")]:
            # The lease expired while this execution ran (a stalled worker, a
            # heartbeat that could not reach Redis): a duplicate may have
            # taken the key over and run the body too. With the Redis-only
            # store nothing else prevents that; with PostgreSQL the duplicate
            # waited on this execution's uncommitted record instead.
            metrics.inc("reliable_idempotency_lease_lost_total", task=self.name)
            log.warning(
                "celery-reliable: %s[%s] finished after its idempotency lease was lost (expired "
                "or taken over); its outcome was not recorded in Redis%s",
                self.name,
                self.request.id,
                "" if runtime.settings.idempotency_store == "postgres"
                else " and a duplicate may have run the task too (Redis-only store)",
            )
            overran = [lease for lease in overran if lease.kind != "I"]  # said just above
        for lease in overran:
            log.warning("celery-reliable: %s[%s] finished after the belief in its %s ended "
                        "(it may have expired and been taken over meanwhile)", self.name,
                        self.request.id, lease.describe)
        return results

    def _replay(self, replay: Replay) -> Any:
        metrics.inc("reliable_idempotent_replays_total", task=self.name)
        # Structured fields for log processors, and the signal the pytest plugin's
        # assert_replayed() reads: this task id's outcome came from a stored record.
        extra = {"reliable_event": "replayed", "reliable_task_id": str(self.request.id)}
        if replay.state == "F":
            error = json.loads(replay.payload or "{}")
            log.info("celery-reliable: %s[%s] replayed a kept failure", self.name,
                     self.request.id, extra=extra)
            raise ReplayedFailure(self.name, str(error.get("type")), str(error.get("message")))
        log.info(
            "celery-reliable: %s[%s] replayed the stored result (duplicate not run)",
            self.name,
            self.request.id,
            extra=extra,
        )
        return json.loads(replay.payload)

    def _rejected(self, policy: TaskPolicy, rejection: Rejected) -> NoReturn:
        """A full bulkhead said no for good: drop (Ignore) or raise BulkheadFull."""
        tier = str(policy.bulkhead)
        if rejection.reason == "drop":
            metrics.inc("reliable_bulkhead_rejected_total", tier=tier, reason="drop")
            log.info("celery-reliable: %s[%s] dropped: bulkhead %r is full", self.name,
                     self.request.id, tier)
            self._store_state(DROPPED, {"reason": "bulkhead full", "tier": tier})
            raise Ignore()
        metrics.inc("reliable_bulkhead_rejected_total", tier=tier, reason=rejection.reason)
        raise BulkheadFull(self.name, tier, rejection.reason)

    def _refused(self, policy: TaskPolicy, refusal: Refused, execution: _Execution,
                 plan: Plan) -> None:
        """Translate a refusal into Celery's control flow (returns only in eager mode)."""
        if refusal.kind == "L":
            assert policy.lock is not None and execution.resource is not None
            how = policy.lock.contention
            metrics.inc("reliable_lock_acquire_total", result=f"busy-{how}")
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
            self._defer(policy, "lock busy", not_after=refusal.retry_after, lock_busy=True,
                        guard="lock")
            return
        if refusal.kind == "I":
            # A twin is executing this key right now: wait for its result.
            self._defer(policy, "duplicate in progress", not_after=refusal.retry_after,
                        guard="idempotency_key")
            return
        if refusal.kind == "B":
            bucket = execution.buckets[plan.kinds[: refusal.index].count("B")]
            metrics.inc("reliable_rate_limited_total", bucket=bucket[2])
            if refusal.slot is not None:  # come back with it: keeps the task's place
                self._bucket_slots()[bucket[0]] = refusal.slot
            self._defer(policy, f"rate limited ({bucket[2]})", scheduled=refusal.retry_after or 0.0,
                        guard="rate limit")
            return
        if refusal.kind == window.GUARD.letter:
            what = window.refused(plan, refusal, self.request)
            metrics.inc("reliable_rate_limited_total", bucket=what)
            self._defer(policy, f"window full ({what})", scheduled=refusal.retry_after or 0.0,
                        guard="rate limit window")
            return
        if refusal.kind == "C":
            metrics.inc("reliable_circuit_deferrals_total", breaker=str(policy.circuit_breaker))
            self._defer(policy, f"circuit {policy.circuit_breaker!r} open",
                        due=refusal.retry_after or 1.0, guard="circuit_breaker")
            return
        if refusal.kind == "K":
            metrics.inc("reliable_bulkhead_waits_total", tier=str(policy.bulkhead))
            self._defer(policy, f"bulkhead {policy.bulkhead!r} full", guard="bulkhead")
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
        request = self.request
        deferrals = int(_header(request, DEFER_HEADER) or 0)
        countdown = policy.defer.countdown(
            deferrals, random.random(), not_after=not_after, not_before=not_before,
            scheduled=scheduled, due=due,
        )
        if request.is_eager:
            if cause is not None:  # nobody else can make it come back: do not spin
                raise StorageError(f"{self.name}: {reason}") from cause
            time.sleep(countdown)
            return
        headers = dict(request.headers or {})
        headers[DEFER_HEADER] = deferrals + 1
        slots = self._bucket_slots()
        if slots:
            headers[BUCKET_SLOT_HEADER] = dict(slots)
        else:
            headers.pop(BUCKET_SLOT_HEADER, None)
        if lock_busy:  # for reliable_lock_wait_seconds: when it first found the lock busy
            headers.setdefault(LOCK_WAIT_HEADER, time.time())
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
        # One line says it all (Celery's own "retry:" line is dropped for a deferral,
        # see _DeferralLogFilter): the countdown, the reason and the guard.
        log.info(
            "celery-reliable: %s[%s] deferred %.2fs: %s (guard %s, deferral %d)%s",
            self.name,
            request.id,
            countdown,
            reason,
            guard,
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

    def _breaker_outcome(self, policy: TaskPolicy, execution: _Execution,
                         failure: BaseException | None) -> str:
        """``s``, ``f`` (a classified failure, or a slow call) or ``n`` (does not count)."""
        assert policy.breaker is not None
        if isinstance(failure, Deferred):
            return "n"
        if isinstance(failure, Retry):
            failure = failure.exc if isinstance(failure.exc, BaseException) else None
            if failure is None:
                return "n"
        if failure is not None:
            return "f" if self._retryable(policy, failure) else "n"
        slow = policy.breaker.slow_call_seconds
        if slow is not None and time.monotonic() - execution.started > slow:
            return "f"
        return "s"

    def _breaker_changed(self, name: str, old: int, new: int) -> None:
        metrics.inc("reliable_circuit_transitions_total", breaker=name, state=STATE_NAMES[new])
        log.warning("celery-reliable: circuit breaker %r %s -> %s (seen by %s[%s])", name,
                    STATE_NAMES[old], STATE_NAMES[new], self.name, self.request.id)

    def _dead_letter(self, policy: TaskPolicy, exc: BaseException, reason: str) -> None:
        """Record a terminal failure once (PostgreSQL, optional queue, metric); never raises."""
        request = self.request
        if getattr(request, "_reliable_dead_lettered", False):
            return
        # The mark makes this delivery's failure terminal (see _on_failure and
        # retry), whether or not a letter is recorded.
        request._reliable_dead_lettered = True
        if not policy.dead_letter:
            self._mark_dead()
            return
        metrics.inc("reliable_dead_letters_total", task=self.name, reason=reason)
        runtime = runtime_for(self.app)
        first = _header(request, FIRST_FAILURE_HEADER)
        info = getattr(request, "delivery_info", None) or {}
        queue = info.get("routing_key") or info.get("queue")
        # The call's own headers (the producer's idempotency_key, ...) and its record's
        # key go with the letter: a replay is the same call, under the same key.
        headers = deadletter.call_headers(getattr(request, "headers", None))
        header_key = _header(request, IDEMPOTENCY_HEADER)
        if header_key is not None:
            headers[IDEMPOTENCY_HEADER] = header_key
        execution = getattr(request, "_reliable_execution", None)
        try:
            letter = deadletter.record(
                runtime.task_engine(), task_name=self.name, task_id=str(request.id),
                args=request.args, kwargs=request.kwargs, exc=exc,
                attempts=int(request.retries or 0) + 1, reason=reason, queue=queue,
                first_failure_at=(datetime.fromtimestamp(float(first), timezone.utc)
                                  if first else None),
                headers=headers,
                idempotency_digest=execution.idem_digest if execution is not None else None,
            )
            log.warning("celery-reliable: %s[%s] dead-lettered (%s) as #%d: %r", self.name,
                        request.id, reason, letter, exc)
        except Exception:
            log.error("celery-reliable: %s[%s] could not be dead-lettered (%s)", self.name,
                      request.id, reason, exc_info=True)
        self._mark_dead()
        dlq = runtime.settings.dead_letter_queue
        if dlq:
            try:
                self.app.send_task(self.name, args=request.args, kwargs=request.kwargs,
                                   queue=dlq, headers={**headers, "reliable_dead_letter": reason})
            except Exception:
                log.error("celery-reliable: %s[%s] could not be published to the dead-letter "
                          "queue %r", self.name, request.id, dlq, exc_info=True)

    def _dead_redelivery(self) -> NoReturn:
        """Admission found this task id dead-lettered: this delivery must not run.

        It is a redelivery of a delivery whose failure was final (its ack was
        lost: the broker died, or the connection broke, before it arrived). It
        ends with ``Ignore`` (acknowledged, nothing stored) when the result
        backend holds the task id's final state; otherwise with
        :class:`ReplayedFailure`, which Celery stores as ``FAILURE``: that
        failure never reached the backend (the worker was killed after the
        letter was recorded, or the backend was down), or Celery overwrote it
        with ``STARTED`` as this delivery began (``track_started``).
        """
        request = self.request
        metrics.inc("reliable_dead_redeliveries_total", task=self.name)
        if request.ignore_result or self.ignore_result or self._result_ready():
            log.warning("celery-reliable: %s[%s] was dead-lettered; this redelivery of it "
                        "(its ack was lost) is not run", self.name, request.id)
            raise Ignore()
        log.warning("celery-reliable: %s[%s] was dead-lettered; this redelivery of it (its "
                    "ack was lost) is not run, and stores FAILURE (the backend no longer held "
                    "a final state)", self.name, request.id)
        raise ReplayedFailure(
            self.name, "DeadLettered",
            f"task id {request.id} was dead-lettered (reliable_dead_letters); a redelivery "
            "of it is not run, and its own failure was not in the result backend")

    def _result_ready(self) -> bool:
        """The result backend holds a final state of this task id (False if unreadable)."""
        try:
            meta = self.backend.get_task_meta(self.request.id, cache=False)
        except Exception:  # disabled or unreachable: let Celery try to store the failure
            log.debug("celery-reliable: %s[%s] could not read its result state", self.name,
                      self.request.id, exc_info=True)
            return False
        return meta.get("status") in states.READY_STATES

    def _mark_dead(self) -> None:
        """This task id's failure is final: a redelivery of it must not run (admit.lua, D).

        Where deliveries are counted (``acks_late``, ``max_redeliveries``), the
        deliveries set of the task id gets the mark ``!dead`` for
        :data:`DELIVERIES_TTL` (or twice the redelivery window), right after the
        letter is recorded (and again by completion, which keeps it, as does the
        completion of another delivery of the task id running at the same
        time): if the broker never gets this delivery's
        ack (it died first) and delivers the message again, admission ignores
        it. A replay is a new task id. Never raises: the mark is best effort
        (without it, such a redelivery runs again, as in plain Celery).
        """
        if not self._counts_deliveries(self._policy()):
            return
        runtime = runtime_for(self.app)
        key = runtime.keys.deliveries(str(self.request.id))
        ttl = _deliveries_ttl(runtime)
        execution = getattr(self.request, "_reliable_execution", None)
        if execution is not None:
            execution.release.mark_dead(ttl)
        try:
            mark_dead(runtime.redis, key, ttl)
        except redis.RedisError:
            log.warning("celery-reliable: %s[%s] could not mark its task id dead-lettered in "
                        "Redis; a redelivery of it would run again", self.name,
                        self.request.id, exc_info=True)

    def _complete(
        self,
        execution: _Execution,
        policy: TaskPolicy,
        *,
        result: Any = None,
        failure: BaseException | None = None,
    ) -> None:
        """Settle what admission took: one PostgreSQL commit (if durable), one Redis call.

        Safe to call twice (``self.retry()`` completes early; the exception it
        raises then passes through here again). Whatever fails in here, the
        ``finally`` settles the Redis side, so no lease outlives the delivery.
        """
        if execution.done:
            return
        runtime = runtime_for(self.app)
        if policy.breaker is not None:
            execution.release.settle_breaker(self._breaker_outcome(policy, execution, failure))
        try:
            if execution.idem_digest is None:
                self._settle(execution, runtime, "X", "")
            elif failure is not None:
                self._complete_failure(execution, policy, runtime, failure)
            else:
                self._complete_success(execution, policy, runtime, result)
        finally:
            if not execution.done:
                if execution.pg is not None:
                    execution.pg.abandon()
                self._settle(execution, runtime, "X", "")

    def _complete_failure(self, execution: _Execution, policy: TaskPolicy, runtime: Runtime,
                          failure: BaseException) -> None:
        terminal = isinstance(failure, Exception) and not isinstance(
            failure, (Retry, Ignore, Reject))
        if terminal and policy.idempotency.keep_failures:
            self._keep_failure(execution, runtime, type(failure).__name__, str(failure))
            return
        if execution.pg is not None:
            execution.pg.abandon()
        self._settle(execution, runtime, "X", "")

    def _keep_failure(self, execution: _Execution, runtime: Runtime, exc_type: str,
                      message: str) -> None:
        """Record a terminal failure (Redis and PostgreSQL); duplicates raise ReplayedFailure."""
        payload = json.dumps({"type": exc_type, "message": message[:2000]})
        if execution.pg is not None:
            try:
                execution.pg.fail_kept(payload)
            except SQLAlchemyError:
                log.error("celery-reliable: %s[%s] could not record its kept failure in "
                          "PostgreSQL", self.name, self.request.id, exc_info=True)
        self._settle(execution, runtime, "F", payload)

    def _complete_success(self, execution: _Execution, policy: TaskPolicy, runtime: Runtime,
                          result: Any) -> None:
        pg = execution.pg
        try:
            payload = dumps_result(result)
        except (TypeError, ValueError) as exc:
            # The body ran: forgetting the key would run its effects again on
            # every duplicate. Keep it as a failure that duplicates replay.
            error = ResultNotSerializable(self.name, str(exc))
            self._keep_failure(execution, runtime, type(error).__name__, str(error))
            raise error from exc
        if pg is not None:
            try:
                pg.succeed(payload)
            except SQLAlchemyError as exc:
                if pg.session_used:
                    # The task's own rows were in this transaction: they did not
                    # commit (or PostgreSQL will tell the redelivery they did).
                    self._settle(execution, runtime, "X", "")
                    if is_outage(exc) or execution.outage is not None:
                        self._defer(policy, "PostgreSQL commit failed", cause=exc)
                        return
                    # PostgreSQL refused the task's own rows (a deferred constraint):
                    # the task failed, as if its body had raised this.
                    final = self._on_failure(policy, exc)
                    if final is exc:
                        raise
                    raise final from exc
                try:  # the effect happened: make the record durable on its own
                    pg.record_success(payload)
                except SQLAlchemyError:
                    log.error("celery-reliable: %s[%s] ran but its durable record could not "
                              "be committed; only Redis remembers it", self.name,
                              self.request.id, exc_info=True)
        self._settle(execution, runtime, "S", payload)

    def retry(self, args: Any = None, kwargs: Any = None, exc: Any = None, throw: bool = True,
              eta: Any = None, countdown: float | None = None, max_retries: int | None = None,
              **options: Any) -> Any:
        """Celery's ``retry`` with the task's backoff, retry budget and guards released first.

        * Without an explicit ``countdown``/``eta``, a task with ``backoff``
          waits the policy's delay, floored by the error's ``Retry-After``.
          ``backoff.max_attempts`` sets ``max_retries``; ``backoff.deadline``
          ends retrying that long after the first failure. That delay never
          exceeds the broker's redelivery window less its margin
          (``reliable_redelivery_window``), nor do Celery's own delays
          (``default_retry_delay``, the ``retry_backoff`` of ``autoretry_for``);
          a countdown/eta the caller passed beyond it is kept and logged as a
          warning.
        * Each retry takes a token from the task's fleet-wide retry budget;
          with the budget spent the failure is dead-lettered, not retried.
        * Guards are released before the retried message is published (it may
          start elsewhere at once). With no retry left, nothing is released
          early and the failure is terminal (dead-lettered, kept with
          ``idempotency_keep_failures``).
        * Once this delivery's failure is dead-lettered it is never retried
          (the call raises ``exc``); only ``DeadLetters.replay`` runs it again.
        * With ``throw=False`` the retry is published and the body goes on; an
          exception it raises afterwards is not terminal (Celery stores
          ``FAILURE``, then the retry runs): neither dead-lettered nor retried again.
        """
        request = self.request
        policy = self._policy()
        if getattr(request, "_reliable_dead_lettered", False):
            raise exc if isinstance(exc, BaseException) else self.MaxRetriesExceededError(
                f"{self.name}[{request.id}]: dead-lettered, not retried")
        backoff = policy.backoff
        if max_retries is None:
            max_retries = (backoff.max_attempts - 1 if backoff is not None
                           and backoff.max_attempts is not None else self.max_retries)
        headers = dict(options.pop("headers", None) or request.headers or {})
        headers.pop(DEFER_HEADER, None)
        headers.pop(LOCK_WAIT_HEADER, None)
        headers.pop(BUCKET_SLOT_HEADER, None)
        now = time.time()
        first = float(headers.get(FIRST_FAILURE_HEADER) or now)
        headers[FIRST_FAILURE_HEADER] = first
        exhausted = max_retries is not None and request.retries + 1 > max_retries
        reason = "retries exhausted"
        if backoff is not None and now - first > backoff.deadline:
            exhausted, reason = True, "deadline passed"
        if not exhausted and policy.retry_budget is not None and not request.is_eager \
                and not self._take_retry_budget(policy):
            exhausted, reason = True, "retry budget exhausted"
        if exhausted:
            error = exc if isinstance(exc, BaseException) else self.MaxRetriesExceededError(
                f"{self.name}[{request.id}]: {reason}")
            self._dead_letter(policy, error, reason)
            if reason == "retries exhausted":
                return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries,
                                     headers=headers, **options)
            raise error
        if countdown is None and eta is None and backoff is not None:
            previous = headers.get(PREV_DELAY_HEADER)
            countdown = backoff.delay(request.retries, random.Random(),
                                      float(previous) if previous is not None else None)
            floor = retry_after(exc) if isinstance(exc, BaseException) else None
            if floor is not None:
                countdown = max(countdown, floor)
            if policy.defer.cap is not None:  # never past the broker's redelivery window
                countdown = min(countdown, policy.defer.cap)
        elif policy.defer.cap is not None:
            countdown = self._retry_countdown(policy.defer.cap, countdown, eta, sys._getframe(1))
        if countdown is not None:
            headers[PREV_DELAY_HEADER] = countdown
        metrics.inc("reliable_retries_total", task=self.name,
                    reason=type(exc).__name__ if isinstance(exc, BaseException) else "retry")
        execution = getattr(request, "_reliable_execution", None)
        if execution is not None:
            try:
                self._complete(execution, policy, failure=Retry(exc=exc))
            except Exception:  # bookkeeping must never stop the retry from being published
                log.warning("celery-reliable: %s[%s] could not release its guards before "
                            "retrying; they expire by their TTL", self.name, request.id,
                            exc_info=True)
        retried = super().retry(args, kwargs, exc, throw, eta, countdown, max_retries,
                                headers=headers, **options)
        # Only reached with throw=False: the retry is published (not in eager mode,
        # where Celery runs no retry for throw=False), the body goes on.
        if not request.is_eager:
            request._reliable_retried = True
        return retried

    def _retry_countdown(self, cap: float, countdown: float | None, eta: Any,
                         caller: FrameType) -> float | None:
        """A retry's countdown inside the broker's redelivery window less its margin (``cap``).

        A delay the caller did not write is the library's to cap: Celery's
        ``default_retry_delay`` (neither countdown nor eta) and the
        ``retry_backoff`` delay that Celery's ``autoretry_for`` wrapper computes
        (found above ``caller``, see :meth:`_from_autoretry`). A countdown or eta the caller
        passed (``retry_kwargs`` included) is kept, with a warning if beyond.
        """
        if countdown is None and not eta:
            default = self.default_retry_delay
            return None if default is None else min(float(default), cap)
        if countdown is not None and getattr(self, "retry_backoff", False) \
                and self._from_autoretry(countdown, caller):
            return min(float(countdown), cap)
        self._warn_beyond_window(cap, countdown, eta)
        return countdown

    def _from_autoretry(self, countdown: float, caller: FrameType) -> bool:
        """``countdown`` is the ``retry_backoff`` delay Celery's autoretry wrapper computed.

        The wrapper need not be ``retry()``'s direct caller: a base class or
        subclass overriding ``retry()`` (logging, metrics) sits in between. So
        look a few frames up for the wrapper's code, retrying *this* task and
        holding the countdown it computed (``retry_kwargs_for_attempt``, bound
        only once it caught the error: a body that calls ``self.retry()`` itself
        runs under the wrapper too, before that). A countdown the override
        changed on the way is then its own, and kept.
        """
        frame: FrameType | None = caller
        for _ in range(_AUTORETRY_DEPTH):
            if frame is None:
                return False
            if frame.f_code is _AUTORETRY_RUN:
                local = frame.f_locals
                computed = local.get("retry_kwargs_for_attempt")
                return local.get("task") is self and isinstance(computed, dict) \
                    and computed.get("countdown") == countdown
            frame = frame.f_back
        return False

    def _warn_beyond_window(self, cap: float, countdown: float | None, eta: Any) -> None:
        """The caller's own countdown is kept; say when the broker may redeliver it meanwhile."""
        if countdown is not None:
            wait: float | None = float(countdown)
        elif isinstance(eta, datetime):
            wait = eta.timestamp() - time.time()
        else:
            wait = None
        if wait is not None and wait > cap:
            log.warning(
                "celery-reliable: %s[%s] retries in %.0fs, beyond the broker's redelivery "
                "window (countdowns are capped at %.0fs): the broker may deliver it again "
                "meanwhile; raise the window (visibility_timeout / consumer_timeout, and "
                "reliable_redelivery_window) or retry sooner",
                self.name, self.request.id, wait, cap,
            )

    def _take_retry_budget(self, policy: TaskPolicy) -> bool:
        """One retry from the task's fleet-wide retry budget (fail open if Redis is down).

        A ratio budget (:class:`RetryBudget`) also credits, in the same round trip, the
        first executions this process counted since it last sent them.
        """
        budget = policy.retry_budget
        assert budget is not None
        runtime = runtime_for(self.app)
        try:
            if isinstance(budget, RetryBudget):
                key = runtime.keys.retry_budget_window(self.name)
                deposits = deposits_for(runtime)
                try:
                    granted, _ = spend(runtime.redis, key, budget, deposits.take(key), True)
                except redis.RedisError:
                    deposits.failed(key, budget.ttl)
                    raise
            else:
                plan = Plan()
                plan.add_bucket(runtime.keys.retry_budget(self.name), budget, 1, queue=False)
                granted = isinstance(plan.admit(runtime.redis), Admitted)
        except redis.RedisError:
            # The budget only limits retries; a retry still goes through the
            # guards, which fail closed on their own.
            log.warning("celery-reliable: retry budget of %s unavailable; retrying",
                        self.name, exc_info=True)
            return True
        if not granted:
            metrics.inc("reliable_retry_budget_exhausted_total", task=self.name)
        return granted

    def _deposit_retry_budget(self, budget: RetryBudget) -> None:
        """Count a first execution for the ratio budget (no I/O here: the count is sent
        with this process's next retry or by a background thread once a second)."""
        request = self.request
        if request.is_eager or request.called_directly or _header(request, DEFER_HEADER):
            return  # the budget is not used eagerly; a deferral's redelivery is no new call
        runtime = runtime_for(self.app)
        deposits_for(runtime).add(runtime.keys.retry_budget_window(self.name), budget)

    def throttle(self, seconds: float) -> NoReturn:
        """Empty this task's buckets fleet-wide for ``seconds``, then defer this task.

        For an upstream that said "slow down" (HTTP 429 with ``Retry-After``):
        every worker stops taking tokens from the task's queue bucket and key
        bucket until ``seconds`` have passed. This execution's guards are
        released (its idempotency record forgotten) and the task is re-published
        to run after the pause; no retry is consumed.
        """
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
            raise ConfigurationError(f"{self.name}: throttle() takes seconds >= 0, "
                                     f"got {seconds!r}")
        execution = getattr(self.request, "_reliable_execution", None)
        policy = self._policy()
        if execution is None or not execution.buckets:
            raise ConfigurationError(
                self._direct_call("throttle()")
                or f"{self.name}: throttle() needs a token bucket (a rate-limited queue in "
                "reliable_queue_rate_limits, or option 'rate_limit_key') and a running task"
            )
        runtime = runtime_for(self.app)
        args: list[Any] = [max(1, int(seconds * 1000))]
        for _, spec, _ in execution.buckets:
            args += [repr(spec.burst), repr(spec.rate)]  # throttle.lua's order
        script("throttle")(runtime.redis, [key for key, _, _ in execution.buckets], args)
        metrics.inc("reliable_throttles_total", task=self.name)
        self._complete(execution, policy, failure=Retry())
        self._defer(policy, f"throttled for {seconds:g}s", not_before=float(seconds),
                    guard="throttle")
        raise AssertionError("unreachable")  # pragma: no cover - _defer raises in a worker

    @contextmanager
    def idempotent_transaction(self) -> Iterator[Any]:
        """A SQLAlchemy session whose rows commit with this task's idempotency record.

        Everything done in the session commits in ONE PostgreSQL transaction
        with the record and the task's result, when the task returns. If the
        task raises, or its worker dies, none of it commits, and a redelivery
        runs cleanly. Leaving the ``with`` block flushes; it does not commit.
        With ``reliable_django_database`` it is ``transaction.atomic(using=alias)``
        inside the record's transaction instead, and yields Django's connection.
        """
        execution = getattr(self.request, "_reliable_execution", None)
        if execution is None or execution.pg is None:
            raise ConfigurationError(
                self._direct_call("idempotent_transaction()")
                or f"{self.name}: idempotent_transaction() needs option 'idempotency_key' (or the "
                "idempotency_key header) and reliable_idempotency_store='postgres', and is "
                "available only while the task runs"
            )
        record = execution.pg
        try:
            with record.transaction() as handle:
                yield handle
        except BaseException as exc:
            if _outage_in(exc, record):
                # The library's own transaction died with PostgreSQL (or the path to
                # it): whatever the body makes of this error, the run defers like a
                # failed commit (ReliableTask.__call__), and runs again once it is back.
                execution.outage = exc
            raise

    def _defer_outage(self, execution: _Execution, policy: TaskPolicy) -> NoReturn:
        """PostgreSQL failed under ``idempotent_transaction()``: defer, like a failed commit.

        Nothing of this run committed. Every guard is released (the key is
        forgotten), no retry is consumed and nothing is dead-lettered; the
        redelivery waits for PostgreSQL in admission and runs once it is back.
        """
        cause = execution.outage
        self._complete(execution, policy, failure=Deferred())
        self._defer(policy, "PostgreSQL failed inside idempotent_transaction", cause=cause)
        raise StorageError(f"{self.name}: PostgreSQL failed") from cause  # pragma: no cover

    # ---------------------------------------------------------- inside a run

    def _direct_call(self, what: str) -> str | None:
        """Why ``what`` is unavailable, if this is a direct call (``my_task(...)``); else None.

        A direct call runs the body as a plain function, like any Celery task
        called directly: no message, no guards, so no lock, token or record.
        """
        if not self.request.called_directly:
            return None
        short = self.name.rsplit(".")[-1]
        return (f"{self.name}: {what} is not available in a direct call ({short}(...) runs "
                "the body as a plain function, without guards); run the task through "
                "its guards with .apply() (in this process), .delay(), or task_always_eager")

    def _execution(self) -> _Execution:
        execution = getattr(self.request, "_reliable_execution", None)
        if execution is None or execution.token is None or execution.resource is None:
            raise RuntimeError(
                self._direct_call("the lock (self.fence, fence_token, lock_resource, lock_lost)")
                or f"{self.name}: no lock is held (set the 'lock' option, and "
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
        """True once this process can no longer claim the lock; stays true.

        Decided from the local monotonic clock, without waiting for Redis: the
        lock's lease cannot expire on the server before ``lock_ttl`` after the
        send time of the last renewal Redis confirmed (or of the admission), so
        the belief ends a safety margin earlier (see ``runtime.lease_margin``).
        Also true as soon as a renewal finds the lock expired or taken over, and
        once this execution released it (``self.retry(throw=False)``).
        """
        lease = self._execution().lease
        return bool(lease is not None and lease.lost)

    @property
    def fence(self) -> Fence:
        """Fenced writes with this execution's token; refused locally once ``lock_lost``."""
        execution = self._execution()
        assert execution.token is not None and execution.resource is not None
        lease = execution.lease
        # lease.lost reads the clock at every call: a fence built before the belief
        # ended refuses from then on too.
        return Fence(execution.resource, execution.token, lambda: lease is not None and lease.lost,
                     holder=execution.owner)
