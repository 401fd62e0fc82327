"""The app settings every guard shares: the stores, the broker's window, the key prefix.

Declared here, like a guard's settings in its module, and composed first by
:mod:`celery_reliable.config` (:data:`~celery_reliable.config.SETTINGS`; the README's
settings reference lists them first).
"""

from __future__ import annotations

from typing import Any

from .options import Option, err, flag, seconds, text, whole

__all__ = ["SHARED_SETTINGS"]


def _prefix(owner: str, name: str, raw: Any) -> str:
    value = str(text()(owner, name, raw))
    if any(c in value for c in "{}\x00 ") or len(value) > 64:
        raise err(owner, name, f"must be at most 64 characters without braces or spaces: {raw!r}")
    return value



#: The settings every guard shares: the stores, the broker's window, the key prefix.
SHARED_SETTINGS: tuple[Option[Any], ...] = (
    Option(
        "reliable_redis_url",
        "redis://127.0.0.1:6379/0",
        "URL",
        "Redis server holding locks, fencing counters and leases. Connections are opened "
        "per worker process, after the fork.",
        text(),
    ),
    Option(
        "reliable_redis_socket_timeout",
        10.0,
        "seconds",
        "Socket timeout of celery-reliable's Redis connections: a call whose reply has not "
        "come back by then fails. An admission that fails so (its reply may be lost after "
        "it ran) is never resent: what it may have taken is undone, owner-checked, and the "
        "task is deferred. Keep it well above Redis' slowest expected reply; it also bounds "
        "how long a worker waits on a stalled link.",
        seconds(),
    ),
    Option(
        "reliable_database_url",
        None,
        "URL",
        "PostgreSQL database for durable records (SQLAlchemy URL; ``postgresql://`` is "
        "read as ``postgresql+psycopg://``). Needed by idempotency and the fencing helpers "
        "that take no explicit connection.",
        text(optional=True),
    ),
    Option(
        "reliable_database_pool_size",
        10,
        "connections",
        "Connections per worker process in celery-reliable's PostgreSQL pool (as many "
        "again may overflow). Each running idempotent task holds one for its whole run: "
        "keep it at least the worker's concurrency per process (threads, gevent).",
        whole(1),
    ),
    Option(
        "reliable_database_lock_timeout",
        5.0,
        "seconds",
        "PostgreSQL ``lock_timeout`` of celery-reliable's connections (also inside "
        "``idempotent_transaction``): a duplicate blocked by a stalled execution's "
        "uncommitted record gives up after this long and is deferred. Not the server's "
        "``idle_in_transaction_session_timeout``: that one must exceed the longest "
        "idempotent body (the transaction stays open while it runs), or the task fails "
        "with 25P03.",
        seconds(),
    ),
    Option(
        "reliable_create_tables",
        True,
        "bool",
        "Create celery-reliable's PostgreSQL tables that do not exist yet when a worker "
        "process first needs them (one short transaction under an advisory lock: safe when "
        "many workers start at once; tables that exist are left alone). ``False``: you "
        "create them (``celery -A proj reliable migrate``, or your own migrations with "
        "``celery_reliable.metadata``), and a task that finds one missing fails at once "
        "with a ``ConfigurationError`` naming that command.",
        flag,
    ),
    Option(
        "reliable_redelivery_window",
        None,
        "seconds",
        "How long the broker lets a worker hold an unacknowledged message before it "
        "redelivers it. ``None`` derives it from the broker settings: Redis and SQS "
        "transports ``broker_transport_options[\"visibility_timeout\"]`` (kombu's "
        "defaults 3600 s and 1800 s), AMQP (RabbitMQ) 1800 s, the default "
        "``consumer_timeout``; other transports: unknown, no cap. Set it for RabbitMQ "
        "servers with another ``consumer_timeout`` and for other transports; with Redis "
        "or SQS it may only shorten the window. No countdown "
        "celery-reliable sets (deferral, bucket slot, breaker wait, backoff delay, and "
        "Celery's own ``default_retry_delay`` and ``autoretry_for`` ``retry_backoff`` "
        "delays) exceeds this window minus 10% (at least 5 s); a countdown the caller "
        "wrote (``self.retry(countdown=...)``, ``eta``, ``retry_kwargs``) beyond it is "
        "kept and logged as a warning.",
        seconds(optional=True),
    ),
    Option(
        "reliable_key_prefix",
        "reliable",
        "string",
        "Prefix of every Redis key. All keys of one prefix share the Redis Cluster hash "
        "tag ``{prefix}``, so one Lua script may touch any of them.",
        _prefix,
    ),
)
