"""Weight-space dynamics: how far the weights moved from initialization, and how fast they turn.

Columns at each evaluation:

    dist_from_init       ||theta - theta_0||_2 over every parameter
    l1_dist_from_init    ||theta - theta_0||_1 (Barak et al. 2022: grows steadily through
                         sparse parity's loss plateau while the loss sits still)
    effective_lr         lr / ||W||^2, W the tracked weights (below)
    tracked_weight_norm  ||W||_2

Effective learning rate. A weight tensor w is scale-invariant when the model's output does
not change under w -> c w (a linear or conv weight followed by BatchNorm or LayerNorm). Its
gradient is then orthogonal to w and shrinks like 1/||w||, so an SGD step turns w by an angle
proportional to lr / ||w||^2: that, not lr, sets the speed of learning for such weights (van
Laarhoven 2017; Li & Arora 2019). All scale-invariant tensors together form one
scale-invariant vector W, hence one column lr / ||W||^2. (Under Adam the angular step goes as
lr / ||W|| instead; the column keeps the SGD definition.) `lr` is the first param group's.

Which tensors are tracked is decided numerically, once, at the probe's first measurement (step
0 of a fresh run): each weight tensor (ndim >= 2) is doubled and counts as scale-invariant when
the outputs on a sample of training rows move by less than `rtol` (0.1) times what a random
perturbation of half its norm does (see `scale_invariant_weights`). The check runs in train
mode, because BatchNorm is scale-invariant only with batch statistics (running statistics
are a fixed affine map); BatchNorm's running buffers are restored afterwards and dropout
sees the same mask in every forward, so the check leaves no trace on training.

When no tensor is scale-invariant (a plain MLP, a transformer without normalization after its
weights), every weight tensor (ndim >= 2) is tracked instead and the column is
lr / ||all weights||^2; summary.json says which (`basis`: "scale_invariant" or "all_weights").

theta_0 and the tracked names are the probe's state_dict, so a resumed run measures against
the same initialization and the same tensors as one never interrupted.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from dgrun.errors import UserError
from dgrun.plots import (draw_marks, legend_outside, looks_log_spaced, pyplot, save_figure,
                         series, step_extent)
from dgrun.probes import PROBES
from dgrun.probes.base import Evaluation, Probe

SCALE = 2.0  # a power of two: scaling is exact in floating point, so only normalization eps
#              (and nothing else) separates "invariant" from "exactly equal"


def _cuda_index(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [torch.cuda.current_device() if device.index is None else device.index]


def _same_noise(device: torch.device) -> None:
    """Reseed the generators a forward pass draws from (dropout), so two passes share masks."""
    torch.default_generator.manual_seed(0)
    for index in _cuda_index(device):
        torch.cuda.default_generators[index].manual_seed(0)


@torch.no_grad()
def scale_invariant_weights(model: nn.Module, x: Tensor, *, rtol: float = 0.1) -> list[str]:
    """Names of the weight tensors (ndim >= 2) the model's train-mode output on `x` is
    invariant to scaling: doubling the tensor changes the outputs (max abs difference) by
    less than `rtol` times what a random perturbation of half its norm does. An unused tensor
    (the perturbation changes nothing) is not invariant. Leaves the model as it found it:
    parameters, buffers (BatchNorm running statistics), train/eval mode and the global RNGs.

    Why relative to a perturbation: normalization's eps keeps invariance from being exact (eps
    1e-3 BatchNorm: doubling moves outputs ~0.3% of what a perturbation does, measured on
    Zhang et al.'s Inception), while a weight that is not invariant moves them about as much
    as a perturbation does or more (~1x-3x on a WRN's residual convs and classifier)."""
    was_training = model.training
    saved_buffers = [(b, b.clone()) for b in model.buffers()]
    found = []
    try:
        with torch.random.fork_rng(devices=_cuda_index(x.device)):
            model.train()

            def forward() -> Tensor:
                _same_noise(x.device)
                out = model(x).float()
                for buffer, value in saved_buffers:  # each pass sees the same running stats
                    buffer.copy_(value)
                return out

            base = forward()
            noise = torch.Generator(device="cpu").manual_seed(0)
            for name, p in model.named_parameters():
                if p.ndim < 2 or not bool(p.detach().abs().sum() > 0):
                    continue
                original = p.detach().clone()
                p.mul_(SCALE)
                scaled = float((forward() - base).abs().max())
                direction = torch.randn(p.shape, generator=noise).to(p.device, p.dtype)
                p.copy_(original + 0.5 * original.norm() * direction / direction.norm())
                perturbed = float((forward() - base).abs().max())
                p.copy_(original)
                if scaled < rtol * perturbed:
                    found.append(name)
    finally:
        for buffer, value in saved_buffers:
            buffer.copy_(value)
        model.train(was_training)
    return found


class DynamicsProbe(Probe):
    KEY = "dynamics"

    def __init__(self, sample: int, rtol: float):
        self.sample, self.rtol = sample, rtol
        self.theta0: Optional[dict[str, Tensor]] = None
        self.tracked: list[str] = []
        self.basis: Optional[str] = None  # "scale_invariant" or "all_weights"

    def _start(self, ev: Evaluation, params: dict[str, nn.Parameter]) -> None:
        self.theta0 = {name: p.detach().clone() for name, p in params.items()}
        x = ev.prepare(ev.train.x[:self.sample])
        self.tracked = scale_invariant_weights(ev.model, x, rtol=self.rtol)
        self.basis = "scale_invariant"
        if not self.tracked:
            self.basis = "all_weights"
            self.tracked = [n for n, p in params.items() if p.ndim >= 2] or list(params)

    def measure(self, ev: Evaluation) -> dict[str, Tensor]:
        params = dict(ev.model.named_parameters())
        if self.theta0 is None:
            self._start(ev, params)
        if set(self.theta0) != set(params) or not set(self.tracked) <= set(params):
            raise UserError("the dynamics probe's saved initialization does not match the "
                            "model's parameters", "resume with the same model, or start a "
                            "new run directory")
        diffs = [p.detach().float() - self.theta0[n].to(p.device, torch.float32)
                 for n, p in params.items()]
        norm2 = torch.stack([params[n].detach().float().pow(2).sum() for n in self.tracked]).sum()
        # All-zero weights would make the column inf, and a non-finite row reads as divergence.
        norm2 = norm2.clamp_min(torch.finfo(torch.float32).tiny)
        return {
            "dist_from_init": torch.stack([d.pow(2).sum() for d in diffs]).sum().sqrt(),
            "l1_dist_from_init": torch.stack([d.abs().sum() for d in diffs]).sum(),
            "effective_lr": ev.lr / norm2,
            "tracked_weight_norm": norm2.sqrt(),
        }

    def summarize(self, rows: list[dict]) -> dict:
        def last(key):
            values = series(rows, key)[1]
            return values[-1] if values else None
        return {self.KEY: {
            "basis": self.basis,
            "tracked_tensors": len(self.tracked),
            "final_dist_from_init": last("dist_from_init"),
            "final_l1_dist_from_init": last("l1_dist_from_init"),
            "final_effective_lr": last("effective_lr"),
        }}

    def plots(self, rows: list[dict], summary: dict, out_dir: Path,
              marks: Sequence[tuple[int, str]] = ()) -> list[Path]:
        steps = series(rows, "dist_from_init")[0]
        if not steps:
            return []
        log_x = looks_log_spaced(steps)
        out_dir.mkdir(parents=True, exist_ok=True)
        fig, (norm_ax, dist_ax, lr_ax) = pyplot().subplots(3, 1, figsize=(8, 8), dpi=120,
                                                          sharex=True)

        def line(ax, key, **style):
            steps, values = series(rows, key, log_x)
            if steps:  # a column the run lacks (no weight_norm) is left out, not drawn empty
                ax.plot(steps, values, **style)

        tracked = {"scale_invariant": "scale-invariant weights",
                   "all_weights": "all weight tensors"}.get(self.basis, "tracked weights")
        line(norm_ax, "weight_norm", label="all parameters")
        line(norm_ax, "tracked_weight_norm", label=tracked)
        norm_ax.set_ylabel("weight norm")
        line(dist_ax, "dist_from_init", color="C0")
        dist_ax.set_ylabel("L2 distance from init", color="C0")
        l1_ax = dist_ax.twinx()  # L1 is ~sqrt(#params) times larger: its own axis
        line(l1_ax, "l1_dist_from_init", color="C1")
        l1_ax.set_ylabel("L1 distance from init", color="C1")
        line(lr_ax, "effective_lr", color="C2")
        lr_ax.set_ylabel(f"effective lr: lr / ||W||², W = {tracked}", fontsize=8)
        lr_ax.set_xlabel("step")
        lrs = series(rows, "effective_lr")[1]
        if lrs and min(lrs) > 0:
            lr_ax.set_yscale("log")
        extent = step_extent(rows, log_x)
        for ax in (norm_ax, dist_ax, lr_ax):
            ax.grid(alpha=0.3)
            draw_marks(ax, marks, log_x, extent)  # the run's events, the same on every panel
            if log_x:
                ax.set_xscale("log")
        norm_ax.set_title("weights over training" + (" (log steps)" if log_x else ""))
        legend_outside(norm_ax)
        return [save_figure(fig, out_dir / "dynamics.png")]

    def state_dict(self) -> dict:
        if self.theta0 is None:
            return {}
        return {"theta0": dict(self.theta0), "tracked": list(self.tracked), "basis": self.basis}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.theta0 = dict(state["theta0"])
        self.tracked = list(state["tracked"])
        self.basis = state["basis"]


@PROBES.register("dynamics")
def dynamics(*, meta, seed, sample: int = 32, rtol: float = 0.1) -> DynamicsProbe:
    """Distance from initialization (L2, L1) and the effective learning rate."""
    if not (isinstance(sample, int) and sample >= 2):
        raise UserError(f"probes.dynamics.sample must be an integer >= 2, got {sample!r}",
                        "BatchNorm needs a batch to normalize: e.g. probes.dynamics.sample=32")
    if not (isinstance(rtol, (int, float)) and 0 < rtol < 1):
        raise UserError(f"probes.dynamics.rtol must be in (0, 1), got {rtol!r}",
                        "e.g. probes.dynamics.rtol=0.1")
    return DynamicsProbe(sample=sample, rtol=float(rtol))
