"""dataset.subset_fraction: a run trains on a random, recorded, reproducible fraction of its
training split; an ensemble's members each on their own (the subset models of memorization
scores and the linear datamodeling score)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import composer, dgrun, read_metrics, read_summary, train_job
from dgrun import checkpoint
from dgrun.data import pipeline, subset
from dgrun.errors import UserError

SMALL = ["model.width=32", "threads=1", "trainer.progress=none", "quiet=true",
         "trainer.stop_at_interpolation=false", "corruption=partial_labels",
         "corruption.prob=0.2", "corruption.seed=7"]


@pytest.fixture(scope="module")
def job():
    yield from composer(*SMALL)


train = train_job


def full_train(job):
    cfg, _ = job()
    return pipeline.load(cfg.dataset.name, cfg.dataset_options, seed=cfg.corruption_seed,
                         corruption_name=cfg.corruption.name, prob=cfg.corruption.prob,
                         **cfg.pipeline).train


def rows_of(run_dir: Path) -> np.ndarray:
    return np.load(run_dir / subset.RECORD_FILE)


def test_draw_is_deterministic_sized_and_seed_dependent():
    a, b = subset.draw(1000, 0.3, seed=5), subset.draw(1000, 0.3, seed=5)
    assert torch.equal(a, b) and len(a) == 300 and len(set(a.tolist())) == 300
    assert torch.equal(a, a.sort().values)
    assert not torch.equal(a, subset.draw(1000, 0.3, seed=6))
    assert len(subset.draw(10, 0.01, seed=0)) == 1 and len(subset.draw(10, 1.0, seed=0)) == 10


def test_the_run_records_the_rows_it_trained_on(job, tmp_path):
    run_dir = tmp_path / "run"
    train(job, run_dir, "dataset.subset_fraction=0.5", "trainer.max_steps=3")
    summary, rows = read_summary(run_dir), rows_of(run_dir)
    full = full_train(job)
    assert summary["subset"] == {"fraction": 0.5, "seed": 0, "size": len(rows),
                                 "file": "subset.npy"}
    assert summary["train_size"] == len(rows) == round(0.5 * len(full))
    assert np.array_equal(rows, subset.draw(len(full), 0.5, seed=0).numpy())
    # The reopened run's data (what `dgrun analyze` sees) are exactly those rows.
    from dgrun.reopen import reopen
    train_split = reopen(run_dir).bundle().train
    assert torch.equal(train_split.y, full.y[rows]) and torch.equal(train_split.x, full.x[rows])
    assert torch.equal(train_split.corrupted, full.corrupted[rows])
    # subset_seed fixes the rows whatever the run's seed.
    other = tmp_path / "other"
    train(job, other, "dataset.subset_fraction=0.5", "dataset.subset_seed=0",
          "dataset.split_seed=0", "seed=3",
          "trainer.max_steps=1")
    assert np.array_equal(rows_of(other), rows)
    # Without a subset: no file, no summary key.
    whole = tmp_path / "whole"
    train(job, whole, "trainer.max_steps=1")
    assert not (whole / subset.RECORD_FILE).exists() and "subset" not in read_summary(whole)


def test_a_finished_subset_run_missing_its_rows_gets_them_back(job, tmp_path, capsys):
    """subset.npy is part of a finished subset run's record (memorization and LDS read it):
    deleted, a re-run of the command writes it again, the same rows, without training."""
    run_dir = tmp_path / "run"
    train(job, run_dir, "dataset.subset_fraction=0.5", "trainer.max_steps=3")
    rows, rows_csv = rows_of(run_dir), (run_dir / "metrics.csv").read_bytes()
    (run_dir / subset.RECORD_FILE).unlink()
    capsys.readouterr()
    train(job, run_dir, "dataset.subset_fraction=0.5", "trainer.max_steps=3")
    assert "repaired what was missing (subset.npy)" in capsys.readouterr().err
    assert np.array_equal(rows_of(run_dir), rows)
    assert (run_dir / "metrics.csv").read_bytes() == rows_csv


def test_ensemble_members_train_on_their_own_subsets(job, tmp_path):
    ens = tmp_path / "ens"
    train(job, ens, "dataset.subset_fraction=0.5", "trainer.ensemble=3", "trainer.max_steps=3")
    drawn = [rows_of(ens / f"member_{k}") for k in range(3)]
    n = len(full_train(job))
    for k, rows in enumerate(drawn):  # member k is the run seed=k, subset included
        assert np.array_equal(rows, subset.draw(n, 0.5, seed=k).numpy())
        assert read_summary(ens / f"member_{k}")["subset"]["seed"] == k
    assert not np.array_equal(drawn[0], drawn[1]) and not np.array_equal(drawn[1], drawn[2])
    # ... and each member trained on its subset: equal to the separate run seed=1.
    alone = tmp_path / "alone"
    train(job, alone, "dataset.subset_fraction=0.5", "seed=1", "trainer.max_steps=3")
    a, b = (checkpoint.load_latest(d / "checkpoints")["model"] for d in (ens / "member_1", alone))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.parametrize("ensemble", [1, 2])
def test_resume_is_exact(job, tmp_path, ensemble):
    common = ["dataset.subset_fraction=0.4", f"trainer.ensemble={ensemble}", "model.dropout=0.1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(job, straight, *common, "trainer.max_epochs=4")
    train(job, resumed, *common, "trainer.max_epochs=2")
    train(job, resumed, *common, "trainer.max_epochs=4")  # continues from its checkpoint
    members = [""] if ensemble == 1 else [f"member_{k}" for k in range(ensemble)]
    for m in members:
        assert read_summary(resumed / m)["resumed_at_steps"]
        drop = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]  # noqa
        assert drop(read_metrics(resumed / m)) == drop(read_metrics(straight / m))
        assert np.array_equal(rows_of(resumed / m), rows_of(straight / m))


@pytest.mark.parametrize("value, problem", [("0", "out of range"), ("1.5", "out of range"),
                                            ("abc", "is not a number")])
def test_a_bad_fraction_is_one_line(job, value, problem):
    with pytest.raises(UserError, match=problem):
        job(f"dataset.subset_fraction={value}")


def test_the_command_line_refuses_a_bad_seed_in_one_line(tmp_path):
    proc = dgrun("dataset.subset_fraction=0.5", "dataset.subset_seed=x",
                 f"hydra.run.dir={tmp_path / 'r'}", "threads=1", check=False)
    assert proc.returncode == 2 and "dataset.subset_seed='x' is not an integer" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_a_checkpoint_from_before_the_subset_keys_still_resumes():
    from dgrun.resume import config_differences

    old = {"dataset": {"name": "digits"}, "seed": 0}
    new = {"dataset": {"name": "digits", "subset_fraction": None, "subset_seed": None}, "seed": 0}
    assert config_differences(old, new) == []
    new["dataset"]["subset_fraction"] = 0.5
    assert config_differences(old, new) == ["dataset.subset_fraction: <unset> -> 0.5"]


def test_streamed_data_cannot_be_subset():
    from dgrun.data.bundle import Bundle, Meta, Split

    x, y = torch.zeros(10, 3), torch.zeros(10, dtype=torch.long)
    streamed = Split(x, y, stream=lambda step, batch, device: (x[:batch], y[:batch]))
    bundle = Bundle(streamed, Split(x, y), Meta("toy", "vector", (3,), 2))
    with pytest.raises(UserError, match="subset_fraction needs a fixed training set"):
        subset.apply(bundle, 0.5, seed=0)
    assert subset.apply(bundle, None, seed=0) is bundle
