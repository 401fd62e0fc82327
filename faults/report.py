"""The campaign's verdict table (rich) and its plot (matplotlib).

``print_verdicts`` prints one row per invariant: status, what was checked, violations and
one example. ``plot`` draws the run from its history: the nemesis intervals (and phases),
task starts per second per workload, the lock holders per resource (each execution a bar,
stale/lost ones marked, fenced writes as ticks: accepted ``|``, refused ``x``), and the
concurrent holders per bulkhead tier against its slots. ``python -m faults.report RESULTS
[--database-url URL]`` re-checks a saved run, prints the table and redraws the plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from faults.checker import Execution, History, Verdict, check, passed
from faults.history import scan

__all__ = ["main", "plot", "print_verdicts", "write_verdicts"]

_STYLE = {"held": "green", "VIOLATED": "bold red", "n/a": "dim"}


def print_verdicts(verdicts: Sequence[Verdict], console: Console | None = None) -> None:
    """The verdict table, then one line: every invariant held, or how many did not."""
    if console is None:
        console = Console()
        if not console.is_terminal:  # a CI log or a file: no 80-column squeeze
            console = Console(width=200)
    table = Table(title="fault campaign verdict", show_lines=True)
    table.add_column("invariant", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("checked", ratio=3)
    table.add_column("violations", justify="right", no_wrap=True)
    table.add_column("example", ratio=2)
    for v in verdicts:
        style = _STYLE[v.status]
        table.add_row(
            v.invariant,
            f"[{style}]{v.status}[/]",
            v.checked,
            f"[{style}]{v.violations}[/]" if v.applicable else "-",
            v.example or "",
        )
    console.print(table)
    broken = [v.invariant for v in verdicts if not v.held]
    if broken:
        console.print(f"[bold red]{len(broken)} invariant(s) violated: {', '.join(broken)}[/]")
    else:
        na = sum(1 for v in verdicts if not v.applicable)
        console.print(
            f"[green]every invariant held[/] ({len(verdicts) - na} checked, {na} not applicable)"
        )


def write_verdicts(results_dir: Path, verdicts: Sequence[Verdict]) -> Path:
    """Save the verdicts as ``<results>/verdicts.json`` (the soak's record)."""
    path = Path(results_dir) / "verdicts.json"
    payload: dict[str, Any] = {
        "passed": passed(verdicts),
        "verdicts": [{**asdict(v), "status": v.status} for v in verdicts],
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def _step(intervals: list[tuple[float, float]]) -> tuple[list[float], list[int]]:
    """Concurrency over time of the given intervals, as step-plot points."""
    # at one instant, starts before ends: a zero-length run (killed as it started) must
    # not dip the level below zero
    points = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals],
                    key=lambda p: (p[0], -p[1]))
    xs: list[float] = []
    ys: list[int] = []
    level = 0
    for x, d in points:
        level += d
        xs.append(x)
        ys.append(level)
    return xs, ys


def plot(results_dir: Path, *, max_resources: int = 16) -> Path | None:
    """Draw ``<results>/run.png`` from the history; None (with a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install 'celery-reliable[test]')")
        return None
    h = History.from_scan(scan(results_dir))
    if not h.events:
        return None
    t0 = min(float(e["t"]) for e in h.events)

    def rel(t: float) -> float:
        return t - t0

    locked = [ex for ex in h.executions if ex.field("resource") is not None and ex.ran]
    tiers: dict[str, list[Execution]] = defaultdict(list)
    for ex in h.executions:
        if ex.field("tier") is not None and ex.ran:
            tiers[str(ex.field("tier"))].append(ex)
    fig, axes = plt.subplots(
        4, 1, figsize=(14, 12), sharex=True, gridspec_kw={"height_ratios": [1.2, 1.5, 2.5, 1.2]}
    )
    ax_faults, ax_rate, ax_locks, ax_tiers = axes
    end = rel(h.t_end)

    # 1. nemeses: one lane per nemesis name, phases shaded behind every panel
    names = sorted({f.name for f in h.faults})
    colors = plt.get_cmap("tab10")
    for i, name in enumerate(names):
        intervals = [
            (rel(f.t0), max(rel(f.t1) - rel(f.t0), end / 500)) for f in h.faults if f.name == name
        ]
        ax_faults.broken_barh(intervals, (i - 0.4, 0.8), color=colors(i % 10))
    ax_faults.set_yticks(range(len(names)), names)
    ax_faults.set_title("nemeses")
    phase_open: dict[str, float] = {}
    labels = 0
    for e in h.of("phase"):
        if e["action"] == "start":
            phase_open[str(e["name"])] = rel(float(e["t"]))
        elif str(e["name"]) in phase_open and e["name"] != "workload":
            lo = phase_open.pop(str(e["name"]))
            for ax in axes:
                ax.axvspan(lo, rel(float(e["t"])), color="0.9", zorder=0)
            labels += 1
            ax_faults.text(
                lo,
                1.0 - 0.12 * ((labels - 1) % 4),  # staggered: heal is often a second long
                f" {e['name']}",
                transform=ax_faults.get_xaxis_transform(),
                va="top",
                fontsize="small",
                color="0.4",
            )

    # 2. task starts per second, per workload
    per: dict[str, list[float]] = defaultdict(list)
    for ex in h.executions:
        per[str(ex.start["workload"])].append(rel(ex.t0))
    # 1 s bins, wider on a long soak (at most ~1500 bins); plotted as starts per second
    width = max(1.0, float(math.ceil(end / 1500)))
    bins = max(1, int(end / width) + 1)
    for workload, times in sorted(per.items()):
        weights = [1.0 / width] * len(times)
        ax_rate.hist(
            times,
            bins=bins,
            range=(0, bins * width),
            weights=weights,
            histtype="step",
            label=workload,
        )
    ax_rate.set_ylabel(f"starts / s ({width:g} s bins)")
    ax_rate.set_title("task throughput")
    if per:
        ax_rate.legend(loc="upper right", fontsize="small")

    # 3. lock holders per resource: the busiest resources, one lane each
    counts: dict[str, int] = defaultdict(int)
    for ex in locked:
        counts[str(ex.field("resource"))] += 1
    shown = sorted(sorted(counts, key=lambda r: -counts[r])[:max_resources])
    lane = {r: i for i, r in enumerate(shown)}
    # one artist per lane and colour, one per marker kind: a soak has thousands of runs
    bars: dict[tuple[int, bool], list[tuple[float, float]]] = defaultdict(list)
    marks: dict[bool, tuple[list[float], list[int]]] = {True: ([], []), False: ([], [])}
    for ex in locked:
        resource = str(ex.field("resource"))
        if resource not in lane:
            continue
        y = lane[resource]
        stale = ex.outcome in ("stale", "lost-lock")
        bars[(y, stale)].append((rel(ex.t0), max(rel(ex.t1) - rel(ex.t0), end / 1000)))
        for w in ex.writes:
            marks[bool(w["accepted"])][0].append(rel(float(w["t"])))
            marks[bool(w["accepted"])][1].append(y)
    for (y, stale), spans in bars.items():
        ax_locks.broken_barh(
            spans, (y - 0.35, 0.7), color="tab:orange" if stale else "tab:blue", alpha=0.45
        )
    for accepted, (xs, ys) in marks.items():
        if xs:
            ax_locks.scatter(
                xs,
                ys,
                marker="|" if accepted else "x",
                color="black" if accepted else "red",
                s=60,
                zorder=3,
            )
    ax_locks.set_yticks(range(len(shown)), shown)
    ax_locks.set_title(
        "lock holders per resource (blue: ran, orange: stale/lost lock; | accepted, x refused "
        "fenced write; darker = overlap)"
    )

    # 4. bulkhead holders per tier against its slots
    for i, (tier, runs) in enumerate(sorted(tiers.items())):
        xs, ys = _step([(rel(ex.t0), rel(ex.t1)) for ex in runs])
        ax_tiers.step(xs, ys, where="post", label=f"tier {tier}", color=colors(i % 10))
        slots = next(
            (
                c.get("slots")
                for c in h.configs("bulkhead")
                if c.get("tier") in (tier, None) and c.get("slots") is not None
            ),
            None,
        )
        if slots is not None:
            ax_tiers.axhline(float(slots), linestyle="--", color=colors(i % 10), linewidth=0.8)
    ax_tiers.set_ylabel("holders")
    ax_tiers.set_title("bulkhead holders per tier (dashed: slots)")
    if tiers:
        ax_tiers.legend(loc="upper right", fontsize="small")
    ax_tiers.set_xlabel("seconds since the first event")
    ax_tiers.set_xlim(0, max(end, 1.0))
    fig.tight_layout()
    path = Path(results_dir) / "run.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Re-check a saved results folder: verdict table, verdicts.json, run.png."""
    parser = argparse.ArgumentParser(prog="python -m faults.report", description=main.__doc__)
    parser.add_argument("results", type=Path)
    parser.add_argument("--database-url", default=os.environ.get("FAULTS_DATABASE_URL"))
    args = parser.parse_args(argv)
    verdicts = check(args.results, args.database_url)
    print_verdicts(verdicts)
    write_verdicts(args.results, verdicts)
    path = plot(args.results)
    if path is not None:
        print(f"plot: {path}")
    return 0 if passed(verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
