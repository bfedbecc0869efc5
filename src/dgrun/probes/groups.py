"""Worst-group accuracy (Sagawa et al. 2020): does the model work on every group, or only on
the ones where the spurious attribute agrees with the label?

At each evaluation, for each split asked for (test and train by default) that has groups:

    <split>_avg_acc            accuracy over all rows (the same pass as the group columns)
    <split>_worst_group_acc    the lowest accuracy of any group that has rows
    <split>_acc_<group>        per group, named from meta.extra["groups"] made column-safe:
                               "y=0,color=red" -> test_acc_y_0_color_red

Groups with no rows in a split (e.g. the minority groups of a rho=1 training set) get no
column, so every value is a number. summarize -> {"groups": {...}}: the worst-group catch-up
step (the first evaluation from which test worst-group accuracy stays within `gap` of average
accuracy, None if it never does), the final and best worst-group accuracies, and the widest
gap after the first evaluation and its step (when the spurious feature ruled). With a
`flipped` test split every test row is in a minority group, so average and worst-group accuracy
nearly coincide: use a `random` test split to watch the catch-up.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from dgrun.data.bundle import Meta
from dgrun.errors import UserError
from dgrun.probes import PROBES
from dgrun.metrics import number
from dgrun.probes.base import Evaluation, Probe

SPLITS = ("train", "test", "val")


def slug(name: str) -> str:
    """A group name as a column-name fragment: runs of anything but letters/digits -> '_'."""
    return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_")


def group_accuracies(correct: Tensor, group: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """(accuracy per group, rows per group), on the device, in one pass.

    One bincount over `group + G * wrong` counts hits and misses together; unweighted
    bincount is deterministic on every device. Empty groups get accuracy 0 (check counts)."""
    both = torch.bincount(group + num_groups * (~correct).long(), minlength=2 * num_groups)
    hits, counts = both[:num_groups], both[:num_groups] + both[num_groups:]
    return hits.float() / counts.clamp_min(1).float(), counts


def worst_group(acc: Tensor, counts: Tensor) -> Tensor:
    return torch.where(counts > 0, acc, torch.ones_like(acc)).min()


def catch_up_step(steps: Sequence[int], avg: Sequence[float], worst: Sequence[float],
                  gap: float) -> Optional[int]:
    """The first step from which avg - worst <= gap at every later evaluation, else None."""
    caught = None
    for step, a, w in zip(steps, avg, worst):
        if a - w <= gap:
            caught = step if caught is None else caught
        else:
            caught = None
    return caught


class GroupAccuracy(Probe):
    def __init__(self, group_names: Sequence[str], splits: Sequence[str], gap: float):
        self.names = [slug(g) for g in group_names]
        self.labels = {slug(g): g.replace(",", ", ") for g in group_names}  # for the figure
        self.splits, self.gap = tuple(splits), float(gap)
        self._present: dict[str, list[int]] = {}

    def _columns_of(self, split: str, counts: Tensor) -> list[int]:
        # Which groups have rows never changes within a run: learn it once (one host sync).
        if split not in self._present:
            self._present[split] = (counts > 0).nonzero().squeeze(1).tolist()
        return self._present[split]

    def measure(self, ev: Evaluation) -> dict:
        row = {}
        for split in self.splits:
            data = {"train": ev.train, "test": ev.test, "val": ev.val}[split]
            if data is None or data.group is None:
                continue
            correct = ev.correct(split)
            acc, counts = group_accuracies(correct, data.group, len(self.names))
            row[f"{split}_avg_acc"] = correct.float().mean()
            row[f"{split}_worst_group_acc"] = worst_group(acc, counts)
            for g in self._columns_of(split, counts):
                row[f"{split}_acc_{self.names[g]}"] = acc[g]
        return row

    def summarize(self, rows: list[dict]) -> dict:
        rows = [r for r in rows if number(r.get("test_worst_group_acc")) is not None
                and number(r.get("test_avg_acc")) is not None]
        if not rows:
            return {"groups": {"worst_group_catch_up_step": None}}
        steps = [int(r["step"]) for r in rows]
        avg = [number(r["test_avg_acc"]) for r in rows]
        worst = [number(r["test_worst_group_acc"]) for r in rows]
        gaps = [a - w for a, w in zip(avg, worst)]
        # The untrained model (first row) often predicts one class, worst group 0: a gap that
        # says nothing about what training learned, so the widest gap is sought after it.
        widest = max(range(1 if len(rows) > 1 else 0, len(rows)), key=gaps.__getitem__)
        best = max(range(len(rows)), key=worst.__getitem__)
        return {"groups": {
            "worst_group_catch_up_step": catch_up_step(steps, avg, worst, self.gap),
            "gap": self.gap,
            "final_worst_group_acc": worst[-1], "final_avg_acc": avg[-1],
            "best_worst_group_acc": worst[best], "best_worst_group_acc_step": steps[best],
            "max_gap": gaps[widest], "max_gap_step": steps[widest],
        }}

    def marks(self, summary: dict) -> list[tuple[int, str]]:
        step = summary.get("groups", {}).get("worst_group_catch_up_step")
        return [] if step is None else [(step, "worst group catches up")]

    def plots(self, rows: list[dict], summary: dict, out_dir: Path,
              marks: Sequence[tuple[int, str]] = ()) -> list[Path]:
        """plots/groups.png: test average and worst-group accuracy, and every group's curve
        (the phenomenon itself: which groups the spurious feature serves, and when the others
        catch up)."""
        from dgrun.plots import (draw_marks, legend_outside, looks_log_spaced, pyplot,
                                 save_figure, series, step_extent)

        plt = pyplot()

        if not series(rows, "test_worst_group_acc")[0]:
            return []
        out_dir.mkdir(parents=True, exist_ok=True)
        log_x = looks_log_spaced([number(r.get("step")) or 0 for r in rows])
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
        per_group = [k for k in rows[-1] if k.startswith("test_acc_")]
        colours = plt.get_cmap("tab10").colors[2:]  # C0, C1 are the average and worst group
        for i, key in enumerate(per_group):
            name = key[len("test_acc_"):]
            ax.plot(*series(rows, key, log_x), color=colours[i % len(colours)], linewidth=0.9,
                    alpha=0.8, label=f"test group {self.labels.get(name, name)}")
        ax.plot(*series(rows, "test_avg_acc", log_x), color="C0", linewidth=2,
                label="test average")
        ax.plot(*series(rows, "test_worst_group_acc", log_x), color="C1", linewidth=2,
                label="test worst group")
        if series(rows, "train_acc", log_x)[0]:
            ax.plot(*series(rows, "train_acc", log_x), color="0.4", linestyle=":",
                    label="train average")
        draw_marks(ax, marks, log_x, step_extent(rows, log_x))
        if log_x:
            ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy")
        ax.set_title("accuracy per group: average vs worst group")
        ax.grid(alpha=0.3)
        legend_outside(ax)
        return [save_figure(fig, out_dir / "groups.png")]



@PROBES.register("groups")
def groups(*, meta: Meta, seed: int, splits: Sequence[str] = ("test", "train"),
           gap: float = 0.05) -> Probe:
    """Average, worst-group and per-group accuracy of `splits` (test, train, val)."""
    names = meta.extra.get("groups")
    if not names:
        raise UserError(f"probe 'groups' needs a dataset with groups; '{meta.name}' has none",
                        "use a grouped dataset (colored_digits, lms, dominoes, text_bias, "
                        "colored_mnist, waterbirds, celeba) or drop probes.groups")
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise UserError(f"probes.groups.splits has unknown split(s) {', '.join(unknown)}",
                        f"choose from: {', '.join(SPLITS)}")
    if float(gap) < 0:
        raise UserError(f"probes.groups.gap={gap} must not be negative", "e.g. 0.05")
    return GroupAccuracy(names, splits, gap)
