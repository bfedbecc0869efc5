"""The ensemble's loop: dgrun.train.fit for N members in lockstep, one vmapped step for all.

Each member gets what its separate run would: its batch order (its seed), its prepared and
augmented batch, its dropout masks, its own loss and gradient (clipped by its own norm), the
same schedule, and at every evaluation its own metrics row, judged by the loop's rules (the
threshold, the stall, divergence) on that member's rows alone. A member that ends writes its
final checkpoint, summary and plots at once and is frozen (dgrun.stacked.Stack.freeze); the
loop ends when every member has. The rules are those of dgrun.train.fit, in the same order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from dgrun.config import RunConfig
from dgrun.objectives import ERM
from dgrun.probes.base import Evaluation
from dgrun.seeding import derive_seed
from dgrun.stacked import Stack, draw_masks
from dgrun.status import COMPLETED, PREEMPTED, STOPPED
from dgrun.stopping import judge
from dgrun.train import Plan, State, Clock, epoch_order, measure


@dataclass
class Parts:
    """What the members share, built by dgrun.ensemble.build."""
    cfg: RunConfig
    plan: Plan
    snapshot_points: set[int]
    optimizer: torch.optim.Optimizer     # over the stacked parameters
    scheduler: torch.optim.lr_scheduler.LRScheduler
    eval_loss: Callable
    bar: Any                             # dgrun.progress: one bar for the ensemble
    device: torch.device


class MemberEvaluation(Evaluation):
    """A member's Evaluation whose train and test logits the stack computed for all members
    at once; anything else (val logits, predict, the model) goes through the member's view."""

    def __init__(self, *args, given: dict[str, torch.Tensor], **kwargs):
        super().__init__(*args, **kwargs)
        self.given = given

    def logits(self, name: str) -> torch.Tensor:
        return self.given[name] if name in self.given else super().logits(name)


def _stacked(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """One shared tensor when every member holds the same one, else (N, ...) stacked."""
    first = tensors[0]
    if all(t is first or (t.shape == first.shape and torch.equal(t, first)) for t in tensors):
        return first, False
    return torch.stack(tensors), True


class Batches:
    """The members' training batches, (N, B, ...), or one batch every member shares
    (batched=False: full-batch or streamed data the members share), and their eval inputs."""

    def __init__(self, members: list, batch_size: int, steps_per_epoch: int,
                 device: torch.device):
        self.members, self.size, self.device = members, len(members), device
        self.bs, self.spe = batch_size, steps_per_epoch
        trains = [m.bundle.train for m in members]
        self.x, self.x_batched = _stacked([s.x for s in trains])
        self.y, self.y_batched = _stacked([s.y for s in trains])
        self.n = len(trains[0])
        # Normalization is fitted on a member's training pixels: the same for shared pixels.
        self.prepares = [m.bundle.prepare for m in members]
        self.one_prepare = not self.x_batched
        self.shared_stream = all(m.bundle is members[0].bundle for m in members)
        self.order: Optional[torch.Tensor] = None
        self.all_rows = torch.arange(self.n, device=device).expand(self.size, -1)
        self.evals = {"train": (self.x, self.x_batched),
                      "test": _stacked([m.bundle.test.x for m in members])}

    def prepare(self, x: torch.Tensor, batched: bool) -> tuple[torch.Tensor, bool]:
        """Stored rows -> model inputs, each member's with its own prepare."""
        if self.one_prepare:
            if not batched:
                return self.prepares[0](x), False
            return self.prepares[0](x.flatten(0, 1)).unflatten(0, x.shape[:2]), True
        return torch.stack([p(x[k] if batched else x) for k, p in enumerate(self.prepares)]), True

    def batch(self, step: int):
        """-> (inputs, batched, (N, B) labels, (N, B) row indices or None when streamed)."""
        train = self.members[0].bundle.train
        if train.stream is not None:
            if self.shared_stream:
                x, y = train.stream(step, self.bs, self.device)
                x, batched, y, idx = x, False, y.expand(self.size, -1), None
            else:
                pairs = [m.bundle.train.stream(step, self.bs, self.device) for m in self.members]
                x, batched, idx = torch.stack([p[0] for p in pairs]), True, None
                y = torch.stack([p[1] for p in pairs])
        elif self.bs >= self.n:
            x, batched, idx = self.x, self.x_batched, self.all_rows
            y = self.y if self.y_batched else self.y.expand(self.size, -1)
        else:
            epoch, position = divmod(step, self.spe)
            if self.order is None or position == 0:
                self.order = torch.stack([epoch_order(m.cfg.seed, epoch, self.n, self.device)
                                          for m in self.members])
            idx = self.order[:, position * self.bs:(position + 1) * self.bs]
            members = torch.arange(self.size, device=self.device).view(-1, 1)
            x, batched = (self.x[members, idx] if self.x_batched else self.x[idx]), True
            y = self.y.gather(1, idx) if self.y_batched else self.y[idx]
        x, batched = self.prepare(x, batched)
        if any(m.augment is not None for m in self.members):
            x = torch.stack([m.augment(x[k] if batched else x, step)
                             for k, m in enumerate(self.members)])
            batched = True
        return x, batched, y, idx

    def losses(self, out: torch.Tensor, y: torch.Tensor, idx: Optional[torch.Tensor]):
        """(N,) each member's objective on its batch."""
        objectives = [m.objective for m in self.members]
        if all(type(o) is ERM for o in objectives):  # one call for all: the mean per member
            per_row = objectives[0].per_example_loss(out.flatten(0, 1), y.reshape(-1))
            return per_row.view(self.size, -1).mean(dim=1)
        return torch.stack([o(out[k], y[k], None if idx is None else idx[k])
                            for k, o in enumerate(objectives)])


def fit(stack: Stack, parts: Parts, members: list, guard, start: int) -> None:
    """Train every member that has a Recorder from step `start` until each has ended."""
    plan, optimizer, scheduler = parts.plan, parts.optimizer, parts.scheduler
    device, cfg, bar = parts.device, parts.cfg, parts.bar
    spe, n_members = plan.steps_per_epoch, stack.size
    data = Batches(members, plan.batch_size, spe, device)
    training = [m for m in members if m.recorder is not None]
    active = {m.k for m in training}
    clock = Clock(State(train_time_s=max(m.state.train_time_s for m in training)), device)
    nonfinite = torch.zeros(n_members, dtype=torch.bool, device=device)
    step = start
    title = f"{cfg.model.name} on {members[0].bundle.meta.name}, corruption: {cfg.corruption.name}"

    def sync(k: int) -> State:
        state = members[k].state
        state.step, state.train_time_s = step, clock.state.train_time_s
        return state

    def evaluate(ks) -> dict[int, dict]:
        clock.pause()
        lr = optimizer.param_groups[0]["lr"]
        logits = {name: stack.logits(x, batched, data.prepare, plan.eval_batch_size)
                  for name, (x, batched) in data.evals.items()}
        rows = {}
        for k in sorted(ks):
            m, state = members[k], sync(k)
            ev = MemberEvaluation(stack.views[k], m.bundle.train, m.bundle.test,
                                  prepare=m.bundle.prepare, batch_size=plan.eval_batch_size,
                                  step=step, lr=lr, val=m.bundle.val,
                                  given={name: out[k] for name, out in logits.items()})
            row = {"step": step, "epoch": step / spe, "time_s": state.train_time_s, "lr": lr}
            row.update(measure(ev, parts.eval_loss, m.probes))
            state.rows.append(row)
            m.recorder.on_eval(state, row)
            rows[k] = row
        keys = ("train_loss", "train_acc", "test_acc")
        bar.eval({key: sum(r[key] for r in rows.values()) / len(rows) for key in keys})
        return rows

    def save(k: int, reason: str) -> None:
        members[k].recorder.save(sync(k), reason)

    def end(k: int, status: str, reason: str) -> None:
        clock.pause()
        state = sync(k)
        state.status, state.stop_reason = status, reason
        members[k].recorder.save(state, reason)
        members[k].summary = members[k].recorder.finish(
            state, log_x=cfg.trainer.eval_schedule == "log", title=title)
        active.discard(k)

    if not training[0].state.rows:
        evaluate(active)
    stack.base.train()
    clock.start()
    while active and (plan.max_steps is None or step < plan.max_steps):
        x, batched, y, idx = data.batch(step)
        calls = stack.dropout_calls(x, batched)
        masks = draw_masks(calls, [derive_seed(m.cfg.seed, "step", step) for m in members],
                           device) if calls else []
        losses = data.losses(stack(x, batched, masks), y, idx)
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # each member's gradient is its own loss's: they share nothing
        if plan.grad_clip is not None:
            stack.clip_grad_norm_(plan.grad_clip)
        optimizer.step()
        scheduler.step()
        stack.hold()  # ended members keep their final parameters
        nonfinite |= ~torch.isfinite(losses.detach())
        step += 1
        bar.step(step)

        last = plan.max_steps is not None and step >= plan.max_steps
        if plan.is_eval_step(step) or last:
            rows, bad, saved = evaluate(active), nonfinite.tolist(), set()
            for k, row in rows.items():
                verdict = judge(members[k].state, row, plan, bad[k])
                if verdict.reached:
                    save(k, "interpolation")
                    saved.add(k)
                if verdict.ending:
                    end(k, *verdict.ending)
            # One member's checkpoint is everyone's: the members that train always share
            # their newest checkpoint step, which is what a re-run resumes them from.
            for k in sorted(active - saved) if saved else ():
                save(k, "periodic")
            stack.freeze([k for k in range(n_members) if k not in active])
            clock.start()
        if last:
            break
        if plan.is_checkpoint_step(step) and active:
            clock.pause()
            for k in sorted(active):
                save(k, "periodic")
            clock.start()
        if plan.max_time_s is not None and active and clock.elapsed() >= plan.max_time_s:
            if not plan.is_eval_step(step):  # an evaluation step has its rows already
                evaluate(active)
            for k in sorted(active):
                end(k, STOPPED, "max_time_s")
        signal_name = guard.signal_name
        if signal_name and active:
            for k in sorted(active):
                end(k, PREEMPTED, signal_name)
    for k in sorted(active):
        end(k, COMPLETED, plan.max_steps_reason)
