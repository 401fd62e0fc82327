"""Adversarial review of issue 11's second-round fixes: each test reproduces a defect (xfail strict)."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery
from celery.exceptions import Retry

from celery_reliable import ReliableTask

from .test_countdown_cap import app, deliver

__all__ = ["app"]  # the fixture, re-exported so pytest finds it here


class _LoggingRetryTask(ReliableTask):  # type: ignore[misc]
    """A house base class that logs every retry, then defers to ReliableTask.retry."""

    abstract = True

    def retry(self, *args: Any, **kwargs: Any) -> Any:
        return super().retry(*args, **kwargs)


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="retry() recognises Celery's autoretry wrapper only as its direct "
                          "caller: a subclass overriding retry() hides it, the backoff is not capped")
def test_autoretry_backoff_through_a_subclass_retry_is_capped(app: Celery, prefix: str) -> None:
    """An autoretry_for + retry_backoff delay escapes the cap when a subclass overrides retry().

    ``ReliableTask.retry`` looks at ``sys._getframe(1)``: with a base class that
    wraps ``retry()`` (logging, metrics: a common pattern) that frame is the
    subclass's method, not Celery's wrapper, so the 4000 s countdown Celery
    computed is taken for the caller's own and kept (a warning only). The
    broker (60 s visibility timeout) redelivers the held ETA message meanwhile:
    the task runs twice.
    """
    app.conf.broker_transport_options = {"visibility_timeout": 60}  # cap 54 s

    @app.task(base=_LoggingRetryTask, bind=True, shared=False, name="adv.auto_backoff_sub",
              autoretry_for=(KeyError,), retry_backoff=4000, retry_backoff_max=7200,
              retry_jitter=False, max_retries=5)
    def computed(self: Any) -> str:
        raise KeyError("listed in autoretry_for")

    retry = deliver(computed, queue=f"q{prefix}")
    assert isinstance(retry, Retry)
    assert float(retry.when) <= 54, f"autoretry countdown {retry.when}s beyond the 54 s cap"
