"""``reliable dlq list|show|replay|purge``: the dead letters in PostgreSQL.

Tables fit the terminal: a dead letter's id never wraps, the other columns
wrap or end in "…" as rich's column settings say. An unknown id is one line
on stderr and exit status 1.
"""

from __future__ import annotations

import json
from datetime import datetime

import click
from rich.console import Group
from rich.table import Table
from rich.text import Text

from ..deadletter import DeadLetter, DeadLetters
from .common import current_app, current_runtime, database_engine, guarded, make_console, one_line

__all__ = ["dlq"]


@click.group()
def dlq() -> None:
    """Dead letters: tasks that will not be retried (list, show, replay, purge)."""


def _letters() -> DeadLetters:
    runtime = current_runtime()
    return DeadLetters(current_app(), database_engine(runtime))


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
                 Text(one_line(error), style="dim", no_wrap=True, overflow="ellipsis")]
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
@guarded
def dlq_list(task_name: str | None, reason: str | None, limit: int) -> None:
    """Newest dead letters first."""
    letters = _letters()
    found = letters.list(task_name=task_name, reason=reason, limit=limit)
    console = make_console()
    total = letters.count()
    if not found:
        console.print(f"no dead letters (of {total})" if task_name or reason else
                      "no dead letters")
        return
    console.print(_dead_letters_table(found, f"{len(found)} of {total} dead letter(s)"))


@dlq.command("show")
@click.argument("letter_id", metavar="ID", type=int)
@guarded
def dlq_show(letter_id: int) -> None:
    """Everything about one dead letter, with its traceback."""
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
    console = make_console()
    console.print(table)
    if letter.traceback:
        console.print(Text("traceback:", style="bold"))
        console.print(Text(letter.traceback.rstrip()))


@dlq.command("replay")
@click.argument("letter_id", metavar="ID", type=int)
@click.option("--force", is_flag=True, help="Replay a letter that was already replayed.")
@guarded
def dlq_replay(letter_id: int, force: bool) -> None:
    """Re-publish a dead letter's task (new task id, attempts reset), once."""
    letters = _letters()
    letter = _letter(letters, letter_id)
    try:
        new_id = letters.replay(letter_id, force=force)
    except ValueError as exc:  # not replayable, or already replayed
        raise click.ClickException(one_line(exc)) from None
    make_console().print(f"dead letter {letter_id} ({letter.task_name}) replayed as task {new_id}")


@dlq.command("purge")
@click.option("--older-than-days", type=click.FloatRange(min=0), default=None,
              help="Only letters whose last failure is older than this many days.")
@click.option("--id", "ids", type=int, multiple=True, help="Only this letter (repeatable).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@guarded
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
    make_console().print(f"deleted {deleted} dead letter(s)")
