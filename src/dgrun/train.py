"""The training loop: one function, read top to bottom.

It knows nothing of Hydra, registries or run directories. It gets a model, device-resident
data, an optimizer and schedule, a Plan (how long, when to evaluate and checkpoint) and Hooks
(where rows, checkpoints and progress go), and it advances a State that holds everything a
resume needs besides the module and optimizer states.

Speed rules: the data already lives on the device, a batch is an index into it, and nothing
forces a host sync between evaluations (the non-finite-loss flag accumulates as a tensor).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import torch
from torch import nn

from dgrun.data.bundle import Split
from dgrun.losses import LossFn
from dgrun.seeding import derive_seed

Augment = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class Plan:
    seed: int
    batch_size: int                      # already resolved: full batch means len(train)
    steps_per_epoch: int
    max_steps: Optional[int]             # None: only the time budget ends the run
    max_time_s: Optional[float]
    is_eval_step: Callable[[int], bool]
    is_checkpoint_step: Callable[[int], bool]
    stop_at_interpolation: bool = True
    interpolation_threshold: float = 1.0
    interpolation_loss: Optional[float] = None
    grad_clip: Optional[float] = None
    eval_batch_size: int = 4096
    max_steps_reason: str = "max_steps"  # what to call reaching max_steps (max_epochs if that set it)


@dataclass
class State:
    step: int = 0
    train_time_s: float = 0.0            # training only: evaluation and checkpoint time excluded
    rows: list[dict] = field(default_factory=list)
    interpolation: dict = field(default_factory=lambda: {
        "reached": False, "step": None, "epoch": None, "time_s": None})
    status: str = "running"
    stop_reason: Optional[str] = None


class Hooks(Protocol):
    def on_step(self, state: State) -> None: ...
    def on_eval(self, state: State, row: dict) -> None: ...
    def save(self, state: State, reason: str) -> None: ...
    def stop_requested(self) -> Optional[str]: ...


def epoch_order(seed: int, epoch: int, n: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(derive_seed(seed, "order", epoch))
    return torch.randperm(n, generator=gen).to(device)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, loss_sum: LossFn, batch_size: int):
    """Summed loss and per-row correctness over a split, as device tensors (no sync here)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=split.y.device)
    correct = torch.empty(len(split), dtype=torch.bool, device=split.y.device)
    for start in range(0, len(split), batch_size):
        out = model(split.x[start:start + batch_size])
        y = split.y[start:start + batch_size]
        total += loss_sum(out.float(), y)
        correct[start:start + batch_size] = out.argmax(dim=-1) == y
    model.train(was_training)
    return total / max(1, len(split)), correct


def measure(model: nn.Module, train: Split, test: Split, loss_sum: LossFn, batch_size: int,
            ) -> dict[str, float]:
    """One metrics row's measurements, synced to the host in a single transfer."""
    train_loss, train_correct = evaluate(model, train, loss_sum, batch_size)
    test_loss, test_correct = evaluate(model, test, loss_sum, batch_size)
    values = {
        "train_loss": train_loss, "train_acc": train_correct.float().mean(),
        "test_loss": test_loss, "test_acc": test_correct.float().mean(),
    }
    corrupted = train.corrupted
    if bool(corrupted.any()) and not bool(corrupted.all()):
        values["train_acc_clean"] = train_correct[~corrupted].float().mean()
        values["train_acc_corrupted"] = train_correct[corrupted].float().mean()
    values["weight_norm"] = torch.sqrt(sum(p.detach().float().pow(2).sum()
                                           for p in model.parameters()))
    names = list(values)
    numbers = torch.stack([values[k].float() for k in names]).tolist()
    return dict(zip(names, numbers))


def fit(model: nn.Module, train: Split, test: Split, optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler, loss_fn: LossFn, eval_loss_sum: LossFn,
        plan: Plan, state: State, hooks: Hooks, augment: Optional[Augment] = None) -> State:
    device = train.y.device
    n, bs, spe = len(train), plan.batch_size, plan.steps_per_epoch
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    clock = _Clock(state, device)
    # Only the generator the model draws from: torch.manual_seed would also seed every other
    # backend, at a cost of ~0.3 ms a step (it records a stack trace per lazy backend).
    step_generator = torch.default_generator
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        step_generator = torch.cuda.default_generators[index]

    def record() -> dict:
        clock.pause()
        row = {"step": state.step, "epoch": state.step / spe, "time_s": state.train_time_s,
               "lr": optimizer.param_groups[0]["lr"]}
        row.update(measure(model, train, test, eval_loss_sum, plan.eval_batch_size))
        state.rows.append(row)
        hooks.on_eval(state, row)
        return row

    def finish(status: str, reason: str) -> State:
        clock.pause()
        state.status, state.stop_reason = status, reason
        if status != "diverged":
            hooks.save(state, reason)
        return state

    if not state.rows:
        record()
    model.train()
    order = None
    clock.start()
    while plan.max_steps is None or state.step < plan.max_steps:
        epoch, position = divmod(state.step, spe)
        if bs >= n:
            xb, yb = train.x, train.y
        else:
            if order is None or position == 0:
                order = epoch_order(plan.seed, epoch, n, device)
            idx = order[position * bs:(position + 1) * bs]
            xb, yb = train.x[idx], train.y[idx]
        if augment is not None:
            xb = augment(xb, state.step)
        # Dropout and other in-model noise: derived from the step, so resume replays it.
        step_generator.manual_seed(derive_seed(plan.seed, "step", state.step))

        loss = loss_fn(model(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if plan.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), plan.grad_clip)
        optimizer.step()
        scheduler.step()
        nonfinite |= ~torch.isfinite(loss.detach())
        state.step += 1
        hooks.on_step(state)

        last = plan.max_steps is not None and state.step >= plan.max_steps
        if plan.is_eval_step(state.step) or last:
            row = record()
            if bool(nonfinite) or not all(math.isfinite(v) for v in row.values()):
                return finish("diverged", "non-finite loss")
            if not state.interpolation["reached"] and _interpolates(row, plan):
                state.interpolation = {"reached": True, "step": state.step,
                                       "epoch": state.step / spe, "time_s": state.train_time_s}
                if plan.stop_at_interpolation:
                    return finish("completed", "interpolation")
                hooks.save(state, "interpolation")
            clock.start()
        if last:
            return finish("completed", plan.max_steps_reason)
        if plan.is_checkpoint_step(state.step):
            clock.pause()
            hooks.save(state, "periodic")
            clock.start()
        if plan.max_time_s is not None and clock.elapsed() >= plan.max_time_s:
            record()
            return finish("stopped", "max_time_s")
        signal_name = hooks.stop_requested()
        if signal_name:
            return finish("preempted", signal_name)
    return finish("completed", plan.max_steps_reason)


def _interpolates(row: dict, plan: Plan) -> bool:
    if plan.interpolation_loss is not None:
        return row["train_loss"] <= plan.interpolation_loss
    return row["train_acc"] >= plan.interpolation_threshold


class _Clock:
    """Training time only: paused (after a device sync) around evaluation and checkpoints."""

    def __init__(self, state: State, device: torch.device):
        self.state, self.device, self.mark = state, device, None

    def start(self) -> None:
        self.mark = time.perf_counter()

    def elapsed(self) -> float:
        running = 0.0 if self.mark is None else time.perf_counter() - self.mark
        return self.state.train_time_s + running

    def pause(self) -> None:
        if self.mark is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.state.train_time_s += time.perf_counter() - self.mark
            self.mark = None
