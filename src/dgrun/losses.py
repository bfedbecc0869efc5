"""Training objectives. Each returns (loss_fn for training, loss_fn for evaluation): the
evaluation loss drops label smoothing, so curves with and without smoothing compare.
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
    train = lambda out, y: F.cross_entropy(out, y, label_smoothing=label_smoothing)  # noqa: E731
    return train, lambda out, y: F.cross_entropy(out, y, reduction="sum")


@LOSSES.register("mse")
def mse(*, label_smoothing: float = 0.0) -> tuple[LossFn, LossFn]:
    """Squared error against one-hot targets (Gromov's grokking MLP), summed over classes."""

    def loss(out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        target = F.one_hot(y, out.shape[-1]).to(out.dtype)
        if label_smoothing:
            target = target * (1 - label_smoothing) + label_smoothing / out.shape[-1]
        per_row = (out - target).pow(2).sum(dim=-1)
        return per_row.mean() if reduction == "mean" else per_row.sum()

    def eval_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        target = F.one_hot(y, out.shape[-1]).to(out.dtype)
        return (out - target).pow(2).sum()

    return loss, eval_loss
