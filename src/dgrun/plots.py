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
# Margins (figure fractions) of a 6 x 4 in single-panel figure with a title: fixed rather than
# computed by tight_layout, which measured a quarter of a run's end-of-run drawing time.
SINGLE_PANEL = {"left": 0.12, "right": 0.97, "bottom": 0.12, "top": 0.92}


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
MARK_COLOURS = ("#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
                "#393b79")
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
    constant stride: the widest gap is at least ten times the first. (Not the last gap: a run
    also evaluates at its final step, which can fall just after a log-spaced one.)"""
    positive = sorted({s for s in steps if s > 0})
    if len(positive) < 3:
        return False
    gaps = [b - a for a, b in zip(positive, positive[1:])]
    return max(gaps) >= 10 * gaps[0]


def draw_marks(ax, marks: Sequence[Mark], log_x: bool = False) -> None:
    """Vertical labelled lines, one distinct colour each; the label goes to the legend."""
    for k, (step, label) in enumerate(marks):
        if step is None or (log_x and step <= 0):
            continue
        ax.axvline(step, color=MARK_COLOURS[k % len(MARK_COLOURS)],
                   linestyle=MARK_DASHES[(k // len(MARK_COLOURS)) % len(MARK_DASHES)],
                   linewidth=1.2, label=f"{label} (step {step:g})")


def plot_run(rows: list[dict], out_dir: Path, *, interpolation_step: Optional[int] = None,
             log_x: bool = False, title: str = "",
             marks: Optional[Sequence[Mark]] = None) -> list[Path]:
    """plots/loss.png and plots/accuracy.png; `marks` are drawn on both (after the
    interpolation step, which keeps its grey dashed line)."""
    if not rows:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    panels = [("loss", [("train_loss", "train"), ("test_loss", "test")]),
              ("accuracy", [("train_acc", "train"), ("test_acc", "test"),
                            ("train_acc_clean", "train (clean rows)"),
                            ("train_acc_corrupted", "train (corrupted rows)")])]
    for name, columns in panels:
        fig, ax = pyplot().subplots(figsize=(6, 4), dpi=120)
        plotted = False
        for key, label in columns:
            steps, values = series(rows, key, log_x)
            if name == "loss":  # a log axis has no place for a loss of exactly 0
                kept = [(s, v) for s, v in zip(steps, values) if v > 0]
                steps, values = [s for s, _ in kept], [v for _, v in kept]
            if steps:
                ax.plot(steps, values, label=label)
                plotted = True
        if interpolation_step is not None:
            ax.axvline(interpolation_step, color="grey", linestyle="--", linewidth=1,
                       label=f"interpolation (step {interpolation_step})")
        draw_marks(ax, marks or [], log_x)
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
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        written.append(save_figure(fig, out_dir / f"{name}.png", margins=SINGLE_PANEL))
    return written


def save_figure(fig, path: Path, margins: Optional[dict] = None) -> Path:
    """Lay out (`margins` for subplots_adjust, else tight_layout), write and close a per-run
    figure (closed: a sweep in one process draws hundreds)."""
    if margins is None:
        fig.tight_layout()
    else:
        fig.subplots_adjust(**margins)
    try:
        write_figure(fig, path)
    finally:
        pyplot().close(fig)
    return path
