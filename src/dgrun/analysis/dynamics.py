"""Training dynamics on one figure: accuracies, losses, weight norm, distance from
initialization, effective learning rate, with the run's detected transitions marked.

Works from metrics rows alone (as written to metrics.csv: strings or numbers) plus the
summary's steps: `interpolation.step`, every `<section>.<name>_step` (grokking's memorization
and generalization steps, the worst-group catch-up step, ...) and every event list entry
with a `step` (the transitions probe's events).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd

from dgrun.analysis.base import ANALYSES, Result, RunArtifacts
from dgrun.analysis.figures import plt, save
from dgrun.errors import UserError

# Sections of summary.json that hold settings or final values, not detected events.
NOT_EVENTS = ("config", "overrides", "versions", "final", "params", "throughput")
NOT_EVENT_PREFIXES = ("best_", "max_", "min_", "final_", "last_")

# (panel, how to pick its columns, y scale)
PANELS = (
    ("accuracy", lambda c: c.endswith("_acc") or "_acc_" in c, "linear"),
    ("loss", lambda c: c.endswith("_loss"), "log"),
    ("weight norm", lambda c: c == "weight_norm", "linear"),
    ("distance from init", lambda c: c.startswith("dist_from_init"), "linear"),
    ("effective lr", lambda c: c.startswith("effective_lr"), "log"),
)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def marks_from_summary(summary: dict) -> list[tuple[int, str]]:
    """(step, label) of every detected event in a summary, by step, one label per step."""
    found: list[tuple[int, str]] = []

    def walk(node, path: list[str]) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if not path and key in NOT_EVENTS:
                    continue
                if _is_number(value) and (key == "step" or key.endswith("_step")) \
                        and not key.startswith(NOT_EVENT_PREFIXES) and path:
                    name = key[:-len("_step")] if key.endswith("_step") else ""
                    found.append((int(value), " ".join(path + [name]).strip()
                                  .replace("_", " ")))
                else:
                    walk(value, path + [key])
        elif isinstance(node, list):
            for item in node:
                if isinstance(item, dict) and _is_number(item.get("step")):
                    what = item.get("metric") or item.get("name") or " ".join(path)
                    found.append((int(item["step"]), str(what).replace("_", " ")))

    walk(summary, [])
    by_step: dict[int, str] = {}
    for step, label in sorted(found):
        by_step.setdefault(step, label)
    return sorted(by_step.items())


def dynamics(rows: Sequence[dict], marks: Sequence[tuple[int, str]] = (), *,
             columns: Optional[Sequence[str]] = None) -> Result:
    """The metric curves of one run and the values at each marked step.

    tables: `curves` (step and every plotted column, numeric), `marks` (step, label, and each
    plotted column's value at the last evaluation at or before the step).
    summary: the panels and their columns, the marks.
    """
    frame = pd.DataFrame(list(rows))
    if frame.empty or "step" not in frame:
        raise UserError("no metrics rows with a step column", "analyze a run that evaluated")
    frame = frame.apply(pd.to_numeric, errors="coerce").sort_values("step")
    wanted = [c for c in (columns or frame.columns) if c != "step" and frame[c].notna().any()]
    panels = {name: [c for c in wanted if pick(c)] for name, pick, _ in PANELS}
    panels = {k: v for k, v in panels.items() if v}
    used = [c for cols in panels.values() for c in cols]
    curves = frame[["step"] + used].reset_index(drop=True)
    at = []
    for step, label in marks:
        upto = curves[curves["step"] <= step]
        values = upto.iloc[-1][used].to_dict() if len(upto) else {c: np.nan for c in used}
        at.append({"step": step, "label": label, **values})
    summary = {"panels": panels, "marks": [{"step": s, "label": lab} for s, lab in marks],
               "num_rows": len(curves), "last_step": int(curves["step"].iloc[-1])}
    return Result({"curves": curves,
                   "marks": pd.DataFrame(at, columns=["step", "label"] + used)}, summary)


def plot_dynamics(result: Result, out_dir) -> list:
    from dgrun.plots import draw_marks, looks_log_spaced

    curves, s = result.tables["curves"], result.summary
    panels = s["panels"]
    marks = [(m["step"], m["label"]) for m in s["marks"]]
    scales = {name: scale for name, _, scale in PANELS}
    # Log-spaced evaluations (a grokking run) read on a log axis, where step 0 has no place.
    log_x = looks_log_spaced(curves["step"].tolist())
    if log_x:
        curves = curves[curves["step"] > 0]
    extent = (float(curves["step"].min()), float(curves["step"].max()))
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.4 * len(panels) + 0.6),
                             sharex=True, squeeze=False)
    for ax, (name, cols) in zip(axes[:, 0], panels.items()):
        for c in cols:
            part = curves[["step", c]].dropna()
            ax.plot(part["step"], part[c], label=c.replace("_", " "))
        if scales[name] == "log" and (curves[cols] > 0).any().any():
            ax.set_yscale("log")
        lines = list(ax.get_lines())
        # The same events on every panel (near-coincident ones merged), named once, on top.
        draw_marks(ax, marks, log_x, extent)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        handles = ax.get_legend_handles_labels()[0] if ax is axes[0, 0] else lines
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    axes[-1, 0].set_xlabel("step")
    if log_x:
        axes[-1, 0].set_xscale("log")
    axes[0, 0].set_title("Training dynamics" + (" with detected transitions" if marks else ""))
    return [save(fig, out_dir, "dynamics")]


@ANALYSES.register("dynamics", plot=plot_dynamics)
def dynamics_from_run(run: RunArtifacts, /, *, columns: Optional[Sequence[str]] = None) -> Result:
    marks = run.marks if run.marks is not None else marks_from_summary(run.summary)
    return dynamics(run.rows, marks, columns=columns)
