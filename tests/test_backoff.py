"""Backoff policies (pure) and error classification."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import httpx
import pytest
import requests

from celery_reliable import Backoff, http_status, is_retryable, retry_after


def seq(policy: Backoff, n: int, seed: int = 7) -> list[float]:
    rng, out, prev = random.Random(seed), [], None
    for i in range(n):
        prev = policy.delay(i, rng, prev)
        out.append(prev)
    return out


def test_seeded_sequences_are_reproducible() -> None:
    policy = Backoff.exponential(base=0.5, cap=8, jitter="full")
    assert seq(policy, 6) == seq(policy, 6)
    assert seq(policy, 6) != seq(policy, 6, seed=8)


@pytest.mark.parametrize("jitter", ["full", "equal", "decorrelated", "none"])
def test_every_strategy_stays_within_its_bounds(jitter: str) -> None:
    """1000 draws per retry number: each within the strategy's documented interval."""
    base, cap = 0.25, 4.0
    policy = Backoff.exponential(base=base, cap=cap, jitter=jitter)  # type: ignore[arg-type]
    rng = random.Random(1)
    for n in range(10):
        exp = min(cap, base * 2**n)
        prev = None
        for _ in range(1000):
            d = policy.delay(n, rng, prev)
            if jitter == "full":
                assert 0 <= d <= exp
            elif jitter == "equal":
                assert exp / 2 <= d <= exp
            elif jitter == "none":
                assert d == exp
            else:
                assert base <= d <= min(cap, 3 * (prev if prev is not None else base))
            prev = d if jitter == "decorrelated" else None


def test_float_delays_and_caps() -> None:
    """Sub-second delays work and the cap holds for large retry numbers."""
    policy = Backoff.exponential(base=0.01, cap=0.05, jitter="none")
    assert [policy.delay(n) for n in range(4)] == [0.01, 0.02, 0.04, 0.05]
    assert Backoff.exponential(base=1, cap=30, jitter="none").delay(500) == 30


def test_presets_from_the_seed() -> None:
    assert (
        Backoff.user_facing().max_attempts,
        Backoff.user_facing().base,
        Backoff.user_facing().cap,
    ) == (2, 0.5, 2.0)
    assert (
        Backoff.background().max_attempts,
        Backoff.background().base,
        Backoff.background().cap,
    ) == (5, 2.0, 60.0)
    assert (
        Backoff.rate_limited_api().max_attempts,
        Backoff.rate_limited_api().base,
        Backoff.rate_limited_api().cap,
    ) == (3, 2.0, 120.0)
    assert (
        Backoff.exponential(
            timedelta(seconds=1), timedelta(minutes=1), deadline=timedelta(hours=1)
        ).deadline
        == 3600
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base": 0},
        {"base": -1},
        {"cap": 0.1, "base": 1},
        {"jitter": "random"},
        {"max_attempts": 0},
        {"deadline": -5},
    ],
)
def test_bad_policies_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="Backoff"):
        Backoff.exponential(**kwargs)  # type: ignore[arg-type]


def _requests_error(status: int, headers: dict[str, str] | None = None) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    response.headers.update(headers or {})
    return requests.HTTPError(f"{status}", response=response)


def _httpx_error(status: int, headers: dict[str, str] | None = None) -> httpx.HTTPStatusError:
    request = httpx.Request("GET", "http://upstream.invalid/")
    return httpx.HTTPStatusError(
        f"{status}",
        request=request,
        response=httpx.Response(status, headers=headers or {}, request=request),
    )


@pytest.mark.parametrize("make", [_requests_error, _httpx_error])
def test_http_classification(make: object) -> None:
    """408, 429, 500, 502, 503, 504 retry; other 4xx do not."""
    for status in (408, 429, 500, 502, 503, 504):
        assert is_retryable(make(status)), status  # type: ignore[operator]
    for status in (400, 401, 403, 404, 409, 422):
        assert not is_retryable(make(status)), status  # type: ignore[operator]
    assert http_status(make(503)) == 503  # type: ignore[operator]


def test_transient_errors_retry_and_others_only_when_listed() -> None:
    import redis

    assert is_retryable(ConnectionError()) and is_retryable(TimeoutError())
    assert is_retryable(redis.ConnectionError()) and is_retryable(requests.ConnectionError())
    assert is_retryable(httpx.ConnectTimeout("slow"))
    assert not is_retryable(ValueError("bad input"))
    assert is_retryable(ValueError("listed"), (ValueError,))


def test_retry_after_seconds_and_http_date() -> None:
    assert retry_after(_requests_error(429, {"Retry-After": "7"})) == 7.0
    when = datetime(2030, 1, 1, 0, 0, 30, tzinfo=timezone.utc)
    err = _httpx_error(503, {"Retry-After": format_datetime(when, usegmt=True)})
    assert retry_after(err, now=when.timestamp() - 30) == pytest.approx(30)
    assert retry_after(_requests_error(503)) is None
    assert retry_after(ValueError()) is None
