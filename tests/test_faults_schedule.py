"""The fault campaign's schedule and plumbing (the campaign itself runs as scripts/faults)."""

from __future__ import annotations

import itertools
import os
import shutil
import time
from pathlib import Path

import pytest
import redis
from kombu import Connection, Exchange, Queue

from celery_reliable.config import ReliableSettings
from faults.app import VISIBILITY_TIMEOUT, build_app
from faults.cluster import (
    RABBITMQ_CONSUMER_TIMEOUT,
    Cluster,
    RabbitMQServer,
    RedisServer,
    TcpProxy,
    rabbitmq_server_script,
)
from faults.nemesis import NEMESES
from faults.run import parse, schedule


def test_same_seed_same_schedule_and_every_nemesis_once() -> None:
    """A seed fixes the whole schedule; a 3-minute one injects every nemesis at least once."""
    names = list(NEMESES)
    first = schedule(1, 180, names)
    assert first == schedule(1, 180, names)
    assert first != schedule(2, 180, names)
    assert {s.nemesis for s in first} == set(names)
    assert all(s.at + s.duration <= 180 for s in first)
    assert all(b.at >= a.at + a.duration for a, b in itertools.pairwise(first))


def test_proxy_stall_holds_bytes_and_retarget_switches_server(tmp_path: Path) -> None:
    """stall() forwards nothing until resume(); retarget() sends new connections elsewhere."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    a, b = RedisServer(tmp_path / "a"), RedisServer(tmp_path / "b")
    a.start()
    b.start()
    proxy = TcpProxy(a.port)
    proxy.start()
    try:
        a.client().set("who", "a")
        b.client().set("who", "b")
        client = redis.Redis(port=proxy.port, socket_timeout=0.5)
        assert client.get("who") == b"a"
        proxy.stall()
        with pytest.raises(redis.TimeoutError):
            client.get("who")
        proxy.resume()
        proxy.retarget(b.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert redis.Redis(port=proxy.port, socket_timeout=2).get("who") == b"b"
                break
            except (OSError, redis.ConnectionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        proxy.stop()
        a.kill()
        b.kill()


def test_broker_option_defaults_to_rabbitmq_and_refuses_others() -> None:
    assert parse([]).broker == "rabbitmq"
    assert parse(["--broker", "redis"]).broker == "redis"
    with pytest.raises(SystemExit):
        parse(["--broker", "kafka"])
    with pytest.raises(ValueError, match="broker must be one of"):
        Cluster(Path("unused"), broker="kafka")


@pytest.mark.parametrize(
    ("url", "window", "options"),
    [
        ("redis://127.0.0.1:1/0", VISIBILITY_TIMEOUT, {"visibility_timeout": VISIBILITY_TIMEOUT}),
        ("amqp://guest:guest@127.0.0.1:1//", RABBITMQ_CONSUMER_TIMEOUT, {"confirm_publish": True}),
    ],
)
def test_app_fits_its_broker(
    monkeypatch: pytest.MonkeyPatch, url: str, window: float, options: dict[str, object]
) -> None:
    """Redis: its visibility timeout; RabbitMQ: confirms, the window is the consumer_timeout."""
    monkeypatch.setenv("FAULTS_BROKER_URL", url)
    app = build_app()
    assert app.conf.broker_transport_options == options
    assert ReliableSettings.from_conf(app.conf).redelivery_window == window


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (killed, not yet reaped by its new parent) is not running
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_private_rabbitmq_keeps_confirmed_messages_across_kill_9(tmp_path: Path) -> None:
    """A kill -9 of the private node loses no confirmed persistent message; destroy ends it all."""
    try:
        rabbitmq_server_script()
    except RuntimeError:
        pytest.skip("rabbitmq-server is not installed")
    node = RabbitMQServer(tmp_path / "broker")
    assert 5672 not in (node.port, node.dist_port, node.epmd_port)
    assert 4369 not in (node.port, node.dist_port, node.epmd_port)
    queue = Queue("t", Exchange("t", "direct", durable=True), "t", durable=True)
    try:
        node.start()
        first_pid = node.pid
        with Connection(node.url, transport_options={"confirm_publish": True}) as conn:
            producer = conn.Producer()
            for i in range(20):
                producer.publish({"i": i}, exchange=queue.exchange, routing_key="t",
                                 declare=[queue], delivery_mode=2)
        node.kill()
        assert first_pid is not None and not _alive(first_pid)
        node.start()  # same ports, same data
        with Connection(node.url) as conn:
            assert queue(conn.channel()).queue_declare(passive=True).message_count == 20
    finally:
        pids = [p for p in (node.pid, node.epmd.pid if node.epmd else None) if p is not None]
        node.destroy()
    assert pids and not any(_alive(p) for p in pids)
    assert not node.home.exists()
    assert any(tmp_path.joinpath("broker").glob("faults*@localhost.log"))
