"""Per-run figures: loss and accuracy curves, train vs test, with labelled marks.

Marks are (step, label) pairs drawn as vertical lines on every figure: the interpolation
point, a probe's detected steps (memorization, generalization, transitions), the step where
a run diverged. A diverged run's rows end in non-finite values; the curves show the finite
part, and `divergence_step(rows)` gives the step to mark.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Optional, Sequence

from dgrun.files import write_figure
from dgrun.metrics import number

Mark = tuple[int, str]


@functools.cache
def pyplot():
    """matplotlib.pyplot on the Agg backend (runs on clusters and CI: never asks for a display),
    imported when a run first draws: at its end, not in the start-up every run waits through."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# Marks take colours the curves (matplotlib's default cycle C0-C3) do not use, so a vertical
# line is never mistaken for a curve; past eight marks the colours repeat with a new dash.
MARK_COLOURS = ("#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#393b79",
                "#637939")  # C4-C9 and two darker ones: C3 (red) draws corrupted rows
MARK_DASHES = ("--", "-.", ":")



def series(rows: list[dict], key: str, log_x: bool = False) -> tuple[list[float], list[float]]:
    """(steps, values) of one column: blanks and non-finite values are left out (a diverged
    run plots its finite part), and so is step 0 on a log axis (it has no place there)."""
    steps, values = [], []
    for row in rows:
        step, value = number(row.get("step")), number(row.get(key))
        if step is None or value is None or (log_x and step <= 0):
            continue
        steps.append(step)
        values.append(value)
    return steps, values


def divergence_step(rows: list[dict], keys: Sequence[str] = ("train_loss", "test_loss")
                    ) -> Optional[int]:
    """The first step whose row has a non-finite value in `keys` (None if the run never
    diverged): the mark a diverged run's figures should carry."""
    for row in rows:
        for key in keys:
            value = row.get(key)
            if value is None:
                continue
            try:
                finite = math.isfinite(float(value))
            except (TypeError, ValueError):
                continue
            if not finite:
                return int(float(row["step"]))
    return None


def looks_log_spaced(steps: Sequence[float]) -> bool:
    """Whether evaluation steps grow geometrically (dgrun's log schedule) rather than by a
    constant stride: the median gap of the later half is at least three times that of the
    first half (medians, so the run's last row, off the schedule at its budget, does not
    decide)."""
    positive = sorted({s for s in steps if s > 0})
    if len(positive) < 4:
        return False
    gaps = [b - a for a, b in zip(positive, positive[1:])]
    half = len(gaps) // 2
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    return median(gaps[half:]) >= 3 * median(gaps[:half])


# Marks closer than this to an event's first mark join it: a twentieth of a linear x axis, a
# factor of 3 on a log one (where "step 16" and "step 40" are one moment of a 400-step run).
MERGE_FRACTION = 0.05
MERGE_FACTOR = 3.0


def merge_marks(marks: Sequence[Mark], log_x: bool = False,
                extent: Optional[tuple[float, float]] = None) -> list[tuple[float, float, str]]:
    """Near-coincident marks as one event: (first step, last step, labels one per line).

    An event seen by several detectors (train accuracy reaching 0.99 and 1.0, a jump seen in
    four curves) is one mark, not a bundle of lines a reader has to untangle."""
    kept = sorted(((float(step), label) for step, label in marks
                   if step is not None and not (log_x and step <= 0)), key=lambda m: m[0])
    if not kept:
        return []
    lo, hi = extent or (kept[0][0], kept[-1][0])
    if log_x:
        where, tolerance = math.log10, math.log10(MERGE_FACTOR)
    else:
        where, tolerance = (lambda v: v), MERGE_FRACTION * max(hi - lo, 1e-9)  # noqa: E731
    events: list[list] = []
    for step, label in kept:
        if events and where(step) - where(events[-1][0]) <= tolerance:
            events[-1][1] = step
            events[-1][2].append(f"{label} ({step:g})")
        else:
            events.append([step, step, [f"{label} ({step:g})"]])
    return [(a, b, "\n".join(labels)) for a, b, labels in events]


def draw_marks(ax, marks: Sequence[Mark], log_x: bool = False,
               extent: Optional[tuple[float, float]] = None, merge: bool = True) -> None:
    """One vertical line per event (a band when its detectors disagree on the step), one
    distinct colour each; the labels, with their steps, go to the legend. `merge=False`: every
    mark its own line, for marks that are distinct events however close (a probe's phase
    boundaries: circuit formation at 200 and cleanup at 293 are two moments, not one)."""
    events = merge_marks(marks, log_x, extent) if merge else [
        (float(step), float(step), f"{label} ({step:g})") for step, label in sorted(marks)
        if step is not None and not (log_x and step <= 0)]
    for k, (first, last, label) in enumerate(events):
        colour = MARK_COLOURS[k % len(MARK_COLOURS)]
        ax.axvline(first, color=colour,
                   linestyle=MARK_DASHES[(k // len(MARK_COLOURS)) % len(MARK_DASHES)],
                   linewidth=1.2, label=label)
        if last > first:
            ax.axvspan(first, last, color=colour, alpha=0.12, linewidth=0)


def legend_outside(ax, **options) -> None:
    """The legend to the right of the axes, where it never hides a curve."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                  fontsize=7, **options)


def step_extent(rows: list[dict], log_x: bool = False) -> Optional[tuple[float, float]]:
    steps = [s for s in (number(r.get("step")) for r in rows)
             if s is not None and not (log_x and s <= 0)]
    return (min(steps), max(steps)) if steps else None


def plot_run(rows: list[dict], out_dir: Path, *, interpolation_step: Optional[int] = None,
             log_x: bool = False, title: str = "",
             marks: Optional[Sequence[Mark]] = None) -> list[Path]:
    """plots/loss.png and plots/accuracy.png; the interpolation step and `marks` are drawn on
    both, near-coincident ones merged into one event."""
    if not rows:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    marks = list(marks or [])
    if interpolation_step is not None:
        marks.insert(0, (interpolation_step, "interpolation (train acc 1.0)"))
    extent = step_extent(rows, log_x)
    panels = [("loss", [("train_loss", "train"), ("test_loss", "test")]),
              ("accuracy", [("train_acc", "train"), ("test_acc", "test"),
                            ("train_acc_clean", "train (clean rows)"),
                            ("train_acc_corrupted", "train (corrupted rows)")])]
    for name, columns in panels:
        fig, ax = pyplot().subplots(figsize=(8, 4), dpi=120)
        plotted = False
        for key, label in columns:
            steps, values = series(rows, key, log_x)
            if name == "loss":  # a log axis has no place for a loss of exactly 0
                kept = [(s, v) for s, v in zip(steps, values) if v > 0]
                steps, values = [s for s, _ in kept], [v for _, v in kept]
            if steps:
                ax.plot(steps, values, label=label)
                plotted = True
        draw_marks(ax, marks, log_x, extent)
        if log_x:
            ax.set_xscale("log")
        if name == "loss" and plotted:
            ax.set_yscale("log")
        if name == "accuracy":
            ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        legend_outside(ax)
        written.append(save_figure(fig, out_dir / f"{name}.png"))
    return written


def save_figure(fig, path: Path) -> Path:
    """Lay out, write and close a per-run figure (closed: a sweep in one process draws
    hundreds)."""
    fig.tight_layout()
    try:
        write_figure(fig, path)
    finally:
        pyplot().close(fig)
    return path
