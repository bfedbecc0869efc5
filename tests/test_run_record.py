"""The run directory is a record you can trust: what a re-run does in every state, what the
summary says was applied, what a refused or interrupted command leaves behind."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import FAST, NoHooks, dgrun, read_metrics, read_summary, train_here
from dgrun import report

SHORT = ["trainer.max_epochs=3", "trainer.stop_at_interpolation=false", *FAST]


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` with a hash of its bytes: 'exactly as it was'."""
    return {str(p.relative_to(directory)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- 1. refused re-runs
def test_a_refused_resume_leaves_the_directory_exactly_as_it_was(run_dir):
    dgrun(*SHORT, f"hydra.run.dir={run_dir}")
    before = snapshot(run_dir)
    proc = dgrun(*SHORT, "model=mlp3", f"hydra.run.dir={run_dir}", check=False)
    assert proc.returncode == 2 and "model.name: mlp1 -> mlp3" in proc.stderr
    assert snapshot(run_dir) == before  # .hydra/config.yaml still says mlp1; the log untouched


def test_a_sweep_mixing_corruptions_and_a_refused_rerun_is_reported_by_what_ran(tmp_path):
    sweep = tmp_path / "sweep"
    dgrun("-m", "corruption=random_labels,partial_labels", "trainer.max_epochs=2",
          f"hydra.sweep.dir={sweep}", *FAST)
    refused = dgrun("model=mlp3", "corruption=partial_labels", "trainer.max_epochs=2",
                    f"hydra.run.dir={sweep / '1'}", *FAST, check=False)
    assert refused.returncode == 2
    # Even a directory whose .hydra/ a foreign tool rewrote is labelled by what it ran.
    (sweep / "0" / ".hydra" / "config.yaml").write_text("model: {name: wrn}\n")
    table = report.report([sweep], out=tmp_path / "out", figures=False).set_index("run")
    assert table.loc["0", "corruption"] == "random_labels" and table.loc["0", "prob"] == 1.0
    assert table.loc["1", "corruption"] == "partial_labels" and table.loc["1", "prob"] == 0.5
    assert list(table["model"]) == ["mlp1", "mlp1"]


# ---------------------------------------------------------------- 2. applied corruption
@pytest.mark.parametrize("name", ["random_labels", "shuffled_pixels", "random_pixels",
                                  "gaussian_pixels"])
def test_the_recorded_corruption_prob_is_the_applied_one(name):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dgrun.config import config_dir, from_hydra, register_schemas
    from dgrun.errors import UserError

    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        assert from_hydra(compose("config", [f"corruption={name}"])).corruption.prob == 1.0
        with pytest.raises(UserError, match=f"'{name}' always applies with prob 1"):
            from_hydra(compose("config", [f"corruption={name}", "corruption.prob=0.3"]))
        with pytest.raises(UserError, match="'none' always applies with prob 0"):
            from_hydra(compose("config", ["corruption.prob=0.3"]))
    GlobalHydra.instance().clear()


def test_corruption_seed_holds_the_corrupted_data_fixed_across_seeds(tmp_path):
    from dgrun.data import pipeline

    def labels(seed: int) -> torch.Tensor:
        return pipeline.load("digits", seed=seed, corruption_name="partial_labels",
                             prob=0.5).train.y

    assert not torch.equal(labels(0), labels(1))
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        # The split follows `seed` too unless pinned (one seed rule): pin both to hold the
        # corrupted training set fixed.
        train_here(sweep / str(seed), f"seed={seed}", "corruption=partial_labels",
                   "corruption.seed=7", "dataset.split_seed=0", "trainer.max_epochs=1", *FAST)
    a, b = read_summary(sweep / "0"), read_summary(sweep / "1")
    assert a["corruption"]["seed"] == b["corruption"]["seed"] == 7 and a["seed"] != b["seed"]
    assert a["corruption"]["train_rows_changed"] == b["corruption"]["train_rows_changed"] > 0
    assert torch.equal(labels(7), labels(7))
    table = report.report([sweep], out=tmp_path / "out", figures=False)
    assert table["corruption_seed"].tolist() == [7, 7]


# ---------------------------------------------------------------- 3. idempotent re-runs
def test_rerunning_a_stopped_or_diverged_run_changes_nothing(tmp_path, capsys):
    stopped = tmp_path / "stopped"
    args = ["trainer.max_epochs=null", "trainer.max_time_s=0.5",
            "trainer.stop_at_interpolation=false", *FAST]
    train_here(stopped, *args)
    assert read_summary(stopped)["stop_reason"] == "max_time_s"
    before = snapshot(stopped)
    capsys.readouterr()
    train_here(stopped, *args)
    assert "already finished" in capsys.readouterr().err  # on the terminal, not in a log
    assert snapshot(stopped) == before
    # A bigger time budget continues it.
    train_here(stopped, *args[:1], "trainer.max_time_s=1.0", *args[2:])
    assert read_summary(stopped)["resumed_at_steps"] and read_summary(stopped)["time_s"] >= 1.0

    diverged = tmp_path / "diverged"
    args = ["optimizer.lr=1e12", "trainer.max_epochs=20", *FAST]
    train_here(diverged, *args)
    assert read_summary(diverged)["status"] == "diverged"
    before = snapshot(diverged)
    train_here(diverged, *args[:1], "trainer.max_epochs=50", *args[2:])  # nor a bigger budget
    assert snapshot(diverged) == before


def test_a_finished_run_is_judged_before_its_data_is_read(tmp_path):
    from test_vision_data import _write_cifar10

    data, run_dir = tmp_path / "data", tmp_path / "run"
    _write_cifar10(data, per_batch=8)
    args = ["dataset=cifar10", f"dataset.root={data}", "trainer.max_epochs=1", *FAST]
    train_here(run_dir, *args)
    for f in (data / "cifar-10-batches-py").iterdir():
        f.unlink()  # the data moved away: a finished run needs none of it
    assert train_here(run_dir, *args)["status"] == "completed"  # no "CIFAR-10 not found"


def test_a_run_stopped_at_the_threshold_continues_without_the_stop(run_dir):
    train_here(run_dir, *FAST)
    first = read_summary(run_dir)
    assert first["stop_reason"] == "interpolation"
    train_here(run_dir, "trainer.stop_at_interpolation=false",
               f"trainer.max_steps={first['steps'] + 24}", *FAST)
    then = read_summary(run_dir)
    assert then["steps"] == first["steps"] + 24 and then["stop_reason"] == "max_steps"
    assert then["resumed_at_steps"] == [first["steps"]]
    assert then["interpolation"]["step"] == first["interpolation"]["step"]


# ---------------------------------------------------------------- 4. metrics at the threshold
def test_the_summary_records_the_metrics_at_the_interpolation_point(run_dir):
    train_here(run_dir, "trainer.stop_at_interpolation=false", "trainer.max_epochs=150", *FAST)
    summary = read_summary(run_dir)
    at = summary["interpolation"]
    row = next(r for r in read_metrics(run_dir) if int(r["step"]) == at["step"])
    for key in ("train_acc", "train_loss", "test_acc", "test_loss"):
        assert at[key] == float(row[key])
    assert at["step"] < summary["steps"]


def test_figure_1c_plots_the_test_error_at_the_threshold_not_the_final_one(tmp_path):
    from dgrun import report_figures

    rows = []
    for prob, reached in ((0.0, True), (0.5, True), (1.0, False)):
        rows.append({"run": str(prob), "run_dir": str(prob), "prob": prob,
                     "status": "completed", "stop_reason": "max_epochs", "interpolation_reached": reached,
                     "interpolation_test_acc": 0.8 - prob if reached else None,
                     "interpolation_step": 10, "interpolation_time_s": 1.0,
                     "final_test_acc": 0.99, "seed": 0})
    figures, notes = report_figures.build(pd.DataFrame(rows), {}, ["prob"])
    fig = next(f for f in figures if f.name == "test_error_vs_corruption")
    (line,) = fig.panels[0].lines
    assert line.x == [0.0, 0.5] and line.mean == pytest.approx([0.2, 0.7])
    assert "1 run(s) that never reached it left out" in fig.note


# ---------------------------------------------------------------- 5. the rethinking preset
def test_rethinking_with_adam_drops_the_sgd_settings():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dgrun.config import config_dir, from_hydra, register_schemas

    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        run = from_hydra(compose("config", ["phenomenon=rethinking", "optimizer=adam"]))
        assert run.optimizer.name == "adam" and run.optimizer.options["lr"] == 1e-3
        assert "momentum" not in run.optimizer.options
        assert from_hydra(compose("config", ["phenomenon=rethinking"])).pipeline[
            "center_crop"] is None  # digits are 8x8: nothing to crop
        cifar = compose("config", ["phenomenon=rethinking", "dataset=cifar10"])
        assert from_hydra(cifar).pipeline["center_crop"] == 28
    GlobalHydra.instance().clear()
    shown = dgrun("--cfg", "job", "phenomenon=rethinking", "dataset=cifar10").stdout
    assert "center_crop: ${dgrun.zhang_crop:${dataset.name}}" in shown


# ---------------------------------------------------------------- 6. the stall rule
def test_stall_rule_on_synthetic_curves():
    from dgrun.stopping import stalled

    steady = [{"train_acc": 0.1 + 0.001 * i, "train_loss": 2.0 * 0.99 ** i} for i in range(50)]
    frozen = steady[:20] + [dict(steady[19])] * 30
    creeping = steady[:20] + [{"train_acc": 0.12, "train_loss": 1.64 * (1 - 1e-5 * i)}
                              for i in range(30)]
    assert not stalled(steady, 10)
    assert stalled(frozen, 10) and stalled(creeping, 10, min_delta=0.01)
    assert not stalled(creeping, 10, min_delta=0.0) and not stalled(frozen, None)
    assert not stalled(frozen[:10], 10)  # too few evaluations to judge


def test_a_run_whose_lr_decays_to_nothing_ends_as_stalled_and_the_report_says_so(tmp_path,
                                                                                  capsys):
    sweep = tmp_path / "sweep"
    train_here(sweep / "0", "phenomenon=rethinking", "scheduler.gamma=0.5",
               "trainer.stall_patience=5", "corruption=random_labels", "trainer.max_epochs=200",
               *FAST)
    summary = read_summary(sweep / "0")
    assert summary["status"] == "stopped" and summary["stop_reason"] == "stalled"
    assert summary["steps"] < 200 * 12 and not summary["interpolation"]["reached"]
    capsys.readouterr()
    report.report([sweep], figures=False)
    out = capsys.readouterr().out
    assert "1 of 1 runs did not reach the interpolation threshold" in out
    assert "0: stopped (stalled)" in out


# ---------------------------------------------------------------- 7. only dgrun's files go
def test_resume_false_in_a_users_directory_removes_only_what_dgrun_wrote(tmp_path):
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "mine.png").write_bytes(b"user figure")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "model.pt").write_bytes(b"user weights")
    (tmp_path / "notes.txt").write_text("user notes")
    train_here(tmp_path, *SHORT)  # the run directory is the user's own folder
    assert (tmp_path / "checkpoints" / "last.pt").exists()
    train_here(tmp_path, "trainer.resume=false", *SHORT, "trainer.max_epochs=2")
    assert (tmp_path / "plots" / "mine.png").read_bytes() == b"user figure"
    assert (tmp_path / "checkpoints" / "model.pt").read_bytes() == b"user weights"
    assert (tmp_path / "notes.txt").read_text() == "user notes"
    assert read_summary(tmp_path)["steps"] == 24  # the fresh run's record
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.pt",
                                                                           "model.pt"]


# ---------------------------------------------------------------- 9. smaller things
def test_bad_directories_gpus_and_crops_are_one_line(tmp_path, monkeypatch):
    for args, message in ((["hydra.run.dir=/proc/nope"], "cannot make hydra.run.dir=/proc/nope"),
                          (["dataset.augment={crop:100}"], "pads the 8x8 images by half")):
        proc = dgrun(*args, *FAST, cwd=tmp_path, check=False)
        assert proc.returncode == 2 and message in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not (tmp_path / "outputs").exists()
    from dgrun import runtime
    from dgrun.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match=r"device=cuda:7 but only 1 CUDA device"):
        runtime.resolve_device("cuda:7")


def test_each_run_resets_what_a_reused_worker_carries_over():
    from dgrun import runtime

    runtime.configure(threads=1, deterministic=True, device="cpu")
    assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
    runtime.configure(threads=None, deterministic=False, device="cpu")
    assert torch.get_num_threads() == runtime.INITIAL_THREADS
    assert not torch.are_deterministic_algorithms_enabled()


def test_a_checkpoint_saves_where_directories_cannot_be_fsynced(tmp_path, monkeypatch):
    from dgrun import checkpoint

    real_open = os.open

    def no_directories(path, flags, *args):
        if os.path.isdir(path):
            raise PermissionError(13, "Permission denied")  # as on Windows
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_directories)
    checkpoint.save({"w": torch.ones(2)}, tmp_path)
    assert torch.equal(checkpoint.load_latest(tmp_path)["w"], torch.ones(2))


# ---------------------------------------------------------------- 10. seen as a new user
def test_ctrl_c_during_start_up_is_one_line_and_leaves_nothing(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "dgrun.cli", *FAST], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # importing torch and composing the config take longer than this
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip() == "dgrun: interrupted", err
    assert not (tmp_path / "outputs").exists()


def test_a_diverged_run_writes_strict_json_and_marks_its_plots(run_dir):
    train_here(run_dir, "optimizer.lr=1e12", "trainer.max_epochs=20", *FAST)

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    summary = json.loads((run_dir / "summary.json").read_text(), parse_constant=refuse)
    assert summary["status"] == "diverged" and summary["stop_reason"] == "non-finite loss"
    assert summary["final"]["train_loss"] is None
    assert (run_dir / "plots" / "loss.png").stat().st_size > 10_000


def test_commands_refused_before_any_run_leave_no_outputs_folder(tmp_path):
    proc = dgrun("dataset=cifar10", "dataset.root=/nonexistent", *FAST, cwd=tmp_path,
                 check=False)
    assert proc.returncode == 2 and "CIFAR-10 not found" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_killed_runs_summary_is_current_at_its_last_checkpoint(run_dir):
    proc = subprocess.Popen([sys.executable, "-m", "dgrun.cli", "trainer.checkpoint_every=2",
                             "trainer.max_epochs=400", "trainer.stop_at_interpolation=false",
                             f"hydra.run.dir={run_dir}", *FAST],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (run_dir / "checkpoints" / "previous.pt").exists():
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    summary = read_summary(run_dir)
    assert summary["status"] == "running" and summary["steps"] >= 24
    assert summary["steps"] % 24 == 0  # the step of a checkpoint (every 2 epochs of 12 steps)


# ---------------------------------------------------------------- 11. knobs do what they say
def tiny_fit(**plan_options):
    """One-step training of a tiny linear model through the real loop; returns (before, after)."""
    from dgrun.data.bundle import Split
    from dgrun.losses import LOSSES
    from dgrun.train import Plan, State, fit

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(16, 4) * 10
    split = Split(x, torch.randint(3, (16,)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    loss, eval_loss = LOSSES.build("cross_entropy")
    plan = Plan(seed=0, batch_size=16, steps_per_epoch=1, max_steps=1, max_time_s=None,
                is_eval_step=lambda s: False, is_checkpoint_step=lambda s: False,
                stop_at_interpolation=False, **plan_options)
    fit(model, split, split, opt, sched, lambda out, y, rows: loss(out, y), eval_loss, plan,
        State(), NoHooks())
    return before, [p.detach() for p in model.parameters()]


def test_grad_clip_bounds_the_update_by_the_clipped_norm():
    def step_norm(**options):
        before, after = tiny_fit(**options)
        return torch.sqrt(sum((a - b).pow(2).sum() for a, b in zip(after, before))).item()

    assert step_norm() > 0.1 * 0.05 * 5  # unclipped: far above the clipped size
    assert step_norm(grad_clip=0.05) == pytest.approx(0.1 * 0.05, rel=1e-4)  # lr * max norm


def test_weight_decay_dropout_and_smoothing_change_what_they_should(tmp_path):
    from dgrun.losses import LOSSES
    from dgrun.models import create

    plain = read_summary_of(tmp_path / "a", "optimizer.weight_decay=0")
    decayed = read_summary_of(tmp_path / "b", "optimizer.weight_decay=0.05")
    assert decayed["final"]["weight_norm"] < 0.9 * plain["final"]["weight_norm"]

    model = create("mlp1", (1, 8, 8), 10, "image", dropout=0.3).train()
    x = torch.randn(32, 1, 8, 8)
    assert not torch.equal(model(x), model(x)) and torch.equal(model.eval()(x), model(x))

    confident = torch.tensor([[20.0, 0.0, 0.0]])
    y = torch.tensor([0])
    smooth_train, smooth_eval = LOSSES.build("cross_entropy", label_smoothing=0.1)
    plain_train, plain_eval = LOSSES.build("cross_entropy")
    assert smooth_train(confident, y) > 10 * plain_train(confident, y)
    assert smooth_eval(confident, y) == plain_eval(confident, y)  # curves stay comparable
    mse_train, mse_eval = LOSSES.build("mse")
    out = torch.tensor([[0.5, 0.2, -0.1]])
    assert mse_eval(out, y).item() == pytest.approx(0.25 + 0.04 + 0.01)
    assert mse_train(out, y).item() == pytest.approx(0.30)


def read_summary_of(run_dir: Path, *args: str) -> dict:
    train_here(run_dir, *args, "trainer.max_epochs=5", "trainer.stop_at_interpolation=false",
               *FAST)
    return read_summary(run_dir)


def test_the_crop_shifts_pixels_and_the_flip_mirrors():
    from dgrun.data.augment import build

    aug = build({"crop": 2, "flip": True}, seed=0, modality="image", input_shape=(1, 8, 8))
    x = torch.arange(1, 6 * 64 + 1, dtype=torch.float32).reshape(6, 1, 8, 8)
    out = aug(x, 3)
    shifts = set()
    for i in range(len(x)):
        found = None
        for image, flipped in ((x[i], False), (x[i].flip(2), True)):
            padded = torch.nn.functional.pad(image, (2, 2, 2, 2))
            for dy in range(5):
                for dx in range(5):
                    if torch.equal(padded[:, dy:dy + 8, dx:dx + 8], out[i]):
                        found = (dy - 2, dx - 2, flipped)
        assert found is not None, "output is no shifted (or mirrored) copy of its input"
        shifts.add(found)
    assert len(shifts) > 1 and any(s[:2] != (0, 0) for s in shifts)


def test_clean_and_corrupted_accuracy_are_measured_against_the_trained_labels():
    from dgrun.data.bundle import Split
    from dgrun.losses import LOSSES
    from dgrun.probes import Evaluation
    from dgrun.train import measure

    true = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    noisy = true.clone()
    noisy[[1, 4, 6]] = torch.tensor([2, 0, 1])  # three corrupted rows, labels changed
    x = torch.nn.functional.one_hot(true, 3).float()  # the model below predicts the true label
    train = Split(x, noisy, corrupted=noisy != true)
    model = torch.nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
    row = measure(Evaluation(model, train, train), LOSSES.build("cross_entropy")[1])
    assert row["train_acc_clean"] == 1.0 and row["train_acc_corrupted"] == 0.0
    assert row["train_acc"] == pytest.approx(5 / 8)


# ---------------------------------------------------------------- the house
def test_compose_does_not_import_the_cli_and_slurm_raises_user_errors(capsys):
    code = ("import sys, dgrun.compose, dgrun.slurm; "
            "print('dgrun.cli' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
    from dgrun import slurm

    assert slurm.main(["--dry-run", "--time", "soon", "--", "seed=0"]) == 2
    assert "--time soon is not a Slurm time" in capsys.readouterr().err
