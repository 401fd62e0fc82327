"""How long calls queued behind an open breaker wait once the downstream is back (the README's
bound), with a real breaker in Redis and an embedded worker."""

from __future__ import annotations

import threading
import time
from typing import Any

import redis
from celery import Celery
from celery.contrib.testing.worker import TestWorkController

from celery_reliable import Backoff, ReliableTask, breaker_state, guards
from celery_reliable.admission import Admitted, Plan, Refused, Release
from celery_reliable.breaker import BreakerSpec
from celery_reliable.keys import KeySpace

from .conftest import wait_for

OPEN = 1.0  # open_seconds


def bound(open_seconds: float, call: float, rounds: int = 1) -> float:
    """The README's worst case after recovery: a probe that failed just before it (``call``),
    reopen, the queued calls' spread, the probes' rounds, and one more ask of a busy probe."""
    probes = rounds * call
    return call + 1.2 * open_seconds + probes + 1.2 * max(1.0, 0.2 * open_seconds + probes)


def test_queued_calls_run_within_the_bound_after_a_long_outage(
    celery_app: Celery, celery_worker: TestWorkController
) -> None:
    """Calls deferred through 10 s of failing probes run within ~2.4 s of the recovery."""
    celery_app.conf.reliable_circuit_breakers = {
        "flappy": {"failure_threshold": 2, "window": 2, "min_calls": 2,
                   "open_seconds": OPEN, "success_threshold": 1, "half_open_max": 1}}
    down = threading.Event()
    down.set()
    finished: dict[int, float] = {}

    # The defer policy is the default one (1 s, doubling up to 30 s): before the fix its
    # growth, not the breaker, decided when a queued call came back.
    @celery_app.task(base=ReliableTask, bind=True, shared=False, name="cbw.call",
                     circuit_breaker="flappy",
                     backoff=Backoff.exponential(0.05, 0.1, max_attempts=1000))
    def call(self: Any, n: int) -> int:
        if down.is_set():
            raise ConnectionError("downstream down")  # retried: failed probes stay queued
        finished[n] = time.monotonic()
        return n

    celery_worker.reload()
    results = [call.delay(n) for n in range(12)]
    wait_for(lambda: breaker_state(celery_app, "flappy") == 1, 10, "the breaker to open")
    time.sleep(10.0)  # the downstream stays down: every half-open probe fails and reopens it
    assert not finished
    down.clear()
    recovered = time.monotonic()
    assert sorted(r.get(timeout=90) for r in results) == list(range(12))
    waits = sorted(t - recovered for t in finished.values())
    # calls are instant here (call = 0): the bound is 1.2 * open + 1.2 s; 2 s for a busy machine
    assert waits[-1] <= bound(OPEN, 0.0) + 2.0, waits


def test_a_busy_half_open_breaker_asks_back_after_as_long_as_its_probes_are_out(
    redis_client: redis.Redis, prefix: str
) -> None:
    """While its probes are out, a refusal's retry-after is max(1 s, time since half-open)."""
    keys = KeySpace(prefix).breaker("busy")
    spec = BreakerSpec(failure_threshold=1, window=1, min_calls=1, open_seconds=0.2,
                       success_threshold=1, half_open_max=1)

    def admit(owner: str) -> Admitted | Refused:
        plan = Plan()
        guards.breaker.plan(plan, keys, spec, owner)
        outcome = plan.admit(redis_client)
        assert isinstance(outcome, (Admitted, Refused))
        return outcome

    admit("a")
    release = Release()
    guards.breaker.release(release, keys, spec, "a")
    guards.breaker.settle(release, "f")
    release.run(redis_client)  # open for 0.2 s
    refused = admit("b")
    assert isinstance(refused, Refused) and refused.retry_after is not None
    assert refused.retry_after <= 0.2  # open: until it half-opens
    time.sleep(0.25)
    assert isinstance(admit("probe"), Admitted)  # half-open: the probe runs (and hangs)
    refused = admit("c")
    assert isinstance(refused, Refused) and refused.retry_after == 1.0
    time.sleep(1.6)
    refused = admit("c")
    assert isinstance(refused, Refused) and refused.retry_after is not None
    assert 1.5 <= refused.retry_after <= 1.6 + 5.0  # as long as the probe has been out
