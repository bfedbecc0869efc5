"""The training loop: one function, read top to bottom.

It knows nothing of Hydra, registries, run directories or phenomena. It gets a model,
device-resident data, an objective, an optimizer and schedule, a Plan (how long, when to
evaluate and checkpoint, when to stop), probes (extra measurements at each evaluation) and
Hooks (where rows, checkpoints and progress go), and it advances a State that holds everything
a resume needs besides the module, optimizer and probe states.

Speed rules: the data already lives on the device, a batch is an index into it, and nothing
forces a host sync between evaluations (the losses accumulate as a tensor, checked for a
non-finite value at each evaluation).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

import torch
from torch import nn

from dgrun.data.bundle import Split, identity
from dgrun.losses import LossFn
from dgrun.probes.base import Evaluation, Probe
from dgrun.seeding import SeedStream, derive_seed
from dgrun.status import COMPLETED, PREEMPTED, STOPPED
from dgrun.stopping import judge

Augment = Callable[[torch.Tensor, int], torch.Tensor]
# objective(outputs, labels, rows) -> scalar loss; rows index the batch into the training split
# (None when the data streams fresh batches), so group objectives can look up group ids.
Objective = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
Prepare = Callable[[torch.Tensor], torch.Tensor]


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
    stall_patience: Optional[int] = None  # see dgrun.stopping.stalled
    stall_min_delta: float = 0.01
    min_lr: Optional[float] = None
    precision: str = "fp32"              # fp32 | bf16 (autocast: matmuls and convs in bfloat16)
    channels_last: bool = False          # image batches in NHWC memory order (faster convs)


def no_interpolation() -> dict:
    return {"reached": False, "step": None, "epoch": None, "time_s": None}


@dataclass
class State:
    step: int = 0
    steps_per_epoch: int = 0             # recorded so a re-run can judge budgets without data
    train_time_s: float = 0.0            # training only: evaluation and checkpoint time excluded
    rows: list[dict] = field(default_factory=list)
    # The first evaluation that fit the training set: its step, epoch, time and every metric
    # measured there (test accuracy at the threshold is Zhang et al.'s Fig. 1c).
    interpolation: dict = field(default_factory=no_interpolation)
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


def measure(ev: Evaluation, loss_sum: LossFn, probes: Sequence[Probe] = ()) -> dict[str, float]:
    """One metrics row's measurements, synced to the host in a single transfer."""
    values: dict[str, torch.Tensor] = {}
    for name in ("train", "test"):
        split, logits = ev.split(name), ev.logits(name)
        values[f"{name}_loss"] = loss_sum(logits, split.y) / max(1, len(split))
        values[f"{name}_acc"] = ev.correct(name).float().mean()
    corrupted, correct = ev.train.corrupted, ev.correct("train")
    if bool(corrupted.any()) and not bool(corrupted.all()):
        # Accuracy against the labels trained on: on corrupted rows, fitting the noisy label.
        values["train_acc_clean"] = correct[~corrupted].float().mean()
        values["train_acc_corrupted"] = correct[corrupted].float().mean()
    values["weight_norm"] = torch.sqrt(sum(p.detach().float().pow(2).sum()
                                           for p in ev.model.parameters()))
    for probe in probes:
        values.update(probe.measure(ev))
    names = list(values)
    numbers = torch.stack([torch.as_tensor(values[k], dtype=torch.float32,
                                           device=ev.train.y.device).reshape(())
                           for k in names]).tolist()
    return dict(zip(names, numbers))


def fit(model: nn.Module, train: Split, test: Split, optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler, objective: Objective,
        eval_loss_sum: LossFn, plan: Plan, state: State, hooks: Hooks, *,
        augment: Optional[Augment] = None, prepare: Prepare = identity,
        probes: Sequence[Probe] = (), val: Optional[Split] = None,
        forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> State:
    """Train until a rule in `plan` ends the run; returns `state` with its status set.

    `prepare` turns stored rows into model inputs batch by batch (images: pixels -> floats);
    `augment` then perturbs training batches; probes add columns to every metrics row.
    `forward` is what training steps call (a torch.compile'd model); evaluation, checkpoints
    and probes use `model` itself.
    """
    forward = model if forward is None else forward
    bf16 = plan.precision == "bf16"
    # A disabled torch.autocast still costs its enter and exit every step (~5 us).
    autocast = torch.autocast(train.y.device.type, dtype=torch.bfloat16) if bf16 \
        else contextlib.nullcontext()
    device = train.y.device
    n, bs, spe = len(train), plan.batch_size, plan.steps_per_epoch
    state.steps_per_epoch = spe
    # The sum of this call's training losses: non-finite exactly when one of them was (inf and
    # nan propagate through a sum; float64 does not overflow on losses), for one in-place add
    # a step instead of isfinite, not and or. (MPS has no float64; float32 overflows only past
    # 3e38, a sum no run that is not diverging reaches.)
    loss_total = torch.zeros((), device=device,
                             dtype=torch.float32 if device.type == "mps" else torch.float64)
    clock = Clock(state, device)
    # Only the generator the model draws from: torch.manual_seed would also seed every other
    # backend, at a cost of ~0.3 ms a step (it records a stack trace per lazy backend).
    step_generator = torch.default_generator
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        step_generator = torch.cuda.default_generators[index]
    step_seed = SeedStream(plan.seed, "step")
    # Whether a training step draws from that generator (dropout): None until the first step
    # of this call shows it. A step that draws nothing needs no seed (~3 us a step saved).
    draws, seeded = None, None

    def record() -> dict:
        clock.pause()
        row = {"step": state.step, "epoch": state.step / spe, "time_s": state.train_time_s,
               "lr": optimizer.param_groups[0]["lr"]}
        ev = Evaluation(model, train, test, prepare=prepare, batch_size=plan.eval_batch_size,
                        step=state.step, lr=row["lr"], val=val)
        row.update(measure(ev, eval_loss_sum, probes))
        plan.eval_batch_size = ev.batch_size  # smaller after an out-of-memory back-off
        state.rows.append(row)
        hooks.on_eval(state, row)
        return row

    def finish(status: str, reason: str) -> State:
        clock.pause()
        state.status, state.stop_reason = status, reason
        # Saved even when diverged: the checkpoint then says so, and a re-run leaves it alone.
        hooks.save(state, reason)
        return state

    if not state.rows:
        record()
    model.train()
    order = None
    every_row = torch.arange(n, device=device)  # a full batch's row indices, for objectives
    clock.start()
    while plan.max_steps is None or state.step < plan.max_steps:
        epoch, position = divmod(state.step, spe)
        idx = None
        if train.stream is not None:
            xb, yb = train.stream(state.step, bs, device)
        elif bs >= n:
            xb, yb, idx = train.x, train.y, every_row
        else:
            if order is None or position == 0:
                order = epoch_order(plan.seed, epoch, n, device)
            idx = order[position * bs:(position + 1) * bs]
            xb, yb = train.x[idx], train.y[idx]
        xb = prepare(xb)
        if augment is not None:
            xb = augment(xb, state.step)
        if plan.channels_last and xb.dim() == 4:
            xb = xb.contiguous(memory_format=torch.channels_last)
        # Dropout and other in-model noise: derived from the step, so resume replays it.
        if draws is not False:
            step_generator.manual_seed(step_seed(state.step))
            seeded = step_generator.get_state() if draws is None else None

        with autocast:
            out = forward(xb)
        loss = objective(out.float() if bf16 else out, yb, idx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if plan.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), plan.grad_clip)
        optimizer.step()
        scheduler.step()
        if draws is None:
            draws = not torch.equal(seeded, step_generator.get_state())
        loss_total.add_(loss.detach())
        state.step += 1
        hooks.on_step(state)

        last = plan.max_steps is not None and state.step >= plan.max_steps
        if plan.is_eval_step(state.step) or last:
            verdict = judge(state, record(), plan, not bool(torch.isfinite(loss_total)))
            if verdict.reached:
                hooks.save(state, "interpolation")
            if verdict.ending:
                return finish(*verdict.ending)
            clock.start()
        if last:
            return finish(COMPLETED, plan.max_steps_reason)
        if plan.is_checkpoint_step(state.step):
            clock.pause()
            hooks.save(state, "periodic")
            clock.start()
        if plan.max_time_s is not None and clock.elapsed() >= plan.max_time_s:
            if not plan.is_eval_step(state.step):  # an evaluation step has its row already
                record()
            return finish(STOPPED, "max_time_s")
        signal_name = hooks.stop_requested()
        if signal_name:
            return finish(PREEMPTED, signal_name)
    return finish(COMPLETED, plan.max_steps_reason)


class Clock:
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
