"""Sweep figures for `dgrun report`: what to draw is computed once (Figure > Panel > Line, mean
and min/max over seeds), then drawn twice: PNGs with matplotlib, an HTML page with Plotly.

    learning_curves.png            train loss and accuracy vs step      (Zhang et al. 2017, Fig. 1a)
    threshold_vs_corruption.png    time and steps to fit vs corruption  (Fig. 1b)
    test_error_vs_corruption.png   test error vs corruption             (Fig. 1c)
    <y>_vs_<x>.png                 any two table columns (--x --y --hue)

One line per value of the swept parameters (the seed excluded); runs that differ only in seed
are averaged: the line is the mean, the band or error bar spans min to max.
"""
from __future__ import annotations

import html
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # runs on clusters and CI: never ask for a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from dgrun.files import write_figure, write_text  # noqa: E402
from dgrun.status import HAS_FINAL_NUMBERS as FINISHED  # noqa: E402
DASHES = ("solid", "dash", "dot", "dashdot")
MPL_DASHES = {"solid": "-", "dash": "--", "dot": ":", "dashdot": "-."}
STANDARD = ("learning_curves", "threshold_vs_corruption", "test_error_vs_corruption")
# (and grokking_vs_<axis>, drawn when the runs carry the grokking probe's numbers)
LABELS = {"prob": "corruption probability", "time_s": "seconds", "step": "step",
          "interpolation_time_s": "seconds to the threshold",
          "interpolation_step": "steps to the threshold", "test_error": "test error"}


@dataclass
class Line:
    label: str
    x: list
    mean: list
    lo: list
    hi: list
    count: list  # runs (seeds) behind each point
    color: str = "C0"
    dash: str = "solid"  # solid | dash | dot | dashdot (Plotly's names)


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    lines: list[Line]
    band: bool = False  # spread as a shaded band (curves) or as error bars (sweep points)
    log_y: bool = False
    log_x: bool = False
    legend_title: str = ""
    xlim: Optional[tuple] = None  # the whole sweep's range, even where only some points remain


@dataclass
class Figure:
    name: str
    title: str
    panels: list[Panel]
    note: str = ""


# ---------------------------------------------------------------- what to draw
def label_of(keys: list[str], values) -> str:
    values = values if isinstance(values, tuple) else (values,)
    return ", ".join(f"{k}={_fmt(v)}" for k, v in zip(keys, values)) or "all runs"


def _fmt(value) -> str:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return f"{value:g}" if isinstance(value, (float, np.floating)) else str(value)


def styles(keys: list[str], groups: list[tuple], table: pd.DataFrame) -> list[tuple[str, str]]:
    """(colour, dash) per line. One numeric parameter (e.g. prob) gets an ordered colour map,
    low to high, and the other parameters dashes; otherwise tab10 colours, solid lines."""
    numeric = [i for i, k in enumerate(keys) if pd.api.types.is_numeric_dtype(table[k])]
    values = [g[numeric[0]] for g in groups] if len(numeric) == 1 else []
    others = [g[:numeric[0]] + g[numeric[0] + 1:] for g in groups] if values else []
    order = list(dict.fromkeys(others))
    # The colour map only when the numeric parameter is the main axis: lines of equal value
    # (e.g. every pixel corruption at prob 0) must still get colours of their own.
    if (len(groups) > 1 and values and not any(pd.isna(v) for v in values)
            and len(set(values)) >= len(order) and len(order) <= len(DASHES)):
        low, scale = min(values), (max(values) - min(values)) or 1
        cmap = plt.get_cmap("viridis")
        return [(matplotlib.colors.to_hex(cmap(0.9 * (v - low) / scale)),
                 DASHES[order.index(o) % len(DASHES)]) for v, o in zip(values, others)]
    tab10 = plt.get_cmap("tab10")
    return [(matplotlib.colors.to_hex(tab10(i % 10)), "solid") for i in range(len(groups))]


def grouped(table: pd.DataFrame, keys: list[str]):
    """[(values, rows)] per combination of `keys`, in sorted order."""
    if not keys:
        return [((), table)]
    return [(k if isinstance(k, tuple) else (k,), part)
            for k, part in table.groupby(keys, dropna=False, sort=True)]


def versus(table: pd.DataFrame, x: str, y: str, keys: list[str], title: str, ylabel: str) -> Panel:
    """Mean and min/max of y at each x, one line per combination of `keys`."""
    data = table.dropna(subset=[x, y])
    groups = grouped(data, keys)
    lines = []
    for (values, part), style in zip(groups, styles(keys, [g for g, _ in groups], data)):
        stats = part.groupby(x, sort=True)[y].agg(["mean", "min", "max", "count"])
        lines.append(Line(label_of(keys, values), list(stats.index), list(stats["mean"]),
                          list(stats["min"]), list(stats["max"]), list(stats["count"]), *style))
    return Panel(title, LABELS.get(x, x), ylabel, lines, legend_title=", ".join(keys))


def learning_curves(table: pd.DataFrame, curves: dict, keys: list[str]) -> Optional[Figure]:
    fig = metric_curves(table, curves, keys, ["train_loss", "train_acc"], "learning_curves",
                        "Learning curves (Zhang et al. 2017, Fig. 1a)")
    if fig is not None:
        fig.panels[0].title, fig.panels[0].ylabel = "training loss", "train loss"
        if len(fig.panels) > 1:
            fig.panels[1].title, fig.panels[1].ylabel = "training accuracy", "train accuracy"
    return fig


def metric_curves(table: pd.DataFrame, curves: dict, keys: list[str], metrics: list[str],
                  name: str, title: str) -> Optional[Figure]:
    """One panel per metrics.csv column vs step, one line per combination of `keys` (mean over
    seeds, band min to max). Log-scaled steps when the runs evaluated on a log schedule; a
    loss panel log-scaled in y when it is positive."""
    runs = table[table["run_dir"].isin(list(curves))]
    if runs.empty:
        return None
    groups = grouped(runs, keys)
    palette = styles(keys, [g for g, _ in groups], runs)
    panels = [Panel(metric, "step", metric, [], band=True, legend_title=", ".join(keys))
              for metric in metrics]
    for (values, part), style in zip(groups, palette):
        seeds = len(part)
        label = label_of(keys, values) + (f" ({seeds} runs)" if seeds > 1 else "")
        for panel, metric in zip(panels, metrics):
            series = [curves[r].set_index("step")[metric].dropna().rename(r)
                      for r in part["run_dir"] if metric in curves[r]]
            series = [s for s in series if len(s)]
            if not series:
                continue
            wide = pd.concat(series, axis=1).sort_index()  # step x run; runs may stop early
            panel.lines.append(Line(label, list(wide.index), list(wide.mean(axis=1)),
                                    list(wide.min(axis=1)), list(wide.max(axis=1)),
                                    list(wide.count(axis=1)), *style))
    log_x = _log_spaced([curves[r]["step"] for r in runs["run_dir"]])
    for panel in panels:
        low = [v for line in panel.lines for v in line.lo if pd.notna(v)]
        panel.log_y = "loss" in panel.title and bool(low) and min(low) > 0
        panel.log_x = log_x
    panels = [p for p in panels if p.lines]
    if not panels:
        return None
    return Figure(name, title, panels, note=_spread_note(runs, keys))


def grokking_figure(finished: pd.DataFrame, swept: list[str], x: Optional[str],
                    hue: Optional[str]) -> Optional[Figure]:
    """Memorization and generalization steps, and their ratio, against the swept parameter
    (train fraction, weight decay, operation...): mean and min-max over seeds. Runs that
    never generalized are counted in the note, not plotted."""
    if "grokking_generalization_step" not in finished or finished.empty:
        return None
    axis = x or next((k for k in swept if k in finished), None)
    if axis is None:
        return None
    keys = [k for k in line_keys(swept, axis, hue) if k != axis]
    grokked = finished.dropna(subset=["grokking_generalization_step"])
    never = len(finished) - len(grokked)
    panels = [versus(finished.dropna(subset=["grokking_memorization_step"]), axis,
                     "grokking_memorization_step", keys, "memorization (train acc)", "step"),
              versus(grokked, axis, "grokking_generalization_step", keys,
                     "generalization (test acc)", "step"),
              versus(grokked, axis, "grokking_delay_ratio", keys, "delay",
                     "generalization / memorization step")]
    for panel in panels[:2]:
        panel.log_y = True
    return Figure(f"grokking_vs_{axis}".replace("/", "_"), "Grokking: when the training set is "
                  "fit, and when the test set", [p for p in panels if p.lines],
                  note=_join(_spread_note(finished, [axis, *keys]),
                             f"{never} run(s) that never generalized left out" if never else ""))


def _log_spaced(step_columns) -> bool:
    """Evaluations at roughly constant ratios (dgrun's log schedule) rather than intervals."""
    for steps in step_columns:
        steps = [s for s in steps if s > 0]
        if len(steps) >= 8 and steps[-1] / steps[0] >= 100:
            gaps = np.diff(steps)
            return bool(gaps[-1] > 10 * max(1, gaps[0]))
    return False


def _spread_note(runs: pd.DataFrame, keys: list[str]) -> str:
    if len(grouped(runs, keys)) < len(runs):
        return "line: mean over seeds; shaded/bars: min to max"
    return ""


def test_acc_at_threshold(table: pd.DataFrame) -> pd.Series:
    """Test accuracy where each run first fit its training set (NaN where not recorded).

    Runs written before summary.json kept `interpolation.test_acc` stopped at the threshold,
    so their final test accuracy is that number."""
    recorded = table.get("interpolation_test_acc", pd.Series(float("nan"), index=table.index))
    stopped_there = table.get("stop_reason") == "interpolation"
    final = table.get("final_test_acc", pd.Series(float("nan"), index=table.index))
    return recorded.astype(float).fillna(final.where(stopped_there).astype(float))


def line_keys(swept: list[str], x: str, hue: Optional[str]) -> list[str]:
    """--hue first, then every other swept parameter, so nothing but seeds is averaged over."""
    return list(dict.fromkeys(([hue] if hue else []) + [k for k in swept if k != x]))


def build(table: pd.DataFrame, curves: dict, swept: list[str], x: Optional[str] = None,
          y: Optional[str] = None, hue: Optional[str] = None,
          curve: tuple[str, ...] = ()) -> tuple[list[Figure], list[str]]:
    """-> (figures to draw, notes on those skipped)."""
    figures, skipped = [], []
    fig = learning_curves(table, curves, line_keys(swept, None, hue))
    if fig:
        figures.append(fig)
    else:
        skipped.append("learning_curves.png skipped: no run has metrics.csv rows")
    for metric in curve:
        fig = metric_curves(table, curves, line_keys(swept, None, hue), [metric],
                            f"{metric}_curves", f"{metric} over training")
        if fig:
            figures.append(fig)
        else:
            skipped.append(f"{metric}_curves.png skipped: no run measured {metric}")
    finished = table[table["status"].isin(FINISHED)]
    axis = x or "prob"
    keys = [k for k in line_keys(swept, axis, hue) if k != axis]
    excluded = len(table) - len(finished)
    left_out = f"{excluded} unfinished or failed run(s) left out" if excluded else ""
    corrupted = "corruption" in table and (table["corruption"].astype(str) != "none").any()
    if axis != "prob" and not corrupted:
        skipped.append("threshold_vs_corruption.png, test_error_vs_corruption.png skipped: "
                       "no run is corrupted (Zhang et al.'s figures; --y draws any column)")
    elif axis not in table or finished[axis].astype(str).nunique() < 2:
        what = "the corruption probability" if axis == "prob" else axis
        skipped.append(f"threshold_vs_corruption.png, test_error_vs_corruption.png skipped: "
                       f"{what} does not vary across finished runs (pick an axis with --x KEY)")
    else:
        reached = finished[finished["interpolation_reached"].astype(bool)]
        if reached.empty:
            skipped.append("threshold_vs_corruption.png skipped: no run reached the threshold")
        else:
            missed = len(finished) - len(reached)
            figures.append(Figure(
                "threshold_vs_corruption", "Time to fit the training set (Zhang et al. 2017, "
                "Fig. 1b)",
                [versus(reached, axis, "interpolation_time_s", keys, "time to threshold",
                        "seconds"),
                 versus(reached, axis, "interpolation_step", keys, "steps to threshold",
                        "steps")],
                note=_join(_spread_note(reached, [axis, *keys]),
                           f"{missed} run(s) that never reached it left out" if missed else "",
                           left_out)))
        # Fig. 1c is the test error at the interpolation threshold: runs that never fit their
        # training set have no such point and are left out (their final error is not it).
        at_threshold = test_acc_at_threshold(reached)
        errors = reached.assign(test_acc_at=at_threshold).dropna(subset=["test_acc_at"])
        if errors.empty:
            skipped.append("test_error_vs_corruption.png skipped: no run reached the threshold "
                           "with a test accuracy recorded there")
        else:
            missed = len(finished) - len(errors)
            errors = errors.assign(test_error=1 - errors["test_acc_at"])
            figures.append(Figure(
                "test_error_vs_corruption", "Test error at the interpolation threshold "
                "(Zhang et al. 2017, Fig. 1c)",
                [versus(errors, axis, "test_error", keys, "test error",
                        "test error (1 - accuracy) at the threshold")],
                note=_join(_spread_note(errors, [axis, *keys]),
                           f"{missed} run(s) that never reached it left out" if missed else "",
                           left_out)))
    fig = grokking_figure(finished, swept, x, hue)
    if fig is not None:
        figures.append(fig)
    if y:
        rows = finished[[y, x, *keys]].dropna(subset=[y])
        figures.append(Figure(f"{y}_vs_{x}".replace("/", "_"), f"{y} vs {x}",
                              [versus(finished, x, y, keys, f"{y} vs {x}", LABELS.get(y, y))],
                              note=_join(_spread_note(rows, [x, *keys]), left_out)))
    span = finished[axis] if axis in finished else None
    if span is not None and pd.api.types.is_numeric_dtype(span) and span.notna().any():
        pad = 0.05 * ((span.max() - span.min()) or 1)
        for fig in figures:
            for panel in fig.panels:
                if panel.xlabel != "step":  # curves over training keep their own range
                    panel.xlim = (span.min() - pad, span.max() + pad)
    return figures, skipped


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


# ---------------------------------------------------------------- PNG (matplotlib)
def save_png(fig: Figure, out: Path) -> Path:
    n = len(fig.panels)
    canvas, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.2), dpi=110, squeeze=False)
    for ax, panel in zip(axes[0], fig.panels):
        categorical = any(isinstance(v, str) for line in panel.lines for v in line.x)
        ticks = sorted({v for line in panel.lines for v in line.x}, key=str) if categorical else []
        for line in panel.lines:
            xs = [ticks.index(v) for v in line.x] if categorical else line.x
            mean, lo, hi = (np.asarray(v, dtype=float) for v in (line.mean, line.lo, line.hi))
            if panel.band:
                ax.plot(xs, mean, color=line.color, label=line.label, linewidth=1.5,
                        linestyle=MPL_DASHES[line.dash])
                if np.any(hi > lo):
                    ax.fill_between(xs, lo, hi, color=line.color, alpha=0.2, linewidth=0)
            else:
                # Clipped: a mean can land a rounding error outside its own min and max.
                ax.errorbar(xs, mean, yerr=[np.maximum(mean - lo, 0), np.maximum(hi - mean, 0)],
                            color=line.color,
                            label=line.label, marker="o", capsize=3, linewidth=1.5,
                            linestyle=MPL_DASHES[line.dash])
        if panel.xlim:
            ax.set_xlim(*panel.xlim)
        if categorical:
            ax.set_xticks(range(len(ticks)), [str(t) for t in ticks])
        if panel.log_y:
            ax.set_yscale("log")
        if panel.log_x:
            ax.set_xscale("log")
        ax.set_title(panel.title if n > 1 else "")  # one panel: the figure's title says it
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
    handles = {}  # one legend for the figure, beside the last panel, clear of the curves
    for ax in axes[0]:
        handles.update(zip(*reversed(ax.get_legend_handles_labels())))
    legend_title = fig.panels[0].legend_title if fig.panels else ""
    if len(handles) > 1 or legend_title:
        axes[0][-1].legend(handles.values(), handles.keys(), title=legend_title or None,
                           loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8,
                           title_fontsize=8)
    canvas.suptitle(fig.title)
    if fig.note:
        canvas.text(0.5, 0.01, fig.note, ha="center", va="bottom", fontsize=8, color="0.35")
    with warnings.catch_warnings():  # a crowded legend: tight_layout gives up, bbox fixes it
        warnings.simplefilter("ignore", UserWarning)
        canvas.tight_layout(rect=(0, 0.04 if fig.note else 0, 1, 1))
    path = out / f"{fig.name}.png"
    try:
        write_figure(canvas, path, bbox_inches="tight")
    finally:
        plt.close(canvas)
    return path


# ---------------------------------------------------------------- HTML (Plotly)
def plotly_figure(fig: Figure):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    chart = make_subplots(rows=1, cols=len(fig.panels),
                          subplot_titles=[p.title for p in fig.panels] if len(fig.panels) > 1
                          else None)
    for col, panel in enumerate(fig.panels, start=1):
        for line in panel.lines:
            mean, lo, hi = (np.asarray(v, dtype=float) for v in (line.mean, line.lo, line.hi))
            x = [str(v) if isinstance(v, str) else v for v in line.x]
            common = dict(legendgroup=line.label, line=dict(color=line.color, dash=line.dash))
            if panel.band and np.any(hi > lo):
                chart.add_trace(go.Scatter(x=x, y=hi, mode="lines", line=dict(width=0),
                                           showlegend=False, hoverinfo="skip",
                                           legendgroup=line.label), row=1, col=col)
                chart.add_trace(go.Scatter(x=x, y=lo, mode="lines", line=dict(width=0),
                                           fill="tonexty", fillcolor=_rgba(line.color, 0.2),
                                           showlegend=False, hoverinfo="skip",
                                           legendgroup=line.label), row=1, col=col)
            error = None if panel.band else dict(type="data", array=hi - mean,
                                                 arrayminus=mean - lo, visible=True)
            chart.add_trace(go.Scatter(x=x, y=mean, name=line.label, showlegend=col == 1,
                                       mode="lines" if panel.band else "lines+markers",
                                       error_y=error, customdata=line.count,
                                       hovertemplate="%{x}: %{y:.4g} (%{customdata} runs)",
                                       **common), row=1, col=col)
        chart.update_xaxes(title_text=panel.xlabel, range=panel.xlim, row=1, col=col,
                           type="log" if panel.log_x else None)
        chart.update_yaxes(title_text=panel.ylabel, type="log" if panel.log_y else None,
                           row=1, col=col)
    legend_title = fig.panels[0].legend_title if fig.panels else ""
    chart.update_layout(legend_title_text=legend_title, height=420, template="plotly_white",
                        margin={"t": 40})  # the page's heading is the figure's title
    return chart


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(255 * c) for c in matplotlib.colors.to_rgb(hex_color))
    return f"rgba({r},{g},{b},{alpha})"


def _html_cell(value) -> str:
    """None, NaN and <NA> alike as "-"; floats to 4 significant digits."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def save_html(figures: list[Figure], table: pd.DataFrame, swept: list[str], out: Path) -> Path:
    """One page, plotly.js inline (works offline): the figures, then the runs table."""
    parts = []
    for i, fig in enumerate(figures):
        chart = plotly_figure(fig).to_html(full_html=False, include_plotlyjs=(i == 0),
                                           div_id=fig.name)
        note = f"<p class='note'>{html.escape(fig.note)}</p>" if fig.note else ""
        parts.append(f"<section><h2>{html.escape(fig.title)}</h2>{chart}{note}</section>")
    columns = ["run", *swept, "seed", "status", "stop_reason", "final_train_acc",
               "final_test_acc", "interpolation_step", "interpolation_time_s", "error"]
    shown = table[[c for c in dict.fromkeys(columns) if c in table]]
    shown = shown.apply(lambda column: column.map(_html_cell))
    bad = table[~table["status"].isin(FINISHED)]
    count = (f"{len(bad)} of {len(table)} runs did not complete" if len(bad)
             else f"all {len(table)} runs completed")
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>dgrun report</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:13px}}
td,th{{padding:2px 8px;border-bottom:1px solid #ddd}} .note{{color:#555;font-size:13px}}</style>
</head><body><h1>dgrun report</h1><p>{html.escape(count)}.</p>
{''.join(parts)}
<section><h2>Runs</h2>{shown.to_html(index=False)}
</section></body></html>
"""
    if not figures:  # the page still needs no network: nothing to embed
        page = page.replace("<h1>", "<p>No figures apply to these runs.</p><h1>", 1)
    path = out / "report.html"
    write_text(path, page)
    return path
