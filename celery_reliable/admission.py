"""Admission and completion of one execution: every guard in ONE Redis round trip each.

A task's guards each contribute a letter, keys and arguments to a
:class:`Plan`; ``admit.lua`` checks all of them first and writes only when
every guard said yes, so a refusal consumes nothing. ``complete.lua``
releases whatever admission took, again in one call. When admission itself
fails (its reply lost: it may or may not have run), :meth:`Plan.rollback`
(``rollback.lua``) undoes whatever it may have taken, checked by owner, and
leaves a marker that makes the request do nothing if it reaches Redis only
later. New
guards plug in here: a ``Plan.add_*`` method, the guard's Lua fragment
(``celery_reliable/guards/<name>.lua``: its part of each script) with one line
in :data:`celery_reliable.guards.GUARDS`, and a line in
:meth:`celery_reliable.task.ReliableTask._plan`.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from .breaker import BreakerSpec
from .bulkhead import TierSpec
from .keys import KeySpace, hash_tag
from .ratelimit import BucketSpec
from .scripts import own_connection, script

__all__ = [
    "FENCE_TTL_MIN",
    "INTERRUPTED_ROLLBACK_TIMEOUT",
    "LOCK_LABEL_MAX",
    "ROLLBACK_MARK_MIN",
    "Admitted",
    "DeadLettered",
    "Mismatch",
    "Plan",
    "Poison",
    "Refused",
    "Rejected",
    "Release",
    "Replay",
    "RolledBack",
    "lock_holder",
    "mark_dead",
]

log = logging.getLogger("celery_reliable")

#: Fencing counters live this long (seconds) after their last acquire, outliving every
#: lease by far (at least 10x the lock ttl); tokens are floored at the
#: server clock, so even an expired counter never lets tokens go backwards.
FENCE_TTL_MIN = 7 * 24 * 3600.0

#: Shortest life of a rollback marker (seconds): longer than any delay we know of
#: for a request already sent (TCP retransmission of a closed socket's data, about
#: 100 s on Linux; a stalled server or proxy), at little cost: one small key per
#: rolled-back admission.
ROLLBACK_MARK_MIN = 600.0

#: Seconds each rollback send may take when the admission was interrupted (a soft
#: time limit, SIGTERM): short, since the caller is being stopped; two sends.
INTERRUPTED_ROLLBACK_TIMEOUT = 1.0

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


def mark_dead(client: redis.Redis, key: str, ttl: float) -> None:
    """Mark a task id's deliveries set ``key`` dead-lettered for ``ttl`` seconds (one round trip).

    The unfinished deliveries go (the task id is done: nothing of it is a lost
    delivery any more); the member ``!dead`` stays, and admit.lua refuses a
    redelivery of the task id while it is there. Safe to repeat.
    """
    pipe = client.pipeline(transaction=True)
    pipe.delete(key)
    pipe.sadd(key, "!dead")
    pipe.pexpire(key, max(1, int(ttl * 1000)))
    pipe.execute()


@dataclass(frozen=True)
class Refused:
    """Guard ``index`` (0-based, plan order) refused; ``retry_after`` seconds or None.

    A bucket's refusal also gives ``slot``: the task's place in the bucket's
    queue (on the queue's clock: server epoch ms until the bucket's rate
    changes), to pass back to :meth:`Plan.add_bucket`.
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


@dataclass
class Plan:
    """The guards of one execution, in order."""

    kinds: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # each guard's first key in ``keys``
    admit_args: list[Any] = field(default_factory=list)
    release_keys: list[str] = field(default_factory=list)
    release_args: list[Any] = field(default_factory=list)
    # What rollback.lua may undo: per entry a letter, a key and this execution's owner.
    undo_kinds: list[str] = field(default_factory=list)
    undo_keys: list[str] = field(default_factory=list)
    undo_owners: list[str] = field(default_factory=list)
    lock_holders: dict[int, str] = field(default_factory=dict)  # lock guard index: holder
    longest: float = 0.0  # the longest lease a guard takes (seconds): the marker outlives it
    #: the marker key of the last :meth:`admit` request (a fresh random name per request)
    marker: str | None = None

    def _undo(self, kind: str, key: str, owner: str) -> None:
        self.undo_kinds.append(kind)
        self.undo_keys.append(key)
        self.undo_owners.append(owner)

    def add_idempotency(
        self, key: str, fingerprint: str, owner: str, lease: float, ttl: float
    ) -> int:
        """Claim the idempotency record ``key`` for ``lease`` seconds; returns its index.

        Put it first in the plan: a finished record replays even when other
        guards (a busy lock, an empty bucket) would have refused.
        """
        self.kinds.append("I")
        self.offsets.append(len(self.keys))
        self.keys.append(key)
        self.admit_args += [fingerprint, owner, max(1, int(lease * 1000)), max(1, int(ttl * 1000))]
        self._undo("I", key, owner)
        self.longest = max(self.longest, lease)
        return len(self.kinds) - 1

    def add_lock(
        self, keys: KeySpace, resource: str, owner: str, ttl: float, *, task: str = "",
        label: str = "", fence_ttl: float | None = None,
    ) -> int:
        """Lock ``resource`` for ``ttl`` seconds, minting a fencing token; returns its index.

        ``task`` and ``label`` are kept with the lease for ``reliable locks``
        (:func:`lock_holder`); :meth:`lock_value` gives the lease value once admitted.
        ``fence_ttl``: seconds the fencing counter lives after the last acquire
        (default: ``FENCE_TTL_MIN`` or ``10 * ttl``, whichever is longer).
        """
        return self.add_lock_keys(keys.lock(resource), keys.fence(resource), owner, ttl,
                                  task=task, label=label, fence_ttl=fence_ttl)

    def add_lock_keys(
        self, lock_key: str, fence_key: str, owner: str, ttl: float, *, task: str = "",
        label: str = "", fence_ttl: float | None = None, nonce: str = "",
    ) -> int:
        """:meth:`add_lock` with the keys already derived (a lock object reuses them)."""
        holder = lock_holder(owner, task, label, nonce)
        if fence_ttl is None:
            fence_ttl = max(FENCE_TTL_MIN, 10 * ttl)
        self.kinds.append("L")
        self.offsets.append(len(self.keys))
        self.keys += [lock_key, fence_key]
        self.admit_args += [holder, max(1, int(ttl * 1000)), max(1, int(fence_ttl * 1000))]
        self._undo("L", lock_key, holder)
        self.longest = max(self.longest, ttl)
        self.lock_holders[len(self.kinds) - 1] = holder
        return len(self.kinds) - 1

    def lock_value(self, index: int, token: int) -> str:
        """The lease value lock guard ``index`` wrote with ``token`` (renew and release it)."""
        return f"{token} {self.lock_holders[index]}"

    def add_bulkhead(
        self, keys: KeySpace, tier: str, spec: TierSpec, owner: str, waiter: str
    ) -> int:
        """Take a slot of ``tier`` as a lease; ``waiter`` names the task while it waits."""
        self.kinds.append("K")
        self.offsets.append(len(self.keys))
        self.keys += list(keys.bulkhead(tier))
        self.admit_args += [
            owner,
            spec.concurrent,
            max(1, int(spec.lease * 1000)),
            waiter,
            spec.queue,
            max(1, int(spec.timeout * 1000)),
            spec.policy,
        ]
        self._undo("K", self.keys[-3], owner)
        self.longest = max(self.longest, spec.lease)
        return len(self.kinds) - 1

    def add_bucket(
        self, key: str, spec: BucketSpec, cost: float, *, slot: int | None = None,
        queue: bool = True,
    ) -> int:
        """Take ``cost`` tokens from the bucket at ``key``.

        A refused task is given a slot in the bucket's queue (``Refused.slot``);
        passing it back as ``slot`` keeps its place however often it comes back
        before its turn, and a fresh arrival (no slot) queues behind the queue
        instead of taking the tokens meant for it. ``queue=False``: a plain take
        that neither queues nor waits behind a queue (the retry budget).
        """
        self.kinds.append("B")
        self.offsets.append(len(self.keys))
        self.keys.append(key)
        mode = max(1, int(slot)) if slot is not None and queue else (0 if queue else -1)
        self.admit_args += [repr(spec.rate), repr(spec.burst), repr(float(cost)), mode]
        return len(self.kinds) - 1

    def add_deliveries(self, key: str, max_redeliveries: int, ttl: float, owner: str) -> int:
        """Count this delivery; refuse (poison) past ``max_redeliveries`` unfinished ones.

        The count is a set of execution owners (deliveries that started and never
        finished), so an admission that is rolled back takes its own entry out.
        """
        self.kinds.append("D")
        self.offsets.append(len(self.keys))
        self.keys.append(key)
        self.admit_args += [max_redeliveries, max(1, int(ttl * 1000)), owner]
        self._undo("D", key, owner)
        return len(self.kinds) - 1

    def add_breaker(self, keys: tuple[str, str], spec: BreakerSpec, owner: str) -> int:
        """Pass the breaker: refused while open or while half-open probes are all taken."""
        self.kinds.append("C")
        self.offsets.append(len(self.keys))
        self.keys += list(keys)
        self.admit_args += [max(1, int(spec.open_seconds * 1000)), spec.half_open_max, owner,
                            max(1, int(spec.probe_lease * 1000))]
        self._undo("C", keys[1], owner)
        self.longest = max(self.longest, spec.probe_lease)
        return len(self.kinds) - 1

    def admit(
        self, client: redis.Redis
    ) -> (Admitted | Refused | Replay | Mismatch | Rejected | Poison | DeadLettered
          | RolledBack):
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
        if code == 2:
            return Replay(index, _text(reply[2]), _text(reply[3]))
        if code == 3:
            return Mismatch(index)
        if code == 4:
            return Rejected(index, self.kinds[index], _text(reply[2]))
        if code == 5:
            return Poison(index, int(reply[2]))
        if code == 7:
            return DeadLettered(index)
        ms = int(reply[2])
        slot = int(reply[3]) if len(reply) > 3 else None
        return Refused(index, self.kinds[index], ms / 1000 if ms > 0 else None, slot)


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


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


class Release:
    """What completion settles, built from what admission took.

    Idempotency records are settled with an outcome chosen at the end of the
    run (:meth:`settle_idempotency`); by default they are forgotten (``X``).
    """

    def __init__(self) -> None:
        self.kinds: list[str] = []
        self.keys: list[str] = []
        self._args: list[list[Any]] = []

    def add_idempotency(self, key: str, owner: str, ttl: float) -> None:
        self.kinds.append("I")
        self.keys.append(key)
        self._args.append([owner, "X", "", max(1, int(ttl * 1000))])

    def settle_idempotency(self, outcome: str, payload: str) -> None:
        """``S`` with result JSON, ``F`` with error JSON, or ``X`` (forget)."""
        for kind, args in zip(self.kinds, self._args, strict=True):
            if kind == "I":
                args[1], args[2] = outcome, payload

    def add_lock(self, lock_key: str, lease_value: str) -> None:
        self.kinds.append("L")
        self.keys.append(lock_key)
        self._args.append([lease_value])

    def add_bulkhead(self, slots_key: str, owner: str) -> None:
        self.kinds.append("K")
        self.keys.append(slots_key)
        self._args.append([owner])

    def add_deliveries(self, key: str) -> None:
        self.kinds.append("D")
        self.keys.append(key)
        self._args.append([0])

    def mark_dead(self, ttl: float) -> None:
        """The task id was dead-lettered: completion keeps its mark for ``ttl`` seconds."""
        for kind, args in zip(self.kinds, self._args, strict=True):
            if kind == "D":
                args[0] = max(1, int(ttl * 1000))

    def add_breaker(self, keys: tuple[str, str], spec: BreakerSpec, owner: str) -> None:
        """Report the outcome to the breaker; neutral unless :meth:`settle_breaker` says."""
        self.kinds.append("C")
        self.keys += list(keys)
        self._args.append([owner, "n", spec.window, spec.failure_threshold, spec.min_calls,
                           spec.success_threshold])

    def settle_breaker(self, outcome: str) -> None:
        """``s`` success, ``f`` a classified failure, ``n`` neutral."""
        for kind, args in zip(self.kinds, self._args, strict=True):
            if kind == "C":
                args[1] = outcome

    def __bool__(self) -> bool:
        return bool(self.kinds)

    def run(self, client: redis.Redis) -> list[int]:
        """One round trip; safe to repeat (a second run changes nothing)."""
        args: list[Any] = ["".join(self.kinds)]
        for entry in self._args:
            args += entry
        reply = script("complete")(client, self.keys, args)
        return [int(r) for r in reply]
