"""The loop's rules, in-process: stop rules, schedules, divergence, knobs, determinism."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import FAST, NoHooks, dgrun, read_metrics, read_summary
from dgrun.cli import config_dir
from dgrun.config import from_hydra, plain, register_schemas
from dgrun.run import log_points, run


@pytest.fixture(scope="module")
def train():
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        def go(run_dir: Path, *overrides: str) -> dict:
            cfg = compose("config", overrides=[*overrides, "threads=1", "trainer.progress=none"])
            return run(from_hydra(cfg), run_dir, plain(cfg))
        yield go
    GlobalHydra.instance().clear()


def test_same_seed_same_numbers_other_seed_other_numbers(train, tmp_path):
    args = ("trainer.max_epochs=3", "trainer.stop_at_interpolation=false", "model.dropout=0.2")
    a = train(tmp_path / "a", *args)
    b = train(tmp_path / "b", *args)
    c = train(tmp_path / "c", *args, "seed=1")
    assert a["final"] == b["final"] and a["final"] != c["final"]


def test_divergence_ends_the_run_as_diverged(train, tmp_path):
    s = train(tmp_path / "r", "optimizer.lr=1e12", "trainer.max_epochs=20")
    assert s["status"] == "diverged" and s["stop_reason"] == "non-finite loss"
    assert s["steps"] < 20 * 12


def test_wall_clock_budget_stops_the_run(train, tmp_path):
    s = train(tmp_path / "r", "trainer.max_epochs=null", "trainer.max_time_s=1.0",
              "trainer.stop_at_interpolation=false")
    assert s["status"] == "stopped" and s["stop_reason"] == "max_time_s"
    assert 1.0 <= s["time_s"] < 3.0


def test_a_time_budget_ending_on_an_evaluation_step_records_that_step_once(train, tmp_path):
    """Every step evaluates and the budget is spent after the first: step 1 is measured by
    the evaluation, and the stop must not measure (and log to the trackers) it again."""
    from test_trackers import tb_scalars

    s = train(tmp_path / "r", "trainer.max_epochs=null", "trainer.max_time_s=1e-9",
              "trainer.unit=step", "trainer.eval_every=1", "logger=tensorboard")
    assert s["status"] == "stopped" and s["stop_reason"] == "max_time_s" and s["steps"] == 1
    assert [int(r["step"]) for r in read_metrics(tmp_path / "r")] == [0, 1]
    series, _ = tb_scalars(tmp_path / "r" / "tensorboard")
    assert [step for step, _ in series["train_loss"]] == [0, 1]


def test_keep_recording_after_interpolation(train, tmp_path):
    s = train(tmp_path / "r", "trainer.stop_at_interpolation=false", "trainer.max_epochs=250")
    assert s["status"] == "completed" and s["stop_reason"] == "max_epochs"
    assert s["interpolation"]["reached"] and s["interpolation"]["step"] < s["steps"] == 3000
    assert (tmp_path / "r" / "checkpoints" / "last.pt").exists()


def test_interpolation_by_loss(train, tmp_path):
    s = train(tmp_path / "r", "trainer.interpolation_loss=0.5")
    rows = read_metrics(tmp_path / "r")
    assert s["interpolation"]["reached"] and float(rows[-1]["train_loss"]) <= 0.5
    assert float(rows[-2]["train_loss"]) > 0.5


def test_full_batch_and_step_units(train, tmp_path):
    s = train(tmp_path / "r", "trainer.batch_size=null", "trainer.max_steps=30",
              "trainer.unit=step", "trainer.eval_every=10", "optimizer=adam")
    assert s["steps"] == 30 and s["epochs"] == 30
    assert [int(r["step"]) for r in read_metrics(tmp_path / "r")] == [0, 10, 20, 30]


def test_log_schedule_evaluates_at_log_spaced_steps(train, tmp_path):
    train(tmp_path / "r", "trainer.eval_schedule=log", "trainer.eval_per_decade=4",
          "trainer.max_steps=200", "trainer.stop_at_interpolation=false")
    steps = [int(r["step"]) for r in read_metrics(tmp_path / "r")]
    assert steps == [0, 1, 2, 3, 6, 10, 18, 32, 56, 100, 178, 200]
    assert log_points(10, limit=100) == {1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25, 32, 40, 50,
                                         63, 79, 100}


@pytest.mark.parametrize("knob", [
    "trainer.label_smoothing=0.1", "trainer.grad_clip=1.0", "optimizer.weight_decay=0.01",
    "model.dropout=0.3", "trainer.loss=mse", "scheduler=cosine", "scheduler=warmup_cosine",
    "scheduler=multistep", "optimizer=adamw", "dataset.augment={crop:1,flip:true}",
    "dataset.preprocess=whiten", "dataset=mnist1d", "model=mlp",
])
def test_regularization_knobs_and_choices_train(train, tmp_path, knob):
    s = train(tmp_path / "r", knob, "trainer.max_epochs=3", "trainer.stop_at_interpolation=false")
    assert s["status"] == "completed" and s["steps"] > 0
    assert s["final"]["train_acc"] > 0.3  # it learned something in 3 epochs


def test_schedules_follow_their_formulas():
    from dgrun.optim import SCHEDULERS

    exp = SCHEDULERS.build("exponential", steps_per_epoch=10, total_steps=None, gamma=0.5)
    assert [exp(s) for s in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]
    cos = SCHEDULERS.build("warmup_cosine", steps_per_epoch=10, total_steps=110, warmup_steps=10)
    assert cos(0) == pytest.approx(0.1) and cos(10) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.5) and cos(110) == pytest.approx(0.0)
    multi = SCHEDULERS.build("multistep", steps_per_epoch=10, total_steps=None,
                             milestones=[2, 4], gamma=0.1)
    assert [multi(s) for s in (19, 20, 40)] == pytest.approx([1.0, 0.1, 0.01])


def test_augmentation_is_seeded_per_step_and_keeps_shapes():
    from dgrun.data.augment import build

    aug = build({"crop": 2, "flip": True}, seed=0, modality="image")
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    assert torch.equal(aug(x, 5), aug(x, 5)) and not torch.equal(aug(x, 5), aug(x, 6))
    assert aug(x, 5).shape == x.shape


def test_mnist1d_leaves_global_random_state_alone():
    from dgrun.data import DATASETS

    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    b = DATASETS.build("mnist1d", num_samples=500)
    assert np.array_equal(np.random.get_state()[1], before)
    assert b.train.x.shape == (400, 40) and b.meta.modality == "vector"


def test_diverged_run_does_not_stop_a_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    dgrun("-m", "optimizer.lr=1e12,0.01", "trainer.max_epochs=2", f"hydra.sweep.dir={sweep}",
          *FAST)
    assert read_summary(sweep / "0")["status"] == "diverged"
    assert read_summary(sweep / "1")["status"] == "completed"


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_loss_between_evaluations_ends_the_run_as_diverged(bad):
    """One non-finite training loss between two evaluations is seen at the next one, even
    when the weights stay finite and later losses are finite again (the loop sums the
    losses on the device and checks the sum at each evaluation)."""
    from dgrun import train
    from dgrun.data.bundle import Split

    gen = torch.Generator().manual_seed(0)
    data = Split(torch.randn(64, 8, generator=gen), torch.randint(2, (64,), generator=gen))

    calls = []

    def objective(out, y, rows):
        calls.append(1)
        loss = torch.nn.functional.cross_entropy(out, y)
        # A constant has no gradient: the weights stay finite, only the loss is not.
        return loss + (bad if len(calls) == 3 else 0.0)

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = train.Plan(seed=0, batch_size=16, steps_per_epoch=4, max_steps=20,
                      max_time_s=None, is_eval_step=lambda s: s % 10 == 0,
                      is_checkpoint_step=lambda s: False, stop_at_interpolation=False)
    f = torch.nn.functional.cross_entropy
    state = train.fit(model, data, data, opt,
                      torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), objective,
                      lambda out, y: f(out, y, reduction="sum"), plan, train.State(),
                      NoHooks())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert (state.status, state.stop_reason, state.step) == ("diverged", "non-finite loss", 10)
