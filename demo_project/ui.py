"""The runner's output: rich progress bars and a table when ``rich`` is installed,
plain lines otherwise (``--plain`` forces them)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from .checks import Verdict

__all__ = ["UI", "make_ui"]


class Step(Protocol):
    def update(self, completed: int, total: int | None = None) -> None: ...


class UI(Protocol):
    def line(self, text: str = "") -> None: ...

    def step(self, title: str, total: int) -> Any: ...  # a context manager giving a Step

    def table(self, verdicts: Sequence[Verdict]) -> None: ...

    def close(self) -> None: ...


# ------------------------------------------------------------------- plain


class _PlainStep:
    """Prints ``done/total`` now and then (at most every 2 s), for logs and dumb terminals."""

    def __init__(self, ui: PlainUI, title: str, total: int) -> None:
        self.ui, self.title, self.total = ui, title, total
        self.completed = 0
        self.shown = time.monotonic()

    def update(self, completed: int, total: int | None = None) -> None:
        if total is not None:
            self.total = total
        changed = completed != self.completed
        self.completed = completed
        if changed and time.monotonic() - self.shown >= 2.0 and completed < self.total:
            self.ui.line(f"    ... {completed}/{self.total}")
            self.shown = time.monotonic()


class PlainUI:
    def line(self, text: str = "") -> None:
        print(text, flush=True)

    @contextmanager
    def step(self, title: str, total: int) -> Iterator[_PlainStep]:
        self.line(title)
        yield _PlainStep(self, title, total)

    def table(self, verdicts: Sequence[Verdict]) -> None:
        rows = [("guarantee", "configured", "observed", "result")]
        rows += [(v.guarantee, v.configured, v.observed, "PASS" if v.passed else "FAIL")
                 for v in verdicts]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        rule = "+-" + "-+-".join("-" * w for w in widths) + "-+"
        self.line(rule)
        for n, r in enumerate(rows):
            self.line("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
                      + " |")
            if n == 0:
                self.line(rule)
        self.line(rule)

    def close(self) -> None:
        pass


# -------------------------------------------------------------------- rich


class _RichStep:
    def __init__(self, progress: Any, task_id: Any) -> None:
        self.progress, self.task_id = progress, task_id

    def update(self, completed: int, total: int | None = None) -> None:
        if total is not None:
            self.progress.update(self.task_id, completed=completed, total=total)
        else:
            self.progress.update(self.task_id, completed=completed)


class RichUI:
    def __init__(self, scenarios: int) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = Console(highlight=False)
        if not self.console.is_terminal:  # a log file or a pipe: no need to wrap at 80
            self.console = Console(highlight=False, width=max(self.console.width, 160))
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(),
                                 console=self.console, transient=True)
        self.overall = self.progress.add_task("scenarios", total=scenarios)
        self.progress.start()

    def line(self, text: str = "") -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    @contextmanager
    def step(self, title: str, total: int) -> Iterator[_RichStep]:
        self.line(title)
        task_id = self.progress.add_task("  " + title.split(":")[0], total=max(1, total))
        try:
            yield _RichStep(self.progress, task_id)
        finally:
            self.progress.remove_task(task_id)
            self.progress.advance(self.overall)

    def table(self, verdicts: Sequence[Verdict]) -> None:
        from rich.table import Table
        from rich.text import Text

        self.progress.stop()
        table = Table(title="guarantees", show_lines=False)
        for column in ("guarantee", "configured", "observed", "result"):
            table.add_column(column, overflow="fold")
        for v in verdicts:
            verdict = Text("PASS", style="bold green") if v.passed else Text("FAIL",
                                                                             style="bold red")
            table.add_row(Text(v.guarantee), Text(v.configured), Text(v.observed), verdict)
        self.console.print(table)

    def close(self) -> None:
        self.progress.stop()


def make_ui(scenarios: int, plain: bool = False) -> UI:
    """Rich output if ``rich`` imports (and ``plain`` is off), else plain prints."""
    if not plain:
        try:
            return RichUI(scenarios)
        except ImportError:
            pass
    return PlainUI()
