"""Losses. Each builder returns (training loss, evaluation loss):

    train(out, y, reduction="mean")    reduction="none" gives per-example losses (B,), which the
                                       objectives (dgrun.objectives) weigh and average
    eval_sum(out, y)                   summed over the rows, without label smoothing, so curves
                                       with and without smoothing compare
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from dgrun.registry import Registry

LOSSES = Registry("loss")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@LOSSES.register("cross_entropy")
def cross_entropy(*, label_smoothing: float = 0.0) -> tuple[LossFn, LossFn]:
    def loss(out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(out, y, label_smoothing=label_smoothing, reduction=reduction)

    return loss, lambda out, y: F.cross_entropy(out, y, reduction="sum")


@LOSSES.register("mse")
def mse(*, label_smoothing: float = 0.0) -> tuple[LossFn, LossFn]:
    """Squared error against one-hot targets (Gromov's grokking MLP), summed over classes."""

    def loss(out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        target = F.one_hot(y, out.shape[-1]).to(out.dtype)
        if label_smoothing:
            target = target * (1 - label_smoothing) + label_smoothing / out.shape[-1]
        per_row = (out - target).pow(2).sum(dim=-1)
        return {"mean": per_row.mean, "sum": per_row.sum}.get(reduction, lambda: per_row)()

    def eval_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        target = F.one_hot(y, out.shape[-1]).to(out.dtype)
        return (out - target).pow(2).sum()

    return loss, eval_loss
