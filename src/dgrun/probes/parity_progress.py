"""Barak et al. 2022's hidden progress on sparse parity: what moves while the loss sits still.

The label of x in {-1,+1}^n is the parity of k hidden coordinates S (1 when chi_S(x) =
prod_{i in S} x_i is -1). Columns at each evaluation:

    relevant_weight_ratio   mean |w| of the first layer's weights on the k relevant input
                            coordinates over the mean |w| on the other n - k (1 at a random
                            initialization; grows as the network finds S)
    relevant_fourier_coef   |f^(S)| = |E_x[f(x) chi_S(x)]|, the Fourier coefficient on S of the
                            network's output f = logit(odd) - logit(even)
    best_wrong_fourier_coef the largest |f^(S')| over `wrong_subsets` other subsets S' of size
                            k, drawn once from the seed (never S)

The expectation is over a fixed set of `sample` points drawn once from the seed, or over the
whole cube when 2^n <= sample (then the coefficients are exact). The first layer is the first
weight matrix that takes the n inputs (an nn.Linear's (out, n) weight).

summary.json `parity_progress`: the relevant subset, the final values, and `fourier_gap_step`:
the first evaluation at which the true coefficient is at least `gap` times the best wrong
one (marked on the plots).
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from dgrun.errors import UserError
from dgrun.metrics import number
from dgrun.probes import PROBES
from dgrun.probes.base import Evaluation, Probe
from dgrun.seeding import derive_seed


def first_layer_weight(model: nn.Module, n: int) -> Optional[Tensor]:
    """The first (out, n) weight matrix of the model, in registration order."""
    for name, p in model.named_parameters():
        if p.ndim == 2 and p.shape[1] == n and name.endswith("weight"):
            return p.detach()
    return None


def relevant_weight_ratio(weight: Tensor, support: Tensor) -> Optional[float]:
    """Mean |w| on the relevant input columns over the mean on the others; None when the
    others are all zero (or there are none): the ratio has no finite value then."""
    relevant = torch.zeros(weight.shape[1], dtype=torch.bool, device=weight.device)
    relevant[support.to(weight.device)] = True
    if not bool((~relevant).any()):
        return None
    other = float(weight[:, ~relevant].abs().mean())
    return float(weight[:, relevant].abs().mean()) / other if other > 0 else None


def cube_sample(n: int, size: int, seed: int) -> Tensor:
    """(m, n) points of {-1,+1}^n: the whole cube when 2^n <= size, else `size` seeded ones."""
    if n <= 30 and 2 ** n <= size:
        bits = (torch.arange(2 ** n)[:, None] >> torch.arange(n)) & 1
        return (1 - 2 * bits).float()
    gen = torch.Generator().manual_seed(derive_seed(seed, "parity_probe_points"))
    return torch.randint(0, 2, (size, n), generator=gen).float() * 2 - 1


def wrong_subsets(n: int, k: int, support: list[int], count: int, seed: int) -> Tensor:
    """(m, k) subsets of size k other than `support`: all of them when there are at most
    `count`, else `count` distinct ones drawn from the seed."""
    total = math.comb(n, k)
    truth = tuple(sorted(support))
    if total - 1 <= count:
        return torch.tensor([s for s in itertools.combinations(range(n), k) if s != truth],
                            dtype=torch.int64).reshape(-1, k)
    gen = torch.Generator().manual_seed(derive_seed(seed, "parity_wrong_subsets"))
    found: set[tuple[int, ...]] = set()
    while len(found) < count:
        s = tuple(sorted(torch.randperm(n, generator=gen)[:k].tolist()))
        if s != truth:
            found.add(s)
    return torch.tensor(sorted(found), dtype=torch.int64)


def characters(points: Tensor, subsets: Tensor) -> Tensor:
    """chi_S(x) = prod_{i in S} x_i for each point (rows) and each row S of `subsets` (columns)."""
    return points[:, subsets].prod(dim=-1).double()          # (N, m)


def fourier_coefficients(output: Tensor, points: Tensor, subsets: Tensor) -> Tensor:
    """|E[f(x) chi_S(x)]| for each row S of `subsets` (m, k), f given on `points`."""
    return from_characters(output, characters(points, subsets))


def from_characters(output: Tensor, chi: Tensor) -> Tensor:
    return (output.double() @ chi).abs() / len(chi)


class ParityProgressProbe(Probe):
    KEY = "parity_progress"

    def __init__(self, n: int, k: int, support: list[int], seed: int, *, sample: int,
                 count: int, gap: float):
        self.n, self.k, self.support = n, k, list(support)
        self.points = cube_sample(n, sample, seed)
        self.wrong = wrong_subsets(n, k, self.support, count, seed)
        self.gap = gap
        # The points and subsets never change: their characters are computed once, so an
        # evaluation costs one forward pass and two matrix-vector products.
        self.chi_true = characters(self.points, torch.tensor([self.support]))
        self.chi_wrong = characters(self.points, self.wrong) if len(self.wrong) else None

    def measure(self, ev: Evaluation) -> dict:
        device = ev.train.x.device
        support = torch.tensor(self.support, device=device)
        logits = ev.predict(self.points.to(device))
        f = (logits[:, 1] - logits[:, 0]).cpu()
        values = {"relevant_fourier_coef": float(from_characters(f, self.chi_true))}
        values["best_wrong_fourier_coef"] = float(from_characters(
            f, self.chi_wrong).max()) if self.chi_wrong is not None else 0.0
        weight = first_layer_weight(ev.model, self.n)
        ratio = None if weight is None else relevant_weight_ratio(weight, support)
        if ratio is not None:
            values["relevant_weight_ratio"] = ratio
        return values

    def summarize(self, rows: list[dict]) -> dict:
        gap_step = None
        for row in sorted(rows, key=lambda r: float(r["step"])):
            true, wrong = (number(row.get(c)) for c in ("relevant_fourier_coef",
                                                        "best_wrong_fourier_coef"))
            if true is not None and wrong is not None and true >= self.gap * wrong and \
                    true > 0:
                gap_step = int(float(row["step"]))
                break
        last = rows[-1] if rows else {}
        return {self.KEY: {
            "relevant_subset": self.support, "n": self.n, "k": self.k,
            "wrong_subsets": len(self.wrong), "sample_points": len(self.points),
            "exact": len(self.points) == 2 ** self.n, "gap": self.gap,
            "fourier_gap_step": gap_step,
            **{f"final_{c}": number(last.get(c)) for c in (
                "relevant_weight_ratio", "relevant_fourier_coef", "best_wrong_fourier_coef")},
        }}

    def marks(self, summary: dict) -> list[tuple[int, str]]:
        step = (summary.get(self.KEY) or {}).get("fourier_gap_step")
        return [] if step is None else [(step, f"Fourier coefficient on S >= {self.gap:g}x "
                                               f"the best wrong subset's")]

    def plots(self, rows: list[dict], summary: dict, out_dir: Path,
              marks=()) -> list[Path]:
        from dgrun.probes.progress_figures import plot_panels
        return plot_panels(rows, [
            ("accuracy", [("train_acc", "train"), ("test_acc", "test")], False),
            ("|Fourier coefficient|", [("relevant_fourier_coef", "on the relevant subset S"),
                                       ("best_wrong_fourier_coef",
                                        "best of the sampled wrong subsets")], False),
            ("first-layer |w|:\nrelevant / others", [("relevant_weight_ratio",
                                                     "relevant / other coordinates")], False),
        ], self.marks(summary), Path(out_dir) / "parity_progress.png",
            f"Hidden progress on ({self.n}, {self.k})-sparse parity, S = {self.support}")


@PROBES.register("parity_progress")
def parity_progress(*, meta, seed, sample: int = 2048, wrong_subsets: int = 200,
                    gap: float = 2.0) -> ParityProgressProbe:
    """Weight on the relevant coordinates and the Fourier gap (Barak et al. 2022)."""
    if meta.name != "sparse_parity":
        raise UserError(f"probe 'parity_progress' measures sparse parity, not "
                        f"dataset={meta.name}", "use dataset=sparse_parity, or drop it with "
                        "~probes.parity_progress")
    for name, value in (("sample", sample), ("wrong_subsets", wrong_subsets)):
        if not (isinstance(value, int) and value >= 1):
            raise UserError(f"probes.parity_progress.{name} must be a positive integer, got "
                            f"{value!r}", f"e.g. probes.parity_progress.{name}=200")
    if not (isinstance(gap, (int, float)) and gap > 1):
        raise UserError(f"probes.parity_progress.gap must be > 1, got {gap!r}",
                        "e.g. probes.parity_progress.gap=2")
    extra = meta.extra
    return ParityProgressProbe(extra["n"], extra["k"], extra["support"], seed, sample=sample,
                               count=wrong_subsets, gap=float(gap))
