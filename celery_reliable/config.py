"""Task options and ``reliable_*`` app settings: one registry, validated once.

Each guard declares its own options, settings and part of a task's policy at the top
of its module (``celery_reliable/guards/<name>.py``; retries and dead letters:
``celery_reliable/failures.py``), as an :class:`~celery_reliable.options.OptionSet`.
This module composes them (:data:`OPTION_SETS`, one line per guard) into
:data:`TASK_OPTIONS` and :data:`SETTINGS`, adds what is shared (the stores' settings),
and assembles a task's :class:`TaskPolicy` from the guards' parts. The README's
reference tables are generated from these entries (``python -m celery_reliable.docs``),
so they cannot drift.

A guard needs nothing else here: its part of a task's policy is ``policy.part(CONFIG)``
(typed: what its ``OptionSet.build`` returns), its settings ``settings.value(OPTION)``,
whether it guards a task or a delivery its ``OptionSet.guards``/``guards_delivery``
(:attr:`TaskPolicy.guarded`, :meth:`TaskPolicy.guards_delivery`), and the typo check
of task attributes its ``OptionSet.prefixes``. The guards older than that registry
whose parts other modules read as attributes (``policy.lock``, ``settings.bulkheads``)
keep them as declared fields of :class:`TaskPolicy` and :class:`ReliableSettings`.

When several options are wrong at once, the error names the first in the
reference's order, guard by guard (:data:`OPTION_SETS`, the shared settings
first): a guard's values, then its templates, then their combination, before
the next guard's. An unknown option or setting (a typo) is refused before any value.

Options are validated when a task is bound to its app (at import or when the
app finalizes), not when it first runs: a bad value raises
:class:`~celery_reliable.errors.ConfigurationError` naming the task and the
option.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import deferral, failures, guards
from .backoff import Backoff
from .breaker import BreakerSpec
from .bulkhead import TierSpec
from .deferral import DeferPolicy
from .errors import ConfigurationError
from .guards.bucket import KeyBucketPolicy
from .guards.idempotency import IdempotencyPolicy
from .guards.lock import Contention, LockPolicy
from .options import (
    Option,
    OptionSet,
    P,
    V,
    check_bound,
    collect,
    render,
    task_signature,
    template_fields,
)
from .ratelimit import BucketSpec
from .redelivery import countdown_cap, redelivery_window
from .retrybudget import RetryBudget
from .shared_settings import SHARED_SETTINGS

__all__ = [
    "OPTION_SETS",
    "SETTINGS",
    "TASK_OPTIONS",
    "Contention",
    "DeferPolicy",
    "IdempotencyPolicy",
    "KeyBucketPolicy",
    "LockPolicy",
    "Option",
    "ReliableSettings",
    "TaskPolicy",
    "build_policy",
    "check_bound",
    "render",
    "task_signature",
    "template_fields",
    "unknown_options",
    "unknown_settings",
]


#: Who declares task options and app settings, in the reference's order. One line per guard
#: (the ``guards`` package imports every guard module: see ``guards.GUARDS``).
OPTION_SETS: tuple[OptionSet[Any], ...] = (
    guards.lock.CONFIG,
    guards.idempotency.CONFIG,
    guards.bucket.CONFIG,
    guards.window.CONFIG,
    guards.bulkhead.CONFIG,
    failures.CONFIG,
    guards.deliveries.CONFIG,
    guards.breaker.CONFIG,
    deferral.CONFIG,
)

TASK_OPTIONS: dict[str, Option[Any]] = collect(o for s in OPTION_SETS for o in s.options)

SETTINGS: dict[str, Option[Any]] = collect(
    SHARED_SETTINGS + tuple(o for s in OPTION_SETS for o in s.settings))



def _check_names() -> None:
    """Each guard's part is keyed by its OptionSet's name: refuse one name twice."""
    names = [s.name for s in OPTION_SETS]
    if len(set(names)) != len(names):
        raise ValueError(f"option sets must have unique names: {names}")


_check_names()


@dataclass(frozen=True)
class ReliableSettings:
    """The ``reliable_*`` settings of one app, validated.

    The shared settings and those of the guards whose settings other modules read
    are fields (``reliable_<x>`` is the field ``<x>``); every setting, by name, is
    in ``values`` (as set: ``redelivery_window`` the field is derived), read typed
    with :meth:`value`.
    """

    redis_url: str
    database_url: str | None
    key_prefix: str
    redis_socket_timeout: float = 10.0
    idempotency_store: str = "postgres"
    #: Django database alias holding idempotency records (contrib.django); None: our pool.
    django_database: str | None = None
    database_lock_timeout: float = 5.0
    database_pool_size: int = 10
    create_tables: bool = True
    queue_rate_limits: Mapping[str, BucketSpec] = field(default_factory=dict)
    bulkheads: Mapping[str, TierSpec] = field(default_factory=dict)
    retry_budget: BucketSpec | RetryBudget | None = None
    dead_letter_queue: str | None = None
    circuit_breakers: Mapping[str, BreakerSpec] = field(default_factory=dict)
    #: The broker's redelivery window, seconds (set or derived); None: unknown.
    redelivery_window: float | None = None
    #: Every setting's validated value, by its name (``reliable_...``).
    values: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def value(self, option: Option[V]) -> V:
        """The validated value of the setting ``option`` (a guard's: ``window.QUEUE_LIMITS``)."""
        if option.name in self.values:
            return self.values[option.name]  # type: ignore[no-any-return]
        return option.value("app settings", option.default)

    @property
    def countdown_cap(self) -> float | None:
        """The longest countdown celery-reliable sets, seconds; None: no cap."""
        return countdown_cap(self.redelivery_window)

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any]) -> ReliableSettings:
        """The settings of ``conf`` (``app.conf`` or a mapping), validated.

        Raises ``ConfigurationError`` for a bad value, and for a ``reliable_*``
        key that is not a setting (a typo would silently keep the default).
        """
        owner = "app settings"
        unknown_settings(conf)
        values: dict[str, Any] = {}

        def parse(options: tuple[Option[Any], ...]) -> None:
            for opt in options:
                values[opt.name] = opt.value(owner, conf.get(opt.name, opt.default))

        parse(SHARED_SETTINGS)
        for option_set in OPTION_SETS:  # the reference's order: the first wrong one is named
            parse(option_set.settings)
            if option_set.check_settings is not None:
                option_set.check_settings(owner, values)
        # The setting reliable_<name> is the field <name>, where there is one.
        declared = _settings_fields()
        fields = {name.removeprefix("reliable_"): value for name, value in values.items()
                  if name.removeprefix("reliable_") in declared}
        fields["redelivery_window"] = redelivery_window(conf, values["reliable_redelivery_window"])
        return cls(**fields, values=values)


@functools.cache
def _settings_fields() -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(ReliableSettings)) - {"values"}


@dataclass(frozen=True)
class TaskPolicy:
    """Everything celery-reliable enforces for one task, validated at bind.

    ``parts``: each guard's part, by its ``OptionSet.name``; a guard reads its own
    with :meth:`part`. The older guards' parts are also spread into the declared
    fields below (``OptionSet.fields``).
    """

    task_name: str
    lock: LockPolicy | None
    idempotency: IdempotencyPolicy
    backoff: Backoff | None
    retry_for: tuple[type[BaseException], ...]
    retry_budget: BucketSpec | RetryBudget | None
    dead_letter: bool
    max_redeliveries: int
    defer: DeferPolicy
    parameters: tuple[str, ...]
    takes_var_kwargs: bool
    signature: inspect.Signature | None
    #: Each guard's part of the policy, by its ``OptionSet.name``.
    parts: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def part(self, option_set: OptionSet[P]) -> P:
        """The part of this policy ``option_set`` built (``policy.part(window.CONFIG)``)."""
        return self.parts[option_set.name]  # type: ignore[no-any-return]

    @functools.cached_property
    def plain_parameters(self) -> tuple[tuple[str, ...], dict[str, Any]] | None:
        """Names and defaults, if the signature has only positional-or-keyword parameters.

        The task pipeline binds such signatures without ``inspect`` (a hot path).
        """
        if self.signature is None:
            return None
        params = self.signature.parameters.values()
        if any(p.kind is not p.POSITIONAL_OR_KEYWORD for p in params):
            return None
        return tuple(p.name for p in params), {p.name: p.default for p in params}

    @functools.cached_property
    def guarded(self) -> bool:
        """True if any guard's part guards every execution (``OptionSet.guards``).

        Queue-level limits come per delivery (:meth:`guards_delivery`).
        """
        return any(s.guards(self.parts[s.name]) for s in OPTION_SETS
                   if s.guards is not None and s.name in self.parts)

    @functools.cached_property
    def _delivery_checks(self) -> tuple[tuple[Callable[[Any, Any], bool], Any], ...]:
        return tuple((s.guards_delivery, self.parts[s.name]) for s in OPTION_SETS
                     if s.guards_delivery is not None and s.name in self.parts)

    def guards_delivery(self, request: Any) -> bool:
        """True if a guard's part guards this delivery (its queue has a limit)."""
        return any(check(part, request) for check, part in self._delivery_checks)


# Names that are ours in spirit: an attribute starting with one of these that
# is not a registered option is most likely a typo. Each guard names its own
# (``OptionSet.prefixes``).
_OUR_PREFIXES: tuple[str, ...] = (
    "fence", "reliable", *(prefix for s in OPTION_SETS for prefix in s.prefixes))


# Decorator options Celery itself understands that are not Task attributes.
_CELERY_OPTIONS = frozenset({
    "autoretry_for", "dont_autoretry_for", "retry_kwargs", "retry_backoff",
    "retry_backoff_max", "retry_jitter", "pydantic", "pydantic_strict", "pydantic_context",
    "pydantic_dump_kwargs", "shared", "filter", "lazy", "base", "bind",
})


def unknown_settings(conf: Mapping[str, Any]) -> None:
    """Refuse a ``reliable_*`` key of ``conf`` that is not in :data:`SETTINGS`.

    ``conf`` may be Celery's ``app.conf``. With a namespace
    (``config_from_object(..., namespace="CELERY")``) Celery reads a setting as
    ``CELERY_RELIABLE_REDIS_URL`` (in the namespace's case) as well as
    ``reliable_redis_url``, so both spellings are accepted. Keys that do not
    start with ``reliable_`` (or the namespace and ``reliable_``) are not ours
    and are not looked at.
    """
    try:
        # Listing the keys first also loads a configuration still pending (app.conf
        # before first use), and with it the namespace.
        keys = [key for key in conf if isinstance(key, str)]
    except Exception:  # a config source that cannot list its keys: nothing to check
        return
    prefix = getattr(conf, "prefix", None) or ""
    spellings = list(SETTINGS)
    if prefix:  # celery.utils.text.match_case: the whole key takes the namespace's case
        spellings += [(prefix + name).upper() if prefix.isupper() else (prefix + name).lower()
                      for name in SETTINGS]
    for key in keys:
        plain = key.lower().startswith("reliable_")
        # With a namespace, other keys (Django's settings) are UPPER_CASE: a plain key is
        # ours only in the lower case Celery reads. Without one, RELIABLE_REDIS_URL is a
        # setting Celery would never read: refused too.
        mine = (key.startswith("reliable_") or key.lower().startswith(f"{prefix}reliable_".lower())
                if prefix else plain)
        if key in spellings or not mine:
            continue
        form = [s for s in spellings if s.lower().startswith("reliable_") == plain]
        lowered = {s.lower(): s for s in form}
        close = difflib.get_close_matches(key.lower(), list(lowered), n=1, cutoff=0.8)
        hint = f"; did you mean {lowered[close[0]]!r}?" if close else ""
        raise ConfigurationError(
            f"app settings: unknown setting {key!r}{hint} (celery-reliable's settings: "
            f"{', '.join(SETTINGS)})"
        )


def unknown_options(task_name: str, attributes: Mapping[str, Any], known: set[str]) -> None:
    """Refuse attributes that look like our options but are not (``lock_tll=30``)."""
    for name, value in attributes.items():
        if name.startswith("_") or name in known or name in TASK_OPTIONS or \
                name in _CELERY_OPTIONS:
            continue
        close = difflib.get_close_matches(name, list(TASK_OPTIONS), n=1, cutoff=0.8)
        # A method or property of a class-based task may share our prefixes;
        # a plain value that does is almost always a misspelt option.
        is_code = callable(value) or isinstance(value, (property, staticmethod, classmethod))
        if close or (name.startswith(_OUR_PREFIXES) and not is_code):
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigurationError(
                f"{task_name}: unknown reliability option {name!r}{hint} "
                f"(known options: {', '.join(sorted(TASK_OPTIONS))})"
            )


def build_policy(
    task_name: str,
    values: Mapping[str, Any],
    signature: inspect.Signature | None,
    settings: ReliableSettings | None = None,
) -> TaskPolicy:
    """Validate every option of one task and return its policy (each guard builds its part).

    Guard by guard in :data:`OPTION_SETS` order (the reference's), so that of several
    wrong options the first there is named: its options' values, their templates
    against the task's signature, then its part (the options' combination).
    """
    params: tuple[str, ...] = ()
    var_kw = True
    if signature is not None:
        params = tuple(
            p.name
            for p in signature.parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        )
        var_kw = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    parts: dict[str, Any] = {}
    declared: dict[str, Any] = {}
    for option_set in OPTION_SETS:
        opts = {o.name: o.value(task_name, values.get(o.name, o.default))
                for o in option_set.options}
        if not var_kw:
            for option in (o.name for o in option_set.options if o.template):
                _check_template(task_name, option, opts[option], params)
        part = parts[option_set.name] = option_set.build(task_name, opts, settings)
        if option_set.fields:
            declared.update(part)
    return TaskPolicy(task_name=task_name, parameters=params, takes_var_kwargs=var_kw,
                      signature=signature, parts=parts, **declared)


def _check_template(task_name: str, option: str, spec: Any, params: tuple[str, ...]) -> None:
    """Refuse a template naming an argument the task does not take."""
    if not isinstance(spec, str):
        return
    for field_name in template_fields(task_name, spec, option):
        if field_name not in params:
            raise ConfigurationError(
                f"{task_name}: option {option!r} template {spec!r} names argument "
                f"{field_name!r}, which the task does not take "
                f"(its arguments: {', '.join(params) or 'none'})"
            )
