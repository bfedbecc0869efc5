"""Grokking: generalization that arrives long after memorization.

From the metrics rows alone (no measurement of its own):

    memorization_step    first evaluated step with train_acc >= train_threshold
    generalization_step  first evaluated step with test_acc >= test_threshold
    delay_steps          generalization_step - memorization_step
    delay_ratio          generalization_step / max(memorization_step, 1)
    grokked              generalized, memorized, and delay_ratio >= min_delay_ratio

A step is null when its threshold is never reached, and so is every field computed from it
(then `grokked` is false). "First" means first, not "first of a sustained stretch": a curve
that touches the threshold once has reached it, which is what the thresholds ask.

Why min_delay_ratio defaults to 5: on tasks that do not grok, test accuracy reaches the
threshold soon after train accuracy (Nanda et al.'s sweep: at train fraction >= 0.7 both take
~220 epochs), a ratio near 1-2; the grokking setups measured here have ratios of ~15 (Gromov's
MLP, 300 / 20 steps), ~27 (embedding MLP, 1350 / 50) and ~10^3 (Power et al.). 5 sits between.
"""
from __future__ import annotations

import math
from typing import Optional

from dgrun.errors import UserError
from dgrun.probes import PROBES
from dgrun.probes.base import Probe


def first_step(rows: list[dict], column: str, threshold: float) -> Optional[int]:
    """The first row's step (in step order) whose `column` is >= threshold; None if none is.
    Blank and non-finite values never reach a threshold."""
    for row in sorted(rows, key=lambda r: float(r["step"])):
        try:
            value = float(row.get(column))
        except (TypeError, ValueError):
            continue
        if math.isfinite(value) and value >= threshold:
            return int(float(row["step"]))
    return None


class GrokkingProbe(Probe):
    """summarize -> {"grokking": {memorization_step, generalization_step, delay_ratio,
    delay_steps, grokked, train_threshold, test_threshold, min_delay_ratio}} (scalars only, so
    the report flattens it into columns grokking_<field>)."""

    KEY = "grokking"

    def __init__(self, train_threshold: float, test_threshold: float, min_delay_ratio: float):
        self.train_threshold = train_threshold
        self.test_threshold = test_threshold
        self.min_delay_ratio = min_delay_ratio

    def summarize(self, rows: list[dict]) -> dict:
        memorized = first_step(rows, "train_acc", self.train_threshold)
        generalized = first_step(rows, "test_acc", self.test_threshold)
        both = memorized is not None and generalized is not None
        ratio = generalized / max(memorized, 1) if both else None
        return {self.KEY: {
            "memorization_step": memorized,
            "generalization_step": generalized,
            "delay_ratio": ratio,
            "delay_steps": generalized - memorized if both else None,
            "grokked": bool(both and ratio >= self.min_delay_ratio),
            "train_threshold": self.train_threshold,
            "test_threshold": self.test_threshold,
            "min_delay_ratio": self.min_delay_ratio,
        }}

    def marks(self, summary: dict) -> list[tuple[int, str]]:
        found = summary.get(self.KEY) or {}
        marks = []
        if found.get("memorization_step") is not None:
            marks.append((found["memorization_step"],
                          f"memorization (train acc >= {found['train_threshold']:g})"))
        if found.get("generalization_step") is not None:
            marks.append((found["generalization_step"],
                          f"generalization (test acc >= {found['test_threshold']:g})"))
        return marks


@PROBES.register("grokking")
def grokking(*, meta, seed, train_threshold: float = 0.99, test_threshold: float = 0.99,
             min_delay_ratio: float = 5.0) -> GrokkingProbe:
    """Memorization and generalization steps, their delay, and whether the run grokked."""
    for name, value in (("train_threshold", train_threshold), ("test_threshold", test_threshold)):
        if not (isinstance(value, (int, float)) and 0 < value <= 1):
            raise UserError(f"probes.grokking.{name} must be an accuracy in (0, 1], got {value!r}",
                            f"e.g. probes.grokking.{name}=0.99")
    if not (isinstance(min_delay_ratio, (int, float)) and min_delay_ratio >= 1):
        raise UserError(f"probes.grokking.min_delay_ratio must be >= 1, got {min_delay_ratio!r}",
                        "e.g. probes.grokking.min_delay_ratio=5")
    return GrokkingProbe(float(train_threshold), float(test_threshold), float(min_delay_ratio))
