"""Figures of the hidden-progress probes (modular_progress, parity_progress): the measures over
training on one page, with the detected phases marked. Imported only when a run draws its
plots, so building probes never loads matplotlib."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from dgrun.plots import draw_marks, legend_outside, looks_log_spaced, pyplot, save_figure, series

Mark = tuple[int, str]


def _panel(ax, rows: list[dict], columns: Sequence[tuple[str, str]], log_x: bool,
           log_y: bool = False) -> bool:
    drawn = False
    for key, label in columns:
        steps, values = series(rows, key, log_x)
        if log_y:  # a log axis has no place for a value of exactly 0
            kept = [(s, v) for s, v in zip(steps, values) if v > 0]
            steps, values = [s for s, _ in kept], [v for _, v in kept]
        if steps:
            ax.plot(steps, values, label=label)
            drawn = True
    if drawn and log_y:
        ax.set_yscale("log")
    if log_x:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    return drawn


def plot_panels(rows: list[dict], panels: Sequence[tuple[str, Sequence[tuple[str, str]], bool]],
                marks: Sequence[Mark], path: Path, title: str) -> list[Path]:
    """One figure, a panel per (y label, [(column, legend label)], log y); marks on each, every
    one its own line (a probe's phases are distinct moments, however close on a log axis), and
    legends beside the panels, where they hide no curve."""
    steps = series(rows, "step")[0] or [float(r["step"]) for r in rows]
    log_x = looks_log_spaced(steps)
    shown = [(label, cols, log_y) for label, cols, log_y in panels
             if any(series(rows, c)[0] for c, _ in cols)]
    if not shown:
        return []
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = pyplot().subplots(len(shown), 1, figsize=(9.5, 2.8 * len(shown) + 0.6),
                                  dpi=120, sharex=True, squeeze=False)
    for ax, (label, cols, log_y) in zip(axes[:, 0], shown):
        _panel(ax, rows, cols, log_x, log_y)
        draw_marks(ax, marks, log_x, merge=False)
        ax.set_ylabel(label)
        legend_outside(ax)
    axes[0, 0].set_title(title, fontsize=9)
    axes[-1, 0].set_xlabel("step")
    return [save_figure(fig, path)]


def plot_progress(rows: list[dict], marks: Sequence[Mark], out_dir: Path,
                  title: str = "Progress measures (Nanda et al. 2023)") -> list[Path]:
    """plots/progress_measures.png: the four losses, then Fourier sparsity and weights."""
    return plot_panels(rows, [
        ("loss", [("train_loss", "train"), ("test_loss", "test"),
                  ("restricted_loss", "restricted (key frequencies only)"),
                  ("excluded_loss", "excluded (key frequencies removed), train")], True),
        ("key frequencies", [("num_key_frequencies", "# key frequencies (logits)")], False),
        ("Gini", [("fourier_gini", "Gini of the embedding's Fourier norms")], False),
        ("sum of squared weights", [("sum_sq_weights", "sum of squared weights")], False),
    ], marks, Path(out_dir) / "progress_measures.png", title)
