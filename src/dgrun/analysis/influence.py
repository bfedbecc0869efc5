"""Influence functions (Koh & Liang 2017, "Understanding black-box predictions via influence
functions"): how much up-weighting a training row changes the loss on a test row,

    score(z_test, z_i) = grad L(z_test)^T (H + damping I)^-1 grad L(z_i)   (= -I_up,loss)

with H the Hessian of the mean training loss at the final weights. Positive: training more on
z_i lowers z_test's loss (the sign convention of every dgrun attribution: higher helps).
Removing z_i from n rows changes the test loss by about score / n (the leave-one-out test).

The inverse-Hessian-vector products s = (H + damping I)^-1 grad L(z_test) are solved for all
chosen test rows at once, with exact Hessian-vector products (torch.func forward-over-reverse,
batched over the right-hand sides):

    cg      conjugate gradients on the full training loss: exact up to `tol` for a positive
            definite H + damping I (convex models; damping makes a network's H so)
    lissa   the stochastic Neumann series of Agarwal et al. (LiSSA), as Koh & Liang use it:
            h <- v + h - (H + damping I) h / scale over `depth` minibatches, s = h / scale;
            `scale` must exceed H's largest eigenvalue (estimated by power iteration when None)

Then score = s . grad L(z_i) over the training rows, batch by batch (exact per-example
gradients, dgrun.analysis.gradients). The loss is that of the attribution output: the
margin's log(1 + e^-f) (cross-entropy exactly) or the regression's (f - y)^2 / 2. Sized for
small models (a few 10^5 parameters): EK-FAC (kronfluence) is what scales this up.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from dgrun.analysis.attribution import METHODS, Attribution, attribute, lrs_at, plot_attribution
from dgrun.analysis.base import (ANALYSES, Result, RunArtifacts, batched, kept_weights, load,
                                 model_device, require_checkpoints, sample_indices)
from dgrun.analysis.gradients import ModelOutput, Projector, projected_gradients
from dgrun.analysis.options import Count, NonNegative, Positive
from dgrun.errors import UserError
from dgrun.registry import Registry

SOLVERS = Registry("inverse-HVP solver")


HESSIANS = ("exact", "gauss_newton")


class TrainingLoss:
    """The mean training loss of `model` over the parameters `names`, as a function of one
    flat parameter vector, and its Hessian-vector products (several vectors at once).

    hessian="exact": the Hessian itself (indefinite away from a minimum: a network's needs
    damping above its most negative eigenvalue). "gauss_newton": mean_i L''(f_i) grad f_i
    grad f_i^T, positive semi-definite always, and equal to the Hessian when f is linear in
    the parameters (least squares, logistic regression)."""

    def __init__(self, model: nn.Module, names: Sequence[str], x: Tensor, y: Tensor, *,
                 output: ModelOutput, prepare: Callable[[Tensor], Tensor] = lambda t: t,
                 batch_size: int = 256, hessian: str = "exact"):
        if hessian not in HESSIANS:
            raise UserError(f"hessian={hessian!r} is not a Hessian", f"choose one of: "
                            f"{', '.join(HESSIANS)}")
        model.eval()  # dropout off, batch norm on its running statistics
        self.device = model_device(model)
        named = dict(model.named_parameters())
        self.names = list(names)
        self.shapes = [named[n].shape for n in self.names]
        self.sizes = [named[n].numel() for n in self.names]
        self.theta = torch.cat([named[n].detach().reshape(-1) for n in self.names])
        fixed = {n: p.detach() for n, p in named.items() if n not in self.names}
        fixed.update(dict(model.named_buffers()))
        self.x, self.y, self.prepare, self.batch_size = x, y, prepare, batch_size

        def outputs(theta: Tensor, xb: Tensor, yb: Tensor) -> Tensor:
            params = dict(zip(self.names, (p.view(s) for p, s in
                                           zip(theta.split(self.sizes), self.shapes))))
            return output.value(functional_call(model, {**params, **fixed}, (xb,)), yb)

        def batch_loss(theta: Tensor, xb: Tensor, yb: Tensor) -> Tensor:
            return output.loss(outputs(theta, xb, yb), yb).sum()

        gradient = grad(batch_loss)
        # d2L/df2 per row: L is a function of the scalar output f alone.
        curvature = vmap(grad(grad(lambda f, y: output.loss(f[None], y[None]).sum())))

        def hvp(v: Tensor, xb: Tensor, yb: Tensor) -> Tensor:
            return jvp(lambda t: gradient(t, xb, yb), (self.theta,), (v,))[1]

        def gnvp(v: Tensor, xb: Tensor, yb: Tensor) -> Tensor:
            f, jv = jvp(lambda t: outputs(t, xb, yb), (self.theta,), (v,))
            _, pull = vjp(lambda t: outputs(t, xb, yb), self.theta)
            return pull(curvature(f.detach(), yb) * jv)[0]

        self._hvps = vmap(hvp if hessian == "exact" else gnvp, in_dims=(0, None, None))

    @property
    def n(self) -> int:
        return len(self.y)

    def hvp(self, vectors: Tensor, rows: Optional[Tensor] = None) -> Tensor:
        """(K, P) -> (K, P): H v for each row v, H the Hessian of the mean loss over `rows`
        (all training rows when None)."""
        idx = torch.arange(self.n) if rows is None else rows
        out = torch.zeros_like(vectors)
        for s in batched(len(idx), self.batch_size):
            at = idx[s]
            xb = self.prepare(self.x[at.to(self.x.device)].to(self.device))
            out += self._hvps(vectors, xb, self.y[at.to(self.y.device)].to(self.device))
        return out / len(idx)

    def top_eigenvalue(self, iterations: int = 20, seed: int = 0) -> float:
        g = torch.Generator().manual_seed(seed)
        v = torch.randn(1, len(self.theta), generator=g).to(self.theta)
        value = 0.0
        for _ in range(iterations):
            hv = self.hvp(v / v.norm())
            value = float((hv * v / v.norm()).sum())
            v = hv
        return abs(value)


@dataclass
class Solved:
    s: Tensor                 # (K, P) the inverse-HVPs
    iterations: int
    relative_residual: float  # max over the K systems of |(H + d) s - v| / |v|


@SOLVERS.register("cg")
def conjugate_gradients(loss: TrainingLoss, v: Tensor, *, damping: float,
                        iterations: int = 100, tol: float = 1e-6, **_) -> Solved:
    """Solve (H + damping I) s = v for every row of v (independent systems, one HVP each
    per iteration). A system whose curvature along its search direction is not positive
    stops there (H + damping I is then not positive definite: raise the damping)."""
    apply = lambda vec: loss.hvp(vec) + damping * vec  # noqa: E731
    x = torch.zeros_like(v)
    r = v.clone()
    p = r.clone()
    rs = (r * r).sum(1)
    norms = v.norm(dim=1).clamp_min(1e-30)
    active = torch.ones(len(v), dtype=torch.bool, device=v.device)
    done = 0
    for done in range(1, iterations + 1):
        ap = apply(p)
        curvature = (p * ap).sum(1)
        active &= curvature > 0
        alpha = torch.where(active, rs / curvature.clamp_min(1e-30), torch.zeros_like(rs))
        x += alpha[:, None] * p
        r -= alpha[:, None] * ap
        new = (r * r).sum(1)
        active &= new.sqrt() / norms > tol
        if not active.any():
            break
        p = r + (new / rs.clamp_min(1e-30))[:, None] * p
        rs = new
    residual = ((apply(x) - v).norm(dim=1) / norms).max()
    return Solved(x, done, float(residual))


@SOLVERS.register("lissa")
def lissa(loss: TrainingLoss, v: Tensor, *, damping: float, depth: int = 1000,
          scale: Optional[float] = None, lissa_batch_size: Optional[int] = 128,
          repeats: int = 1, seed: int = 0, **_) -> Solved:
    """The Neumann series sum_j (I - (H + d) / scale)^j v / scale, truncated at `depth`
    terms, each HVP on a fresh seeded minibatch (`lissa_batch_size=None`: the full loss,
    deterministic); averaged over `repeats` draws."""
    if scale is None:  # the series converges only when (H + d) / scale has norm below 1
        scale = 1.2 * (loss.top_eigenvalue(seed=seed) + damping)
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros_like(v)
    for _ in range(repeats):
        h = v.clone()
        for _ in range(depth):
            rows = None if lissa_batch_size is None else torch.randint(
                loss.n, (min(lissa_batch_size, loss.n),), generator=g)
            h = v + h - (loss.hvp(h, rows) + damping * h) / scale
            if not torch.isfinite(h).all():
                raise UserError(f"LiSSA diverged (scale {scale:g} is below the Hessian's top "
                                "eigenvalue)", "pass a larger scale=, or scale=null to "
                                "estimate it, or solver=cg")
        total += h / scale
    s = total / repeats
    residual = ((loss.hvp(s) + damping * s - v).norm(dim=1) / v.norm(dim=1).clamp_min(1e-30))
    return Solved(s, depth * repeats, float(residual.max()))


def loss_gradients(model: nn.Module, x: Tensor, y: Tensor, *, output: ModelOutput,
                   names: Sequence[str], prepare: Callable[[Tensor], Tensor] = lambda t: t,
                   batch_size: int = 64) -> Tensor:
    """(N, P) exact per-example gradients of the loss, grad L = -q grad f, flattened in the
    order of `names` (TrainingLoss's order)."""
    numels = {n: p.numel() for n, p in model.named_parameters() if n in names}
    numels = {n: numels[n] for n in names}
    phi, q = projected_gradients(model, x, y, output=output, projector=Projector(numels, None),
                                 names=names, prepare=prepare, batch_size=batch_size)
    return -q[:, None] * phi


def influence_scores(model: nn.Module, x_train: Tensor, y_train: Tensor, x_test: Tensor,
                     y_test: Tensor, *, output: ModelOutput, names: Sequence[str],
                     prepare: Callable[[Tensor], Tensor] = lambda t: t, solver: str = "cg",
                     damping: float = 0.01, hessian: str = "exact", batch_size: int = 64,
                     **solver_options) -> tuple[Tensor, Solved]:
    """(T, N) scores grad L(test)^T (H + damping I)^-1 grad L(train_i) at the model's
    current weights, and the solve's record."""
    if damping < 0 or not math.isfinite(damping):
        raise UserError(f"damping={damping} must be a non-negative number", "e.g. damping=0.01")
    solve = SOLVERS.get(solver)
    loss = TrainingLoss(model, names, x_train, y_train, output=output, prepare=prepare,
                        batch_size=max(batch_size, 256), hessian=hessian)
    v = loss_gradients(model, x_test, y_test, output=output, names=names, prepare=prepare,
                       batch_size=batch_size).to(loss.theta)
    solved = solve(loss, v, damping=damping, **solver_options)
    scores = []
    for s in batched(len(x_train), 4 * batch_size):  # never all N gradients at once
        g = loss_gradients(model, x_train[s], y_train[s], output=output, names=names,
                           prepare=prepare, batch_size=batch_size).to(loss.theta)
        scores.append(solved.s @ g.T)
    return torch.cat(scores, dim=1), solved


# --- as an attribution method, and as `dgrun analyze RUN influence` ---------------------------


@METHODS.register("influence")
def influence_method(a: Attribution) -> Tensor:
    """At the last checkpoint; options from `a.influence` (solver, damping, ...; by default
    conjugate gradients on the Gauss-Newton Hessian, damping 0.01)."""
    with kept_weights(a.model) as model:
        load(model, a.checkpoints[-1][1])
        scores, solved = influence_scores(model, a.x_train, a.y_train, a.x_test, a.y_test,
                                          output=a.output, names=a.names, prepare=a.prepare,
                                          batch_size=a.batch_size,
                                          **{"hessian": "gauss_newton", **a.influence})
    a.solved = solved
    return scores


@ANALYSES.register("influence", plot=plot_attribution)
def influence_from_run(run: RunArtifacts, /, *, solver: str = "cg", damping: NonNegative = 0.01,
                       hessian: str = "gauss_newton", iterations: Count = 100,
                       tol: Positive = 1e-6, depth: Count = 1000,
                       scale: Optional[Positive] = None,
                       lissa_batch_size: Optional[Count] = 128, repeats: Count = 1,
                       num_test: Count = 32, top_k: Count = 10,
                       output: str = "margin", batch_size: Count = 64,
                       params: Optional[Sequence[str]] = None) -> Result:
    """Influence of every training row on a seeded sample of `num_test` test rows, at the
    run's last checkpoint."""
    require_checkpoints(run.checkpoints, "influence")
    if solver not in SOLVERS and solver != "ekfac":  # EK-FAC: a method of its own, no solve
        raise UserError(f"unknown solver '{solver}'",
                        f"choose one of: {', '.join(SOLVERS.names() + ['ekfac'])}")
    last = [run.checkpoints[-1]]
    b = run.bundle
    options = {"solver": solver, "damping": float(damping), "hessian": hessian,
               "seed": run.seed}
    options.update({"iterations": iterations, "tol": tol} if solver == "cg" else
                   {"depth": depth, "scale": scale, "lissa_batch_size": lissa_batch_size,
                    "repeats": repeats})
    kept: dict = {}
    result = attribute(run.model, last, b.train, b.test, prepare=b.prepare,
                       methods=("ekfac" if solver == "ekfac" else "influence",),
                       lrs=lrs_at(run.rows, [last[0][0]]),
                       test_indices=sample_indices(len(b.test), num_test, run.seed),
                       top_k=top_k, proj_dim=None, seed=run.seed, output=output,
                       batch_size=batch_size, params=params, influence=options,
                       keep=kept)
    result.summary.update(solver=solver, damping=float(damping), checkpoint_step=last[0][0])
    if solver == "ekfac":
        return result
    record = kept["attribution"].solved
    result.summary.update(hessian=hessian, solver_iterations=record.iterations,
                          relative_residual=record.relative_residual)
    if record.relative_residual > 1e-2:
        result.summary["note"] = (f"the solve left a relative residual of "
                                  f"{record.relative_residual:.3g}: raise damping (or "
                                  "iterations; hessian=gauss_newton is never indefinite)")
    return result
