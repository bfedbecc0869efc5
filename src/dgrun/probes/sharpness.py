"""Sharpness: the top eigenvalue of the training loss's Hessian, and optionally its trace.

Columns (every `every`-th evaluation; the others are left blank):

    sharpness       the Hessian's eigenvalue of largest magnitude (power iteration, as PyHessian
                    does; after training it is the top, positive one)
    hessian_trace   Hutchinson's estimate E[v^T H v], v Rademacher (`trace_samples` > 0)

The Hessian is that of the run's training loss (trainer.loss, mean over rows) on a fixed
subset of `sample` training rows, drawn once from the seed, with the model in eval mode (no
dropout noise, BatchNorm on its running statistics), over every trainable parameter.
Hessian-vector products come from torch.func: reverse-over-reverse (vjp of grad), with the
forward and gradient graph built once per measurement and reused by every product.

Cost per measurement: one forward and backward pass with its graph kept, then one
Hessian-vector product (about twice a backward pass) per power iteration, at most
`iterations` (default 20; it stops early when the estimate changes by less than `tol`
relative), plus `trace_samples` more for the trace. `summarize` reports the mean number of
products a measurement took (`hvps_per_measurement`).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp

from dgrun.errors import UserError
from dgrun.losses import LOSSES
from dgrun.metrics import number
from dgrun.probes import PROBES
from dgrun.probes.base import Evaluation, Probe
from dgrun.seeding import derive_seed

Params = dict[str, Tensor]


def hessian_vector_product(loss_of: Callable[[Params], Tensor], params: Params
                           ) -> Callable[[Params], Params]:
    """v -> H v for the Hessian of loss_of at params (graph built once, reused per call)."""
    _, vjp_fn = vjp(grad(loss_of), params)
    return lambda v: vjp_fn(v)[0]


def _dot(a: Params, b: Params) -> Tensor:
    return sum((a[k].double() * b[k].double()).sum() for k in a)


def _like(params: Params, draw: Callable[[Tensor], Tensor]) -> Params:
    return {k: draw(p) for k, p in params.items()}


def top_eigenvalue(hvp: Callable[[Params], Params], params: Params, *, iterations: int = 20,
                   tol: float = 1e-3, generator: Optional[torch.Generator] = None
                   ) -> tuple[float, int]:
    """Power iteration: (eigenvalue of largest magnitude, Hessian-vector products used)."""
    v = _like(params, lambda p: torch.randn(p.shape, generator=generator).to(p))
    norm = _dot(v, v).sqrt()
    v = {k: t / norm for k, t in v.items()}
    value, used = None, 0
    for _ in range(iterations):
        hv = hvp(v)
        used += 1
        new = float(_dot(v, hv))
        norm = float(_dot(hv, hv).sqrt())
        if norm == 0:
            return 0.0, used
        v = {k: t / norm for k, t in hv.items()}
        if value is not None and abs(new - value) <= tol * abs(new):
            return new, used
        value = new
    return value, used


def hutchinson_trace(hvp: Callable[[Params], Params], params: Params, samples: int,
                     generator: Optional[torch.Generator] = None) -> float:
    """Mean of v^T H v over `samples` Rademacher vectors v."""
    total = 0.0
    for _ in range(samples):
        v = _like(params, lambda p: (torch.randint(0, 2, p.shape, generator=generator) * 2 - 1
                                     ).to(p))
        total += float(_dot(v, hvp(v)))
    return total / samples


def loss_closure(model: nn.Module, x: Tensor, y: Tensor, loss: Callable
                 ) -> tuple[Callable[[Params], Tensor], Params]:
    """The training loss on (x, y) as a function of the trainable parameters, and those."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())
    return (lambda ps: loss(functional_call(model, {**ps, **frozen, **buffers}, (x,)), y),
            params)


class SharpnessProbe(Probe):
    KEY = "sharpness"

    def __init__(self, loss: Callable, seed: int, *, sample: int, every: int, iterations: int,
                 tol: float, trace_samples: int):
        self.loss, self.seed, self.sample, self.every = loss, seed, sample, every
        self.iterations, self.tol, self.trace_samples = iterations, tol, trace_samples
        self.evaluations = 0
        self.hvps: list[int] = []

    def measure(self, ev: Evaluation) -> dict:
        self.evaluations += 1
        if (self.evaluations - 1) % self.every:
            return {}
        n = len(ev.train)
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(
            derive_seed(self.seed, "sharpness")))[:self.sample].to(ev.train.y.device)
        x, y = ev.prepare(ev.train.x[rows]), ev.train.y[rows]
        was_training = ev.model.training
        ev.model.eval()
        try:
            with torch.enable_grad():
                loss_of, params = loss_closure(ev.model, x, y, self.loss)
                hvp = hessian_vector_product(loss_of, params)
                # The same start vector at every measurement: curves move with the model only.
                noise = torch.Generator().manual_seed(derive_seed(self.seed, "sharpness_v"))
                value, used = top_eigenvalue(hvp, params, iterations=self.iterations,
                                             tol=self.tol, generator=noise)
                out = {"sharpness": value}
                if self.trace_samples:
                    out["hessian_trace"] = hutchinson_trace(hvp, params, self.trace_samples,
                                                            noise)
                    used += self.trace_samples
        finally:
            ev.model.train(was_training)
        self.hvps.append(used)
        return out

    def summarize(self, rows: list[dict]) -> dict:
        values = [v for v in (number(r.get("sharpness")) for r in rows) if v is not None]
        return {self.KEY: {
            "final": values[-1] if values else None,
            "max": max(values) if values else None,
            "sample": self.sample, "every": self.every, "iterations": self.iterations,
            "trace_samples": self.trace_samples,
            "hvps_per_measurement": sum(self.hvps) / len(self.hvps) if self.hvps else None,
        }}

    def plots(self, rows: list[dict], summary: dict, out_dir, marks=()) -> list:
        from pathlib import Path

        from dgrun.probes.progress_figures import plot_panels
        return plot_panels(rows, [
            ("top Hessian eigenvalue", [("sharpness", "sharpness")], False),
            ("Hessian trace", [("hessian_trace", "Hutchinson trace")], False),
            ("loss", [("train_loss", "train"), ("test_loss", "test")], True),
        ], [], Path(out_dir) / "sharpness.png", "Sharpness of the training loss")

    def state_dict(self) -> dict:
        return {"evaluations": self.evaluations, "hvps": list(self.hvps)}

    def load_state_dict(self, state: dict) -> None:
        self.evaluations = int(state.get("evaluations", 0))
        self.hvps = list(state.get("hvps", []))


@PROBES.register("sharpness")
def sharpness(*, meta, seed, loss: str = "cross_entropy", sample: int = 512, every: int = 1,
              iterations: int = 20, tol: float = 1e-3, trace_samples: int = 0
              ) -> SharpnessProbe:
    """Top Hessian eigenvalue (and Hutchinson trace) of the training loss on a fixed subset."""
    for name, value, least in (("sample", sample, 1), ("every", every, 1),
                               ("iterations", iterations, 2), ("trace_samples", trace_samples, 0)):
        if not (isinstance(value, int) and value >= least):
            raise UserError(f"probes.sharpness.{name} must be an integer >= {least}, got "
                            f"{value!r}", f"e.g. probes.sharpness.{name}="
                            f"{dict(sample=512, every=1, iterations=20, trace_samples=10)[name]}")
    if not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise UserError(f"probes.sharpness.tol must be in (0, 1), got {tol!r}",
                        "e.g. probes.sharpness.tol=0.001")
    return SharpnessProbe(LOSSES.build(loss)[0], seed, sample=sample, every=every,
                          iterations=iterations, tol=float(tol), trace_samples=trace_samples)
