"""Guard ``T``, a toy gate: the proof that a guard is its module, its fragment and
one registry line each in ``guards.GUARDS`` and ``config.OPTION_SETS``.

tests/test_config_registry.py copies the package, drops this file and ``toy.lua``
into ``celery_reliable/guards/`` and adds the registry lines; nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..options import Option, OptionSet, seconds, text
from .base import Guard, Hooks, ms, register

if TYPE_CHECKING:
    from ..admission import Plan
    from ..config import ReliableSettings

GUARD = Guard("T", "toy", admit=(1, 1))

RETRY = Option(
    "reliable_toy_retry",
    5.0,
    "seconds",
    "How long a task refused by a closed gate waits before it tries again.",
    seconds(),
)


def policy_part(task_name: str, opts: Mapping[str, Any],
                settings: ReliableSettings | None) -> str | None:
    """The task's gate (``toy_gate``), or None."""
    return opts["toy_gate"]  # type: ignore[no-any-return]


CONFIG = OptionSet(
    name="toy",
    options=(
        Option("toy_gate", None, "name", "The gate the task passes through.",
               text(optional=True)),
    ),
    settings=(RETRY,),
    build=policy_part,
    prefixes=("toy_",),
    guards=lambda gate: gate is not None,
)


def gate_key(tag: str, gate: str) -> str:
    return f"{tag}:toy:{gate}"


class _Hooks(Hooks):
    order = 70

    def plan(self, call: Any, plan: Plan, execution: Any, arguments: dict[str, Any]) -> None:
        gate = call.policy.part(CONFIG)
        if gate is not None:
            retry = call.runtime.settings.value(RETRY)
            plan.add(GUARD, [gate_key(call.runtime.keys.tag, gate)], [ms(retry)])

    def refused(self, call: Any, outcome: Any, plan: Plan, execution: Any) -> Any:
        call.defer("gate closed", scheduled=outcome.retry_after or 0.0, guard="toy gate")
        return None


register(GUARD, _Hooks())
