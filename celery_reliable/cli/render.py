"""The status screen of ``status`` and ``top`` (:func:`render`) and its tables.

Every table fits the terminal (80 columns too): its key columns (a lock's
token and time left) never wrap, and the other columns wrap or end in "…" as
rich's column settings say; no string is cut by hand.
"""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..breaker import STATE_NAMES, BreakerSpec
from ..bulkhead import TierSpec, TierStats
from ..ratelimit import BucketSpec
from ..runtime import Runtime
from .common import safe_url
from .snapshot import LockInfo, Snapshot

__all__ = ["TTL_NOTE", "header", "locks_table", "render"]

TTL_NOTE = ("'expires in' is the lease time left: a running task's heartbeat renews it every "
            "lock_ttl/3, and Redis does not record when a lock was taken, so its age is unknown")


def _seconds(ms: int) -> str:
    if ms == -1:
        return "no expiry"
    return f"{ms / 1000:.1f} s"


def _number(value: float) -> str:
    return f"{value:g}"


def _panel(title: str, body: RenderableType, error: str | None = None) -> Panel:
    if error is not None:
        body = Text(error, style="bold red")
    return Panel(body, title=title, title_align="left")


def locks_table(locks: list[LockInfo], total: int, *, caption: bool = True) -> RenderableType:
    """Per lock: task name over its owner, resource label over its digest, token, time left.

    Token and time left never wrap (a token is only useful whole). The other
    two columns share what is left: the task name and the label fold onto more
    lines, whole; the owner and the digest below them stay on one line and
    end in "…" when narrow (at 80 columns their first ~20 characters show).
    """
    if not locks:
        return Text("no locks held")
    table = Table(box=None, pad_edge=False)
    table.add_column("task / owner", min_width=10)
    table.add_column("resource / digest", min_width=10)
    table.add_column("token", justify="right", no_wrap=True)
    table.add_column("expires in", justify="right", no_wrap=True)
    for lock in locks:
        table.add_row(
            Group(Text(lock.task or "-", overflow="fold"),
                  Text(lock.owner, style="dim", no_wrap=True, overflow="ellipsis")),
            Group(Text(lock.label or "-", overflow="fold"),
                  Text(lock.digest, style="dim", no_wrap=True, overflow="ellipsis")),
            lock.token, _seconds(lock.ttl_ms),
        )
    # Below the table, not its caption: a caption wraps at the table's width.
    notes = [Text(TTL_NOTE)] if caption else []
    if total > len(locks):
        notes.append(Text(f"... and {total - len(locks)} more (`reliable locks` lists all)"))
    return Group(table, *notes)


def _buckets_table(buckets: list[tuple[str, BucketSpec, float | None]]) -> RenderableType:
    if not buckets:
        return Text("no queue is rate limited (reliable_queue_rate_limits)")
    table = Table(box=None, pad_edge=False)
    table.add_column("queue", overflow="fold")  # a long name folds, whole
    for name in ("tokens left", "burst", "rate"):
        table.add_column(name, justify="right", no_wrap=True)
    for queue, spec, tokens in buckets:
        left = "-" if tokens is None else f"{tokens:.2f}"
        table.add_row(Text(queue), left, _number(spec.burst), f"{_number(spec.rate)}/s")
    return table


def _tiers_table(tiers: list[tuple[str, TierSpec, TierStats]]) -> RenderableType:
    if not tiers:
        return Text("no bulkhead tiers")
    table = Table(box=None, pad_edge=False)
    table.add_column("tier", overflow="fold")
    for name in ("active", "waiting", "rejected", "timed out", "dropped", "policy"):
        table.add_column(name, justify="left" if name == "policy" else "right", no_wrap=True)
    for tier, spec, stats in tiers:
        table.add_row(Text(tier), f"{stats.active}/{spec.concurrent}",
                      f"{stats.waiting}/{spec.queue}",
                      str(stats.rejected), str(stats.timed_out), str(stats.dropped), spec.policy)
    return table


_STATE_STYLE = {0: "green", 1: "bold red", 2: "yellow"}


def _breakers_table(breakers: list[tuple[str, BreakerSpec, int]]) -> RenderableType:
    if not breakers:
        return Text("no circuit breakers (reliable_circuit_breakers)")
    table = Table(box=None, pad_edge=False)
    table.add_column("breaker", overflow="fold")
    table.add_column("state", no_wrap=True)
    table.add_column("opens after")  # "N failures in W": wraps at its spaces
    table.add_column("open for", no_wrap=True)
    for name, spec, state in breakers:
        table.add_row(Text(name), Text(STATE_NAMES.get(state, str(state)),
                                 style=_STATE_STYLE.get(state, "")),
                      f"{spec.failure_threshold} failures in {spec.window}",
                      f"{_number(spec.open_seconds)} s")
    return table


def render(snap: Snapshot, header: str) -> RenderableType:
    """The status screen."""
    errors = snap.errors
    if snap.dead_letters is None and "dead letters" not in errors:
        dead: RenderableType = Text("no database configured (reliable_database_url)")
    else:
        dead = Text(f"{snap.dead_letters} dead letter(s)  "
                    "(`reliable dlq list` to inspect, `dlq replay ID` to re-run)")
    return Group(
        Text(header, style="bold"),
        _panel(f"Locks held ({snap.locks_total})", locks_table(snap.locks, snap.locks_total),
               errors.get("locks")),
        _panel("Token buckets", _buckets_table(snap.buckets), errors.get("buckets")),
        _panel("Bulkhead tiers", _tiers_table(snap.tiers), errors.get("bulkheads")),
        _panel("Circuit breakers", _breakers_table(snap.breakers), errors.get("breakers")),
        _panel("Dead letters", dead, errors.get("dead letters")),
    )


def header(runtime: Runtime, snap: Snapshot, extra: str = "") -> str:
    """The screen's first line: prefix, Redis (password masked), when it was read."""
    settings = runtime.settings
    return (f"celery-reliable  prefix {settings.key_prefix!r}  "
            f"redis {safe_url(settings.redis_url)}  at {snap.taken_at:%Y-%m-%d %H:%M:%S}{extra}")
