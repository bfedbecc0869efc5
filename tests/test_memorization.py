"""Memorization and influence estimates from subset models (Feldman & Zhang 2020)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import cli_here, train_here
from dgrun.analysis.memorization import auc, in_out_difference, memorization


def synthetic(m: int = 400, n: int = 30, t: int = 6, seed: int = 0):
    """Models whose outcomes are known: rows 0-4 are right only when trained on ("memorized"),
    the others always; test row j is right exactly when training row 10 + j was in."""
    g = torch.Generator().manual_seed(seed)
    rows_in = torch.rand(m, n, generator=g) < 0.5
    train_correct = torch.ones(m, n, dtype=torch.bool)
    train_correct[:, :5] = rows_in[:, :5]
    test_correct = rows_in[:, 10:10 + t].clone()
    corrupted = torch.zeros(n, dtype=torch.bool)
    corrupted[:5] = True
    return rows_in, train_correct, test_correct, corrupted


def test_known_memorization_influence_and_auc():
    rows_in, train_correct, test_correct, corrupted = synthetic()
    result = memorization(rows_in, train_correct, test_correct, corrupted, top_k=3)
    table = result.tables["memorization"]
    assert list(table.columns[:4]) == ["index", "memorization", "se", "corrupted"]
    assert np.allclose(table["memorization"][:5], 1.0) and np.allclose(table["memorization"][5:], 0)
    assert result.summary["auc_vs_corrupted"] == 1.0
    assert result.summary["mean_memorization"] == {"clean": 0.0, "corrupted": 1.0}
    top1 = result.tables["influence"].query("rank == 1")
    assert list(top1["train_index"]) == [10 + j for j in range(6)]
    assert np.allclose(top1["influence"], 1.0)


def test_standard_errors_are_those_of_a_difference_of_means_and_shrink_with_models():
    g = torch.Generator().manual_seed(1)
    rows_in = torch.rand(60, 4, generator=g) < 0.5
    outcome = torch.rand(60, 3, generator=g) < 0.7
    est, se = in_out_difference(rows_in, outcome)
    i, j = 2, 1
    a = outcome[rows_in[:, i], j].double().numpy()
    b = outcome[~rows_in[:, i], j].double().numpy()
    assert est[i, j].item() == pytest.approx(a.mean() - b.mean())
    expected = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    assert se[i, j].item() == pytest.approx(expected)
    # Noisy outcomes: the standard error falls as 1/sqrt(models).
    ses = []
    for m in (100, 1600):
        rows_in = torch.rand(m, 20, generator=g) < 0.5
        noisy = torch.rand(m, 20, generator=g) < 0.5
        ses.append(memorization(rows_in, noisy, noisy[:, :2], torch.zeros(20, dtype=torch.bool))
                   .summary["mean_se"])
    assert ses[1] == pytest.approx(ses[0] / 4, rel=0.15)


def test_auc_counts_ties_half_and_needs_both_kinds():
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert auc(np.array([1.0, 1.0]), np.array([0, 1])) == 0.5
    assert auc(np.array([1.0, 2.0]), np.array([0, 0])) is None


def test_a_row_always_or_never_in_has_no_estimate():
    rows_in, train_correct, test_correct, corrupted = synthetic(m=50)
    rows_in[:, 7] = True
    table = memorization(rows_in, train_correct, test_correct, corrupted).tables["memorization"]
    assert np.isnan(table["memorization"][7]) and table["models_out"][7] == 0


SUBSETS = ["dataset.subset_fraction=0.5", "dataset.split_seed=0", "corruption=partial_labels", "corruption.prob=0.2",
           "trainer.max_steps=40", "model.width=32", "threads=1"]


def test_analyze_an_ensemble_of_subset_models(tmp_path, capsys):
    ens = tmp_path / "ens"
    train_here(ens, *SUBSETS, "corruption.seed=0", "trainer.ensemble=4")
    code, out_text, err = cli_here(capsys, "analyze", str(ens), "memorization", "top_k=2")
    assert code == 0, err
    out = ens / "analysis" / "memorization"
    table = pd.read_csv(out / "memorization.csv")
    assert list(table.columns[:4]) == ["index", "memorization", "se", "corrupted"]
    assert len(table) == 1438 and table["corrupted"].sum() > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_models"] == 4 and abs(summary["subset_fraction"] - 0.5) < 0.01
    assert (out / "memorization_distribution.png").is_file()
    assert (out / "most_memorized.png").is_file()
    assert len(pd.read_csv(out / "influence.csv")) == 2 * 359
    assert str(out) in out_text
    # Its own output (analysis/, with a summary.json) is not taken for one more run.
    code, _, err = cli_here(capsys, "analyze", str(ens), "memorization")
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["num_models"] == 4

    # Subsets of different training sets (corruption drawn from each seed) are refused.
    other = tmp_path / "other"
    train_here(other, *SUBSETS, "trainer.ensemble=2")
    code, _, err = cli_here(capsys, "analyze", str(other), "memorization")
    assert code == 2 and "corruption.seed" in err and len(err.strip().splitlines()) == 1
    # So are subsets of splits drawn from each member's seed (the seed rule's default).
    unpinned = tmp_path / "unpinned"
    train_here(unpinned, *[o for o in SUBSETS if not o.startswith("dataset.split_seed")],
               "corruption.seed=0", "trainer.ensemble=2")
    code, _, err = cli_here(capsys, "analyze", str(unpinned), "memorization")
    assert code == 2 and "dataset.split_seed" in err and len(err.strip().splitlines()) == 1
    # Models trained on the whole split are not subset models.
    whole = tmp_path / "whole"
    train_here(whole, "trainer.max_steps=2", "model.width=32", "threads=1", "trainer.ensemble=2")
    code, _, err = cli_here(capsys, "analyze", str(whole), "memorization")
    assert code == 2 and "dataset.subset_fraction" in err
