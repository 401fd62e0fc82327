"""Task options and ``reliable_*`` app settings: one registry, validated once.

Every option lives in :data:`TASK_OPTIONS` and every setting in
:data:`SETTINGS` with its default, its unit and its documentation; the
README's reference tables are generated from these entries
(``python -m celery_reliable.docs``), so they cannot drift.

Options are validated when a task is bound to its app (at import or when the
app finalizes), not when it first runs: a bad value raises
:class:`~celery_reliable.errors.ConfigurationError` naming the task and the
option.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
import inspect
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

from .backoff import Backoff
from .breaker import BreakerSpec, parse_breakers
from .bulkhead import TierSpec, parse_bulkheads
from .errors import ConfigurationError
from .guards import window as _window
from .ratelimit import BucketSpec, parse_bucket, parse_queue_limits
from .redelivery import countdown_cap, redelivery_window
from .retrybudget import RetryBudget, parse_retry_budget

__all__ = [
    "SETTINGS",
    "TASK_OPTIONS",
    "DeferPolicy",
    "IdempotencyPolicy",
    "KeyBucketPolicy",
    "LockPolicy",
    "Option",
    "ReliableSettings",
    "TaskPolicy",
]

Contention = Literal["defer", "skip", "fail"]
_CONTENTION: tuple[str, ...] = ("defer", "skip", "fail")


@dataclass(frozen=True)
class Option:
    """One documented, validated option.

    ``parse(owner, value)`` returns the normalised value or raises
    ConfigurationError; ``owner`` is the task name (or "app settings").
    """

    name: str
    default: Any
    unit: str
    doc: str
    parse: Callable[[str, str, Any], Any] = field(repr=False)

    def value(self, owner: str, raw: Any) -> Any:
        return self.parse(owner, self.name, raw)


def _err(owner: str, name: str, message: str) -> ConfigurationError:
    return ConfigurationError(f"{owner}: option {name!r} {message}")


def _seconds(*, allow_zero: bool = False, optional: bool = False) -> Callable[[str, str, Any], Any]:
    def parse(owner: str, name: str, raw: Any) -> float | None:
        if raw is None and optional:
            return None
        if isinstance(raw, timedelta):
            raw = raw.total_seconds()
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise _err(owner, name, f"must be seconds (int, float or timedelta), got {raw!r}")
        value = float(raw)
        if value != value or value in (float("inf"), float("-inf")):
            raise _err(owner, name, f"must be a finite number of seconds, got {raw!r}")
        if value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise _err(owner, name, f"must be {bound} seconds, got {raw!r}")
        return value

    return parse


def _choice(choices: tuple[str, ...]) -> Callable[[str, str, Any], Any]:
    def parse(owner: str, name: str, raw: Any) -> str:
        if raw not in choices:
            raise _err(owner, name, f"must be one of {', '.join(map(repr, choices))}, got {raw!r}")
        return str(raw)

    return parse


def _lock_spec(owner: str, name: str, raw: Any) -> Any:
    if raw is None or callable(raw):
        return raw
    if not isinstance(raw, str) or not raw:
        raise _err(owner, name, f"must be a non-empty template string or a callable, got {raw!r}")
    try:
        list(string.Formatter().parse(raw))
    except ValueError as exc:
        raise _err(owner, name, f"is not a valid format template ({exc}): {raw!r}") from exc
    return raw


def _idempotency_spec(owner: str, name: str, raw: Any) -> Any:
    if raw is None or raw is True or callable(raw):
        return raw
    if raw is False:
        return None
    return _lock_spec(owner, name, raw)


def _flag(owner: str, name: str, raw: Any) -> bool:
    if not isinstance(raw, bool):
        raise _err(owner, name, f"must be True or False, got {raw!r}")
    return raw


def _backoff(owner: str, name: str, raw: Any) -> Any:
    if raw is None or isinstance(raw, Backoff):
        return raw
    raise _err(owner, name, f"must be a Backoff (e.g. Backoff.exponential(base=2, cap=60)) "
                            f"or None, got {raw!r}")


def _exception_types(owner: str, name: str, raw: Any) -> tuple[type[BaseException], ...]:
    if raw is None:
        return ()
    items = raw if isinstance(raw, (tuple, list)) else (raw,)
    for item in items:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise _err(owner, name, f"must be exception classes, got {item!r}")
    return tuple(items)


def _optional_flag(owner: str, name: str, raw: Any) -> bool | None:
    if raw is None or isinstance(raw, bool):
        return raw
    raise _err(owner, name, f"must be True, False or None, got {raw!r}")


def _count(owner: str, name: str, raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise _err(owner, name, f"must be a whole number >= 0, got {raw!r}")
    return raw


def _budget(owner: str, name: str, raw: Any) -> Any:
    return parse_retry_budget(owner, name, raw)


def _pool(owner: str, name: str, raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise _err(owner, name, f"must be a whole number >= 1, got {raw!r}")
    return raw


def _string(*, optional: bool = False) -> Callable[[str, str, Any], Any]:
    def parse(owner: str, name: str, raw: Any) -> str | None:
        if raw is None and optional:
            return None
        if not isinstance(raw, str) or not raw:
            raise _err(owner, name, f"must be a non-empty string, got {raw!r}")
        return raw

    return parse


def _prefix(owner: str, name: str, raw: Any) -> str:
    value = str(_string()(owner, name, raw))
    if any(c in value for c in "{}\x00 ") or len(value) > 64:
        raise _err(owner, name, f"must be at most 64 characters without braces or spaces: {raw!r}")
    return value


TASK_OPTIONS: dict[str, Option] = {
    o.name: o
    for o in (
        Option(
            "lock",
            None,
            "template or callable",
            "Resource the task locks while it runs. A format template over the task's bound "
            'arguments (``"order:{order_id}"``) or a callable that receives the bound '
            "arguments as one mapping and returns the resource name. ``None`` means no lock.",
            _lock_spec,
        ),
        Option(
            "lock_ttl",
            30.0,
            "seconds",
            "Lease time of the lock. A heartbeat renews it about every ``lock_ttl / 3`` while "
            "the task runs; if the worker dies, the lock frees itself at most this long after "
            "the last renewal. The holder's ``self.lock_lost`` turns true 1 % + 50 ms before "
            "``lock_ttl`` has passed since the last renewal Redis confirmed.",
            _seconds(),
        ),
        Option(
            "lock_contention",
            "defer",
            "one of defer, skip, fail",
            'What a task does when its lock is held by another execution: ``"defer"`` '
            're-publishes it with a jittered countdown (no retry consumed), ``"skip"`` drops '
            'it and stores the result state ``SKIPPED``, ``"fail"`` raises ``LockNotAcquired``.',
            _choice(_CONTENTION),
        ),
        Option(
            "lock_label",
            None,
            "template or callable",
            "What ``celery reliable locks`` shows for this task's lock (at most 60 characters "
            "are kept, with the lease). ``None`` shows the ``lock`` template itself, argument "
            "names and not their values (a callable ``lock``: its name), since a formatted "
            "resource may carry a secret. A template over the bound arguments "
            '(``"order {order_id}"``) or a callable receiving them shows those values, '
            "readable in Redis: name only arguments that are not secret.",
            _lock_spec,
        ),
        Option(
            "idempotency_key",
            None,
            "template, callable or True",
            "Makes the task's effect happen once per key. A format template over the bound "
            'arguments (``"charge:{order_id}"``), a callable receiving them as one mapping, or '
            "``True`` for the task name plus the canonical JSON of all arguments. A producer "
            'may pass the key per call instead: ``apply_async(headers={"idempotency_key": '
            "k})``. Duplicates replay the stored result; the same key with other arguments "
            "raises ``IdempotencyKeyMismatch``.",
            _idempotency_spec,
        ),
        Option(
            "idempotency_ttl",
            24 * 3600.0,
            "seconds",
            "How long a finished record (result, or a kept failure) is kept and replayed.",
            _seconds(),
        ),
        Option(
            "idempotency_lease",
            30.0,
            "seconds",
            "Lease of an execution in progress, renewed by the heartbeat about every "
            "``idempotency_lease / 3``. Duplicates arriving meanwhile are deferred; if the "
            "worker dies, one duplicate takes over at most this long after the last renewal.",
            _seconds(),
        ),
        Option(
            "idempotency_keep_failures",
            False,
            "bool",
            "Keep terminal failures: a duplicate of a task that raised (not retried) raises "
            "``ReplayedFailure`` instead of running again. Off by default: a later delivery "
            "may run.",
            _flag,
        ),
        Option(
            "rate_limit_key",
            None,
            "template or callable",
            "A token bucket per key on top of the queue's (per-tenant quotas): a format "
            'template over the bound arguments (``"tenant:{tenant_id}"``) or a callable '
            "receiving them as one mapping. Needs ``rate_limit_key_spec``. Buckets are shared "
            "by every task that uses the same key.",
            _lock_spec,
        ),
        Option(
            "rate_limit_key_spec",
            None,
            'rate such as "10/s", or {rate, burst}',
            'The bucket of ``rate_limit_key``: ``"10/s"``, ``"300/m"``, ``"1000/h"``, or '
            '``{"rate": 25, "burst": 50}`` (rate in tokens per second); burst defaults to '
            "max(1, rate per second).",
            lambda owner, name, raw: raw,  # parsed with the key in build_policy
        ),
        Option(
            "rate_cost",
            1.0,
            "tokens",
            "Tokens one execution takes from each of its buckets (queue and key).",
            _seconds(),
        ),
        # -- guard W, the sliding window (celery_reliable/guards/window.py)
        Option(
            "rate_limit_window",
            None,
            'limit such as "1000/d"',
            "A sliding-window limit: at most N executions start in any window (strict "
            'quotas): ``"60/m"``, ``"1000/d"``, ``"10/s"``, ``"100/h"``, ``"20/10s"`` '
            "(N admissions per window of s, m, h or d). Per ``rate_limit_window_key``, or "
            "per task name without it. A refused task is deferred to when a slot frees "
            "(capped by the redelivery window), without consuming a retry.",
            lambda owner, name, raw: raw,  # parsed with its key and mode in build_policy
        ),
        Option(
            "rate_limit_window_key",
            None,
            "template or callable",
            "The key of ``rate_limit_window`` (per-tenant quotas): a format template over "
            'the bound arguments (``"tenant:{tenant_id}"``) or a callable receiving them as '
            "one mapping. Windows are shared by every task that uses the same key.",
            _lock_spec,
        ),
        Option(
            "rate_limit_window_mode",
            "exact",
            "exact or approximate",
            "``exact``: a log of admissions (a sorted set of up to N entries per key), never "
            "more than N in any window. ``approximate``: two counters per key (O(1) memory), "
            "at most floor(N * (1 + d / w)) in any interval d <= the window w (up to 2N in "
            "a whole window when the previous one's admissions came at its very end).",
            _window.parse_mode,
        ),
        Option(
            "bulkhead",
            None,
            "tier name",
            'Bulkhead tier whose fleet-wide slot the task holds while it runs (``"critical"``, '
            '``"standard"``, ``"optional"`` or one defined in ``reliable_bulkheads``).',
            _string(optional=True),
        ),
        Option(
            "backoff",
            None,
            "Backoff policy",
            "Retry delays: ``Backoff.exponential(base=2, cap=60, jitter=\"full\")`` or a preset "
            "(``Backoff.user_facing()``, ``.background()``, ``.rate_limited_api()``). With it, "
            "retryable failures (connection errors, timeouts, HTTP 408/429/5xx, plus "
            "``retry_for`` and ``autoretry_for``) are retried automatically, and every "
            "``self.retry()`` without a countdown waits the policy's delay (floored by a "
            "``Retry-After`` header). ``max_attempts`` and ``deadline`` bound the retries.",
            _backoff,
        ),
        Option(
            "retry_for",
            (),
            "exception classes",
            "Exceptions retried besides the transient ones (with ``backoff``).",
            _exception_types,
        ),
        Option(
            "retry_budget",
            None,
            "RetryBudget, rate, False or None",
            "Fleet-wide retry budget of this task: past it, a failure is dead-lettered "
            "instead of retried (this stops retry storms). ``RetryBudget(ratio=0.2, "
            "min_per_second=10, ttl=10)`` or ``{\"ratio\": 0.2, \"min_per_second\": 10, "
            "\"ttl\": 10}``: retries may be ``ratio`` of the task's first executions in the "
            "last ``ttl`` seconds plus ``min_per_second`` (Finagle's retry budget). A rate "
            "(``\"10/s\"`` or ``{\"rate\": 10, \"burst\": 10}``): an absolute token bucket of "
            "retries. ``None`` uses ``reliable_retry_budget``; ``False`` disables the budget.",
            _budget,
        ),
        Option(
            "dead_letter",
            None,
            "bool or None",
            "Record terminal failures in the PostgreSQL dead-letter table. ``None``: when "
            "``reliable_database_url`` is set.",
            _optional_flag,
        ),
        Option(
            "max_redeliveries",
            3,
            "deliveries",
            "With ``acks_late``: how many times a task whose worker died while running it "
            "(kill -9, out of memory) is redelivered; the next delivery is dead-lettered with "
            "reason \"worker lost\" instead of killing another worker.",
            _count,
        ),
        Option(
            "circuit_breaker",
            None,
            "breaker name",
            "Circuit breaker shared by every worker (configured in "
            "``reliable_circuit_breakers``). While open, the task is deferred, not run.",
            _string(optional=True),
        ),
        Option(
            "defer_delay",
            1.0,
            "seconds",
            "Base countdown of a deferral. The n-th consecutive deferral of one task waits a "
            "random time in ``[d/2, d]`` with ``d = min(defer_max_delay, defer_delay * 2**n)``, "
            "or the guard's own retry-after when that is sooner. A circuit breaker's refusal "
            "uses the breaker's own time instead (when it half-opens, or after as long as its "
            "probes have been out), never this growth.",
            _seconds(),
        ),
        Option(
            "defer_max_delay",
            30.0,
            "seconds",
            "Cap on a single deferral's countdown.",
            _seconds(),
        ),
    )
}


SETTINGS: dict[str, Option] = {
    o.name: o
    for o in (
        Option(
            "reliable_redis_url",
            "redis://127.0.0.1:6379/0",
            "URL",
            "Redis server holding locks, fencing counters and leases. Connections are opened "
            "per worker process, after the fork.",
            _string(),
        ),
        Option(
            "reliable_redis_socket_timeout",
            10.0,
            "seconds",
            "Socket timeout of celery-reliable's Redis connections: a call whose reply has not "
            "come back by then fails. An admission that fails so (its reply may be lost after "
            "it ran) is never resent: what it may have taken is undone, owner-checked, and the "
            "task is deferred. Keep it well above Redis' slowest expected reply; it also bounds "
            "how long a worker waits on a stalled link.",
            _seconds(),
        ),
        Option(
            "reliable_database_url",
            None,
            "URL",
            "PostgreSQL database for durable records (SQLAlchemy URL; ``postgresql://`` is "
            "read as ``postgresql+psycopg://``). Needed by idempotency and the fencing helpers "
            "that take no explicit connection.",
            _string(optional=True),
        ),
        Option(
            "reliable_idempotency_store",
            "postgres",
            "one of postgres, redis",
            "Where idempotency records are durable. ``postgres`` (default): each first "
            "execution holds one PostgreSQL transaction, committed with the result; a Redis "
            "miss consults PostgreSQL. ``redis``: records live in Redis only, which is faster "
            "but loses them (and may run a key again) if Redis loses data: use it only with "
            "a persistent Redis (AOF ``appendfsync always`` or ``everysec`` with its window).",
            _choice(("postgres", "redis")),
        ),
        Option(
            "reliable_django_database",
            None,
            "Django database alias",
            "Keep each first execution's idempotency record on Django's connection for this "
            "alias (``\"default\"``) instead of celery-reliable's own pool: the record, the "
            "task body's ORM writes on that alias (``idempotent_transaction()`` is a "
            "``transaction.atomic`` block) and the result commit in one transaction. Needs "
            "``celery_reliable.contrib.django``, and ``reliable_database_url`` on the same "
            "database (``database_url_from_django(alias)``); a task refuses to run otherwise.",
            _string(optional=True),
        ),
        Option(
            "reliable_database_pool_size",
            10,
            "connections",
            "Connections per worker process in celery-reliable's PostgreSQL pool (as many "
            "again may overflow). Each running idempotent task holds one for its whole run: "
            "keep it at least the worker's concurrency per process (threads, gevent).",
            lambda owner, name, raw: _pool(owner, name, raw),
        ),
        Option(
            "reliable_database_lock_timeout",
            5.0,
            "seconds",
            "PostgreSQL ``lock_timeout`` of celery-reliable's connections (also inside "
            "``idempotent_transaction``): a duplicate blocked by a stalled execution's "
            "uncommitted record gives up after this long and is deferred. Not the server's "
            "``idle_in_transaction_session_timeout``: that one must exceed the longest "
            "idempotent body (the transaction stays open while it runs), or the task fails "
            "with 25P03.",
            _seconds(),
        ),
        Option(
            "reliable_create_tables",
            True,
            "bool",
            "Create celery-reliable's PostgreSQL tables that do not exist yet when a worker "
            "process first needs them (one short transaction under an advisory lock: safe when "
            "many workers start at once; tables that exist are left alone). ``False``: you "
            "create them (``celery -A proj reliable migrate``, or your own migrations with "
            "``celery_reliable.metadata``), and a task that finds one missing fails at once "
            "with a ``ConfigurationError`` naming that command.",
            _flag,
        ),
        Option(
            "reliable_queue_rate_limits",
            None,
            "queue → rate",
            'Fleet-wide token bucket per queue: ``{"emails": "50/s", "stripe": '
            '{"rate": 25, "burst": 50}}``. Every ReliableTask taken from the queue (by '
            "its message's routing key) draws ``rate_cost`` tokens; a denied task is deferred "
            "by the bucket's retry-after plus jitter, without consuming a retry.",
            parse_queue_limits,
        ),
        Option(  # guard W (celery_reliable/guards/window.py)
            "reliable_queue_window_limits",
            None,
            "queue → limit",
            'Fleet-wide sliding window per queue: ``{"reports": "1000/d", "exports": '
            '{"limit": "60/m", "mode": "approximate"}}`` (see ``rate_limit_window`` and '
            "``rate_limit_window_mode``; mode exact by default). Every ReliableTask taken from "
            "the queue counts once; a refused task is deferred to when a slot frees.",
            _window.parse_queue_windows,
        ),
        Option(
            "reliable_bulkheads",
            None,
            "tier → {concurrent, queue, timeout, policy, lease}",
            "Bulkhead tiers, merged over the defaults critical 5/10/180 s (wait), standard "
            "8/12/120 s (wait), optional 4/6/60 s (drop); lease 30 s. ``concurrent`` slots "
            "fleet-wide, ``queue`` tasks waiting at most, each for ``timeout`` seconds; "
            "``policy`` wait|drop|fail. Environment variables "
            "``RELIABLE_BULKHEAD_<TIER>_CONCURRENT``/``_QUEUE``/``_TIMEOUT`` override.",
            parse_bulkheads,
        ),
        Option(
            "reliable_retry_budget",
            RetryBudget(),
            "RetryBudget, rate or None",
            "Default fleet-wide retry budget per task name (see the task option "
            "``retry_budget``): 20 % of the task's first executions in the last 10 s plus "
            "10 retries/s, so a burst of fresh failures is retried (100 at once, more with "
            "traffic) and a sustained storm is held to about 1.2 times the traffic plus 10/s. "
            "The absolute ``\"10/s\"`` of earlier versions is still accepted. ``None`` "
            "disables it.",
            _budget,
        ),
        Option(
            "reliable_dead_letter_queue",
            None,
            "queue name",
            "Also publish each dead-lettered task to this queue (same task name, arguments "
            "and headers, plus a ``reliable_dead_letter`` header), for consumers of your own.",
            _string(optional=True),
        ),
        Option(
            "reliable_circuit_breakers",
            None,
            "name → thresholds",
            "Circuit breakers: ``{\"payments-api\": {\"failure_threshold\": 5, \"window\": 10, "
            "\"min_calls\": 5, \"open_seconds\": 30, \"success_threshold\": 2, "
            "\"half_open_max\": 2, \"slow_call_seconds\": None, \"probe_lease\": 60}}`` "
            "(these are the defaults).",
            parse_breakers,
        ),
        Option(
            "reliable_redelivery_window",
            None,
            "seconds",
            "How long the broker lets a worker hold an unacknowledged message before it "
            "redelivers it. ``None`` derives it from the broker settings: Redis and SQS "
            "transports ``broker_transport_options[\"visibility_timeout\"]`` (kombu's "
            "defaults 3600 s and 1800 s), AMQP (RabbitMQ) 1800 s, the default "
            "``consumer_timeout``; other transports: unknown, no cap. Set it for RabbitMQ "
            "servers with another ``consumer_timeout`` and for other transports; with Redis "
            "or SQS it may only shorten the window. No countdown "
            "celery-reliable sets (deferral, bucket slot, breaker wait, backoff delay, and "
            "Celery's own ``default_retry_delay`` and ``autoretry_for`` ``retry_backoff`` "
            "delays) exceeds this window minus 10% (at least 5 s); a countdown the caller "
            "wrote (``self.retry(countdown=...)``, ``eta``, ``retry_kwargs``) beyond it is "
            "kept and logged as a warning.",
            _seconds(optional=True),
        ),
        Option(
            "reliable_key_prefix",
            "reliable",
            "string",
            "Prefix of every Redis key. All keys of one prefix share the Redis Cluster hash "
            "tag ``{prefix}``, so one Lua script may touch any of them.",
            _prefix,
        ),
    )
}


@dataclass(frozen=True)
class ReliableSettings:
    """The ``reliable_*`` settings of one app, validated."""

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
    queue_window_limits: Mapping[str, _window.WindowSpec] = field(default_factory=dict)
    bulkheads: Mapping[str, TierSpec] = field(default_factory=dict)
    retry_budget: BucketSpec | RetryBudget | None = None
    dead_letter_queue: str | None = None
    circuit_breakers: Mapping[str, BreakerSpec] = field(default_factory=dict)
    #: The broker's redelivery window, seconds (set or derived); None: unknown.
    redelivery_window: float | None = None

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
        values = {
            name: opt.value(owner, conf.get(name, opt.default)) for name, opt in SETTINGS.items()
        }
        if (values["reliable_django_database"] is not None
                and values["reliable_idempotency_store"] != "postgres"):
            raise ConfigurationError(
                f"{owner}: reliable_django_database needs reliable_idempotency_store='postgres' "
                "(records kept in Redis only have no transaction to share with the ORM)"
            )
        if values["reliable_django_database"] is not None:
            # Imported now, in the thread that binds the task, rather than on the first
            # task's first use, inside a pool thread: CPython 3.11 keeps its AST depth
            # counter in state shared between threads, so an import through pytest's
            # assertion rewriter (it rewrites every module of a pytest11 plugin's package)
            # racing another thread's ast.parse (Celery formatting a deferral's traceback)
            # fails with "AST constructor recursion depth mismatch" (seen in test_django).
            # Without Django installed the task refuses to run later, as before.
            with contextlib.suppress(ImportError):
                importlib.import_module("celery_reliable.contrib.django.record")
        return cls(
            redis_url=values["reliable_redis_url"],
            redis_socket_timeout=values["reliable_redis_socket_timeout"],
            database_url=values["reliable_database_url"],
            key_prefix=values["reliable_key_prefix"],
            idempotency_store=values["reliable_idempotency_store"],
            django_database=values["reliable_django_database"],
            database_lock_timeout=values["reliable_database_lock_timeout"],
            database_pool_size=values["reliable_database_pool_size"],
            create_tables=values["reliable_create_tables"],
            queue_rate_limits=values["reliable_queue_rate_limits"],
            queue_window_limits=values["reliable_queue_window_limits"],
            bulkheads=values["reliable_bulkheads"],
            retry_budget=values["reliable_retry_budget"],
            dead_letter_queue=values["reliable_dead_letter_queue"],
            circuit_breakers=values["reliable_circuit_breakers"],
            redelivery_window=redelivery_window(conf, values["reliable_redelivery_window"]),
        )


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


@dataclass(frozen=True)
class LockPolicy:
    """How one task locks its resource."""

    spec: str | Callable[[Mapping[str, Any]], str]
    ttl: float
    contention: Contention
    label_spec: str | Callable[[Mapping[str, Any]], str] | None = None  # option lock_label

    def resource(self, task_name: str, arguments: Mapping[str, Any]) -> str:
        """The resource name for one call; raises ConfigurationError if it cannot be built."""
        return render(self.spec, task_name, "lock", arguments)

    def label(self, task_name: str, arguments: Mapping[str, Any]) -> str:
        """What ``reliable locks`` shows for one call (kept with the lease)."""
        if self.label_spec is None:
            return self.default_label
        return render(self.label_spec, task_name, "lock_label", arguments)

    @functools.cached_property
    def default_label(self) -> str:
        """Without ``lock_label``: the ``lock`` template, or a callable's name.

        Argument names, never their values: a formatted resource is user data
        (an e-mail address, a token) and would sit readable in Redis and on screen.
        """
        if callable(self.spec):
            name = getattr(self.spec, "__qualname__", type(self.spec).__name__)
            return f"{name.rsplit('<locals>.', 1)[-1]}(...)"  # "f.<locals>.g": "g"
        return self.spec


@dataclass(frozen=True)
class IdempotencyPolicy:
    """How one task derives and keeps its idempotency key."""

    spec: Any  # template str, callable, True, or None (header keys only)
    ttl: float
    lease: float
    keep_failures: bool

    def key(
        self, task_name: str, arguments: Mapping[str, Any], header: Any, fingerprint: str
    ) -> str | None:
        """The key for one call: the header's if given, else the option's; None if neither."""
        if header is not None:
            if not isinstance(header, str) or not header:
                raise ConfigurationError(
                    f"{task_name}: header 'idempotency_key' must be a non-empty string, "
                    f"got {header!r}"
                )
            return header
        if self.spec is None:
            return None
        if self.spec is True:
            return fingerprint
        return render(self.spec, task_name, "idempotency_key", arguments)


@dataclass(frozen=True)
class KeyBucketPolicy:
    """A per-key token bucket (``rate_limit_key`` + ``rate_limit_key_spec``)."""

    spec: Any  # template str or callable
    bucket: BucketSpec

    def key(self, task_name: str, arguments: Mapping[str, Any]) -> str:
        return render(self.spec, task_name, "rate_limit_key", arguments)


@dataclass(frozen=True)
class DeferPolicy:
    """Countdown of deferrals (a guard said "not now")."""

    delay: float
    max_delay: float
    #: No countdown exceeds this (the broker's redelivery window less a margin), seconds.
    cap: float | None = None

    def countdown(
        self,
        deferrals: int,
        rand: float,
        *,
        not_after: float | None = None,
        not_before: float | None = None,
        scheduled: float | None = None,
        due: float | None = None,
    ) -> float:
        """Seconds until the next attempt after ``deferrals`` earlier deferrals.

        ``rand`` is uniform in [0, 1). The base is equal jitter,
        ``d/2 + rand * d/2`` with ``d = min(max_delay, delay * 2**deferrals)``;
        ``not_after`` (e.g. when the blocking lock expires) caps it, and
        ``not_before`` (e.g. a bucket's retry-after) floors it, jittered by up to
        20% so deferred tasks do not return in lockstep. ``scheduled`` (a token
        bucket's place in its queue of refused tasks) replaces all of that: the
        task comes back then, up to 5% (at most 1 s) later. Whatever the
        guard asked, the result never exceeds ``cap``: a task whose turn is
        further away comes back at the cap and is deferred again.
        ``due`` (a circuit breaker's own time: when it half-opens, or when its
        probes are worth asking again) also replaces the deferral growth: the
        task comes back ``due`` to ``1.2 * due`` seconds later, however often
        it was deferred before.
        """
        if due is not None:
            wait: float = max(0.0, due) * (1 + 0.2 * rand)
        elif scheduled is not None:
            wait = max(0.0, scheduled)
            wait += min(0.05 * wait, 1.0) * rand
        else:
            d = min(self.max_delay, self.delay * (2.0 ** min(deferrals, 30)))
            wait = d / 2 + rand * d / 2
            if not_after is not None and not_after >= 0:
                wait = min(wait, not_after + 0.05 * rand)
            if not_before is not None and not_before > 0:
                wait = max(wait, not_before * (1 + 0.2 * rand))
        return wait if self.cap is None else min(wait, self.cap)


@dataclass(frozen=True)
class TaskPolicy:
    """Everything celery-reliable enforces for one task, validated at bind."""

    task_name: str
    lock: LockPolicy | None
    idempotency: IdempotencyPolicy
    key_bucket: KeyBucketPolicy | None
    rate_cost: float
    bulkhead: str | None
    tier: TierSpec | None
    backoff: Backoff | None
    retry_for: tuple[type[BaseException], ...]
    retry_budget: BucketSpec | RetryBudget | None
    dead_letter: bool
    max_redeliveries: int
    circuit_breaker: str | None
    breaker: BreakerSpec | None
    defer: DeferPolicy
    parameters: tuple[str, ...]
    takes_var_kwargs: bool
    signature: inspect.Signature | None
    window: _window.WindowPolicy | None = None  # guard W
    #: The app has queue windows (reliable_queue_window_limits): look at each delivery's queue.
    queue_windows: bool = False

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

    @property
    def guarded(self) -> bool:
        """True if any task-level guard is configured (queue buckets come per delivery)."""
        return (self.lock is not None or self.idempotency.spec is not None
                or self.key_bucket is not None or self.bulkhead is not None
                or self.circuit_breaker is not None or self.window is not None)


# Names that are ours in spirit: an attribute starting with one of these that
# is not a registered option is most likely a typo.
_OUR_PREFIXES = (
    "lock",
    "defer",
    "fence",
    "reliable",
    "idempotency",
    "bulkhead",
    "rate_cost",
    "rate_limit_key",
    "rate_limit_window",
    "backoff",
    "circuit",
    "retry_budget",
    "max_redeliveries",
)


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


def build_policy(
    task_name: str,
    values: Mapping[str, Any],
    signature: inspect.Signature | None,
    settings: ReliableSettings | None = None,
) -> TaskPolicy:
    """Validate every option of one task and return its policy."""
    opts = {
        name: opt.value(task_name, values.get(name, opt.default))
        for name, opt in TASK_OPTIONS.items()
    }
    params: tuple[str, ...] = ()
    var_kw = True
    if signature is not None:
        params = tuple(
            p.name
            for p in signature.parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        )
        var_kw = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    for option in ("lock", "lock_label", "idempotency_key", "rate_limit_key",
                   "rate_limit_window_key"):
        spec = opts[option]
        if isinstance(spec, str) and not var_kw:
            for field_name in template_fields(task_name, spec, option):
                if field_name not in params:
                    raise ConfigurationError(
                        f"{task_name}: option {option!r} template {spec!r} names argument "
                        f"{field_name!r}, which the task does not take "
                        f"(its arguments: {', '.join(params) or 'none'})"
                    )
    lock = None
    if opts["lock"] is not None:
        spec = opts["lock"]
        lock = LockPolicy(spec=spec, ttl=opts["lock_ttl"], contention=opts["lock_contention"],
                          label_spec=opts["lock_label"])
    elif opts["lock_label"] is not None:
        raise ConfigurationError(f"{task_name}: option 'lock_label' is set but 'lock' is not")
    if opts["defer_max_delay"] < opts["defer_delay"]:
        raise ConfigurationError(
            f"{task_name}: option 'defer_max_delay' ({opts['defer_max_delay']}) must be >= "
            f"'defer_delay' ({opts['defer_delay']})"
        )
    key_bucket = None
    if opts["rate_limit_key"] is not None:
        if opts["rate_limit_key_spec"] is None:
            raise ConfigurationError(
                f"{task_name}: option 'rate_limit_key' needs 'rate_limit_key_spec' (e.g. \"10/s\")"
            )
        bucket = parse_bucket(
            f"{task_name}: option 'rate_limit_key_spec'", opts["rate_limit_key_spec"]
        )
        if opts["rate_cost"] > bucket.burst:
            raise ConfigurationError(
                f"{task_name}: option 'rate_cost' ({opts['rate_cost']}) exceeds the "
                f"'rate_limit_key_spec' burst ({bucket.burst}); the task could never run"
            )
        key_bucket = KeyBucketPolicy(spec=opts["rate_limit_key"], bucket=bucket)
    elif opts["rate_limit_key_spec"] is not None:
        raise ConfigurationError(
            f"{task_name}: option 'rate_limit_key_spec' is set but 'rate_limit_key' is not"
        )
    tier = None
    if opts["bulkhead"] is not None and settings is not None:
        tier = settings.bulkheads.get(opts["bulkhead"])
        if tier is None:
            raise ConfigurationError(
                f"{task_name}: option 'bulkhead' names tier {opts['bulkhead']!r}, which is not "
                f"configured (tiers: {', '.join(sorted(settings.bulkheads))}; define it in "
                "reliable_bulkheads)"
            )
    if opts["idempotency_ttl"] < opts["idempotency_lease"]:
        raise ConfigurationError(
            f"{task_name}: option 'idempotency_ttl' ({opts['idempotency_ttl']}) must be >= "
            f"'idempotency_lease' ({opts['idempotency_lease']})"
        )
    if (opts["idempotency_key"] is not None and settings is not None
            and settings.idempotency_store == "postgres" and not settings.database_url):
        raise ConfigurationError(
            f"{task_name}: option 'idempotency_key' needs 'reliable_database_url' (durable "
            "records), or reliable_idempotency_store='redis' (Redis only, weaker)"
        )
    breaker = None
    if opts["circuit_breaker"] is not None and settings is not None:
        breaker = settings.circuit_breakers.get(opts["circuit_breaker"])
        if breaker is None:
            raise ConfigurationError(
                f"{task_name}: option 'circuit_breaker' names {opts['circuit_breaker']!r}, "
                "which is not configured in reliable_circuit_breakers "
                f"(configured: {', '.join(sorted(settings.circuit_breakers)) or 'none'})"
            )
    budget = opts["retry_budget"]
    if budget is None and settings is not None:
        budget = settings.retry_budget
    dead_letter = opts["dead_letter"]
    if dead_letter is None:
        dead_letter = bool(settings is not None and settings.database_url)
    return TaskPolicy(
        task_name=task_name,
        lock=lock,
        backoff=opts["backoff"],
        retry_for=opts["retry_for"],
        retry_budget=budget or None,
        dead_letter=dead_letter,
        max_redeliveries=opts["max_redeliveries"],
        circuit_breaker=opts["circuit_breaker"],
        breaker=breaker,
        key_bucket=key_bucket,
        rate_cost=opts["rate_cost"],
        bulkhead=opts["bulkhead"],
        tier=tier,
        idempotency=IdempotencyPolicy(
            spec=opts["idempotency_key"],
            ttl=opts["idempotency_ttl"],
            lease=opts["idempotency_lease"],
            keep_failures=opts["idempotency_keep_failures"],
        ),
        defer=DeferPolicy(delay=opts["defer_delay"], max_delay=opts["defer_max_delay"],
                          cap=settings.countdown_cap if settings is not None else None),
        parameters=params,
        takes_var_kwargs=var_kw,
        signature=signature,
        window=_window.policy(task_name, opts),
        queue_windows=bool(settings is not None and settings.queue_window_limits),
    )


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
