"""Which app declared a task, and which retry countdown Celery computed: frame inspection.

Celery records neither, so :class:`~celery_reliable.task.ReliableTask` tells them from
the Celery code on the stack: :func:`declared_in` (the function binding a task into an
app) and :func:`from_autoretry` (the ``autoretry_for`` wrapper calling ``retry()``).
"""

from __future__ import annotations

import inspect
import sys
import weakref
from contextlib import suppress
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any

import celery.app
from celery import _state
from celery.app.autoretry import add_autoretry_behaviour

if TYPE_CHECKING:
    from .config import TaskPolicy

__all__ = ["Binding", "declared_in", "decorated_function", "from_autoretry", "pending_in"]

#: The code of the ``run`` wrapper that Celery's ``autoretry_for`` installs
#: (``celery/app/autoretry.py``): a countdown passed to ``retry()`` from it, with
#: ``retry_backoff``, is a delay Celery computed, not one the caller wrote.
_AUTORETRY_RUN = next((const for const in add_autoretry_behaviour.__code__.co_consts
                       if getattr(const, "co_name", None) == "run"), None)
#: How many frames above ``retry()`` the autoretry wrapper is looked for: its
#: own call, plus ``retry()`` overrides in a few base classes.
_AUTORETRY_DEPTH = 8


class Binding:
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


def declared_in(cls: Any, app: Any) -> bool:
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
    fun = decorated_function(cls)
    path, shared = _celery_caller(app) if _CELERY_KNOWN else ("finalize", False)
    if path == "decorator":
        _shared_task_app(fun)  # its declaration is now: note the current app
        return False
    if path == "direct":
        return True
    if fun is not None and pending_in(app, fun):
        return True  # @app.task on this app, finalizing now
    return shared and fun is not None and _shared_task_app(fun) is app


def decorated_function(cls: Any) -> Any:
    """The function the task was made from (None for a Task subclass)."""
    # Celery >= 5.7 keeps it as _decorated_fun; before, __wrapped__ is it (a
    # staticmethod for bind=False tasks).
    fun = inspect.getattr_static(cls, "_decorated_fun", None)
    if fun is None:
        fun = cls.__dict__.get("__wrapped__")
    return fun.__func__ if isinstance(fun, staticmethod) else fun


def pending_in(app: Any, fun: Any) -> bool:
    """``app`` holds the lazy promise of an ``@app.task`` over ``fun``, not yet evaluated."""
    for promise in getattr(app, "_pending", ()):
        try:
            args = object.__getattribute__(promise, "_Proxy__args")
        except AttributeError:  # already evaluated
            continue
        if args and args[0] is fun:
            return True
    return False


def from_autoretry(task: Any, countdown: float, caller: FrameType) -> bool:
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
            return local.get("task") is task and isinstance(computed, dict) \
                and computed.get("countdown") == countdown
        frame = frame.f_back
    return False
