#!/usr/bin/env python
"""Follow one option from the decorator to its Lua fragment and back: which modules, how often.

Issue 14 measures "following one option from the decorator to its Lua fragment and back
visits each module once" (before the refactor one lock option passed through ``task.py``
about ten times). This script makes that a count anyone can rerun, at any commit::

    python benchmarks/option_path.py                       # the installed celery_reliable
    PYTHONPATH=/path/to/old/checkout python benchmarks/option_path.py --option lock

It starts a throwaway redis-server, defines one ReliableTask with just the chosen option
(``lock``: ``lock="res:{n}"``; ``window``: ``rate_limit_window="1000000/m"``; ``none``:
no option, the fast path) and one with another option (``--against``), warms them up,
then runs ONE more call the way a worker's pool process does (``push_request``,
``task(n)``, ``pop_request``) under ``sys.setprofile``.
An *entry* is a call into a ``celery_reliable`` module's function from code outside
that module (Celery, the task body's caller, or another of our modules); calls within a
module and returns are not entries, so an orchestrator that calls out and gets control
back still counts once per call into it. The body and Celery's own code are not ours and
are left out. Per module it prints entries, all calls into its functions and the distinct
functions that ran, and the path (the sequence of modules entered and returned to,
consecutive repeats collapsed), and, by module, the functions that ran only because of
the option (lines, traced with ``sys.settrace``, that did not run for the other task,
by module and function): where the option's own code lives, branches included.
``--json`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _redis_server import throwaway_redis  # noqa: E402

OPTIONS: dict[str, dict[str, Any]] = {
    "none": {},
    "lock": {"lock": "res:{n}"},
    "window": {"rate_limit_window": "1000000/m"},
    "bucket": {"rate_limit_key": "tenant", "rate_limit_key_spec": "1000000/s"},
}


def _module(frame: FrameType, root: str) -> str | None:
    """The ``celery_reliable`` module of ``frame`` (``pipeline/call.py``), or None."""
    path = frame.f_code.co_filename
    if not path.startswith(root):
        return None
    return path[len(root):].lstrip("/")


def trace_one(task: Any, n: int, root: str) -> list[tuple[str, str, str, str | None]]:
    """Run one call of ``task`` under a profiler: (event, module, function, caller module)."""
    events: list[tuple[str, str, str, str | None]] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event not in ("call", "return"):
            return
        here = _module(frame, root)
        back = frame.f_back
        there = _module(back, root) if back is not None else None
        if event == "call" and here is not None:
            events.append(("call", here, frame.f_code.co_name, there))
        elif event == "return" and there is not None and there != here:
            events.append(("return", there, back.f_code.co_name if back else "", here))

    _call(task, n, sys.setprofile, profile)
    return events


def _call(task: Any, n: int, install: Callable[[Any], None], hook: Any) -> None:
    """Call ``task(n)`` as a pool process does, with ``hook`` installed (``sys.setprofile`` or
    ``sys.settrace``) around the call only."""
    task.push_request(id=str(uuid.uuid4()), delivery_info={"routing_key": "celery",
                                                           "exchange": ""},
                      retries=0, called_directly=False, is_eager=False, args=(n,), kwargs={})
    install(hook)
    try:
        task(n)
    finally:
        install(None)
        task.pop_request()


def trace_lines(task: Any, n: int, root: str) -> set[tuple[str, str, int]]:
    """Run one call of ``task`` under a line tracer: (module, function, line) of our code run."""
    ran: set[tuple[str, str, int]] = set()

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            ran.add((frame.f_code.co_filename[len(root):].lstrip("/"), frame.f_code.co_name,
                     frame.f_lineno))
        return local

    def global_(frame: FrameType, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename.startswith(root) else None

    _call(task, n, sys.settrace, global_)
    return ran


def summarize(events: list[tuple[str, str, str, str | None]]) -> dict[str, Any]:
    path: list[str] = []
    for _event, module, _fn, _other in events:
        if not path or path[-1] != module:
            path.append(module)
    entries = Counter(m for e, m, _, caller in events if e == "call" and caller != m)
    calls = Counter(m for e, m, _, _ in events if e == "call")
    functions: dict[str, list[str]] = {}
    for e, m, fn, _ in events:
        if e == "call" and fn not in functions.setdefault(m, []):
            functions[m].append(fn)
    return {
        "modules": {m: {"entries": entries[m], "calls": calls[m], "functions": functions[m]}
                    for m in sorted(calls, key=lambda m: (-entries[m], m))},
        "path": path,
        "modules_entered": len(entries),
        "most_entries": max(entries.values(), default=0),
    }


def option_code(ran: set[tuple[str, str, int]],
                without: set[tuple[str, str, int]]) -> dict[str, dict[str, int]]:
    """Lines that ran only because of the option (not for the other task): module ->
    function -> how many such lines."""
    out: dict[str, dict[str, int]] = {}
    for m, fn, _line in sorted(ran - without):
        out.setdefault(m, {})
        out[m][fn] = out[m].get(fn, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -sum(kv[1].values())))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--option", choices=sorted(OPTIONS), default="window")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    parser.add_argument("--against", choices=sorted(OPTIONS), default=None,
                        help="the other task's option (default: window, or lock for window); "
                             "none: a task without options (the fast path, no pipeline)")
    args = parser.parse_args(argv)
    if args.against is None:
        args.against = "lock" if args.option == "window" else "window"

    from celery import Celery

    import celery_reliable
    from celery_reliable import ReliableTask

    root = str(Path(celery_reliable.__file__).resolve().parent)
    with throwaway_redis(args.redis_server, prefix="optpath-") as (port, _tmp):
        app = Celery("optpath", broker="memory://", backend="cache+memory://",
                     set_as_current=False)
        app.conf.reliable_redis_url = f"redis://127.0.0.1:{port}/0"
        app.conf.reliable_key_prefix = f"optpath-{uuid.uuid4().hex[:6]}"

        @app.task(base=ReliableTask, name="optpath.task", **OPTIONS[args.option])
        def body(n: int) -> int:
            return n

        @app.task(base=ReliableTask, name="optpath.plain", **OPTIONS[args.against])
        def plain(n: int) -> int:
            return n

        app.finalize()
        task, bare = app.tasks["optpath.task"], app.tasks["optpath.plain"]
        for i in range(50):  # warm: connections, scripts loaded, caches filled
            trace_one(task, i, "\0")
            trace_one(bare, i, "\0")
        events = trace_one(task, 10_000, root)
        code = option_code(trace_lines(task, 10_002, root), trace_lines(bare, 10_003, root))
        out = {"library": root, "option": args.option, "against": args.against,
               **summarize(events), "option_code": code,
               "option_modules": len(code), "option_lines": sum(
                   sum(fns.values()) for fns in code.values())}
        app.close()
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{out['library']}: option {args.option!r}, one call after warm-up")
    print(f"{'module':<28} {'entries':>7} {'calls':>6}  functions")
    for m, row in out["modules"].items():
        print(f"{m:<28} {row['entries']:>7} {row['calls']:>6}  {', '.join(row['functions'])}")
    print("path: " + " > ".join(out["path"]))
    print(f"lines that run only because of the option (not for a task with {args.against!r}): "
          f"{out['option_lines']} in {out['option_modules']} modules")
    for m, fns in out["option_code"].items():
        where = ", ".join(f"{fn} {k}" for fn, k in fns.items())
        print(f"  {m:<26} {sum(fns.values()):>3}  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
