"""``reliable status``, ``reliable top`` and ``reliable locks``: what the guards hold now."""

from __future__ import annotations

import contextlib
import time

import click
from rich.console import RenderableType
from rich.live import Live

from .common import current_app, current_runtime, guarded, make_console
from .render import header, locks_table, render
from .snapshot import collect, held_locks

__all__ = ["locks", "status", "top"]


@click.command()
@guarded
def status() -> None:
    """One screen: locks held, buckets, bulkhead tiers, breakers, dead letters."""
    runtime = current_runtime()
    snap = collect(current_app(), runtime)
    make_console().print(render(snap, header(runtime, snap)))


@click.command()
@click.option("--iterations", type=click.IntRange(min=1), default=None, hidden=True,
              help="Refresh this many times, then exit (for tests).")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between refreshes.")
@guarded
def top(iterations: int | None, interval: float) -> None:
    """Live dashboard of the status screen, refreshed every second; Ctrl-C quits.

    A server that goes down while it runs is shown in its panels (the
    dashboard keeps refreshing); one that is down at start is an error.
    """
    app = current_app()
    runtime = current_runtime()
    snap = collect(app, runtime)  # fail fast on a wrong URL or a server that is down
    console = make_console()
    count = 1

    def frame() -> RenderableType:
        note = f"  refresh {count}" + ("" if iterations else "  (Ctrl-C quits)")
        return render(snap, header(runtime, snap, note))

    with contextlib.suppress(KeyboardInterrupt), \
            Live(frame(), console=console, auto_refresh=False) as live:
        while iterations is None or count < iterations:
            time.sleep(interval)
            snap = collect(app, runtime, tolerant=True)
            count += 1
            live.update(frame(), refresh=True)


@click.command()
@guarded
def locks() -> None:
    """Every lock held now: task, resource label, fencing token, lease time left, owner, digest.

    The label is the task's ``lock`` template (argument names, not their values;
    a callable's name), its ``lock_label``, or a FencedLock's ``label``: what
    the resource was formatted to never leaves the worker except as a digest.
    """
    runtime = current_runtime()
    found, total = held_locks(runtime)
    console = make_console()
    console.print(f"{total} lock(s) held under prefix {runtime.settings.key_prefix!r}")
    if found:
        console.print(locks_table(found, total))
