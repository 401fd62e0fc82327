"""The fault campaign's schedule and plumbing (the campaign itself runs as scripts/faults)."""

from __future__ import annotations

import itertools
import shutil
import time
from pathlib import Path

import pytest
import redis

from faults.cluster import RedisServer, TcpProxy
from faults.nemesis import NEMESES
from faults.run import schedule


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
