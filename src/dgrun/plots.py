"""Per-run figures: loss and accuracy curves, train vs test, the interpolation point marked."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # runs on clusters and CI: never ask for a display
import matplotlib.pyplot as plt  # noqa: E402


def _axis(ax, rows: list[dict], key: str, label: str, log_x: bool):
    steps = [r["step"] for r in rows if r.get(key) is not None]
    values = [r[key] for r in rows if r.get(key) is not None]
    if log_x:  # step 0 has no place on a log axis
        pairs = [(s, v) for s, v in zip(steps, values) if s > 0]
        steps, values = [p[0] for p in pairs], [p[1] for p in pairs]
    ax.plot(steps, values, label=label)


def plot_run(rows: list[dict], out_dir: Path, *, interpolation_step: Optional[int] = None,
             log_x: bool = False, title: str = "",
             marks: Sequence[tuple[int, str]] = ()) -> list[Path]:
    if not rows:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    panels = [("loss", [("train_loss", "train"), ("test_loss", "test")]),
              ("accuracy", [("train_acc", "train"), ("test_acc", "test"),
                            ("train_acc_clean", "train (clean rows)"),
                            ("train_acc_corrupted", "train (corrupted rows)")])]
    for name, series in panels:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for key, label in series:
            if any(r.get(key) is not None for r in rows):
                _axis(ax, rows, key, label, log_x)
        if interpolation_step is not None:
            ax.axvline(interpolation_step, color="grey", linestyle="--", linewidth=1,
                       label=f"interpolation (step {interpolation_step})")
        for i, (step, label) in enumerate(marks):
            ax.axvline(step, color=f"C{i + 4}", linestyle=":", linewidth=1.2,
                       label=f"{label} (step {step})")
        if log_x:
            ax.set_xscale("log")
        if name == "loss":
            ax.set_yscale("log")
        else:
            ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
