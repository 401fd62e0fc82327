"""The shared circuit breaker: its state machine in Redis, and a task behind it."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import TestWorkController

from celery_reliable import ConfigurationError, ReliableTask, breaker_state, guards
from celery_reliable.admission import Admitted, Plan, Refused, Release
from celery_reliable.breaker import BreakerSpec, parse_breakers
from celery_reliable.keys import KeySpace

from .conftest import wait_for

SPEC = BreakerSpec(
    failure_threshold=3,
    window=5,
    min_calls=3,
    open_seconds=0.4,
    success_threshold=2,
    half_open_max=2,
)


def call(
    client: redis.Redis, keys: tuple[str, str], owner: str, outcome: str | None
) -> Admitted | Refused:
    """One execution by ``owner`` (any worker: the state is in Redis). None: still running."""
    plan = Plan()
    guards.breaker.plan(plan, keys, SPEC, owner)
    admitted = plan.admit(client)
    assert isinstance(admitted, (Admitted, Refused))
    if isinstance(admitted, Admitted) and outcome is not None:
        release = Release()
        guards.breaker.release(release, keys, SPEC, owner)
        guards.breaker.settle(release, outcome)
        release.run(client)
    return admitted


def state(client: redis.Redis, keys: tuple[str, str]) -> int:
    return int(client.hget(keys[0], "s") or 0)


def test_state_machine(redis_client: redis.Redis, prefix: str) -> None:
    keys = KeySpace(prefix).breaker("api")
    # closed: neutral outcomes (a 404) and successes never open it
    for i in range(6):
        call(redis_client, keys, f"w{i % 2}", "n")
    call(redis_client, keys, "a", "s")
    assert state(redis_client, keys) == 0
    # failures seen by worker A and worker B count together
    call(redis_client, keys, "worker-A", "f")
    call(redis_client, keys, "worker-B", "f")
    assert state(redis_client, keys) == 0
    call(redis_client, keys, "worker-A", "f")
    assert state(redis_client, keys) == 1  # 3 failures in the last 5 calls
    refused = call(redis_client, keys, "worker-B", None)
    assert isinstance(refused, Refused) and refused.retry_after is not None
    assert 0 < refused.retry_after <= 0.4
    time.sleep(0.45)
    # half-open: exactly half_open_max probes at once, fleet-wide
    probes = [call(redis_client, keys, f"probe-{i}", None) for i in range(3)]
    assert [type(p) for p in probes] == [Admitted, Admitted, Refused]
    assert state(redis_client, keys) == 2
    for i in range(2):  # both probes succeed: closed
        release = Release()
        guards.breaker.release(release, keys, SPEC, f"probe-{i}")
        guards.breaker.settle(release, "s")
        release.run(redis_client)
    assert state(redis_client, keys) == 0


def test_a_failed_probe_reopens(redis_client: redis.Redis, prefix: str) -> None:
    keys = KeySpace(prefix).breaker("api")
    for i in range(3):
        call(redis_client, keys, f"w{i}", "f")
    assert state(redis_client, keys) == 1
    time.sleep(0.45)
    call(redis_client, keys, "probe", "f")
    assert state(redis_client, keys) == 1
    assert isinstance(call(redis_client, keys, "next", None), Refused)


def test_a_dead_probe_frees_its_place(redis_client: redis.Redis, prefix: str) -> None:
    keys = KeySpace(prefix).breaker("api")
    spec = BreakerSpec(
        failure_threshold=1,
        window=1,
        min_calls=1,
        open_seconds=0.1,
        success_threshold=1,
        half_open_max=1,
        probe_lease=0.3,
    )
    plan = Plan()
    guards.breaker.plan(plan, keys, spec, "x")
    plan.admit(redis_client)
    release = Release()
    guards.breaker.release(release, keys, spec, "x")
    guards.breaker.settle(release, "f")
    release.run(redis_client)
    time.sleep(0.15)
    first = Plan()
    guards.breaker.plan(first, keys, spec, "dies")
    assert isinstance(first.admit(redis_client), Admitted)  # then its worker is killed
    second = Plan()
    guards.breaker.plan(second, keys, spec, "other")
    assert isinstance(second.admit(redis_client), Refused)
    time.sleep(0.35)
    third = Plan()
    guards.breaker.plan(third, keys, spec, "other")
    assert isinstance(third.admit(redis_client), Admitted)


def test_bad_breaker_config() -> None:
    with pytest.raises(ConfigurationError, match="'window' must be a positive integer"):
        parse_breakers("s", "reliable_circuit_breakers", {"api": {"window": 0}})
    with pytest.raises(ConfigurationError, match="must be <= 'window'"):
        parse_breakers("s", "reliable_circuit_breakers", {"api": {"failure_threshold": 20}})
    assert parse_breakers("s", "r", {"api": {}})["api"] == BreakerSpec()


def test_task_behind_an_open_breaker_is_deferred_then_probes_and_closes(
    celery_app: Celery, celery_worker: TestWorkController, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="celery_reliable")
    celery_app.conf.reliable_circuit_breakers = {
        "partner": {
            "failure_threshold": 2,
            "window": 4,
            "min_calls": 2,
            "open_seconds": 1.0,
            "success_threshold": 1,
            "half_open_max": 1,
        }
    }
    runs: list[str] = []

    @celery_app.task(
        base=ReliableTask,
        bind=True,
        shared=False,
        name="cb.partner",
        circuit_breaker="partner",
        defer_delay=0.1,
        defer_max_delay=0.3,
    )
    def partner(self: Any, mode: str) -> str:
        runs.append(mode)
        if mode == "down":
            raise ConnectionError("partner unreachable")
        if mode == "404":
            raise LookupError("no such customer")  # not classified: does not count
        return mode

    celery_worker.reload()
    for mode in ("404", "404", "404"):
        with pytest.raises(LookupError):
            partner.delay(mode).get(timeout=10)
    assert breaker_state(celery_app, "partner") == 0
    for _ in range(2):
        with pytest.raises(ConnectionError):
            partner.delay("down").get(timeout=10)
    assert breaker_state(celery_app, "partner") == 1
    opened = time.monotonic()
    result = partner.delay("ok")
    wait_for(lambda: result.state == "RETRY", 5, "a deferral while open")
    assert result.get(timeout=15) == "ok"
    assert time.monotonic() - opened >= 0.9  # it did not run while the breaker was open
    assert runs.count("ok") == 1 and result.result == "ok"
    assert breaker_state(celery_app, "partner") == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("'partner' closed -> open" in m for m in messages)
    assert any("'partner' open -> half-open" in m for m in messages)
    assert any("'partner' half-open -> closed" in m for m in messages)


def test_unknown_breaker_fails_at_bind(celery_app: Celery) -> None:
    def f() -> None:
        return None

    with pytest.raises(ConfigurationError, match="option 'circuit_breaker' names 'nope'"):
        celery_app.task(base=ReliableTask, shared=False, name="cb.x", circuit_breaker="nope")(
            f
        )._get_current_object()


def test_slow_calls_count_as_failures(celery_app: Celery,
                                      celery_worker: TestWorkController) -> None:
    celery_app.conf.reliable_circuit_breakers = {
        "slowpoke": {"failure_threshold": 2, "window": 2, "min_calls": 2, "open_seconds": 30,
                     "slow_call_seconds": 0.2}}

    @celery_app.task(base=ReliableTask, bind=True, shared=False, name="cb.slow",
                     circuit_breaker="slowpoke")
    def slow(self: Any, seconds: float) -> str:
        time.sleep(seconds)
        return "done"

    celery_worker.reload()
    assert slow.delay(0.0).get(timeout=10) == "done"
    assert breaker_state(celery_app, "slowpoke") == 0
    for _ in range(2):
        assert slow.delay(0.3).get(timeout=10) == "done"  # succeeded, but too slowly
    assert breaker_state(celery_app, "slowpoke") == 1
