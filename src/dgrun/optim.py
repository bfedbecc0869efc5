"""Optimizers and learning-rate schedules.

Every schedule is a per-step multiplier of the base lr, f(step) -> factor, wrapped in LambdaLR:
"per epoch" schedules are expressed in steps via steps_per_epoch, so they behave the same in
full-batch and minibatch runs and resume exactly from the step counter.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from dgrun.errors import UserError
from dgrun.registry import Registry

OPTIMIZERS = Registry("optimizer")
SCHEDULERS = Registry("scheduler")
Schedule = Callable[[int], float]


@OPTIMIZERS.register("sgd")
def sgd(params, /, *, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0,
        nesterov: bool = False) -> torch.optim.Optimizer:
    if nesterov and momentum == 0:
        raise UserError("optimizer.nesterov=true needs momentum", "set optimizer.momentum > 0")
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=nesterov)


@OPTIMIZERS.register("adam")
def adam(params, /, *, lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999),
         eps: float = 1e-8, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, betas=_betas(betas), eps=eps, weight_decay=weight_decay)


@OPTIMIZERS.register("adamw")
def adamw(params, /, *, lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999),
          eps: float = 1e-8, weight_decay: float = 0.01) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=_betas(betas), eps=eps,
                             weight_decay=weight_decay)


def _betas(betas: Sequence[float]) -> tuple[float, float]:
    b = tuple(float(v) for v in betas)
    if len(b) != 2 or not all(0.0 <= v < 1.0 for v in b):
        raise UserError(f"optimizer.betas={list(betas)} must be two numbers in [0, 1)",
                        "e.g. optimizer.betas=[0.9,0.98]")
    return b


def _warm(schedule: Schedule, warmup_steps: int) -> Schedule:
    if warmup_steps <= 0:
        return schedule
    return lambda step: schedule(step) * min(1.0, (step + 1) / warmup_steps)


def _unit(step: int) -> float:
    return 1.0


@SCHEDULERS.register("constant")
def constant(*, steps_per_epoch: int, total_steps: int | None, warmup_steps: int = 0) -> Schedule:
    return _warm(_unit, warmup_steps)


class ConstantLR(torch.optim.lr_scheduler.LambdaLR):
    """A schedule whose factor is always 1: LambdaLR's record (last_epoch, state_dict, so
    checkpoints and resume are unchanged) without recomputing the same lr every step."""

    def step(self, epoch=None) -> None:
        if not hasattr(self, "_last_lr"):  # the constructor's first step sets the lr
            return super().step(epoch)
        self.last_epoch += 1
        self._step_count += 1


@SCHEDULERS.register("exponential")
def exponential(*, steps_per_epoch: int, total_steps: int | None, gamma: float = 0.95,
                staircase: bool = True, warmup_steps: int = 0,
                epoch_steps: int | None = None) -> Schedule:
    """lr * gamma ** epoch; `staircase` decays once per whole epoch (as TF's exponential_decay).

    `epoch_steps` fixes the length of the decay's epoch in steps, so a schedule written for one
    dataset (Zhang et al.'s 0.95 per CIFAR-10 epoch of 391 steps) decays as fast per step on
    another; null follows the data's own epoch.
    """
    period = steps_per_epoch if epoch_steps is None else epoch_steps
    if staircase:
        return _warm(lambda step: gamma ** (step // period), warmup_steps)
    return _warm(lambda step: gamma ** (step / period), warmup_steps)


@SCHEDULERS.register("multistep")
def multistep(*, steps_per_epoch: int, total_steps: int | None,
              milestones: Sequence[int] = (100, 150), gamma: float = 0.1,
              warmup_steps: int = 0) -> Schedule:
    """lr * gamma ** (number of milestone epochs passed)."""
    bounds = sorted(int(m) * steps_per_epoch for m in milestones)
    return _warm(lambda step: gamma ** sum(step >= b for b in bounds), warmup_steps)


def _cosine(total_steps: int | None, min_lr_factor: float, start: int) -> Schedule:
    if total_steps is None:
        raise UserError("a cosine schedule needs a step budget",
                        "set trainer.max_steps or trainer.max_epochs")
    span = max(1, total_steps - start)

    def factor(step: int) -> float:
        t = min(1.0, max(0, step - start) / span)
        return min_lr_factor + (1 - min_lr_factor) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


@SCHEDULERS.register("cosine")
def cosine(*, steps_per_epoch: int, total_steps: int | None,
           min_lr_factor: float = 0.0) -> Schedule:
    return _cosine(total_steps, min_lr_factor, start=0)


@SCHEDULERS.register("warmup_cosine")
def warmup_cosine(*, steps_per_epoch: int, total_steps: int | None, warmup_steps: int = 100,
                  min_lr_factor: float = 0.0) -> Schedule:
    """Linear warmup over `warmup_steps`, then cosine decay to min_lr_factor * lr."""
    return _warm(_cosine(total_steps, min_lr_factor, start=warmup_steps), warmup_steps)


def build(model: torch.nn.Module, optimizer: str, optimizer_options: dict, scheduler: str,
          scheduler_options: dict, *, steps_per_epoch: int, total_steps: int | None):
    opt = OPTIMIZERS.build(optimizer, model.parameters(), **optimizer_options)
    factor = SCHEDULERS.build(scheduler, steps_per_epoch=steps_per_epoch,
                              total_steps=total_steps, **scheduler_options)
    schedule = ConstantLR if factor is _unit else torch.optim.lr_scheduler.LambdaLR
    return opt, schedule(opt, factor)
