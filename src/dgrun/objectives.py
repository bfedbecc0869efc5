"""Training objectives: how a batch's per-example losses become the one loss the loop minimizes.

ERM averages them; the group objectives weigh them by the batch rows' groups (Split.group), the
interventions that simplicity-bias studies compare against ERM. The loop builds one per run,

    objective = OBJECTIVES.build(name, train=train_split, num_groups=G,
                                 per_example_loss=fn, **options)   # fn(out, y) -> (B,) losses

optionally with mean_loss=fn_mean (fn_mean(out, y) -> the mean of fn's losses in one call, with
the same gradients: ERM's batch loss then skips the per-example vector, ~20 us a step).

and calls `objective(out, y, rows)` each step, where `rows` is the LongTensor of the batch's
row indices into `train` (None for streamed data, which only `erm` accepts). Objectives with
state (group DRO's weights) keep it as tensors on the training split's device and save it
through state_dict()/load_state_dict(), so a resumed run continues exactly. Nothing here
syncs with the host.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Optional

import torch
from torch import Tensor

from dgrun.data.bundle import Split
from dgrun.errors import UserError
from dgrun.registry import Registry

OBJECTIVES = Registry("objective")
PerExampleLoss = Callable[[Tensor, Tensor], Tensor]

__all__ = ["OBJECTIVES", "Objective", "ERM", "GroupDRO", "Reweight", "group_counts"]


class Objective(ABC):
    """objective(out, y, rows) -> scalar loss; state_dict()/load_state_dict() for resume."""

    def __init__(self, per_example_loss: PerExampleLoss,
                 mean_loss: Optional[PerExampleLoss] = None):
        self.per_example_loss = per_example_loss
        self.mean_loss = mean_loss

    @abstractmethod
    def __call__(self, out: Tensor, y: Tensor, rows: Optional[Tensor]) -> Tensor:
        """The batch's loss."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _grouped(name: str, train: Split, num_groups: int) -> Tensor:
    """The training split's group ids, or one line saying why this objective cannot run."""
    if train.group is None:
        raise UserError(f"objective '{name}' needs a dataset with groups, and this one has none",
                        "use a grouped dataset (colored_digits, lms, dominoes, text_bias, "
                        "colored_mnist, waterbirds, celeba) or objective=erm")
    if train.stream is not None:
        raise UserError(f"objective '{name}' needs fixed training rows, but this dataset streams "
                        "fresh samples", "use objective=erm with streamed data")
    if num_groups < 1 or int(train.group.max()) >= num_groups or int(train.group.min()) < 0:
        raise ValueError(f"group ids must lie in 0..{num_groups - 1}")
    return train.group


def group_counts(group: Tensor, num_groups: int) -> Tensor:
    return torch.bincount(group, minlength=num_groups)


def _group_mean_losses(losses: Tensor, group: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Mean loss of each group in the batch (0 for groups absent from it) and the counts.
    A one-hot matmul rather than a scatter: deterministic on every device."""
    onehot = torch.nn.functional.one_hot(group, num_groups).to(losses.dtype)  # (B, G)
    counts = onehot.sum(0)
    return (onehot.t() @ losses) / counts.clamp_min(1), counts


@OBJECTIVES.register("erm")
class ERM(Objective):
    """Empirical risk minimization: the mean per-example loss."""

    def __init__(self, *, train: Split, num_groups: int, per_example_loss: PerExampleLoss,
                 mean_loss: Optional[PerExampleLoss] = None):
        super().__init__(per_example_loss, mean_loss)

    def __call__(self, out: Tensor, y: Tensor, rows: Optional[Tensor]) -> Tensor:
        if self.mean_loss is not None:  # uniform weights: the loss's own mean reduction
            return self.mean_loss(out, y)
        return self.per_example_loss(out, y).mean()


@OBJECTIVES.register("group_dro")
class GroupDRO(Objective):
    """Online group DRO (Sagawa et al. 2020, Algorithm 1), as in their loss.py.

    Weights q over groups start uniform. Each step, with L_g the mean loss of group g in the
    batch (0 when g is absent):

        q_g <- q_g * exp(eta * (L_g + adjustment / sqrt(n_g)))     then q <- q / sum(q)
        loss = sum_g q_g * L_g

    n_g is group g's size in the training split; `adjustment` (their C, default 0) is the
    generalization adjustment that favours small groups. The q update uses detached losses:
    gradients flow through L_g only.
    """

    def __init__(self, *, train: Split, num_groups: int, per_example_loss: PerExampleLoss,
                 mean_loss: Optional[PerExampleLoss] = None, eta: float = 0.01,
                 adjustment: float = 0.0):
        super().__init__(per_example_loss, mean_loss)
        if float(eta) < 0 or float(adjustment) < 0:
            raise UserError(f"objective.eta={eta} and objective.adjustment={adjustment} must "
                            "not be negative", "e.g. objective.eta=0.01 objective.adjustment=0")
        self.group = _grouped("group_dro", train, num_groups)
        self.num_groups, self.eta = num_groups, float(eta)
        sizes = group_counts(self.group, num_groups).float()
        # Groups absent from training never appear in a batch: their bonus is moot, keep it 0.
        self.bonus = torch.where(sizes > 0, float(adjustment) / sizes.clamp_min(1).sqrt(), 0.0)
        self.q = torch.full((num_groups,), 1.0 / num_groups, device=self.group.device)

    def __call__(self, out: Tensor, y: Tensor, rows: Optional[Tensor]) -> Tensor:
        if rows is None:
            raise ValueError("group_dro needs the batch's row indices")
        group_loss, _ = _group_mean_losses(self.per_example_loss(out, y).float(),
                                           self.group[rows], self.num_groups)
        q = self.q * torch.exp(self.eta * (group_loss.detach() + self.bonus))
        self.q = q / q.sum()
        return group_loss @ self.q

    def state_dict(self) -> dict:
        return {"q": self.q.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.q = state["q"].to(self.q.device, self.q.dtype).clone()


@OBJECTIVES.register("reweight")
class Reweight(Objective):
    """Importance weighting by inverse group frequency: row i of group g weighs

        w_g = N / (G' * n_g)       (N training rows, G' groups present, n_g rows in g)

    and loss = mean_i(w_{g(i)} * loss_i). The weights average 1 over the training split, and the
    expected batch loss is the unweighted mean of the group losses (every group counts alike).
    """

    def __init__(self, *, train: Split, num_groups: int, per_example_loss: PerExampleLoss,
                 mean_loss: Optional[PerExampleLoss] = None):
        super().__init__(per_example_loss, mean_loss)
        self.group = _grouped("reweight", train, num_groups)
        sizes = group_counts(self.group, num_groups).float()
        present = (sizes > 0).sum()
        self.weights = torch.where(sizes > 0, len(self.group) / (present * sizes.clamp_min(1)),
                                   0.0)

    def __call__(self, out: Tensor, y: Tensor, rows: Optional[Tensor]) -> Tensor:
        if rows is None:
            raise ValueError("reweight needs the batch's row indices")
        losses = self.per_example_loss(out, y)
        return (self.weights[self.group[rows]].to(losses.dtype) * losses).mean()
