"""The machinery of options and settings: :class:`Option`, its validators, what a
guard declares (:class:`OptionSet`), and the checks of a task's function at bind
(its signature, which templates are checked against; a forgotten ``bind=True``).

Each guard declares its own task options and app settings at the top of its module
(``celery_reliable/guards/<name>.py``; retries and dead letters in
``celery_reliable/failures.py``, deferral in ``celery_reliable/deferral.py``);
:mod:`celery_reliable.config` composes them into ``TASK_OPTIONS``
and ``SETTINGS`` and assembles a task's policy from their parts. This module imports
no guard, so every guard may import it.
"""

from __future__ import annotations

import inspect
import string
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .errors import ConfigurationError

if TYPE_CHECKING:
    from .config import ReliableSettings

__all__ = [
    "Option",
    "OptionSet",
    "check_bound",
    "choice",
    "collect",
    "err",
    "flag",
    "optional_flag",
    "render",
    "seconds",
    "task_signature",
    "template_fields",
    "template_spec",
    "text",
    "whole",
]

#: ``parse(owner, name, raw)``: the normalised value, or ConfigurationError.
Parser = Callable[[str, str, Any], Any]

V = TypeVar("V")
P = TypeVar("P")


@dataclass(frozen=True)
class Option(Generic[V]):
    """One documented, validated option; its value (after ``parse``) is a ``V``.

    ``parse(owner, name, value)`` returns the normalised value or raises
    ConfigurationError; ``owner`` is the task name (or "app settings").
    ``template``: the value may be a format template over the task's arguments
    (checked at bind against the task's signature).
    """

    name: str
    default: Any
    unit: str
    doc: str
    parse: Callable[[str, str, Any], V] = field(repr=False)
    template: bool = False

    def value(self, owner: str, raw: Any) -> V:
        return self.parse(owner, self.name, raw)


@dataclass(frozen=True)
class OptionSet(Generic[P]):
    """What one guard declares: its task options, its app settings, its part of the policy.

    ``name``: the part's key in ``TaskPolicy.parts`` (the guard's name; unique).
    ``build(task_name, options, settings)`` gets the task's validated values of this
    set's options (by name) and the app's settings (None before the app is
    configured: the declaration only) and returns the guard's part of the task's
    policy, a ``P``: the guard reads it back typed with ``policy.part(CONFIG)``.
    ``guards(part)`` (None: never): the part makes every execution of the task go
    through the pipeline; ``guards_delivery(part, request)`` (None: never): it makes
    this delivery do so (a queue-level limit: the delivery's queue has one). ``prefixes``: task
    attributes starting with one of these that are no option are refused as typos
    (``lock_tll=30``). ``check_settings(owner, values)`` (optional) refuses a
    combination of the app's validated setting values (the shared ones and those of
    this set and the sets before it, by name).

    ``fields``: the part is a mapping of ``TaskPolicy``'s declared fields, by name,
    spread into them (the guards whose parts other modules read as attributes,
    ``policy.lock``); a new guard leaves it False and needs no line in ``config``.
    """

    name: str
    options: tuple[Option[Any], ...]
    build: Callable[[str, Mapping[str, Any], ReliableSettings | None], P]
    settings: tuple[Option[Any], ...] = ()
    check_settings: Callable[[str, Mapping[str, Any]], None] | None = None
    prefixes: tuple[str, ...] = ()
    guards: Callable[[P], bool] | None = None
    guards_delivery: Callable[[P, Any], bool] | None = None
    fields: bool = False


def collect(options: Iterable[Option[Any]]) -> dict[str, Option[Any]]:
    """``options`` by name, refusing a name two guards both declare."""
    out: dict[str, Option[Any]] = {}
    for option in options:
        if option.name in out:
            raise ValueError(f"option {option.name!r} is declared twice")
        out[option.name] = option
    return out


def err(owner: str, name: str, message: str) -> ConfigurationError:
    return ConfigurationError(f"{owner}: option {name!r} {message}")


def seconds(*, allow_zero: bool = False, optional: bool = False) -> Parser:
    def parse(owner: str, name: str, raw: Any) -> float | None:
        if raw is None and optional:
            return None
        if isinstance(raw, timedelta):
            raw = raw.total_seconds()
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise err(owner, name, f"must be seconds (int, float or timedelta), got {raw!r}")
        value = float(raw)
        if value != value or value in (float("inf"), float("-inf")):
            raise err(owner, name, f"must be a finite number of seconds, got {raw!r}")
        if value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise err(owner, name, f"must be {bound} seconds, got {raw!r}")
        return value

    return parse


def choice(choices: tuple[str, ...]) -> Parser:
    def parse(owner: str, name: str, raw: Any) -> str:
        if raw not in choices:
            raise err(owner, name, f"must be one of {', '.join(map(repr, choices))}, got {raw!r}")
        return str(raw)

    return parse


def template_spec(owner: str, name: str, raw: Any) -> Any:
    """A format template over the task's arguments, a callable receiving them, or None."""
    if raw is None or callable(raw):
        return raw
    if not isinstance(raw, str) or not raw:
        raise err(owner, name, f"must be a non-empty template string or a callable, got {raw!r}")
    try:
        list(string.Formatter().parse(raw))
    except ValueError as exc:
        raise err(owner, name, f"is not a valid format template ({exc}): {raw!r}") from exc
    return raw


def flag(owner: str, name: str, raw: Any) -> bool:
    if not isinstance(raw, bool):
        raise err(owner, name, f"must be True or False, got {raw!r}")
    return raw


def optional_flag(owner: str, name: str, raw: Any) -> bool | None:
    if raw is None or isinstance(raw, bool):
        return raw
    raise err(owner, name, f"must be True, False or None, got {raw!r}")


def whole(minimum: int) -> Parser:
    """A whole number >= ``minimum``."""
    def parse(owner: str, name: str, raw: Any) -> int:
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < minimum:
            raise err(owner, name, f"must be a whole number >= {minimum}, got {raw!r}")
        return raw

    return parse


def text(*, optional: bool = False) -> Parser:
    """A non-empty string (or None, if ``optional``)."""
    def parse(owner: str, name: str, raw: Any) -> str | None:
        if raw is None and optional:
            return None
        if not isinstance(raw, str) or not raw:
            raise err(owner, name, f"must be a non-empty string, got {raw!r}")
        return raw

    return parse


def render(spec: Any, task_name: str, option: str, arguments: Mapping[str, Any]) -> str:
    """A name from a template over the bound arguments or a callable receiving them.

    Shared by ``lock``, ``idempotency_key`` and ``rate_limit_key``; raises
    ConfigurationError naming the task and the option.
    """
    if callable(spec):
        value = spec(arguments)
        if not isinstance(value, str) or not value:
            raise ConfigurationError(
                f"{task_name}: option {option!r} callable returned {value!r}; "
                "it must return a non-empty string"
            )
        return value
    try:
        return str(spec.format_map(arguments))
    except (KeyError, IndexError, AttributeError) as exc:
        raise ConfigurationError(
            f"{task_name}: option {option!r} template {spec!r} cannot be formatted "
            f"with the call's arguments: {exc!r}"
        ) from exc


def template_fields(task_name: str, template: str, option: str = "lock") -> list[str]:
    """Root argument names a format template refers to (``{order.id}`` → ``order``)."""
    names = []
    for _, field_name, _, _ in string.Formatter().parse(template):
        if field_name is None:
            continue
        root = field_name.split(".", 1)[0].split("[", 1)[0]
        if root == "" or root.isdigit():
            raise ConfigurationError(
                f"{task_name}: option {option!r} template {template!r} uses a positional field; "
                "name the argument instead"
            )
        names.append(root)
    return names


def check_bound(task_name: str, run: Callable[..., Any], bound: bool) -> None:
    """Refuse an unbound task whose function's first parameter is ``self``.

    Without ``bind=True`` Celery passes the call's first argument as ``self``, so
    the task would fail when it runs with a bare ``TypeError`` (a missing argument,
    or ``'int' object has no attribute 'fence'``). A first parameter with another
    name is not refused: it cannot be told from an ordinary argument.
    """
    if bound:
        return
    try:
        params = list(inspect.signature(run).parameters.values())
    except (TypeError, ValueError):
        return
    if params and params[0].name == "self" and params[0].kind in (
            inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        raise ConfigurationError(
            f"{task_name}: the task function takes 'self' but the task is not bound, so "
            "'self' would receive the call's first argument; add bind=True to the decorator "
            "(@app.task(base=ReliableTask, bind=True, ...))"
        )


def task_signature(run: Callable[..., Any], bound: bool) -> inspect.Signature | None:
    try:
        sig = inspect.signature(run)
    except (TypeError, ValueError):
        return None
    if bound:
        params = list(sig.parameters.values())[1:]
        sig = sig.replace(parameters=params)
    return sig
