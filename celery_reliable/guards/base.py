"""What every guard module declares: :class:`Guard`, and the helpers they share."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from ..admission import Outcome, Plan, Release
    from ..pipeline.call import Call, Execution

__all__ = ["HOOKS", "Guard", "Hooks", "ms", "overriding", "register"]


@dataclass(frozen=True)
class Guard:
    """One guard: its plan letter, its fragment file and where its keys and arguments lie.

    ``name``: the fragment is ``celery_reliable/guards/<name>.lua``. ``admit`` and
    ``complete``: how many keys and arguments the guard takes in ``admit.lua`` and
    ``complete.lua`` (what its ``plan`` and ``release`` functions pass); the composed
    script steps past them to the next guard's.
    """

    letter: str
    name: str
    admit: tuple[int, int]
    complete: tuple[int, int] = (0, 0)


def ms(seconds: float) -> int:
    """``seconds`` as whole milliseconds for a script, at least 1."""
    return max(1, int(seconds * 1000))


# ------------------------------------------------------------- pipeline hooks


class Hooks:
    """What a guard does in the task pipeline (:mod:`celery_reliable.pipeline`).

    The pipeline calls every guard through these methods and never asks which
    guard it is: a guard module subclasses this at its end and registers an
    instance with :func:`register`. ``call`` is the delivery
    (:class:`celery_reliable.pipeline.call.Call`: task, policy, runtime and the
    services a guard uses: ``defer``, ``store_state``, ...), ``execution`` what
    one admitted execution holds (``pipeline.call.Execution``).
    """

    #: Where the guard goes in a task's admission plan (lower first).
    order: ClassVar[int] = 100
    #: Its leases' lost belief is reported at completion (``finished after ...``).
    reports_overrun: ClassVar[bool] = False

    def outcome(self, code: int, index: int, kind: str, reply: list[Any]) -> Outcome:
        """What ``admit.lua``'s refusal ``reply`` (reply code ``code``) by this guard means.

        By default a refusal for now (:class:`~celery_reliable.admission.Refused`:
        ``reply[2]`` the milliseconds to wait, ``reply[3]`` a bucket's slot).
        """
        from ..admission import Refused

        ms = int(reply[2])
        slot = int(reply[3]) if len(reply) > 3 else None
        return Refused(index, kind, ms / 1000 if ms > 0 else None, slot)

    def plan(self, call: Call, plan: Plan, execution: Execution,
             arguments: dict[str, Any]) -> None:
        """Add this guard to ``plan`` if the task's policy (or the delivery) asks for it."""

    def hold(self, call: Call, plan: Plan, index: int, result: int, execution: Execution,
             started: float) -> None:
        """Admitted with ``result``: register its leases and its release entry."""

    def refused(self, call: Call, outcome: Any, plan: Plan, execution: Execution) -> Any:
        """Translate a refusal (``outcome``) into control flow.

        Raises (defer, skip, drop, fail, dead-letter), returns None after an
        eager deferral slept (admission tries again), or returns a
        :class:`~celery_reliable.admission.Replay` to replay.
        """
        raise AssertionError(f"guard {type(self).__name__} cannot refuse: {outcome!r}")

    def admitted(self, call: Call, execution: Execution) -> bool:
        """Admitted and held, before the body runs: open what the run needs (the
        idempotency record's PostgreSQL transaction). False: it deferred (eager: it
        slept; admission is tried again). Raises to end the delivery (a mismatch)."""
        return True

    def finish(self, call: Call, execution: Execution, result: Any,
               failure: BaseException | None) -> bool:
        """Record the run's outcome and settle (``pipeline.complete.settle``) yourself:
        True if this guard did (the idempotency record); else the pipeline settles."""
        return False

    def abandon(self, call: Call, execution: Execution) -> None:
        """Completion failed before settling: let go of what ``admitted`` opened."""

    def completing(self, call: Call, execution: Execution,
                   failure: BaseException | None) -> None:
        """Before completion: put the run's outcome into this guard's release entry."""

    def deferred(self, release: Release) -> None:
        """The execution is deferred after its body ran but before it had an effect (its
        commit failed): undo in ``release`` what counts only runs (called once per guard
        with entries in it, by ``Release.deferred``)."""

    def settled(self, call: Call, execution: Execution, result: int) -> bool:
        """After completion, with this guard's result; True if it reported its lease lost."""
        return False


#: Each guard's hooks, by letter (:func:`register`).
HOOKS: dict[str, Hooks] = {}


def register(guard: Guard, hooks: Hooks) -> None:
    """Give ``guard`` its pipeline ``hooks`` (a guard module does so at its end)."""
    HOOKS[guard.letter] = hooks
    overriding.cache_clear()
    planners.cache_clear()


@cache
def planners() -> tuple[Hooks, ...]:
    """Every guard's hooks in planning order (``Hooks.order``); :func:`register` refreshes it."""
    return tuple(sorted(HOOKS.values(), key=lambda hooks: hooks.order))


@cache
def overriding(method: str) -> frozenset[str]:
    """The letters of the guards whose hooks override ``method`` (the others need no call)."""
    default = getattr(Hooks, method)
    return frozenset(letter for letter, hooks in HOOKS.items()
                     if getattr(type(hooks), method) is not default)
