"""A call's arguments by parameter name, their fingerprint, and its queue's bucket."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from ..canonical import NotCanonical, fingerprint
from ..errors import ArgumentsNotCanonical
from ..runtime import runtime_for

if TYPE_CHECKING:
    from ..config import TaskPolicy
    from ..ratelimit import BucketSpec

__all__ = ["arguments", "fingerprint_of", "queue_bucket"]

_NO_DEFAULT = inspect.Parameter.empty


def arguments(policy: TaskPolicy, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name, defaults applied (what templates and keys read)."""
    if policy.signature is None:
        return dict(kwargs)
    simple = policy.plain_parameters
    if simple is not None and len(args) <= len(simple[0]):
        # The common shape (named parameters, no *args/**kwargs/keyword-only):
        # what bind_partial + apply_defaults would give, without their cost.
        names, defaults = simple
        given = dict(zip(names, args, strict=False))
        for name, value in kwargs.items():
            if name not in defaults or name in given:
                break  # unknown or given twice: let bind_partial raise its TypeError
            given[name] = value
        else:
            # in signature order, as bind_partial gives them (a callable key may
            # depend on the order, whatever order the caller spelled them in)
            return {
                name: given[name] if name in given else defaults[name]
                for name in names
                if name in given or defaults[name] is not _NO_DEFAULT
            }
    bound = policy.signature.bind_partial(*args, **kwargs)
    bound.apply_defaults()
    out = dict(bound.arguments)
    for param in policy.signature.parameters.values():
        if param.kind is param.VAR_KEYWORD:
            out.update(out.pop(param.name, {}))
    return out


def fingerprint_of(task_name: str, named: dict[str, Any]) -> str:
    """The canonical fingerprint of ``named``; ``ArgumentsNotCanonical`` if it has none."""
    try:
        return fingerprint(named)
    except NotCanonical as exc:
        raise ArgumentsNotCanonical(task_name, str(exc)) from exc


def queue_bucket(app: Any, request: Any) -> tuple[str, BucketSpec] | None:
    """The queue this delivery came from and its bucket, if the queue is rate limited.

    The queue is the message's routing key (with Celery's default direct
    routing, the queue name).
    """
    limits = runtime_for(app).settings.queue_rate_limits
    if not limits:
        return None
    info = getattr(request, "delivery_info", None) or {}
    queue = info.get("routing_key") or info.get("queue")
    if queue is None or queue not in limits:
        return None
    return queue, limits[queue]
