"""Generate the README's reference tables from the option registry.

``python -m celery_reliable.docs`` prints them; ``--write README.md`` replaces
the text between ``<!-- reference:start -->`` and ``<!-- reference:end -->``.
A test fails when the README and the code differ.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .config import SETTINGS, TASK_OPTIONS, Option

START = "<!-- reference:start -->"
END = "<!-- reference:end -->"


def _default(option: Option[Any]) -> str:
    if option.name == "reliable_bulkheads":
        return "see below"
    value = option.default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value!r}`"


def _table(options: dict[str, Option[Any]], title: str) -> list[str]:
    lines = [f"| {title} | default | unit | meaning |", "|---|---|---|---|"]
    for option in options.values():
        doc = " ".join(option.doc.replace("|", "\\|").split())
        lines.append(f"| `{option.name}` | {_default(option)} | {option.unit} | {doc} |")
    return lines


def reference() -> str:
    """The generated Markdown, without the markers."""
    lines = ["### Task options", "",
             "Set in the decorator (`@app.task(base=ReliableTask, lock=...)`) or as class "
             "attributes; validated when the task is bound.", ""]
    lines += _table(TASK_OPTIONS, "option")
    lines += ["", "### App settings (`app.conf`)", ""]
    lines += _table(SETTINGS, "setting")
    return "\n".join(lines) + "\n"


def replace_in(text: str) -> str:
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    if not rest or END not in rest:
        raise ValueError(f"README lacks the markers {START} ... {END}")
    return f"{head}{START}\n{reference()}{END}{tail}"


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--write":
        path = Path(argv[1])
        path.write_text(replace_in(path.read_text("utf-8")), "utf-8")
        return 0
    sys.stdout.write(reference())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
