"""Figure plumbing shared by the analyses: a display-free backend and one way to save."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # runs on clusters and CI: never ask for a display
import matplotlib.pyplot as plt  # noqa: E402

from dgrun.files import write_figure  # noqa: E402

__all__ = ["plt", "save", "mark_steps"]


def save(fig, out_dir: Path, name: str) -> Path:
    path = Path(out_dir) / f"{name}.png"
    try:
        write_figure(fig, path, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def mark_steps(ax, marks: Sequence[tuple[int, str]], *, legend: bool = True) -> None:
    """Dashed vertical lines at (step, label) marks, each in its own colour."""
    colors = plt.get_cmap("tab10")
    for i, (step, label) in enumerate(marks):
        ax.axvline(step, color=colors((i + 3) % 10), linestyle="--", linewidth=1.2,
                   label=f"{label} (step {step})" if legend else None)
