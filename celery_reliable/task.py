"""``ReliableTask``: the Celery task base that enforces every guard.

A thin Celery adapter: the task's options as class attributes, validated per app
(:meth:`ReliableTask.bind`, :meth:`ReliableTask.policy_for`); ``__call__`` runs a
guarded delivery through the pipeline (:mod:`celery_reliable.pipeline`: plan ->
admit -> replay | refuse | run -> complete) and an unguarded one straight;
``retry()``, ``throttle()``, ``idempotent_transaction()`` and the lock's
``fence`` / ``fence_token`` / ``lock_resource`` / ``lock_lost`` for the body.
"""

from __future__ import annotations

import inspect
import logging
import sys
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

from celery import Task

from . import pipeline
from .config import (
    TASK_OPTIONS,
    ReliableSettings,
    TaskPolicy,
    build_policy,
    check_bound,
    task_signature,
    unknown_options,
)
from .declared import Binding, declared_in
from .errors import ConfigurationError
from .fencing import Fence
from .pipeline import failure, retrying
from .pipeline.arguments import arguments, fingerprint_of, queue_bucket
from .pipeline.call import Call, Deferred, Execution
from .pipeline.failure import outage_in
from .pipeline.headers import *  # noqa: F403  (re-exported: the header names, below)
from .pipeline.headers import IDEMPOTENCY_HEADER, header
from .retrybudget import RetryBudget

__all__ = ["Deferred", "ReliableTask"]
__all__ += pipeline.headers.__all__  # the header names and result states, for compatibility

log = logging.getLogger("celery_reliable")


class ReliableTask(Task):  # type: ignore[misc]
    """Celery task base with fleet-wide guards.

    Use as ``@app.task(base=ReliableTask, bind=True, lock="order:{order_id}")``.
    Every option is a class attribute settable in the decorator or a subclass, set
    to its default from the registry after the class
    (:data:`celery_reliable.config.TASK_OPTIONS`, declared by each guard's module
    with its documentation, unit and validation; the README's reference lists them).
    Options are validated when the task is bound to the app; a bad one raises
    ``ConfigurationError``.
    """

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
        foreign = bound[app].foreign if app in bound else not declared_in(cls, app)
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
            bound[app] = Binding(None, str(error), foreign=True)
        else:
            bound[app] = Binding(policy, None, foreign=foreign)
        cls._reliable_last = None  # rebound: _policy() looks the app up again
        return result

    @classmethod
    def _bound(cls) -> weakref.WeakKeyDictionary[Any, Binding]:
        """This class's bindings, one per app (never inherited from a base class)."""
        bound = cls.__dict__.get("_reliable_bindings")
        if bound is None:
            bound = weakref.WeakKeyDictionary()
            cls._reliable_bindings = bound
        return bound

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
            binding = bound[app] = Binding(cls._build_reliable_policy(app), None)
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
            retrying.deposit_retry_budget(self, policy.retry_budget)
        header_key = header(request, IDEMPOTENCY_HEADER)
        bucket = queue_bucket(self.app, request)
        counts = bool(policy.max_redeliveries is not None and self._acks_late()
                      and not request.is_eager)
        if (policy.guarded or header_key is not None or bucket is not None or counts
                or policy.guards_delivery(request)):
            return pipeline.run(self, policy, args, kwargs, header_key, bucket, counts)
        if policy.backoff is None and not policy.dead_letter:
            return self.run(*args, **kwargs)
        try:
            return self.run(*args, **kwargs)
        except Exception as exc:
            final = failure.on_failure(Call(self, policy), exc)
            if final is exc:
                raise
            raise final from exc

    def _acks_late(self) -> bool:
        value = getattr(self.request, "acks_late", None)
        return bool(self.acks_late if value is None else value)

    def apply_async(self, args: Any = None, kwargs: Any = None, *rest: Any,
                    **options: Any) -> Any:
        """Celery's ``apply_async``; an idempotent call's arguments are checked here first.

        An argument with no canonical JSON form raises ``ArgumentsNotCanonical``
        in the caller, before anything is published.
        """
        policy = self._policy()
        headers = options.get("headers") or {}
        if policy.idempotency.spec is not None or IDEMPOTENCY_HEADER in headers:
            fingerprint_of(self.name, arguments(policy, tuple(args or ()), dict(kwargs or {})))
        return super().apply_async(args, kwargs, *rest, **options)

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
        return retrying.retry(Call(self, self._policy()), super().retry, sys._getframe(1),
                              args, kwargs, exc, throw, eta, countdown, max_retries, options)

    def throttle(self, seconds: float) -> NoReturn:
        """Empty this task's buckets fleet-wide for ``seconds``, then defer this task.

        For an upstream that said "slow down" (HTTP 429 with ``Retry-After``):
        every worker stops taking tokens from the task's queue bucket and key
        bucket until ``seconds`` have passed. This execution's guards are
        released (its idempotency record forgotten) and the task is re-published
        to run after the pause; no retry is consumed.
        """
        retrying.throttle(Call(self, self._policy()), seconds, self._direct_call("throttle()"))

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
            if outage_in(exc, record):
                # The library's own transaction died with PostgreSQL (or the path to
                # it): whatever the body makes of this error, the run defers like a
                # failed commit (ReliableTask.__call__), and runs again once it is back.
                execution.outage = exc
            raise

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

    def _execution(self) -> Execution:
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
        the belief ends a safety margin earlier (see ``leases.lease_margin``).
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


# Every registered option is a class attribute settable in the decorator (a new guard
# needs no line here).
for _name, _option in TASK_OPTIONS.items():
    if _name not in vars(ReliableTask):
        setattr(ReliableTask, _name, _option.default)
