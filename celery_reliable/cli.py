"""``celery -A proj reliable ...``: inspect and operate the guards of one app.

Registered as a Celery CLI plugin (entry point group ``celery.commands``), so
every command runs with the app given to ``celery -A``, its settings and its
key prefix::

    celery -A proj reliable status              # one screen: locks, buckets, tiers, breakers, DLQ
    celery -A proj reliable top                 # the same, refreshed every second (Ctrl-C quits)
    celery -A proj reliable locks               # every lock held now: task, label, token, time left
    celery -A proj reliable dlq list|show ID|replay ID|purge [--older-than-days N|--id ID] [--yes]
    celery -A proj reliable purge-idempotency [--batch-size N]
    celery -A proj reliable migrate             # create the PostgreSQL tables (idempotent)

Mistakes a user can make (a bad URL, a server that is down, no database
configured, an unknown dead-letter id) print one line on stderr and exit 1.

Every table fits the terminal (80 columns too): its key columns (a lock's
token and time left, a dead letter's id) never wrap, and the other columns
wrap or end in "…" as rich's column settings say; no string is cut by hand.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import click
import redis
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from sqlalchemy.engine import Engine
from sqlalchemy.engine import make_url as _make_url
from sqlalchemy.exc import DBAPIError, ProgrammingError, SQLAlchemyError

from .breaker import STATE_NAMES, BreakerSpec
from .bulkhead import TierSpec, TierStats
from .classify import is_missing_table
from .deadletter import DeadLetter, DeadLetters
from .errors import ConfigurationError
from .ratelimit import BucketSpec
from .runtime import Runtime, runtime_for

__all__ = ["reliable"]

F = TypeVar("F", bound=Callable[..., Any])

#: Locks shown on the ``status``/``top`` screen (``locks`` lists all of them).
STATUS_LOCKS = 15

TTL_NOTE = ("'expires in' is the lease time left: a running task's heartbeat renews it every "
            "lock_ttl/3, and Redis does not record when a lock was taken, so its age is unknown")


# ------------------------------------------------------------------ errors


def _one_line(value: object) -> str:
    return " ".join(str(value).split())


def _safe_url(url: str | None) -> str:
    """``url`` without its password (for messages)."""
    if not url:
        return "<unset>"
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
    except ValueError:
        return "<unparseable URL>"


def _describe(exc: BaseException, app: Any) -> str | None:
    """One line for an error the user can cause (or fix); None for anything else (a bug)."""
    conf = app.conf
    if isinstance(exc, redis.RedisError):
        url = _safe_url(conf.get("reliable_redis_url"))
        return f"Redis at {url} is unavailable: {_one_line(exc)}"
    if isinstance(exc, ProgrammingError) and "UndefinedTable" in type(exc.orig).__name__:
        return ("celery-reliable's tables are missing in the database; create them with "
                f"`celery -A {app.main or 'proj'} reliable migrate`")
    if isinstance(exc, DBAPIError):
        url = _safe_url(conf.get("reliable_database_url"))
        return f"PostgreSQL at {url} is unavailable: {_one_line(exc.orig)}"
    if isinstance(exc, SQLAlchemyError):  # a malformed URL, an unknown driver
        url = _safe_url(conf.get("reliable_database_url"))
        return f"reliable_database_url {url} is not usable: {_one_line(exc)}"
    if isinstance(exc, ConfigurationError):
        return _one_line(exc)
    try:
        from kombu.exceptions import OperationalError as BrokerError
    except ImportError:  # pragma: no cover - kombu comes with celery
        return None
    if isinstance(exc, BrokerError):
        return f"the broker is unavailable: {_one_line(exc)}"
    return None


def _guarded(func: F) -> F:
    """Turn errors a user can cause into one line on stderr and exit status 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except click.ClickException:
            raise
        except Exception as exc:
            message = _describe(exc, _app())
            if message is None:
                raise
            raise click.ClickException(message) from None

    return wrapper  # type: ignore[return-value]


# ------------------------------------------------------------------ context


def _app() -> Any:
    ctx = click.get_current_context()
    app = getattr(ctx.find_root().obj, "app", None) or getattr(ctx.obj, "app", None)
    if app is None:
        raise click.ClickException("no Celery app: run this as `celery -A proj reliable ...`")
    return app


def _runtime() -> Runtime:
    app = _app()
    try:
        return runtime_for(app)
    except ConfigurationError as exc:
        raise click.ClickException(_one_line(exc)) from None
    except ValueError as exc:  # redis-py refuses the URL
        url = _safe_url(app.conf.get("reliable_redis_url"))
        raise click.ClickException(f"reliable_redis_url {url} is not usable: "
                                   f"{_one_line(exc)}") from None


def _engine(runtime: Runtime) -> Engine:
    if not runtime.settings.database_url:
        raise click.ClickException(
            "no database configured: set reliable_database_url (PostgreSQL) in the app's settings"
        )
    engine: Engine = runtime.engine
    return engine


def _console() -> Console:
    ctx = click.get_current_context()
    no_color = bool(getattr(ctx.find_root().obj, "no_color", False))
    return Console(no_color=no_color, highlight=False)


# ------------------------------------------------------------------ state


@dataclass(frozen=True)
class LockInfo:
    """One lock held now, as Redis has it."""

    key: str
    token: str
    owner: str
    task_id: str
    ttl_ms: int
    task: str = ""  # the task that holds it ("" for a FencedLock or an older version's lease)
    label: str = ""  # the lock template, a lock_label, or FencedLock(label=...)

    @classmethod
    def parse(cls, key: str, value: str, ttl_ms: int) -> LockInfo:
        """From the lease value ``"<token> <owner>[\\n<task>\\n<label>[\\n<nonce>]]"``.

        (:func:`~celery_reliable.admission.lock_holder`; a FencedLock's nonce is not shown.)
        """
        token, _, holder = value.partition(" ")
        owner, _, described = holder.partition("\n")
        task, _, label = described.partition("\n")
        label = label.partition("\n")[0]
        task_id = owner.rpartition("/")[0] if "/" in owner else ""
        return cls(key=key, token=token, owner=owner, task_id=task_id, ttl_ms=ttl_ms,
                   task=task, label=label)

    @property
    def digest(self) -> str:
        return self.key.rsplit(":", 1)[-1]


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def held_locks(runtime: Runtime, limit: int | None = None) -> tuple[list[LockInfo], int]:
    """Locks of this prefix held now (SCAN, never KEYS), by soonest expiry; and how many in all."""
    client = runtime.redis
    pattern = _glob_escape(runtime.keys.pattern("lock")[:-1]) + "*"
    keys = [k.decode() if isinstance(k, bytes) else str(k)
            for k in client.scan_iter(match=pattern, count=1000)]
    found: list[LockInfo] = []
    for start in range(0, len(keys), 500):
        chunk = keys[start:start + 500]
        pipe = client.pipeline(transaction=False)
        for key in chunk:
            pipe.get(key)
            pipe.pttl(key)
        replies = pipe.execute()
        for i, key in enumerate(chunk):
            value, ttl = replies[2 * i], replies[2 * i + 1]
            if value is None:
                continue  # released or expired since the SCAN
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            found.append(LockInfo.parse(key, text, int(ttl)))
    found.sort(key=lambda lock: (lock.ttl_ms < 0, lock.ttl_ms, lock.key))
    total = len(found)
    return (found[:limit] if limit is not None else found), total


@dataclass
class Snapshot:
    """Everything ``status`` and ``top`` show, read once."""

    taken_at: datetime = field(default_factory=datetime.now)
    locks: list[LockInfo] = field(default_factory=list)
    locks_total: int = 0
    buckets: list[tuple[str, BucketSpec, float | None]] = field(default_factory=list)
    tiers: list[tuple[str, TierSpec, TierStats]] = field(default_factory=list)
    breakers: list[tuple[str, BreakerSpec, int]] = field(default_factory=list)
    dead_letters: int | None = None  # None: no database configured
    errors: dict[str, str] = field(default_factory=dict)


SECTIONS = ("locks", "buckets", "bulkheads", "breakers", "dead letters")


def collect(app: Any, runtime: Runtime, *, tolerant: bool = False) -> Snapshot:
    """Read every panel. ``tolerant``: keep a section's error in ``errors`` instead of raising."""
    from .status import breaker_state, bucket_tokens, bulkhead_stats

    snap = Snapshot()
    settings = runtime.settings
    redis_down: str | None = None

    def read_locks() -> None:
        snap.locks, snap.locks_total = held_locks(runtime, STATUS_LOCKS)

    def read_buckets() -> None:
        snap.buckets = [(queue, spec, bucket_tokens(app, queue))
                        for queue, spec in settings.queue_rate_limits.items()]

    def read_tiers() -> None:
        stats = bulkhead_stats(app)
        snap.tiers = [(tier, spec, stats[tier]) for tier, spec in settings.bulkheads.items()]

    def read_breakers() -> None:
        snap.breakers = [(name, spec, breaker_state(app, name))
                         for name, spec in settings.circuit_breakers.items()]

    def read_dead_letters() -> None:
        if settings.database_url:
            snap.dead_letters = DeadLetters(app, runtime.engine).count()

    readers = (read_locks, read_buckets, read_tiers, read_breakers, read_dead_letters)
    for section, read in zip(SECTIONS, readers, strict=True):
        uses_redis = section != "dead letters"
        if uses_redis and redis_down is not None:
            snap.errors[section] = redis_down
            continue
        try:
            read()
        except Exception as exc:
            message = _describe(exc, app)
            # Tables not created yet (status before migrate) is a state to show, not a failure.
            if message is None or not (tolerant or is_missing_table(exc)):
                raise
            snap.errors[section] = message
            if isinstance(exc, redis.RedisError):
                redis_down = message
    return snap


# ------------------------------------------------------------------ rendering


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


def _locks_table(locks: list[LockInfo], total: int, *, caption: bool = True) -> RenderableType:
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
        _panel(f"Locks held ({snap.locks_total})", _locks_table(snap.locks, snap.locks_total),
               errors.get("locks")),
        _panel("Token buckets", _buckets_table(snap.buckets), errors.get("buckets")),
        _panel("Bulkhead tiers", _tiers_table(snap.tiers), errors.get("bulkheads")),
        _panel("Circuit breakers", _breakers_table(snap.breakers), errors.get("breakers")),
        _panel("Dead letters", dead, errors.get("dead letters")),
    )


def _header(runtime: Runtime, snap: Snapshot, extra: str = "") -> str:
    settings = runtime.settings
    return (f"celery-reliable  prefix {settings.key_prefix!r}  "
            f"redis {_safe_url(settings.redis_url)}  at {snap.taken_at:%Y-%m-%d %H:%M:%S}{extra}")


# ------------------------------------------------------------------ commands


@click.group(name="reliable")
def reliable() -> None:
    """celery-reliable: locks, buckets, bulkheads, breakers and dead letters of this app."""


@reliable.command()
@_guarded
def status() -> None:
    """One screen: locks held, buckets, bulkhead tiers, breakers, dead letters."""
    runtime = _runtime()
    snap = collect(_app(), runtime)
    _console().print(render(snap, _header(runtime, snap)))


@reliable.command()
@click.option("--iterations", type=click.IntRange(min=1), default=None, hidden=True,
              help="Refresh this many times, then exit (for tests).")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between refreshes.")
@_guarded
def top(iterations: int | None, interval: float) -> None:
    """Live dashboard of the status screen, refreshed every second; Ctrl-C quits.

    A server that goes down while it runs is shown in its panels (the
    dashboard keeps refreshing); one that is down at start is an error.
    """
    app = _app()
    runtime = _runtime()
    snap = collect(app, runtime)  # fail fast on a wrong URL or a server that is down
    console = _console()
    count = 1

    def frame() -> RenderableType:
        note = f"  refresh {count}" + ("" if iterations else "  (Ctrl-C quits)")
        return render(snap, _header(runtime, snap, note))

    with contextlib.suppress(KeyboardInterrupt), \
            Live(frame(), console=console, auto_refresh=False) as live:
        while iterations is None or count < iterations:
            time.sleep(interval)
            snap = collect(app, runtime, tolerant=True)
            count += 1
            live.update(frame(), refresh=True)


@reliable.command()
@_guarded
def locks() -> None:
    """Every lock held now: task, resource label, fencing token, lease time left, owner, digest.

    The label is the task's ``lock`` template (argument names, not their values;
    a callable's name), its ``lock_label``, or a FencedLock's ``label``: what
    the resource was formatted to never leaves the worker except as a digest.
    """
    runtime = _runtime()
    found, total = held_locks(runtime)
    console = _console()
    console.print(f"{total} lock(s) held under prefix {runtime.settings.key_prefix!r}")
    if found:
        console.print(_locks_table(found, total))


@reliable.group()
def dlq() -> None:
    """Dead letters: tasks that will not be retried (list, show, replay, purge)."""


def _letters() -> DeadLetters:
    runtime = _runtime()
    return DeadLetters(_app(), _engine(runtime))


def _letter(letters: DeadLetters, letter_id: int) -> DeadLetter:
    try:
        return letters.get(letter_id)
    except KeyError:
        raise click.ClickException(f"no dead letter with id {letter_id}") from None


def _when(value: datetime | None) -> str:
    return value.isoformat(sep=" ", timespec="seconds") if value is not None else "-"


def _dead_letters_table(found: list[DeadLetter], title: str) -> Table:
    """Newest first: id; task, error (and replayed as); reason; attempts; last failure.

    The id (what show/replay/purge take) and the attempts never wrap. The task
    name folds, whole; below it the error and the replayed task id each stay
    on one line, ending in "…" where the column ends (``dlq show ID`` has all
    of them). The last failure's date and time are two lines, so the task
    column gets the width (at 80 columns about 30 characters).
    """
    table = Table(box=None, pad_edge=False, title=title, title_justify="left")
    table.add_column("id", justify="right", no_wrap=True)
    table.add_column("task / error", min_width=12)
    table.add_column("reason", min_width=9)
    table.add_column("attempts", justify="right", no_wrap=True)
    table.add_column("last failure", max_width=14)
    for letter in found:
        error = f"{letter.exc_type}: {letter.exc_message}" if letter.exc_type else "-"
        lines = [Text(letter.task_name, overflow="fold"),
                 Text(_one_line(error), style="dim", no_wrap=True, overflow="ellipsis")]
        if letter.replayed_as:
            lines.append(Text(f"replayed as {letter.replayed_as}", style="dim", no_wrap=True,
                              overflow="ellipsis"))
        table.add_row(str(letter.id), Group(*lines), Text(letter.reason), str(letter.attempts),
                      _when(letter.last_failure_at))
    return table


@dlq.command("list")
@click.option("--task", "task_name", default=None, help="Only letters of this task name.")
@click.option("--reason", default=None, help='Only this reason (e.g. "retries exhausted").')
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@_guarded
def dlq_list(task_name: str | None, reason: str | None, limit: int) -> None:
    """Newest dead letters first."""
    letters = _letters()
    found = letters.list(task_name=task_name, reason=reason, limit=limit)
    console = _console()
    total = letters.count()
    if not found:
        console.print(f"no dead letters (of {total})" if task_name or reason else
                      "no dead letters")
        return
    console.print(_dead_letters_table(found, f"{len(found)} of {total} dead letter(s)"))


@dlq.command("show")
@click.argument("letter_id", metavar="ID", type=int)
@_guarded
def dlq_show(letter_id: int) -> None:
    """Everything about one dead letter, with its traceback."""
    import json

    letter = _letter(_letters(), letter_id)
    table = Table(box=None, pad_edge=False, show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")  # all of every value, folded when narrow
    rows = [
        ("id", str(letter.id)), ("task", letter.task_name), ("task id", letter.task_id),
        ("queue", letter.queue or "-"), ("reason", letter.reason),
        ("attempts", str(letter.attempts)),
        ("error", f"{letter.exc_type}: {letter.exc_message}" if letter.exc_type else "-"),
        ("args", json.dumps(letter.args)), ("kwargs", json.dumps(letter.kwargs)),
        ("replayable", "yes" if letter.replayable else "no (arguments were not JSON)"),
        ("first failure", _when(letter.first_failure_at)),
        ("last failure", _when(letter.last_failure_at)),
        ("replayed as", letter.replayed_as or "-"),
    ]
    for name, value in rows:
        table.add_row(name, Text(value))
    console = _console()
    console.print(table)
    if letter.traceback:
        console.print(Text("traceback:", style="bold"))
        console.print(Text(letter.traceback.rstrip()))


@dlq.command("replay")
@click.argument("letter_id", metavar="ID", type=int)
@click.option("--force", is_flag=True, help="Replay a letter that was already replayed.")
@_guarded
def dlq_replay(letter_id: int, force: bool) -> None:
    """Re-publish a dead letter's task (new task id, attempts reset), once."""
    letters = _letters()
    letter = _letter(letters, letter_id)
    try:
        new_id = letters.replay(letter_id, force=force)
    except ValueError as exc:  # not replayable, or already replayed
        raise click.ClickException(_one_line(exc)) from None
    _console().print(f"dead letter {letter_id} ({letter.task_name}) replayed as task {new_id}")


@dlq.command("purge")
@click.option("--older-than-days", type=click.FloatRange(min=0), default=None,
              help="Only letters whose last failure is older than this many days.")
@click.option("--id", "ids", type=int, multiple=True, help="Only this letter (repeatable).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@_guarded
def dlq_purge(older_than_days: float | None, ids: tuple[int, ...], yes: bool) -> None:
    """Delete dead letters: all of them, the old ones, or by id."""
    letters = _letters()
    what = []
    if ids:
        what.append("with id " + ", ".join(map(str, ids)))
    if older_than_days is not None:
        what.append(f"older than {older_than_days:g} day(s)")
    described = "dead letters " + " and ".join(what) if what else \
        f"ALL {letters.count()} dead letter(s)"
    if not yes:
        click.confirm(f"Delete {described}?", abort=True, err=True)
    deleted = letters.purge(older_than_days=older_than_days, ids=list(ids) if ids else None)
    _console().print(f"deleted {deleted} dead letter(s)")


@reliable.command("purge-idempotency")
@click.option("--batch-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Records deleted per (short) transaction.")
@_guarded
def purge_idempotency(batch_size: int) -> None:
    """Delete expired idempotency records from PostgreSQL (run it from cron or beat)."""
    from .idempotency import purge_expired

    deleted = purge_expired(_engine(_runtime()), batch_size=batch_size)
    _console().print(f"deleted {deleted} expired idempotency record(s)")


@reliable.command()
@_guarded
def migrate() -> None:
    """Create celery-reliable's PostgreSQL tables that do not exist yet (safe to repeat)."""
    from .schema import create_tables, metadata

    runtime = _runtime()
    engine = _engine(runtime)
    create_tables(engine)
    url = _make_url(str(runtime.settings.database_url)).render_as_string(hide_password=True)
    names = ", ".join(sorted(metadata.tables))
    _console().print(f"tables ready in {url}: {names}")

