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

from dgrun.errors import UserError
from dgrun.registry import Registry

LOSSES = Registry("loss")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@LOSSES.register("cross_entropy")
def cross_entropy(*, label_smoothing: float = 0.0) -> tuple[LossFn, LossFn]:
    def loss(out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        if reduction == "mean" and label_smoothing:  # the per-example mean's gradients, bit
            return loss(out, y, "none").mean()        # for bit (torch's own mean differs)
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


@LOSSES.register("hinge")
def hinge(*, label_smoothing: float = 0.0) -> tuple[LossFn, LossFn]:
    """Multi-class hinge loss: the sum over wrong classes j of max(0, 1 - out[y] + out[j]).

    With two classes it is exactly the binary hinge loss max(0, 1 - s (out[1] - out[0])),
    s = +-1: Barak et al.'s loss for sparse parity. (torch's multi_margin_loss divides this sum
    by the number of classes, which would halve the effective learning rate of a 2-class run.)
    """
    if label_smoothing:
        raise UserError(f"trainer.label_smoothing={label_smoothing} has no meaning for the hinge "
                        "loss", "set trainer.label_smoothing=0")

    def train(out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        if reduction == "mean":  # scaled per row, then averaged: the gradients of the
            return train(out, y, "none").mean()  # per-example mean, bit for bit
        return F.multi_margin_loss(out, y, reduction=reduction) * out.shape[-1]

    def eval_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.multi_margin_loss(out, y, reduction="sum") * out.shape[-1]

    return train, eval_loss
