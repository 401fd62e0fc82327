"""Guard ``I``: the idempotency record of one call, in Redis (``idempotency.lua``).

The durable side (PostgreSQL) is ``celery_reliable.idempotency``. Options
``idempotency_*``, settings ``reliable_idempotency_store`` and ``reliable_django_database``
(:data:`CONFIG`); ``TaskPolicy.idempotency`` is an :class:`IdempotencyPolicy`.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import metrics
from ..errors import ConfigurationError
from ..keys import idempotency_digest
from ..options import Option, OptionSet, choice, flag, render, seconds, template_spec, text
from .base import Guard, Hooks, ms, register

if TYPE_CHECKING:
    from ..admission import Outcome, Plan, Release
    from ..config import ReliableSettings


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


def _key_spec(owner: str, name: str, raw: Any) -> Any:
    if raw is None or raw is True or callable(raw):
        return raw
    if raw is False:
        return None
    return template_spec(owner, name, raw)


def policy_part(task_name: str, opts: Mapping[str, Any],
                settings: ReliableSettings | None) -> dict[str, Any]:
    """``TaskPolicy.idempotency`` (its ``spec`` is None without the option)."""
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
    return {"idempotency": IdempotencyPolicy(
        spec=opts["idempotency_key"],
        ttl=opts["idempotency_ttl"],
        lease=opts["idempotency_lease"],
        keep_failures=opts["idempotency_keep_failures"],
    )}


def check_settings(owner: str, values: Mapping[str, Any]) -> None:
    """``reliable_django_database`` needs the PostgreSQL store (and imports its record)."""
    if values["reliable_django_database"] is None:
        return
    if values["reliable_idempotency_store"] != "postgres":
        raise ConfigurationError(
            f"{owner}: reliable_django_database needs reliable_idempotency_store='postgres' "
            "(records kept in Redis only have no transaction to share with the ORM)"
        )
    # Imported now, in the thread that binds the task, rather than on the first
    # task's first use, inside a pool thread: CPython 3.11 keeps its AST depth
    # counter in state shared between threads, so an import through pytest's
    # assertion rewriter (it rewrites every module of a pytest11 plugin's package)
    # racing another thread's ast.parse (Celery formatting a deferral's traceback)
    # fails with "AST constructor recursion depth mismatch" (seen in test_django).
    # Without Django installed the task refuses to run later, as before.
    with contextlib.suppress(ImportError):
        importlib.import_module("celery_reliable.contrib.django.record")


CONFIG = OptionSet(
    name="idempotency",
    options=(
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
            _key_spec,
            template=True,
        ),
        Option(
            "idempotency_ttl",
            24 * 3600.0,
            "seconds",
            "How long a finished record (result, or a kept failure) is kept and replayed.",
            seconds(),
        ),
        Option(
            "idempotency_lease",
            30.0,
            "seconds",
            "Lease of an execution in progress, renewed by the heartbeat about every "
            "``idempotency_lease / 3``. Duplicates arriving meanwhile are deferred; if the "
            "worker dies, one duplicate takes over at most this long after the last renewal.",
            seconds(),
        ),
        Option(
            "idempotency_keep_failures",
            False,
            "bool",
            "Keep terminal failures: a duplicate of a task that raised (not retried) raises "
            "``ReplayedFailure`` instead of running again. Off by default: a later delivery "
            "may run.",
            flag,
        ),
    ),
    settings=(
        Option(
            "reliable_idempotency_store",
            "postgres",
            "one of postgres, redis",
            "Where idempotency records are durable. ``postgres`` (default): each first "
            "execution holds one PostgreSQL transaction, committed with the result; a Redis "
            "miss consults PostgreSQL. ``redis``: records live in Redis only, which is faster "
            "but loses them (and may run a key again) if Redis loses data: use it only with "
            "a persistent Redis (AOF ``appendfsync always`` or ``everysec`` with its window).",
            choice(("postgres", "redis")),
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
            text(optional=True),
        ),
    ),
    build=policy_part,
    prefixes=("idempotency",),
    guards=lambda part: part["idempotency"].spec is not None,
    fields=True,
    check_settings=check_settings,
)

GUARD = Guard("I", "idempotency", admit=(1, 4), complete=(1, 4))

#: This guard's metrics (exported by ``celery_reliable.prometheus``); replays are
#: counted by the pipeline (``pipeline.complete``).
METRICS: tuple[metrics.MetricSpec, ...] = (
    metrics.MetricSpec("reliable_idempotent_replays_total", "counter",
                       "Duplicate executions answered from the idempotency record instead of "
                       "running."),
    metrics.MetricSpec("reliable_idempotency_lease_lost_total", "counter",
                       "Executions that finished after their idempotency lease was lost "
                       "(expired or taken over): a duplicate may have run too (always, with "
                       "the Redis-only store).", ("task",)),
)


def plan(plan: Plan, key: str, fingerprint: str, owner: str, lease: float, ttl: float) -> int:
    """Claim the record ``key`` for ``lease`` seconds; returns its index in ``plan``.

    Put it first in the plan: a finished record replays even when other
    guards (a busy lock, an empty bucket) would have refused.
    """
    return plan.add(GUARD, [key], [fingerprint, owner, ms(lease), ms(ttl)], undo=(key, owner),
                    lease=lease)


def release(release: Release, key: str, owner: str, ttl: float) -> None:
    """Settle the record at completion; forgotten (``X``) unless :func:`settle` says."""
    release.add(GUARD, [key], [owner, "X", "", ms(ttl)])


def settle(release: Release, outcome: str, payload: str) -> None:
    """``S`` with result JSON, ``F`` with error JSON, or ``X`` (forget)."""
    for args in release.entries(GUARD):
        args[1], args[2] = outcome, payload


# ------------------------------------------------------------- pipeline hooks


class _Hooks(Hooks):
    """The record in the task pipeline: first in the plan, a lease, replays and mismatches."""

    order = 10
    reports_overrun = True

    def outcome(self, code: int, index: int, kind: str, reply: list[Any]) -> Outcome:
        from ..admission import Mismatch, Replay, text

        if code == 2:  # finished: replay its state (S/F) and payload
            return Replay(index, text(reply[2]), text(reply[3]))
        if code == 3:  # recorded with another fingerprint
            return Mismatch(index)
        return super().outcome(code, index, kind, reply)

    def plan(self, call: Any, plan_: Plan, execution: Any, arguments: dict[str, Any]) -> None:
        idem = call.policy.idempotency
        if idem.spec is None and call.header_key is None:
            return
        fp = execution.fingerprint = call.fingerprint(arguments)
        key = idem.key(call.name, arguments, call.header_key, fp)
        assert key is not None
        execution.idem_digest = idempotency_digest(call.name, key)
        plan(plan_, call.runtime.keys.idempotency(call.name, key), fp, execution.owner,
             idem.lease, idem.ttl)

    def hold(self, call: Any, plan: Plan, index: int, result: int, execution: Any,
             started: float) -> None:
        idem = call.policy.idempotency
        key = plan.keys[plan.offsets[index]]
        execution.leases.append(call.lease("I", key, execution.owner, idem.lease, started,
                                           "idempotency lease"))
        release(execution.release, key, execution.owner, idem.ttl)

    def refused(self, call: Any, outcome: Any, plan: Plan, execution: Any) -> Any:
        from ..admission import Mismatch, Replay
        from ..errors import IdempotencyKeyMismatch

        if isinstance(outcome, Replay):
            return outcome
        if isinstance(outcome, Mismatch):
            assert execution.idem_digest is not None
            raise IdempotencyKeyMismatch(call.name, execution.idem_digest)
        # A twin is executing this key right now: wait for its result.
        call.defer("duplicate in progress", not_after=outcome.retry_after,
                   guard="idempotency_key")
        return None

    def admitted(self, call: Any, execution: Any) -> bool:
        if call.runtime.settings.idempotency_store != "postgres":
            return True  # the record is Redis': admission opened it
        from .durable import claim_durably

        return claim_durably(call, execution)

    def finish(self, call: Any, execution: Any, result: Any,
               failure: BaseException | None) -> bool:
        from .durable import finish

        finish(call, execution, result, failure)
        return True

    def abandon(self, call: Any, execution: Any) -> None:
        if execution.pg is not None:
            execution.pg.abandon()

    def settled(self, call: Any, execution: Any, result: int) -> bool:
        if result:
            return False
        from ..pipeline.headers import log

        # The lease expired while this execution ran (a stalled worker, a
        # heartbeat that could not reach Redis): a duplicate may have
        # taken the key over and run the body too. With the Redis-only
        # store nothing else prevents that; with PostgreSQL the duplicate
        # waited on this execution's uncommitted record instead.
        metrics.inc("reliable_idempotency_lease_lost_total", task=call.name)
        log.warning(
            "celery-reliable: %s finished after its idempotency lease was lost (expired "
            "or taken over); its outcome was not recorded in Redis%s",
            call.describe,
            "" if call.runtime.settings.idempotency_store == "postgres"
            else " and a duplicate may have run the task too (Redis-only store)",
        )
        return True


register(GUARD, _Hooks())
