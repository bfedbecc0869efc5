"""Rules that decide when a run has done its job: the interpolation threshold and the stall.

One place for each rule: the loop applies them as it trains, the resume decision re-checks
them with a new config, and the report applies the threshold to a curve whose run has not
written its summary yet.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from dgrun.status import COMPLETED, DIVERGED, STOPPED


def interpolates(row: dict, threshold: float = 1.0, loss: Optional[float] = None) -> bool:
    """Does this metrics row fit the training data? (train loss <= `loss` when given, else
    train accuracy >= `threshold`)."""
    if loss is not None:
        value = row.get("train_loss")
        return value is not None and value <= loss
    value = row.get("train_acc")
    return value is not None and value >= threshold


def stalled(rows: Sequence[dict], patience: Optional[int], min_delta: float = 0.01) -> bool:
    """No progress in the last `patience` evaluations: train accuracy never rose above its best
    from before that window, and train loss never fell below (1 - min_delta) times its best.

    A run whose learning rate has decayed to nothing, or that cannot fit its data, ends here
    instead of spending its whole budget. Cumulative over the window, so a slow but steady
    descent (noisy labels being fit one by one) is progress, and a frozen one is not.
    """
    if not patience or len(rows) <= patience:
        return False
    before, window = rows[:-patience], rows[-patience:]
    best_acc = max(_finite(r.get("train_acc"), -math.inf) for r in before)
    best_loss = min(_finite(r.get("train_loss"), math.inf) for r in before)
    acc_gain = any(_finite(r.get("train_acc"), -math.inf) > best_acc for r in window)
    loss_gain = any(_finite(r.get("train_loss"), math.inf) < (1 - min_delta) * best_loss
                    for r in window)
    return not (acc_gain or loss_gain)


def _finite(value, default: float) -> float:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else default


@dataclass
class Verdict:
    ending: Optional[tuple[str, str]] = None  # (status, stop_reason) when the run ends here
    reached: bool = False  # the threshold was first crossed here and the run goes on


def judge(state, row: dict, plan, nonfinite: bool) -> Verdict:
    """What an evaluation means for a run (a train.State, its newest metrics `row`, a
    train.Plan): diverged, fitted (stopping there or going on), stalled, or nothing new.
    The first row that fits is recorded as `state.interpolation`. Shared by the single-run
    loop and the ensemble's, so both end runs by the same rules."""
    if nonfinite or not all(math.isfinite(v) for k, v in row.items()
                            if k in ("train_loss", "test_loss")):
        return Verdict((DIVERGED, "non-finite loss"))
    reached = False
    if not state.interpolation["reached"] and interpolates(
            row, plan.interpolation_threshold, plan.interpolation_loss):
        state.interpolation = {"reached": True, **row}  # step, epoch, time_s, then metrics
        if plan.stop_at_interpolation:
            return Verdict((COMPLETED, "interpolation"))
        reached = True
    if stalled(state.rows, plan.stall_patience, plan.stall_min_delta) or (
            plan.min_lr is not None and row["lr"] < plan.min_lr):
        return Verdict((STOPPED, "stalled"), reached)
    return Verdict(None, reached)
