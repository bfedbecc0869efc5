"""The phenomenon presets and the objective/logger groups, through the real `dgrun` command."""
from __future__ import annotations

import pytest

from conftest import FAST, dgrun, read_metrics, read_summary, train_here
from dgrun import checkpoint


def test_simplicity_bias_preset_learns_the_colour_first(run_dir):
    train_here(run_dir, "phenomenon=simplicity_bias", "trainer.max_steps=120",
               "probes.dfr.every=1000", *FAST)
    rows = read_metrics(run_dir)
    assert {"test_worst_group_acc", "test_acc_y_1_color_red", "dfr_test_acc"} <= set(rows[0])
    # Some early evaluation uses the colour alone: train accuracy is rho (0.9) while the test
    # group whose colour disagrees with its label is almost never right.
    colour_only = [r for r in rows if abs(float(r["train_acc"]) - 0.9) < 0.02
                   and float(r["test_worst_group_acc"]) < 0.1]
    assert colour_only, [(r["step"], r["train_acc"], r["test_worst_group_acc"]) for r in rows]
    summary = read_summary(run_dir)
    assert summary["groups"]["max_gap"] > 0.3 and summary["objective"] == "erm"
    assert [int(r["step"]) for r in rows][:4] == [0, 1, 2, 3]  # log-spaced evaluations


def test_group_dro_keeps_its_weights_in_the_checkpoint_and_resumes_exactly(tmp_path):
    args = ["phenomenon=simplicity_bias", "objective=group_dro", "objective.eta=2.0",
            "~probes.dfr", *FAST]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_here(straight, *args, "trainer.max_steps=60")
    train_here(split, *args, "trainer.max_steps=25")
    q = checkpoint.load_latest(split / "checkpoints")["objective"]["q"]
    assert q.shape == (4,) and float(q.sum()) == pytest.approx(1.0)
    assert float(q.max() - q.min()) > 0.01  # moved away from uniform, toward the worse groups
    train_here(split, *args, "trainer.max_steps=60")  # continues: a bigger budget
    drop = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]  # noqa
    assert drop(read_metrics(split)) == drop(read_metrics(straight))


def test_a_group_objective_on_data_without_groups_is_one_line(tmp_path):
    proc = dgrun("objective=group_dro", *FAST, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "objective 'group_dro' needs a dataset with groups" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_robustness_preset_records_corruption_and_adversarial_accuracy(run_dir):
    train_here(run_dir, "phenomenon=robustness", "trainer.max_epochs=4",
               "probes.robustness.corruptions=[gaussian_noise,contrast]",
               "probes.robustness.severities=[1,5]", "probes.robustness.every=2",
               "probes.robustness.n=64", "probes.robustness.n_adv=32", *FAST)
    rows = read_metrics(run_dir)
    measured = [r for r in rows if r["corruption_acc"] != ""]
    assert [int(r["step"]) for r in measured] == [0, 24, 48]  # every 2nd evaluation
    for r in measured[1:]:
        assert 0.0 <= float(r["adv_acc"]) <= float(r["test_acc"]) + 0.1
        assert float(r["corruption_acc_contrast"]) >= 0.0
    assert (run_dir / "plots" / "robustness.png").stat().st_size > 10_000
    assert read_summary(run_dir)["robustness"]["corruption_acc"] is not None


def test_a_tracker_from_the_command_line_and_resume_false_removes_its_files(run_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_here(run_dir, "logger=tensorboard", "trainer.max_epochs=2",
               "trainer.stop_at_interpolation=false", *FAST)
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    steps = [e.step for e in events.Scalars("train_acc")]
    assert steps == [int(r["step"]) for r in read_metrics(run_dir)]
    train_here(run_dir, "trainer.resume=false", "trainer.max_epochs=2",
               "trainer.stop_at_interpolation=false", *FAST)
    assert not (run_dir / "tensorboard").exists() and not (run_dir / "trackers.json").exists()


def test_a_missing_tracker_package_is_one_line_before_anything_is_written(tmp_path):
    import subprocess
    import sys

    code = ("import sys, importlib.util as u; real = u.find_spec; "
            "u.find_spec = lambda n, *a: None if n == 'wandb' else real(n, *a); "
            "sys.argv = ['dgrun', 'logger=wandb']; import dgrun.cli; dgrun.cli.main()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True)
    assert proc.returncode == 2, proc.stderr
    assert "logger 'wandb' needs the 'wandb' package" in proc.stderr
    assert "pip install 'dgrun[wandb]'" in proc.stderr and list(tmp_path.iterdir()) == []


def test_every_tracker_runs_from_its_shipped_config(run_dir):
    """The configs as shipped (W&B's and MLflow's carry a `name`/`run_name` option) through a
    real run: each tracker writes its files, and trackers.json keeps their run ids."""
    import json

    for package in ("tensorboard", "wandb", "mlflow"):
        pytest.importorskip(package)
    train_here(run_dir, "logger=[tensorboard,mlflow,wandb]", "trainer.max_epochs=2", *FAST)
    ids = json.loads((run_dir / "trackers.json").read_text())
    assert ids["wandb"]["run_id"] and ids["mlflow"]["run_id"]
    assert ids["tensorboard"]["last_step"] == read_summary(run_dir)["steps"]
    assert any((run_dir / "wandb").glob("offline-run-*"))
    assert (run_dir / "mlruns").is_dir() and (run_dir / "tensorboard").is_dir()
