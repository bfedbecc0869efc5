"""`dgrun analyze` on runs the README's own commands produce: files written, known answers,
one-line errors. (The analyses' arithmetic is tested in test_analysis.py.)"""
from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import FAST, cli_here, train_here


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory):
    """Digits with 30% of the labels redrawn, per-example tracking and log-spaced snapshots."""
    run_dir = tmp_path_factory.mktemp("analyze") / "run"
    train_here(run_dir, "corruption=partial_labels", "corruption.prob=0.3",
               "trainer.track_examples=true", "trainer.snapshots=log", "trainer.max_epochs=40",
               "trainer.stop_at_interpolation=false", "optimizer=adam", *FAST)
    return run_dir


def test_cartography_puts_the_corrupted_rows_in_the_hard_to_learn_region(noisy_run, capsys):
    code, out, _ = cli_here(capsys, "analyze", str(noisy_run), "cartography")
    assert code == 0
    folder = noisy_run / "analysis" / "cartography"
    assert f"{folder / 'data_map.png'}" in out
    table = pd.read_csv(folder / "examples.csv")
    corrupted = table[table["corrupted"].astype(bool)]
    clean = table[~table["corrupted"].astype(bool)]
    hard = lambda part: (part["region"] == "hard-to-learn").mean()  # noqa: E731
    assert hard(corrupted) > 0.8 and hard(clean) < 0.2
    assert json.loads((folder / "summary.json").read_text())


def test_attribution_features_and_dynamics_write_their_tables_and_figures(noisy_run, capsys):
    for what, files in (("attribution", ["top.csv", "corrupted_in_top_k.png"]),
                        ("features", ["probe.csv", "linear_probe.png"]),
                        ("dynamics", ["curves.csv", "dynamics.png"]),
                        ("robustness", ["corruptions.csv", "robustness.png"])):
        # Small options: the files and their plumbing are under test here, not the methods
        # (tests/test_analysis.py checks those); the defaults took ~200 s on 2 busy cores.
        options = {"attribution": ["num_test=3", "top_k=3", "methods=[trak,knn]",
                                   "num_checkpoints=2", "proj_dim=32", "batch_size=512"],
                   "features": ["num_checkpoints=2", "num_train=300", "num_test=300"],
                   "robustness": ["n=64", "n_adv=16", "severities=[1,5]"]}.get(what, [])
        assert cli_here(capsys, "analyze", str(noisy_run), what, *options)[0] == 0
        for name in files:
            assert (noisy_run / "analysis" / what / name).stat().st_size > 0, (what, name)


def test_analyze_errors_are_one_line(noisy_run, tmp_path, capsys):
    cases = [(["analyze", str(noisy_run), "cartograpy"], "unknown analysis 'cartograpy'"),
             (["analyze", str(noisy_run), "robustness", "step=7"],
              "kept no checkpoint at step 7"),
             (["analyze", str(noisy_run), "attribution", "colour=red"], "no option 'colour'"),
             (["analyze", str(tmp_path), "dynamics"], "no run directories under")]
    for args, message in cases:
        code, _, err = cli_here(capsys, *args)
        assert code == 2 and message in err, err
        assert len(err.strip().splitlines()) == 1
    untracked = tmp_path / "plain"
    train_here(untracked, "trainer.max_epochs=2", *FAST)
    code, _, err = cli_here(capsys, "analyze", str(untracked), "cartography")
    assert code == 2 and "trainer.track_examples=true" in err
