"""FGSM and PGD with the budget in pixel space, whatever normalization the model sees.

The attack moves pixels x in [0, 1]; the model sees prepare(x), and gradients flow through
prepare. So eps = 8/255 means 8 grey levels whether the run standardizes, whitens or does
nothing, and every adversarial image is a valid image (clipped to [0, 1]).

    pgd   maximise the cross-entropy: from a random point of the eps-ball (optional), `steps`
          ascent steps of `step_size` (linf: sign of the gradient; l2: the unit gradient), each
          followed by projection onto the ball and clipping to [0, 1]  (Madry et al. 2018)
    fgsm  one step of size eps from x itself (Goodfellow et al. 2015): pgd with steps=1,
          step_size=eps, no random start

Random starts come from a CPU generator keyed by (seed, "attack"), drawn for the whole batch
at once: the same seed gives the same adversarial images on every device and batch size.

(torchattacks 3.5.1 was considered: it pins requests~=2.25.1, which would downgrade this
environment's requests, and draws its random start from torch's global generator, which
would shift the training run's random stream. AutoAttack is not on PyPI.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgrun.errors import UserError
from dgrun.robustness.rng import Draws

Prepare = Callable[[Tensor], Tensor]


class LinfBall:
    @staticmethod
    def random(shape: tuple[int, ...], eps: float, draws: Draws) -> Tensor:
        return draws.uniform(shape, -eps, eps)

    @staticmethod
    def ascent(grad: Tensor, size: float) -> Tensor:
        return size * grad.sign()

    @staticmethod
    def project(delta: Tensor, eps: float) -> Tensor:
        return delta.clamp(-eps, eps)


class L2Ball:
    @staticmethod
    def random(shape: tuple[int, ...], eps: float, draws: Draws) -> Tensor:
        """Uniform in the ball: a Gaussian direction, radius eps * U^(1/d)."""
        direction = draws.normal(shape)
        d = math.prod(shape[1:])
        radius = eps * draws.uniform((shape[0],)).pow(1.0 / d)
        return direction * (radius / _norms(direction)).view(-1, *[1] * (len(shape) - 1))

    @staticmethod
    def ascent(grad: Tensor, size: float) -> Tensor:
        return size * grad / _norms(grad).clamp_min(1e-12).view(-1, *[1] * (grad.dim() - 1))

    @staticmethod
    def project(delta: Tensor, eps: float) -> Tensor:
        scale = (eps / _norms(delta).clamp_min(1e-12)).clamp(max=1.0)
        return delta * scale.view(-1, *[1] * (delta.dim() - 1))


def _norms(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1)


NORMS = {"linf": LinfBall, "l2": L2Ball}
KINDS = ("fgsm", "pgd")


@dataclass(frozen=True)
class AttackSpec:
    """kind fgsm|pgd, norm linf|l2, eps in pixel units ([0, 1] scale). step_size None means
    2.5 * eps / steps for pgd (Madry et al.'s choice), eps for fgsm."""
    kind: str = "pgd"
    norm: str = "linf"
    eps: float = 8 / 255
    steps: int = 10
    step_size: Optional[float] = None
    random_start: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"attack kind {self.kind!r} is not one of {', '.join(KINDS)}",
                            "use attack=pgd, attack=fgsm or attack=none")
        if self.norm not in NORMS:
            raise UserError(f"attack norm {self.norm!r} is not one of {', '.join(NORMS)}",
                            "use norm=linf or norm=l2")
        if not self.eps > 0:
            raise UserError(f"attack eps={self.eps} must be positive", "e.g. eps=0.0314 (8/255)")
        if self.kind == "pgd" and (int(self.steps) != self.steps or self.steps < 1):
            raise UserError(f"attack steps={self.steps} must be a positive integer", "e.g. 10")
        if self.step_size is not None and not self.step_size > 0:
            raise UserError(f"attack step_size={self.step_size} must be positive or null",
                            "leave it null for 2.5 * eps / steps")

    def resolved(self) -> "AttackSpec":
        """The PGD run this spec means: fgsm becomes one unrandomised step of size eps."""
        if self.kind == "fgsm":
            return replace(self, kind="pgd", steps=1, step_size=self.eps, random_start=False)
        size = self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps
        return replace(self, steps=int(self.steps), step_size=size)


def attack(model: nn.Module, prepare: Prepare, x: Tensor, y: Tensor, spec: AttackSpec, *,
           seed: int = 0, batch_size: int = 512) -> Tensor:
    """Adversarial pixels for float pixels x (N, C, H, W) in [0, 1] and labels y.

    The model is put in eval mode (and restored); parameters' .grad is left untouched. Works
    inside torch.no_grad() or inference_mode: it turns gradients on for itself.
    """
    run = spec.resolved()
    ball = NORMS[run.norm]
    x = x.detach()
    start = (ball.random(tuple(x.shape), run.eps, Draws(x.device, seed, "attack"))
             if run.random_start else torch.zeros_like(x))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            # Clones: tensors made under inference_mode (a probe's cached subset) cannot
            # take part in autograd, normal copies can.
            x, y, start = x.clone(), y.clone(), start.clone()
            return torch.cat([
                _pgd(model, prepare, x[i:i + batch_size], y[i:i + batch_size],
                     start[i:i + batch_size], run, ball)
                for i in range(0, len(x), batch_size)])
    finally:
        model.train(was_training)


def _pgd(model: nn.Module, prepare: Prepare, x: Tensor, y: Tensor, start: Tensor,
         run: AttackSpec, ball) -> Tensor:
    adv = (x + start).clamp(0, 1)
    for _ in range(run.steps):
        adv.requires_grad_(True)
        # Summed, not averaged: each image's gradient is its own, whatever the batch.
        loss = F.cross_entropy(model(prepare(adv)).float(), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() + ball.ascent(grad, run.step_size)
        adv = (x + ball.project(adv - x, run.eps)).clamp(0, 1)
    return adv.detach()


@torch.no_grad()
def _correct(model: nn.Module, prepare: Prepare, x: Tensor, y: Tensor, batch_size: int,
             ) -> Tensor:
    return torch.cat([model(prepare(x[i:i + batch_size])).argmax(dim=-1) == y[i:i + batch_size]
                      for i in range(0, len(x), batch_size)])


def adversarial_accuracy(model: nn.Module, prepare: Prepare, x: Tensor, y: Tensor,
                         spec: AttackSpec, *, seed: int = 0, batch_size: int = 512) -> Tensor:
    """Accuracy (a device scalar) on attacked images; an image already misclassified counts as
    an error."""
    adv = attack(model, prepare, x, y, spec, seed=seed, batch_size=batch_size)
    was_training = model.training
    model.eval()
    try:
        return _correct(model, prepare, adv, y, batch_size).float().mean()
    finally:
        model.train(was_training)
