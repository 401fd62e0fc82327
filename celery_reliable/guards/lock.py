"""Guard ``L``: a lock that mints fencing tokens (``lock.lua``); its lease value.

Options ``lock``, ``lock_ttl``, ``lock_contention``, ``lock_label`` (:data:`CONFIG`);
``TaskPolicy.lock`` is a :class:`LockPolicy`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .. import metrics
from ..errors import ConfigurationError
from ..options import Option, OptionSet, choice, render, seconds, template_spec
from .base import Guard, Hooks, ms, register

if TYPE_CHECKING:
    from ..admission import Plan, Release
    from ..config import ReliableSettings
    from ..keys import KeySpace

Contention = Literal["defer", "skip", "fail"]


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


def policy_part(task_name: str, opts: Mapping[str, Any],
                settings: ReliableSettings | None) -> dict[str, Any]:
    """``TaskPolicy.lock``: a LockPolicy, or None without the option ``lock``."""
    if opts["lock"] is not None:
        return {"lock": LockPolicy(spec=opts["lock"], ttl=opts["lock_ttl"],
                                   contention=opts["lock_contention"],
                                   label_spec=opts["lock_label"])}
    if opts["lock_label"] is not None:
        raise ConfigurationError(f"{task_name}: option 'lock_label' is set but 'lock' is not")
    return {"lock": None}


CONFIG = OptionSet(
    name="lock",
    options=(
        Option(
            "lock",
            None,
            "template or callable",
            "Resource the task locks while it runs. A format template over the task's bound "
            'arguments (``"order:{order_id}"``) or a callable that receives the bound '
            "arguments as one mapping and returns the resource name. ``None`` means no lock.",
            template_spec,
            template=True,
        ),
        Option(
            "lock_ttl",
            30.0,
            "seconds",
            "Lease time of the lock. A heartbeat renews it about every ``lock_ttl / 3`` while "
            "the task runs; if the worker dies, the lock frees itself at most this long after "
            "the last renewal. The holder's ``self.lock_lost`` turns true 1 % + 50 ms before "
            "``lock_ttl`` has passed since the last renewal Redis confirmed.",
            seconds(),
        ),
        Option(
            "lock_contention",
            "defer",
            "one of defer, skip, fail",
            'What a task does when its lock is held by another execution: ``"defer"`` '
            're-publishes it with a jittered countdown (no retry consumed), ``"skip"`` drops '
            'it and stores the result state ``SKIPPED``, ``"fail"`` raises ``LockNotAcquired``.',
            choice(("defer", "skip", "fail")),
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
            template_spec,
            template=True,
        ),
    ),
    build=policy_part,
    prefixes=("lock",),
    guards=lambda part: part["lock"] is not None,
    fields=True,
)

GUARD = Guard("L", "lock", admit=(2, 3), complete=(1, 1))

#: This guard's metrics (exported by ``celery_reliable.prometheus``).
METRICS: tuple[metrics.MetricSpec, ...] = (
    metrics.MetricSpec("reliable_lock_acquire_total", "counter",
                       "Lock admissions by result: acquired, or busy-<lock_contention>.",
                       ("result",)),
    metrics.MetricSpec("reliable_lock_wait_seconds", "histogram",
                       "Delay a busy lock added before its acquisition (0 if it was free)."),
)

#: Fencing counters live this long (seconds) after their last acquire, outliving every
#: lease by far (at least 10x the lock ttl); tokens are floored at the
#: server clock, so even an expired counter never lets tokens go backwards.
FENCE_TTL_MIN = 7 * 24 * 3600.0

#: Longest resource label kept with a lock's lease (characters); a longer one ends in "…".
LOCK_LABEL_MAX = 60
#: Longest task name kept with a lock's lease (characters).
LOCK_TASK_MAX = 200


def _printable(text: str, limit: int) -> str:
    """``text`` on one line (whitespace runs, newlines included, become one space), cut."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def lock_holder(owner: str, task: str = "", label: str = "", nonce: str = "") -> str:
    """What follows the fencing token in a lock's lease value.

    ``"<owner>\\n<task name>\\n<label>"``, or just ``"<owner>"`` (the format of
    older versions) when there is neither; ``nonce`` (a FencedLock's, one per
    acquire) follows on a fourth line: the holder rollback.lua compares is then
    one acquire's, even when callers reuse an owner. The task name and the label are for
    ``celery reliable locks``: kept in the lease itself, they are written by the
    same SET, renewed and released with it, and need no key of their own (their
    cost: their bytes, in the lease and in every admit, renew, release and
    rollback call of it). The label must never carry a secret: the task
    pipeline passes the ``lock`` template (argument names, not values).
    """
    task, label = _printable(task, LOCK_TASK_MAX), _printable(label, LOCK_LABEL_MAX)
    if nonce:
        return f"{owner}\n{task}\n{label}\n{nonce}"
    if not task and not label:
        return owner
    return f"{owner}\n{task}\n{label}"


def plan(
    plan: Plan, lock_key: str, fence_key: str, owner: str, ttl: float, *, task: str = "",
    label: str = "", fence_ttl: float | None = None, nonce: str = "",
) -> int:
    """Lock ``lock_key`` for ``ttl`` seconds, minting a token; returns its index in ``plan``.

    ``task`` and ``label`` are kept with the lease for ``reliable locks``
    (:func:`lock_holder`); :func:`lease_value` gives the lease value once admitted.
    ``fence_ttl``: seconds the fencing counter ``fence_key`` lives after the last
    acquire (default: ``FENCE_TTL_MIN`` or ``10 * ttl``, whichever is longer).
    """
    holder = lock_holder(owner, task, label, nonce)
    if fence_ttl is None:
        fence_ttl = max(FENCE_TTL_MIN, 10 * ttl)
    return plan.add(GUARD, [lock_key, fence_key], [holder, ms(ttl), ms(fence_ttl)],
                    undo=(lock_key, holder), lease=ttl)


def plan_resource(
    plan_: Plan, keys: KeySpace, resource: str, owner: str, ttl: float, *, task: str = "",
    label: str = "", fence_ttl: float | None = None,
) -> int:
    """:func:`plan` for ``resource``'s lock and fencing keys in ``keys``."""
    return plan(plan_, keys.lock(resource), keys.fence(resource), owner, ttl, task=task,
                label=label, fence_ttl=fence_ttl)


def lease_value(plan: Plan, index: int, token: int) -> str:
    """The lease value lock entry ``index`` of ``plan`` wrote with ``token`` (renew and
    release it): ``"<token> <holder>"``."""
    return f"{token} {plan.admit_args[plan.arg_offsets[index]]}"


def release(release: Release, lock_key: str, lease_value: str) -> None:
    """Release the lock if the lease is still ``lease_value`` ("<token> <holder>")."""
    release.add(GUARD, [lock_key], [lease_value])


# ------------------------------------------------------------- status (read-only)


@dataclass(frozen=True)
class LockInfo:
    """One lock held now, as the store has it."""

    key: str
    token: str
    owner: str
    task_id: str
    ttl_ms: int
    task: str = ""  # the task that holds it ("" for a FencedLock or an older version's lease)
    label: str = ""  # the lock template, a lock_label, or FencedLock(label=...)

    @classmethod
    def parse(cls, key: str, value: str, ttl_ms: int) -> LockInfo:
        """From the lease value ``"<token> <owner>[\\n<task>\\n<label>[\\n<nonce>]]"``.

        (:func:`lock_holder`; a FencedLock's nonce is not shown.)
        """
        token, _, holder = value.partition(" ")
        owner, _, described = holder.partition("\n")
        task, _, label = described.partition("\n")
        label = label.partition("\n")[0]
        task_id = owner.rpartition("/")[0] if "/" in owner else ""
        return cls(key=key, token=token, owner=owner, task_id=task_id, ttl_ms=ttl_ms,
                   task=task, label=label)

    @property
    def digest(self) -> str:
        return self.key.rsplit(":", 1)[-1]


def lease_prefix(keys: KeySpace) -> str:
    """What the key of every lock lease of ``keys`` starts with (to list them)."""
    return keys.pattern("lock")[:-1]


# ------------------------------------------------------------- pipeline hooks


#: Message header: when this task first found its lock busy (epoch seconds).
LOCK_WAIT_HEADER = "reliable_lock_wait_since"


class _Hooks(Hooks):
    """The lock in the task pipeline: a lease renewed by the heartbeat, its token on hold."""

    order = 20

    def plan(self, call: Any, plan: Plan, execution: Any, arguments: dict[str, Any]) -> None:
        lock = call.policy.lock
        if lock is None:
            return
        execution.resource = lock.resource(call.name, arguments)
        plan_resource(plan, call.runtime.keys, execution.resource, execution.owner, lock.ttl,
                      task=call.name, label=lock.label(call.name, arguments))

    def hold(self, call: Any, plan: Plan, index: int, result: int, execution: Any,
             started: float) -> None:
        metrics.inc("reliable_lock_acquire_total", result="acquired")
        since = call.header(LOCK_WAIT_HEADER)
        metrics.observe("reliable_lock_wait_seconds",
                        max(0.0, time.time() - float(since)) if since else 0.0)
        execution.token = result
        key, value = plan.keys[plan.offsets[index]], lease_value(plan, index, result)
        execution.lease = call.lease("L", key, value, call.policy.lock.ttl, started, "lock")
        execution.leases.append(execution.lease)
        release(execution.release, key, value)

    def refused(self, call: Any, outcome: Any, plan: Plan, execution: Any) -> Any:
        from celery.exceptions import Ignore

        from ..errors import LockNotAcquired
        from ..keys import digest
        from ..pipeline.headers import SKIPPED, log

        how = call.policy.lock.contention
        metrics.inc("reliable_lock_acquire_total", result=f"busy-{how}")
        if how == "skip":
            log.info("celery-reliable: %s skipped: lock %s is busy", call.describe,
                     digest(execution.resource))
            call.store_state(SKIPPED, {"reason": "lock busy", "lock": digest(execution.resource)})
            raise Ignore()
        if how == "fail":
            raise LockNotAcquired(call.name, execution.resource)
        call.defer("lock busy", not_after=outcome.retry_after, lock_busy=True, guard="lock")
        return None

    def settled(self, call: Any, execution: Any, result: int) -> bool:
        if not result:
            from ..pipeline.headers import log

            log.warning("celery-reliable: %s finished after its lock was lost", call.describe)
        return False


register(GUARD, _Hooks())
