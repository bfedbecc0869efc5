"""The `dgrun` command as a user types it: real runs in subprocesses, checked through files."""
from __future__ import annotations

import os

import pytest

from conftest import FAST, dgrun, read_metrics, read_summary, train_here


def test_default_job_reaches_interpolation_and_writes_a_complete_run_dir(run_dir):
    dgrun(f"hydra.run.dir={run_dir}", *FAST)
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "metrics.csv", "summary.json",
                 "plots/loss.png", "plots/accuracy.png", "checkpoints/last.pt"):
        assert (run_dir / name).exists(), name
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["stop_reason"] == "interpolation"
    assert summary["model"] == "mlp1" and summary["dataset"] == "digits"
    assert summary["params"] == 64 * 512 + 512 + 512 * 10 + 10
    assert summary["final"]["train_acc"] == 1.0
    assert summary["final"]["test_acc"] > 0.9
    interp = summary["interpolation"]
    assert interp["reached"] and interp["step"] == summary["steps"] and interp["time_s"] > 0
    rows = read_metrics(run_dir)
    assert list(rows[0]) == ["step", "epoch", "time_s", "lr", "train_loss", "train_acc",
                             "test_loss", "test_acc", "weight_norm"]
    assert rows[0]["step"] == "0" and int(rows[-1]["step"]) == summary["steps"]
    assert float(rows[-1]["train_acc"]) == 1.0
    assert all((run_dir / "plots" / p).stat().st_size > 10_000 for p in ("loss.png", "accuracy.png"))


def test_random_labels_are_memorized_but_test_accuracy_stays_at_chance(run_dir):
    # Adam fits random digits labels in seconds; SGD's default takes minutes on 2 cores.
    train_here(run_dir, "model=mlp3", "corruption=random_labels", "optimizer=adam",
               "trainer.max_epochs=300", *FAST)
    summary = read_summary(run_dir)
    assert summary["final"]["train_acc"] == 1.0
    assert summary["final"]["test_acc"] < 0.2  # chance is 0.1
    assert summary["interpolation"]["reached"]


def test_partial_label_sweep_runs_three_jobs_with_clean_and_corrupted_accuracy(tmp_path):
    sweep = tmp_path / "sweep"
    dgrun("-m", "corruption=partial_labels", "corruption.prob=0,0.5,1.0", "optimizer=adam",
          "trainer.max_epochs=3", f"hydra.sweep.dir={sweep}", *FAST)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1", "2"]
    probs = [read_summary(j)["corruption"]["prob"] for j in jobs]
    assert probs == [0.0, 0.5, 1.0]
    # Only the half-corrupted run has both clean and corrupted rows to report separately.
    assert "train_acc_clean" not in read_metrics(jobs[0])[0]
    assert {"train_acc_clean", "train_acc_corrupted"} <= set(read_metrics(jobs[1])[0])
    for job in jobs:
        assert read_summary(job)["status"] == "completed"


def test_help_cfg_info_and_completion_behave_like_hydra(tmp_path):
    help_text = dgrun("--help", cwd=tmp_path).stdout
    assert "== Config groups ==" in help_text and "corruption:" in help_text
    assert "mlp3" in help_text and "dgrun report" in help_text
    cfg = dgrun("--cfg", "job", "model=mlp3", "corruption.prob=0", cwd=tmp_path).stdout
    assert "name: mlp3" in cfg and "prob: 0.0" in cfg and "max_epochs: 500" in cfg
    assert "Hydra" in dgrun("--info", cwd=tmp_path).stdout
    completion = dgrun("-sc", "query=bash", cwd=tmp_path,
                       env={"COMP_LINE": "dgrun corruption=ran", "COMP_POINT": "21"}).stdout
    assert "corruption=random_labels" in completion and "corruption=random_pixels" in completion
    assert not any(tmp_path.iterdir()), "showing help must not create run directories"


@pytest.mark.parametrize("args, expected", [
    (["model=mlp5"], "unknown model 'mlp5'; choose one of: alexnet"),
    (["trainer.max_stepz=3"], "unknown config key 'trainer.max_stepz'; did you mean trainer.max_steps?"),
    (["+trainer.max_stepz=3"], "unknown config key 'trainer.max_stepz'; did you mean trainer.max_steps?"),
    (["+foo=bar"], "unknown config key 'foo'"),
    (["model.widht=3"], "did you mean model.width?"),
    (["corruption.prob=1.5"], "corruption.prob=1.5 is out of range [0.0, 1.0]"),
    (["optimizer.lr=-1"], "optimizer.lr=-1.0 is out of range"),
    (["trainer.max_steps=abc"], "trainer.max_steps=abc is not of type Integer"),
    (["dataset=mnist1d", "model=alexnet"], "model 'alexnet' cannot take vector data"),
    (["corruption.prob=0,0.5"], "add -m (--multirun)"),
    (["device=tpu"], "device='tpu' is not a device"),
    (["dataset=cifar10", "dataset.root=/nonexistent/data"], "CIFAR-10 not found: expected /nonexistent/data/cifar-10-batches-py"),
    (["dataset.center_crop=28"], "larger than the 8x8 images"),
    (["-m", "corruption=partial_labels", "corruption.prob=0,1.5"], "corruption.prob=1.5 is out of range"),
    (["trainer.max_steps=null", "trainer.max_epochs=null"], "training has no budget"),
    (["scheduler=cosine", "trainer.max_epochs=null", "trainer.max_time_s=5"], "a cosine schedule needs a step budget"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_no_run_dir(tmp_path, args, expected):
    run_dir = tmp_path / "run"
    proc = dgrun(*args, f"hydra.run.dir={run_dir}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                 *FAST, cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("dgrun: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not run_dir.exists() and not (tmp_path / "sweep").exists()


def test_a_failed_setup_never_touches_a_users_own_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    proc = dgrun("dataset=cifar10", "dataset.root=/nonexistent", "hydra.run.dir=.", *FAST,
                 cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
