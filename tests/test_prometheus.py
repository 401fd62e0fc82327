"""Prometheus export: library counters forwarded with stable labels, gauges read from
Redis on scrape, and counters of forked children (prefork workers) merged through
prometheus_client's multiprocess mode."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from celery_reliable import RedisFence, guards, metrics
from celery_reliable.admission import Admitted, Plan, Release
from celery_reliable.config import ReliableSettings
from celery_reliable.keys import KeySpace
from tests.cli_app import RELIABLE_CONF
from tests.conftest import ROOT, RedisServer, free_port, wait_for

pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry, generate_latest

from celery_reliable import prometheus

SETTINGS = ReliableSettings.from_conf(RELIABLE_CONF)

#: The label names of every exported metric: part of the interface.
LABELS = {
    "reliable_lock_acquire_total": {"result"},
    "reliable_lock_wait_seconds": set(),
    "reliable_fence_rejections_total": set(),
    "reliable_idempotent_replays_total": set(),
    "reliable_rate_limited_total": {"queue"},
    "reliable_bulkhead_rejected_total": {"tier"},
    "reliable_retries_total": {"task", "reason"},
    "reliable_dead_letters_total": set(),
    "reliable_circuit_transitions_total": {"breaker", "state"},
    "reliable_circuit_deferrals_total": {"breaker"},
    "reliable_bulkhead_waits_total": {"tier"},
    "reliable_throttles_total": {"task"},
    "reliable_retry_budget_exhausted_total": {"task"},
    "reliable_idempotency_lease_lost_total": {"task"},
    "reliable_store_up": {"store"},
}


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    reg = CollectorRegistry()
    old = metrics.set_sink(None)
    prometheus.install(reg)
    yield reg
    metrics.set_sink(old)


def sample(reg: CollectorRegistry, name: str, **labels: str) -> float:
    return reg.get_sample_value(name, labels) or 0.0


def test_library_counters_reach_prometheus_with_stable_labels(
    registry: CollectorRegistry, redis_client: redis.Redis, prefix: str
) -> None:
    metrics.inc("reliable_retries_total", task="t.sync", reason="ConnectionError")
    metrics.inc("reliable_retries_total", task="t.sync", reason="ConnectionError")
    metrics.inc("reliable_rate_limited_total", bucket="queue 'emails'")
    metrics.inc("reliable_rate_limited_total", bucket="rate_limit_key")
    metrics.inc("reliable_bulkhead_rejected_total", tier="optional", reason="drop")
    metrics.inc("reliable_bulkhead_rejected_total", tier="optional", reason="timeout")
    metrics.inc("reliable_dead_letters_total", task="t.sync", reason="retries exhausted")
    metrics.inc("reliable_idempotent_replays_total", task="t.charge")
    metrics.inc("reliable_idempotency_lease_lost_total", task="t.charge")
    metrics.inc("reliable_lock_acquire_total", result="acquired")
    metrics.inc("reliable_lock_acquire_total", result="busy-defer")
    metrics.inc("reliable_circuit_transitions_total", breaker="partner", state="open")
    metrics.observe("reliable_lock_wait_seconds", 0.7)
    metrics.inc("reliable_not_exported_total", x="y")  # unknown: counted here, not exported
    metrics.gauge("reliable_store_up", 0, store="postgres")
    metrics.gauge("reliable_store_up", 1, store="redis")
    fence = RedisFence(redis_client)  # a real call site: a stale token is refused
    fence.set(f"{prefix}:acct", "new", 10)
    with pytest.raises(Exception, match="stale"):
        fence.set(f"{prefix}:acct", "old", 9)

    assert sample(registry, "reliable_retries_total", task="t.sync",
                  reason="ConnectionError") == 2
    assert sample(registry, "reliable_rate_limited_total", queue="emails") == 1
    assert sample(registry, "reliable_rate_limited_total", queue="rate_limit_key") == 1
    assert sample(registry, "reliable_bulkhead_rejected_total", tier="optional") == 2
    assert sample(registry, "reliable_dead_letters_total") == 1
    assert sample(registry, "reliable_idempotent_replays_total") == 1
    assert sample(registry, "reliable_idempotency_lease_lost_total", task="t.charge") == 1
    assert sample(registry, "reliable_lock_acquire_total", result="acquired") == 1
    assert sample(registry, "reliable_lock_acquire_total", result="busy-defer") == 1
    assert sample(registry, "reliable_fence_rejections_total") == 1
    assert sample(registry, "reliable_circuit_transitions_total", breaker="partner",
                  state="open") == 1
    assert sample(registry, "reliable_lock_wait_seconds_count") == 1
    assert sample(registry, "reliable_lock_wait_seconds_bucket", le="1.0") == 1
    assert sample(registry, "reliable_lock_wait_seconds_bucket", le="0.5") == 0
    assert metrics.value("reliable_not_exported_total", x="y") >= 1
    assert registry.get_sample_value("reliable_store_up", {"store": "postgres"}) == 0
    assert sample(registry, "reliable_store_up", store="redis") == 1

    exported = {family.name: family for family in registry.collect()}
    for name, labels in LABELS.items():
        family = exported[name.removesuffix("_total")]
        for s in family.samples:
            assert set(s.labels) - {"le"} == labels, (name, s)
    text = generate_latest(registry).decode()
    assert "reliable_not_exported" not in text


def test_a_failing_sink_never_breaks_the_caller() -> None:
    def broken(name: str, value: float, labels: object) -> None:
        raise RuntimeError("exporter bug")

    old = metrics.set_sink(broken)
    try:
        before = metrics.value("reliable_throttles_total", task="x")
        metrics.inc("reliable_throttles_total", task="x")
        metrics.observe("reliable_lock_wait_seconds", 1.0)
        assert metrics.value("reliable_throttles_total", task="x") == before + 1
    finally:
        metrics.set_sink(old)


def _app(redis_url: str, prefix: str) -> Celery:
    app = Celery("prom-test", broker="memory://", backend="cache+memory://")
    app.conf.update(reliable_redis_url=redis_url, reliable_key_prefix=prefix, **RELIABLE_CONF)
    return app


def test_gauges_are_read_from_redis_on_scrape(redis_client: redis.Redis, redis_url: str,
                                             prefix: str) -> None:
    keys = KeySpace(prefix)
    plan = Plan()
    guards.bulkhead.plan(plan, keys, "payments", SETTINGS.bulkheads["payments"], "owner-1",
                         "task-1")
    guards.bucket.plan(plan, keys.queue_bucket("emails"), SETTINGS.queue_rate_limits["emails"], 4)
    assert isinstance(plan.admit(redis_client), Admitted)
    spec = SETTINGS.circuit_breakers["partner"]
    for _ in range(2):
        entry = Plan()
        guards.breaker.plan(entry, keys.breaker("partner"), spec, "probe")
        assert isinstance(entry.admit(redis_client), Admitted)
        done = Release()
        guards.breaker.release(done, keys.breaker("partner"), spec, "probe")
        guards.breaker.settle(done, "f")
        done.run(redis_client)

    reg = CollectorRegistry()
    reg.register(prometheus.StateCollector(_app(redis_url, prefix)))

    assert sample(reg, "reliable_state_up") == 1
    assert sample(reg, "reliable_bulkhead_active", tier="payments") == 1
    assert sample(reg, "reliable_bulkhead_active", tier="critical") == 0
    assert sample(reg, "reliable_bulkhead_waiting", tier="payments") == 0
    assert sample(reg, "reliable_circuit_state", breaker="partner") == 1
    assert 6 <= sample(reg, "reliable_bucket_tokens", queue="emails") < 7
    assert sample(reg, "reliable_bucket_tokens", queue="stripe") == 25

    down = CollectorRegistry()
    down.register(prometheus.StateCollector(
        _app(f"redis://127.0.0.1:{free_port()}/0", prefix)))
    text = generate_latest(down).decode()  # the scrape itself does not fail
    assert "reliable_state_up 0.0" in text
    assert "reliable_bulkhead_active" not in text


CHILDREN = textwrap.dedent("""
    import json, multiprocessing, os, sys
    from celery_reliable import metrics, prometheus

    prometheus.install()

    def child(n):
        prometheus.install()  # what worker_process_init does
        for _ in range(n):
            metrics.inc("reliable_retries_total", task="t", reason="ConnectionError")
        metrics.observe("reliable_lock_wait_seconds", 2.0)

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=child, args=(n,)) for n in (1, 2, 3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(p.pid)
    metrics.inc("reliable_retries_total", task="t", reason="ConnectionError")  # the parent's own
    reg = prometheus.registry_for()
    get = reg.get_sample_value
    print(json.dumps({
        "retries": get("reliable_retries_total", {"task": "t", "reason": "ConnectionError"}),
        "waits": get("reliable_lock_wait_seconds_count", {}),
        "files": sorted(os.listdir(os.environ["PROMETHEUS_MULTIPROC_DIR"])),
        "pids": [p.pid for p in procs],
    }))
""")


def test_counts_of_forked_children_are_merged(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CHILDREN], env=env, capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["retries"] == 1 + 2 + 3 + 1
    assert out["waits"] == 3
    for pid in out["pids"]:
        assert f"counter_{pid}.db" in out["files"]


def test_multiprocess_mode_needs_the_variable_before_the_import(tmp_path: Path) -> None:
    script = ("import os, prometheus_client\n"
              f"os.environ['PROMETHEUS_MULTIPROC_DIR'] = {str(tmp_path)!r}\n"
              "from celery_reliable import prometheus\n"
              "prometheus.install()\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode != 0
    assert "imported before PROMETHEUS_MULTIPROC_DIR was set" in proc.stderr


# ------------------------------------------------------------------ a real prefork worker


@pytest.fixture
def metrics_worker(redis_server: RedisServer, redis_url: str, prefix: str,
                   tmp_path: Path) -> Iterator[dict[str, str]]:
    multiproc = tmp_path / "prom"
    multiproc.mkdir()
    (multiproc / "counter_1.db").write_bytes(b"stale")  # left by a previous run: emptied
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
        "CLI_METRICS_PORT": str(free_port()),
        "CLI_REDIS_URL": redis_url,
        "CLI_DATABASE_URL": "",
        "CLI_PREFIX": prefix,
        "CLI_BROKER_URL": f"{redis_server.url}/6",
        "CLI_RESULT_URL": f"{redis_server.url}/7",
        "CLI_QUEUE": f"q-{prefix}",
    }
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 - lives with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tests.cli_app", "worker", "-P", "prefork",
         "-c", "2", "-Q", env["CLI_QUEUE"], "--without-mingle", "--without-gossip",
         "--without-heartbeat", "--prefetch-multiplier", "1", "-l", "info"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        yield env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()
        print((tmp_path / "worker.log").read_text(errors="replace")[-3000:])


def scrape(port: str) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())
    except OSError:
        return None


@pytest.mark.slow
def test_prefork_worker_exports_counts_of_all_its_children(
    metrics_worker: dict[str, str], redis_client: redis.Redis, prefix: str
) -> None:
    env = metrics_worker
    port = env["CLI_METRICS_PORT"]
    first = wait_for(lambda: scrape(port), 60, "the worker's metrics endpoint", interval=0.2)
    assert "reliable_state_up 1.0" in first
    assert not Path(env["PROMETHEUS_MULTIPROC_DIR"], "counter_1.db").exists()  # emptied
    assert 'reliable_bulkhead_active{tier="payments"} 0.0' in first

    sender = Celery("sender", broker=env["CLI_BROKER_URL"], backend=env["CLI_RESULT_URL"])
    sent, pids = 0, set()
    while len(pids) < 2 and sent < 48:  # until both children have counted (a slow start)
        batch = [sender.send_task("cli.count", args=["reliable_retries_total", 1, 0.3],
                                  queue=env["CLI_QUEUE"]) for _ in range(4)]
        pids |= {r.get(timeout=60) for r in batch}
        sent += len(batch)
    assert len(pids) == 2, pids

    def merged() -> float:
        text = scrape(port) or ""
        found = re.search(r'reliable_retries_total\{reason="test",task="cli.count"\} (\S+)', text)
        return float(found.group(1)) if found else 0.0

    wait_for(lambda: merged() == sent, 10, f"{sent} retries merged from both children {pids}")
    keys = KeySpace(prefix)
    plan = Plan()
    guards.bulkhead.plan(plan, keys, "payments", SETTINGS.bulkheads["payments"],
                      f"o-{secrets.token_hex(2)}", "w")
    assert isinstance(plan.admit(redis_client), Admitted)
    assert 'reliable_bulkhead_active{tier="payments"} 1.0' in (scrape(port) or "")
