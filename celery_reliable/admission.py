"""Admission and completion of one execution: every guard in ONE Redis round trip each.

A task's guards each contribute a letter, keys and arguments to a
:class:`Plan`; ``admit.lua`` checks all of them first and writes only when
every guard said yes, so a refusal consumes nothing. ``complete.lua``
releases whatever admission took, again in one call. When admission itself
fails (its reply lost: it may or may not have run), :meth:`Plan.rollback`
(``rollback.lua``) undoes whatever it may have taken, checked by owner, and
leaves a marker that makes the request do nothing if it reaches Redis only
later.

Plan and Release know no guard: each guard is one unit, its module
``celery_reliable/guards/<name>.py`` (its letter; its ``plan`` and ``release``
functions, which put its keys and arguments into a plan with :meth:`Plan.add` and a
release with :meth:`Release.add`, and settle its release entries; its pipeline hooks,
:class:`celery_reliable.guards.base.Hooks`, which also decode its refusals) and its Lua
fragment ``guards/<name>.lua`` (its part of each script), with one line in
:data:`celery_reliable.guards.GUARDS`.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from .guards.base import HOOKS, Guard, overriding
from .keys import KeySpace, hash_tag
from .scripts import own_connection, script

__all__ = [
    "INTERRUPTED_ROLLBACK_TIMEOUT",
    "ROLLBACK_MARK_MIN",
    "Admitted",
    "DeadLettered",
    "Mismatch",
    "Outcome",
    "Plan",
    "Poison",
    "Refused",
    "Rejected",
    "Release",
    "Replay",
    "RolledBack",
]

log = logging.getLogger("celery_reliable")

#: Shortest life of a rollback marker (seconds): longer than any delay we know of
#: for a request already sent (TCP retransmission of a closed socket's data, about
#: 100 s on Linux; a stalled server or proxy), at little cost: one small key per
#: rolled-back admission.
ROLLBACK_MARK_MIN = 600.0

#: Seconds each rollback send may take when the admission was interrupted (a soft
#: time limit, SIGTERM): short, since the caller is being stopped; two sends.
INTERRUPTED_ROLLBACK_TIMEOUT = 1.0


@dataclass(frozen=True)
class Refused:
    """Guard ``index`` (0-based, plan order) refused; ``retry_after`` seconds or None.

    A bucket's refusal also gives ``slot``: the task's place in the bucket's
    queue (on the queue's clock: server epoch ms until the bucket's rate
    changes), to pass back to ``guards.bucket.plan``.
    """

    index: int
    kind: str
    retry_after: float | None
    slot: int | None = None


@dataclass(frozen=True)
class Replay:
    """Guard ``index`` is a finished idempotency record: ``state`` S or F, ``payload`` JSON."""

    index: int
    state: str
    payload: str


@dataclass(frozen=True)
class Mismatch:
    """Guard ``index``'s idempotency key was recorded with another fingerprint."""

    index: int


@dataclass(frozen=True)
class Rejected:
    """Guard ``index`` rejects for good (a full bulkhead: drop, fail, queue, timeout)."""

    index: int
    kind: str
    reason: str


@dataclass(frozen=True)
class Poison:
    """Guard ``index``: the task was delivered ``deliveries`` times without finishing."""

    index: int
    deliveries: int


@dataclass(frozen=True)
class DeadLettered:
    """Guard ``index`` (deliveries): the task id was dead-lettered; this is a redelivery.

    Its last delivery's failure was final and recorded, but the broker
    delivers it again (its ack was lost: the broker died or the connection
    broke before the ack arrived). It must not run: nothing was taken.
    """

    index: int


@dataclass(frozen=True)
class RolledBack:
    """The request was rolled back (:meth:`Plan.rollback`) before it reached Redis; it did nothing.

    Only a request whose client already gave up on it gets this reply, so in
    practice nobody reads it; a caller that does treats it as a deferral.
    """


@dataclass(frozen=True)
class Admitted:
    """Every guard admitted; ``results[i]`` is guard i's result (lock: its token)."""

    results: tuple[int, ...]


#: What one admission request decides (:meth:`Plan.admit`).
Outcome = Admitted | Refused | Replay | Mismatch | Rejected | Poison | DeadLettered | RolledBack


@dataclass
class Plan:
    """The guards of one execution, in order."""

    kinds: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # each guard's first key in ``keys``
    admit_args: list[Any] = field(default_factory=list)
    arg_offsets: list[int] = field(default_factory=list)  # its first argument in ``admit_args``
    # What rollback.lua may undo: per entry a letter, a key and this execution's owner.
    undo_kinds: list[str] = field(default_factory=list)
    undo_keys: list[str] = field(default_factory=list)
    undo_owners: list[str] = field(default_factory=list)
    longest: float = 0.0  # the longest lease a guard takes (seconds): the marker outlives it
    #: the marker key of the last :meth:`admit` request (a fresh random name per request)
    marker: str | None = None

    def add(
        self, guard: Guard, keys: list[str], args: list[Any], *,
        undo: tuple[str, str] | None = None, lease: float = 0.0,
    ) -> int:
        """Append ``guard`` with its admit.lua ``keys`` and ``args``; returns its index.

        ``undo``: the key and owner rollback.lua checks to undo it; ``lease``: the
        seconds it holds a lease (the rollback marker outlives the longest).
        A guard module's ``plan`` function calls it (``celery_reliable.guards``).
        """
        self.kinds.append(guard.letter)
        self.offsets.append(len(self.keys))
        self.arg_offsets.append(len(self.admit_args))
        self.keys += keys
        self.admit_args += args
        if undo is not None:
            self.undo_kinds.append(guard.letter)
            self.undo_keys.append(undo[0])
            self.undo_owners.append(undo[1])
        if lease > self.longest:
            self.longest = lease
        return len(self.kinds) - 1

    def admit(self, client: redis.Redis) -> Outcome:
        """One round trip: everything admitted, or nothing changed.

        Each call is a new request with its own rollback marker (a random key in
        the plan's hash tag, passed last): if it raises, :meth:`rollback` undoes
        what it may have taken and writes that marker, and the request, should
        it reach Redis only then, does nothing.
        """
        self.marker = KeySpace(hash_tag(self.keys[0] if self.keys else "")).undone(
            secrets.token_hex(8))
        reply = script("admit")(client, [*self.keys, self.marker],
                                ["".join(self.kinds), *self.admit_args])
        code = int(reply[0])
        if code == 1:
            return Admitted(tuple(int(r) for r in reply[1:]))
        if code == 6:
            return RolledBack()
        index = int(reply[1]) - 1
        kind = self.kinds[index]
        return HOOKS[kind].outcome(code, index, kind, reply)


    def rollback(
        self, client: redis.Redis, *, attempts: int = 3, pause: float = 0.05,
        timeout: float | None = None,
    ) -> list[int]:
        """Undo what a failed :meth:`admit` may have taken; one round trip, safe to repeat.

        For an admission that raised (its reply lost: it may or may not have run).
        Only this execution's own entries go, each checked by owner: its
        in-progress idempotency record, its lock, its bulkhead slot, its breaker
        probe and its entry in the delivery count. Nothing taken, nothing changed.
        It also writes the last admit request's marker, for the longest lease of
        the plan and at least :data:`ROLLBACK_MARK_MIN`: should that request
        reach Redis only now (delayed in the network or behind a stalled
        server), it does nothing. A request delayed even longer is not stopped;
        what it takes expires by its TTL.

        Bucket tokens are not refunded: a bucket keeps no record of who took a
        token, so a refund could not tell a run admission from one that never
        ran, and refunding tokens never taken would let more through than the
        rate. Keeping them errs toward admitting fewer: at most ``cost`` tokens per
        lost reply, refilled at the bucket's rate.

        Sent up to ``attempts`` times, ``pause`` seconds apart (growing 4x), on a
        connection error or a timeout; then the last error is raised and what the
        admission took expires by its TTL. ``timeout``: seconds each send may take
        (connect and reply), on a connection of its own, for a caller that must not
        wait the client's socket timeout (an interrupted task); None: the
        client's own.
        """
        if not self.undo_kinds:
            return []
        keys = self.undo_keys
        args: list[Any] = ["".join(self.undo_kinds), *self.undo_owners]
        if self.marker is not None:
            keys = [*keys, self.marker]
            args.append(int(max(ROLLBACK_MARK_MIN, self.longest) * 1000))
        for attempt in range(attempts):
            try:
                if timeout is None:
                    reply = script("rollback")(client, keys, args)
                else:
                    reply = _call_within(client, "rollback", keys, args, timeout)
                return [int(r) for r in reply]
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if attempt + 1 >= attempts:
                    raise
                log.debug("celery-reliable: rollback of an admission failed (%r); resending",
                          exc)
                time.sleep(pause * 4**attempt)
        raise AssertionError("unreachable")  # pragma: no cover


def _call_within(
    client: redis.Redis, name: str, keys: list[str], args: list[Any], timeout: float
) -> Any:
    """Run script ``name`` once on a new connection whose connect and reads take <= ``timeout`` s.

    A client that is not a plain ``redis.Redis`` (cluster, sentinel) keeps its own timeouts.
    """
    conn = own_connection(client, timeout)
    if conn is None:
        return script(name)(client, keys, args)
    try:
        return script(name).call_once(conn, keys, args)
    finally:
        conn.disconnect()


def text(value: bytes | str) -> str:
    """A script reply's string."""
    return value.decode("utf-8") if isinstance(value, bytes) else value


class Release:
    """What completion settles, built from what admission took.

    Each guard's module adds its entries (its ``release`` function) and settles
    them in place once the run's outcome is known (:meth:`entries`): an
    idempotency record, say, is forgotten (``X``) unless ``guards.idempotency.settle``
    gives it the result.
    """

    def __init__(self) -> None:
        self.kinds: list[str] = []
        self.keys: list[str] = []
        self._args: list[list[Any]] = []

    def add(self, guard: Guard, keys: list[str], args: list[Any]) -> None:
        """Append ``guard`` with its complete.lua ``keys`` and ``args`` (a guard module's
        ``release`` function calls it)."""
        self.kinds.append(guard.letter)
        self.keys += keys
        self._args.append(args)

    def entries(self, guard: Guard) -> list[list[Any]]:
        """The argument lists of ``guard``'s entries, to settle in place."""
        return [args for kind, args in zip(self.kinds, self._args, strict=True)
                if kind == guard.letter]

    def deferred(self) -> None:
        """The execution is deferred after its body ran but before it had an effect (its
        commit failed): each guard with an entry that overrides ``Hooks.deferred`` (what
        counts only runs, a sliding window's admission) undoes its part."""
        deferring = overriding("deferred")
        for kind in dict.fromkeys(self.kinds):
            if kind in deferring:
                HOOKS[kind].deferred(self)

    def __bool__(self) -> bool:
        return bool(self.kinds)

    def run(self, client: redis.Redis) -> list[int]:
        """One round trip; safe to repeat (a second run changes nothing)."""
        args: list[Any] = ["".join(self.kinds)]
        for entry in self._args:
            args += entry
        reply = script("complete")(client, self.keys, args)
        return [int(r) for r in reply]
