"""Guard ``W``: a sliding-window limit, at most N admissions in any window (``window.lua``).

For strict quotas ("1000 reports a day per tenant"), which a token bucket does
not give (it refills continuously) and a fixed window gives only loosely (it
admits 2N within moments around a window's boundary: N at the end of one
window, N at the start of the next).

Two modes, chosen per limit:

``exact``
    A log of admissions: a Redis sorted set per key, one member per admission
    (the execution's owner) scored by the server's time of admission. Never
    more than N admissions in any window of ``w`` seconds, however they are
    timed. Memory: up to N members per key (about 60-100 bytes each); each
    admission costs O(log N). A refused task is deferred to its turn (below).
    A rolled-back admission (its reply lost) takes its own member out.

``approximate``
    The weighted two-window counter: two fixed-window counts (the current
    window ``c`` and the one before, ``p``), O(1) memory per key; an execution
    is admitted while ``p * (w - e) / w + c + 1 <= N`` (``e``: time elapsed
    in the current fixed window), which assumes the previous window's
    admissions were spread evenly. Its error, derived in ``window.lua`` and
    tested (tests/test_window.py): any interval of length ``d <= w`` holds at
    most ``floor(N * (1 + d / w))`` admissions; a whole window (``d = w``) may
    thus hold up to 2N when the previous window's admissions all came at its
    very end, but never 2N within a short interval as a fixed window does
    (``N + floor(N * d / w)``: for d = 1% of w, 1.01 N). Within a fixed
    window, at most N. A rolled-back admission is not refunded (as bucket
    tokens are not): a counter does not know which admission was whose, so a
    refund could take back one that did run; keeping it errs toward admitting
    fewer, by one per lost reply, for at most two windows.

Refused tasks get turns, so that a burst refused at once does not come back at
once (each to the one slot that frees first, all but one refused again). In
exact mode a refusal promises the task (its id, which a deferral keeps: the
ticket) the time the slot meant for it frees: the k-th refused of a burst the
k-th slot to free, counting the turns already promised as future admissions
(plus, behind a future turn, 5% of its wait, at most 1 s: how late
``DeferPolicy``'s jitter may bring its task back). The turns are a second sorted
set (:func:`turns_key`): a fresh arrival counts them as taken, a task back for
its turn takes any free slot and its turn goes, one back early (a capped
deferral) keeps it unless a fresh arrival would be admitted but for its own turn
(slots given back since: then it is, and its turn goes); a turn whose task never
comes back is pruned w after it came. Turns are promises, not admissions: the
bound is checked on admissions alone. Measured (tests/test_window.py): 15 tasks
at once under "5/2s", the 10 refused are told about 2 s (5) and 4.1 s (5) and
come back admitted, 10 refusals in all (without turns, all 10 aim at 2 s: 15 or
more). In approximate mode the turns are spaced w / N apart (field ``q`` of the
hash), bookkeeping only: a fresh arrival the count admits is not held back.
All within admission's one round trip (a refusal writes its turn).

Options (:data:`CONFIG`): the app setting ``reliable_queue_window_limits`` (per queue)
and the task options ``rate_limit_window``, ``rate_limit_window_key`` and
``rate_limit_window_mode`` (per key); its part of a task's policy,
``policy.part(CONFIG)``, is a :class:`WindowPart`. (The guard needs no line in
``config`` but its registry line in ``config.OPTION_SETS``.)
An admission counts once, whatever its ``rate_cost`` (that is the buckets').

An admission counts only if the execution ran (its body started and ended, with
a result or a failure: a run that failed used its slot). One deferred after it
was admitted but before its body ran to an effect gives its slot back at
completion, in exact mode: PostgreSQL unavailable (or its tables missing) when
the durable record is opened, its record found finished there (a replay), an
outage under ``idempotent_transaction()``, a failed commit of the task's own
rows, ``self.throttle()``, or an admission interrupted before the body
started. Completion's release entry (``complete.lua``, its ``complete``
section) takes the execution's own member out; it is ``refund`` until
:meth:`_Hooks.completing` sees the body ran (any outcome but a
:class:`~celery_reliable.pipeline.call.Deferred`), and a deferral after that
(a failed commit: ``Release.deferred`` calls the guards' ``Hooks.deferred``) sets it
back with :func:`refund`. No extra round trip: the
entry rides on completion's. In approximate mode nothing is given back (as
for a rolled-back admission): a deferred admission stays counted for at most
two fixed windows.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import metrics
from ..errors import ConfigurationError
from ..keys import digest
from ..options import Option, OptionSet, choice, render, template_spec
from .base import Guard, Hooks, ms, register

if TYPE_CHECKING:
    from ..admission import Plan, Refused, Release
    from ..config import ReliableSettings
    from ..keys import KeySpace

__all__ = ["CONFIG", "GUARD", "MODES", "QUEUE_LIMITS", "WindowPart", "WindowPolicy", "WindowSpec",
           "parse_queue_windows", "parse_window", "refund"]

GUARD = Guard("W", "window", admit=(2, 6), complete=(1, 2))

#: The release entry's flag: give the admission back (the default), or keep it counted.
REFUND, KEEP = "r", "k"

#: The modes, and the letter ``window.lua`` is given for each.
MODES: dict[str, str] = {"exact": "e", "approximate": "a"}

_UNITS = {
    "s": 1.0, "sec": 1.0, "second": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0,
    "h": 3600.0, "hour": 3600.0,
    "d": 86400.0, "day": 86400.0,
}
_LIMIT = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*([a-z]+)\s*$")


@dataclass(frozen=True)
class WindowSpec:
    """At most ``limit`` admissions in any ``window`` seconds; ``mode`` exact or approximate."""

    limit: int
    window: float
    mode: str = "exact"

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1:
            raise ValueError(f"the limit must be a whole number >= 1, got {self.limit!r}")
        if not (self.window >= 0.001 and math.isfinite(self.window)):
            raise ValueError(f"the window must be >= 1 ms, got {self.window!r} s")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")


def _limit(raw: Any) -> tuple[int, float]:
    if isinstance(raw, str):
        match = _LIMIT.match(raw.lower())
        if match and match.group(3) in _UNITS:
            count = float(match.group(2)) if match.group(2) else 1.0
            return int(match.group(1)), count * _UNITS[match.group(3)]
    raise ValueError(
        f"expected a limit such as '60/m', '1000/d', '10/s', '100/h' or '20/10s', got {raw!r}"
    )


def parse_window(owner: str, raw: Any, mode: str = "exact") -> WindowSpec:
    """A window from ``"1000/d"`` or ``{"limit": "1000/d", "mode": "approximate"}``.

    Raises ConfigurationError whose message starts with ``owner``.
    """
    try:
        if isinstance(raw, Mapping):
            unknown = set(raw) - {"limit", "mode"}
            if unknown:
                raise ValueError(f"unknown keys {sorted(unknown)}; expected 'limit' and 'mode'")
            if "limit" not in raw:
                raise ValueError("missing 'limit'")
            mode = raw.get("mode", mode)
            raw = raw["limit"]
        limit, window = _limit(raw)
        return WindowSpec(limit, window, mode)
    except ValueError as exc:
        raise ConfigurationError(f"{owner}: {exc}") from None


def parse_queue_windows(owner: str, name: str, raw: Any) -> dict[str, WindowSpec]:
    """``reliable_queue_window_limits``: queue name -> window."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigurationError(
            f"{owner}: option {name!r} must be a mapping of queue name to limit, got {raw!r}"
        )
    out = {}
    for queue, spec in raw.items():
        if not isinstance(queue, str) or not queue:
            raise ConfigurationError(f"{owner}: option {name!r} has a bad queue name {queue!r}")
        out[queue] = parse_window(f"{owner}: option {name!r} queue {queue!r}", spec)
    return out


@dataclass(frozen=True)
class WindowPolicy:
    """A per-key window (``rate_limit_window`` [+ ``rate_limit_window_key``])."""

    spec: str | Callable[..., Any] | None  # template, callable, or None: the task's name
    window: WindowSpec

    def key(self, task_name: str, arguments: Mapping[str, Any]) -> str:
        if self.spec is None:
            return f"task:{task_name}"
        return render(self.spec, task_name, "rate_limit_window_key", arguments)


@dataclass(frozen=True)
class WindowPart:
    """The window guard's part of a task's policy (``policy.part(CONFIG)``)."""

    #: The task's key window (``rate_limit_window``), or None.
    key: WindowPolicy | None
    #: The app's queue windows (``reliable_queue_window_limits``; none before it is configured).
    queues: Mapping[str, WindowSpec]


def policy_part(task_name: str, opts: Mapping[str, Any],
                settings: ReliableSettings | None) -> WindowPart:
    """The task's key window (None without ``rate_limit_window``) and the app's queue windows."""
    window = None
    if opts["rate_limit_window"] is not None:
        spec = parse_window(f"{task_name}: option 'rate_limit_window'",
                            opts["rate_limit_window"], opts["rate_limit_window_mode"])
        window = WindowPolicy(opts["rate_limit_window_key"], spec)
    elif opts["rate_limit_window_key"] is not None:
        raise ConfigurationError(
            f"{task_name}: option 'rate_limit_window_key' is set but 'rate_limit_window' "
            "is not (e.g. \"1000/d\")"
        )
    queues = settings.value(QUEUE_LIMITS) if settings is not None else {}
    return WindowPart(window, queues)


QUEUE_LIMITS = Option(
    "reliable_queue_window_limits",
    None,
    "queue → limit",
    'Fleet-wide sliding window per queue: ``{"reports": "1000/d", "exports": '
    '{"limit": "60/m", "mode": "approximate"}}`` (see ``rate_limit_window`` and '
    "``rate_limit_window_mode``; mode exact by default). Every ReliableTask taken from "
    "the queue counts once; a refused task is deferred to when a slot frees.",
    parse_queue_windows,
)


CONFIG = OptionSet(
    name="window",
    options=(
        Option(
            "rate_limit_window",
            None,
            'limit such as "1000/d"',
            "A sliding-window limit: at most N executions start in any window (strict "
            'quotas): ``"60/m"``, ``"1000/d"``, ``"10/s"``, ``"100/h"``, ``"20/10s"`` '
            "(N admissions per window of s, m, h or d). Per ``rate_limit_window_key``, or "
            "per task name without it. A refused task is deferred to when a slot frees "
            "(capped by the redelivery window), without consuming a retry.",
            lambda owner, name, raw: raw,  # parsed with its mode in policy_part
        ),
        Option(
            "rate_limit_window_key",
            None,
            "template or callable",
            "The key of ``rate_limit_window`` (per-tenant quotas): a format template over "
            'the bound arguments (``"tenant:{tenant_id}"``) or a callable receiving them as '
            "one mapping. Windows are shared by every task that uses the same key with the "
            "same limit and mode (another limit or mode on the key is a window of its own).",
            template_spec,
            template=True,
        ),
        Option(
            "rate_limit_window_mode",
            "exact",
            "exact or approximate",
            "``exact``: a log of admissions (a sorted set of up to N entries per key), never "
            "more than N in any window. ``approximate``: two counters per key (O(1) memory), "
            "at most floor(N * (1 + d / w)) in any interval d <= the window w (up to 2N in "
            "a whole window when the previous one's admissions came at its very end).",
            choice(tuple(MODES)),
        ),
    ),
    settings=(QUEUE_LIMITS,),
    build=policy_part,
    prefixes=("rate_limit_window",),
    guards=lambda part: part.key is not None,
    guards_delivery=lambda part, request: queue_window(part.queues, request) is not None,
)


def queue_window(limits: Mapping[str, WindowSpec], request: Any) -> tuple[str, WindowSpec] | None:
    """The queue this delivery came from (its routing key) and its window, if it has one."""
    if not limits:
        return None
    info = getattr(request, "delivery_info", None) or {}
    queue = info.get("routing_key") or info.get("queue")
    if queue is None or queue not in limits:
        return None
    return queue, limits[queue]


def _shape(spec: WindowSpec | None) -> str:
    """The window's limit, length and mode, part of its key's name (see :func:`key_key`)."""
    if spec is None:
        return ""
    return f":{spec.limit}/{ms(spec.window)}{MODES[spec.mode]}"


def queue_key(keys: KeySpace, queue: str, spec: WindowSpec | None = None) -> str:
    """The queue's window: named by the queue and the window's shape (:func:`key_key`)."""
    return f"{keys.tag}:window:q:{digest(queue)}{_shape(spec)}"


def key_key(keys: KeySpace, name: str, spec: WindowSpec | None = None) -> str:
    """The window of ``name`` with ``spec``'s limit, length and mode.

    The shape is part of the name: tasks that share a window key but not its limit,
    length or mode count in separate windows. One log pruned by each admission to its
    own window (a "60/m" task's admissions cut a "1000/d" task's log to a minute) would
    let the longer window admit far more than its limit, and an exact and an
    approximate window cannot share a key (a sorted set and a hash). ``spec`` None: the
    name alone (tests that write a window's script arguments by hand)."""
    return f"{keys.tag}:window:k:{digest(name)}{_shape(spec)}"


def turns_key(key: str) -> str:
    """Exact mode: the turns promised to refused tasks of the window at ``key`` (a sorted set)."""
    return f"{key}:turns"


def plan(plan: Plan, key: str, spec: WindowSpec, owner: str, ticket: str = "",
         cap: float | None = None) -> int:
    """Count one admission in the window at ``key`` (exact mode: as ``owner``, undone by
    rollback.lua if the admission's reply is lost). ``ticket`` (the task id; exact mode)
    names the turn a refusal promises it, which it takes when it comes back; without
    one, a refusal promises nothing. ``cap``: the longest deferral, seconds (the task's
    ``DeferPolicy.cap``; None: none); in approximate mode a refused task whose turn is
    further away takes no turn (it comes back at the cap and asks again)."""
    undo = (key, owner) if spec.mode == "exact" else None
    return plan.add(GUARD, [key, turns_key(key)],
                    [spec.limit, ms(spec.window), MODES[spec.mode], owner, ticket,
                     0 if cap is None else ms(cap)], undo=undo)


def release(release: Release, key: str, owner: str) -> None:
    """Exact mode: completion gives ``owner``'s admission back unless :func:`count` says it ran."""
    release.add(GUARD, [key], [owner, REFUND])


def count(release: Release) -> None:
    """The body ran (to a result or a failure): its admissions stay counted."""
    for args in release.entries(GUARD):
        args[1] = KEEP


def refund(release: Release) -> None:
    """The execution was deferred before its body ran to an effect: give its admissions back."""
    for args in release.entries(GUARD):
        args[1] = REFUND


def plan_task(plan_: Plan, keys: KeySpace, limits: Mapping[str, WindowSpec], request: Any,
              task_policy: WindowPolicy | None, task_name: str,
              arguments: Mapping[str, Any], owner: str, cap: float | None = None) -> None:
    """Add the delivery's queue window and the task's key window, if any (``cap``: the
    task's longest deferral, seconds, see :func:`plan`)."""
    ticket = str(getattr(request, "id", None) or "")
    queued = queue_window(limits, request)
    if queued is not None:
        plan(plan_, queue_key(keys, queued[0], queued[1]), queued[1], owner, ticket, cap)
    if task_policy is not None:
        name = task_policy.key(task_name, arguments)
        plan(plan_, key_key(keys, name, task_policy.window), task_policy.window, owner,
             ticket, cap)


def refused(plan_: Plan, refusal: Refused, request: Any) -> str:
    """What refused (for the log and ``reliable_rate_limited_total``'s label)."""
    key = plan_.keys[plan_.offsets[refusal.index]]
    if ":window:q:" in key:
        info = getattr(request, "delivery_info", None) or {}
        return f"queue {info.get('routing_key') or info.get('queue')!r}"
    return "rate_limit_window"


# ------------------------------------------------------------- pipeline hooks


class _Hooks(Hooks):
    """Sliding windows in the task pipeline: the delivery's queue's and the task's key's."""

    order = 60

    def plan(self, call: Any, plan: Plan, execution: Any, arguments: dict[str, Any]) -> None:
        runtime = call.runtime
        plan_task(plan, runtime.keys, runtime.settings.value(QUEUE_LIMITS), call.request,
                  call.policy.part(CONFIG).key, call.name, arguments, execution.owner,
                  call.policy.defer.cap)

    def hold(self, call: Any, plan: Plan, index: int, result: int, execution: Any,
             started: float) -> None:
        key = plan.keys[plan.offsets[index]]
        if key in plan.undo_keys:  # exact mode (plan() gives only it an undo): a log entry
            release(execution.release, key, execution.owner)

    def completing(self, call: Any, execution: Any, failure: BaseException | None) -> None:
        from ..pipeline.call import Deferred

        if not isinstance(failure, Deferred):  # it ran: a result, a failure, a retry
            count(execution.release)

    def deferred(self, release: Release) -> None:
        refund(release)

    def refused(self, call: Any, outcome: Any, plan: Plan, execution: Any) -> Any:
        what = refused(plan, outcome, call.request)
        metrics.inc("reliable_rate_limited_total", bucket=what)
        call.defer(f"window full ({what})", scheduled=outcome.retry_after or 0.0,
                   guard="rate limit window")
        return None


register(GUARD, _Hooks())
