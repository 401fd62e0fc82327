"""The broker's redelivery window, and the cap it puts on every countdown this library sets.

A worker holds a message with a countdown (a deferral, a retry) unacknowledged
until its ETA. Past the broker's redelivery window the broker gives the
message to another worker while the first still holds it, and the task runs
twice:

* Redis (``redis://``, ``rediss://``, ``sentinel://``) and SQS (``sqs://``):
  ``broker_transport_options["visibility_timeout"]``; kombu's defaults are
  3600 s for Redis (``kombu.transport.redis.Channel.visibility_timeout``) and
  1800 s for SQS (``kombu.transport.SQS.Channel.default_visibility_timeout``).
* AMQP (RabbitMQ: ``amqp://``, ``amqps://``, ``pyamqp://``, ``librabbitmq://``,
  and Celery's default broker): RabbitMQ's ``consumer_timeout`` closes the
  channel of a consumer holding an unacknowledged delivery longer than that and
  requeues it; its default is 30 minutes (1800 s) since RabbitMQ 3.8.17. It is
  a server setting the app cannot read: set ``reliable_redelivery_window`` if
  the server's differs.
* Any other transport: no window is known, nothing is capped unless
  ``reliable_redelivery_window`` says.

The cap is the window minus a margin of 10% of the window, at least 5 s (half
the window when that is under 10 s): the margin absorbs the time a message
waits between its publication and the worker taking it, and clock skew.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .errors import ConfigurationError

__all__ = [
    "AMQP_CONSUMER_TIMEOUT",
    "REDIS_VISIBILITY_TIMEOUT",
    "SQS_VISIBILITY_TIMEOUT",
    "countdown_cap",
    "redelivery_window",
]

#: kombu's Redis transport default ``visibility_timeout``, seconds.
REDIS_VISIBILITY_TIMEOUT = 3600.0
#: kombu's SQS transport default ``visibility_timeout``, seconds.
SQS_VISIBILITY_TIMEOUT = 1800.0
#: RabbitMQ's default ``consumer_timeout`` (30 min since 3.8.17), seconds.
AMQP_CONSUMER_TIMEOUT = 1800.0

_REDIS = frozenset({"redis", "rediss", "sentinel"})
_SQS = frozenset({"sqs"})
_AMQP = frozenset({"amqp", "amqps", "pyamqp", "librabbitmq"})


def _transport(conf: Mapping[str, Any]) -> str | None:
    """The transport alias kombu would pick for the consuming connection, lower case."""
    url = getattr(conf, "broker_read_url", None) or conf.get("broker_read_url") \
        or conf.get("broker_url")
    if isinstance(url, (list, tuple)):
        url = url[0] if url else None
    explicit = conf.get("broker_transport")
    if not url:
        # Celery's default broker is amqp://guest@localhost//
        return explicit.lower() if isinstance(explicit, str) else (None if explicit else "amqp")
    if not isinstance(url, str):
        return None
    first = url.split(";", 1)[0].strip()
    if "://" not in first:
        return explicit.lower() if isinstance(explicit, str) else None
    scheme = first[: first.index("://")]
    if "+" in scheme:  # "redis+socket://", "sqla+postgresql://": kombu takes the prefix
        return scheme.split("+", 1)[0].lower()
    if explicit:  # kombu lets broker_transport win over the URL's scheme
        return explicit.lower() if isinstance(explicit, str) else None
    return scheme.lower()


def _visibility_timeout(conf: Mapping[str, Any], default: float) -> float:
    options = conf.get("broker_transport_options") or {}
    if not isinstance(options, Mapping):
        raise ConfigurationError(
            f"app settings: 'broker_transport_options' must be a mapping, got {options!r}"
        )
    raw = options.get("visibility_timeout")
    if raw is None:
        return default
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw) \
            or raw <= 0:
        raise ConfigurationError(
            "app settings: broker_transport_options['visibility_timeout'] must be a finite "
            f"number of seconds > 0, got {raw!r}"
        )
    return float(raw)


def redelivery_window(conf: Mapping[str, Any], override: float | None = None) -> float | None:
    """The broker's redelivery window in seconds, from the app's settings; None if unknown.

    ``override`` (``reliable_redelivery_window``, already validated) wins; for
    Redis and SQS, whose window the app's settings state, it may only shorten
    it. Raises ConfigurationError naming a malformed or contradicted setting.
    """
    transport = _transport(conf)
    known: float | None = None
    if transport in _REDIS:
        known = _visibility_timeout(conf, REDIS_VISIBILITY_TIMEOUT)
    elif transport in _SQS:
        known = _visibility_timeout(conf, SQS_VISIBILITY_TIMEOUT)
    if override is None:
        if known is None and transport in _AMQP:
            return AMQP_CONSUMER_TIMEOUT  # the server's setting: not readable from here
        return known
    if known is not None and override > known:
        raise ConfigurationError(
            f"app settings: 'reliable_redelivery_window' ({override:g} s) exceeds the "
            f"broker's visibility_timeout ({known:g} s; broker_transport_options, or "
            "kombu's default): the broker would redeliver held messages sooner; raise "
            "visibility_timeout instead"
        )
    return override


def countdown_cap(window: float | None) -> float | None:
    """The longest countdown this library sets under ``window`` seconds; None: no cap.

    ``window - max(0.1 * window, min(5, window / 2))``.
    """
    if window is None:
        return None
    return window - max(0.1 * window, min(5.0, window / 2))
