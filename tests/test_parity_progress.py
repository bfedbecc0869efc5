"""Barak et al.'s hidden-progress measures on sparse parity, on models with known answers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dgrun.data.algorithmic import modular, sparse_parity
from dgrun.errors import UserError
from dgrun.models.mlp import MLP
from dgrun.probes import Evaluation, build
from dgrun.probes.parity_progress import relevant_weight_ratio, wrong_subsets


class ExactParity(nn.Module):
    """Computes the parity of the coordinates in S exactly: logit(odd) - logit(even) =
    -chi_S(x), read through a first layer that sees only S (plus `leak` on the rest, which
    the product never uses)."""

    def __init__(self, n: int, support: list[int], leak: float = 0.0):
        super().__init__()
        self.support = support
        self.first = nn.Linear(n, n, bias=False)
        with torch.no_grad():
            self.first.weight.fill_(leak)
            self.first.weight[:, support] = 1.0

    def forward(self, x):
        self.first(x)  # the layer the probe reads; the answer uses x[:, S] directly
        chi = x[:, self.support].prod(dim=1)
        return torch.stack([torch.zeros_like(chi), -chi], dim=1)


def measure(model, bundle, **options):
    probe, = build({"parity_progress": options}, meta=bundle.meta, seed=0)
    return probe.measure(Evaluation(model, bundle.train, bundle.test)), probe


def test_an_exact_parity_model_has_all_its_fourier_mass_on_the_subset():
    bundle = sparse_parity(n=10, k=3, train_size=100)
    support = bundle.meta.extra["support"]
    row, probe = measure(ExactParity(10, support, leak=0.25), bundle)
    # 2^10 <= 2048 points (the default sample): the whole cube, so the coefficients are exact.
    assert row["relevant_fourier_coef"] == pytest.approx(1.0)
    assert row["best_wrong_fourier_coef"] == pytest.approx(0.0, abs=1e-12)
    assert row["relevant_weight_ratio"] == pytest.approx(4.0)   # 1 / 0.25
    summary = probe.summarize([{"step": 0, **row}])["parity_progress"]
    assert summary["relevant_subset"] == support and summary["exact"]
    assert summary["fourier_gap_step"] == 0
    assert len(probe.wrong) == 119  # every other 3-subset of 10: C(10,3) - 1


def test_a_random_network_has_no_fourier_gap_and_no_preference_for_s():
    torch.manual_seed(0)
    bundle = sparse_parity(n=50, k=3, train_size=100)
    row, probe = measure(MLP(50, 2, width=256), bundle)
    assert row["relevant_fourier_coef"] < 2 * row["best_wrong_fourier_coef"]
    assert row["relevant_weight_ratio"] == pytest.approx(1.0, abs=0.2)
    assert probe.summarize([{"step": 0, **row}])["parity_progress"]["fourier_gap_step"] is None
    assert not probe.summarize([])["parity_progress"]["exact"]


def test_sampled_wrong_subsets_are_distinct_and_never_the_truth():
    subsets = wrong_subsets(50, 3, [1, 2, 3], 200, seed=0)
    rows = {tuple(r) for r in subsets.tolist()}
    assert len(rows) == 200 and (1, 2, 3) not in rows
    assert relevant_weight_ratio(torch.ones(4, 5), torch.tensor([0, 1])) == pytest.approx(1.0)
    assert relevant_weight_ratio(torch.eye(2), torch.tensor([0, 1])) is None


def test_the_probe_refuses_other_datasets():
    with pytest.raises(UserError, match="dataset=sparse_parity"):
        build({"parity_progress": {}}, meta=modular(p=7).meta, seed=0)
