"""The linear datamodeling score (Park et al. 2023), and the attribution/influence analyses
that it scores, from run directories."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import cli_here, train_here
from dgrun.analysis.datamodels import linear_datamodeling_score, spearman_columns


def test_a_perfect_linear_datamodel_scores_one_and_noise_scores_zero():
    g = torch.Generator().manual_seed(0)
    rows_in = torch.rand(200, 40, generator=g) < 0.5
    tau = torch.randn(5, 40, generator=g)
    measured = rows_in.double() @ tau.double().T  # outputs that ARE the linear datamodel
    assert linear_datamodeling_score(tau, rows_in, measured)[0] == pytest.approx(1.0)
    assert linear_datamodeling_score(-tau, rows_in, measured)[0] == pytest.approx(-1.0)
    # Only the ranking matters (Spearman): a monotone transform of the outputs scores 1 too.
    assert linear_datamodeling_score(tau, rows_in, measured.exp())[0] == pytest.approx(1.0)
    noise = torch.randn(5, 40, generator=g)
    assert abs(linear_datamodeling_score(noise, rows_in, measured)[0]) < 0.2
    # Partly right: noise added to the true attribution lands in between.
    mixed = linear_datamodeling_score(tau + 1.5 * noise, rows_in, measured)[0]
    assert 0.2 < mixed < 0.95


def test_spearman_matches_scipy_and_a_constant_column_is_nan():
    from scipy.stats import spearmanr

    g = np.random.default_rng(0)
    a, b = g.normal(size=(30, 3)), g.normal(size=(30, 3))
    a[:, 2] = 1.0
    got = spearman_columns(a, b)
    assert got[0] == pytest.approx(spearmanr(a[:, 0], b[:, 0]).statistic)
    assert np.isnan(got[2])


DATA = ["dataset.split_seed=0", "corruption=partial_labels", "corruption.prob=0.2", "corruption.seed=0",
        "model.width=16", "threads=1", "trainer.max_steps=30"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lds")
    train_here(root / "run", *DATA, "trainer.checkpoint_every=2")
    train_here(root / "subsets", *DATA, "dataset.subset_fraction=0.5", "trainer.ensemble=6")
    train_here(root / "independent", *DATA, "seed=50", "trainer.ensemble=2")
    return root


def test_attribution_with_lds_writes_a_score_per_method(runs, capsys):
    code, _, err = cli_here(capsys, "analyze", str(runs / "run"), "attribution",
                            "methods=[trak,grad_cosine,knn,influence]", "num_test=6",
                            "proj_dim=64", f"lds={runs / 'subsets'}", "num_checkpoints=2")
    assert code == 0, err
    out = runs / "run" / "analysis" / "attribution"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["lds"]) == {"trak", "grad_cosine", "knn", "influence"}
    assert all(-1 <= v <= 1 for v in summary["lds"].values())
    assert summary["lds_models"]["count"] == 6
    table = pd.read_csv(out / "lds.csv")
    assert list(table["method"]) == ["trak", "grad_cosine", "knn", "influence"]
    assert (table["num_models"] == 6).all() and (table["num_test"] <= 6).all()


def test_trak_over_independently_trained_models(runs, capsys):
    code, _, err = cli_here(capsys, "analyze", str(runs / "run"), "attribution",
                            "methods=[trak]", "num_test=4", "proj_dim=32",
                            f"models={runs / 'independent'}")
    assert code == 0, err
    summary = json.loads((runs / "run" / "analysis" / "attribution" / "summary.json")
                         .read_text())
    assert summary["checkpoints_from"]["models"] == 2 and summary["checkpoint_steps"] == [0, 1]


def test_lds_refuses_subset_models_of_another_training_set(runs, tmp_path, capsys):
    other = tmp_path / "other"
    train_here(other, "model.width=16", "threads=1", "trainer.max_steps=2",
               "dataset.subset_fraction=0.5", "trainer.ensemble=2")  # clean labels
    code, _, err = cli_here(capsys, "analyze", str(runs / "run"), "attribution",
                            "methods=[knn]", "num_test=2", f"lds={other}")
    assert code == 2 and "different training set" in err


def test_influence_analysis_from_a_run(runs, capsys):
    code, _, err = cli_here(capsys, "analyze", str(runs / "run"), "influence", "num_test=4",
                            "damping=0.1", "top_k=3")
    assert code == 0, err
    out = runs / "run" / "analysis" / "influence"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["solver"] == "cg" and summary["damping"] == 0.1
    assert summary["relative_residual"] < 1e-3 and summary["checkpoint_step"] == 30
    top = pd.read_csv(out / "top.csv")
    assert len(top) == 4 * 3 and set(top["method"]) == {"influence"}
    code, _, err = cli_here(capsys, "analyze", str(runs / "run"), "influence", "solver=lissa",
                            "num_test=2", "depth=50", "damping=0.1")
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["solver"] == "lissa"
    code, _, err = cli_here(capsys, "analyze", str(runs / "run"), "influence", "solver=ekfac",
                            "num_test=2", "top_k=2")
    assert code == 0, err
    assert set(pd.read_csv(out / "top.csv")["method"]) == {"ekfac"}
    code, _, err = cli_here(capsys, "analyze", str(runs / "run"), "influence", "solver=newton")
    assert code == 2 and "unknown solver 'newton'; choose one of: cg, lissa, ekfac" in err
