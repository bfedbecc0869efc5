"""The Zhang et al. 2017 study end to end: real-format CIFAR-10 files through `dgrun`."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import FAST, dgrun, read_metrics, read_summary
from dgrun.cli import config_dir
from dgrun.config import from_hydra, register_schemas
from test_vision_data import _write_cifar10


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    _write_cifar10(root, per_batch=40)  # 200 train / 40 test images in the real pickle format
    return root


@pytest.mark.parametrize("model, params", [
    ("mlp1", 1_209_866), ("alexnet", 1_387_786),
    pytest.param("inception", 1_649_402, marks=pytest.mark.slow)])  # 20 s on 2 cores
def test_fake_cifar10_trains_the_papers_models_with_the_papers_setup(tmp_path, cifar_root,
                                                                    model, params):
    run_dir = tmp_path / "run"
    # No dataset.center_crop on the command line: the preset crops 32x32 images to 28x28 itself.
    dgrun("dataset=cifar10", f"dataset.root={cifar_root}",
          "phenomenon=rethinking", f"model={model}", "corruption=random_labels",
          "trainer.max_epochs=2", f"hydra.run.dir={run_dir}", *FAST)
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["steps"] == 4  # 200 rows, batch 128
    assert summary["params"] == params  # Table 1's counts: 28x28x3 input after the centre crop
    assert summary["input_shape"] == [3, 28, 28]
    rows = read_metrics(run_dir)
    assert float(rows[0]["lr"]) == (0.1 if model == "inception" else 0.01)
    # 4 steps are far from the paper's 391-step epoch: the lr has not decayed yet
    assert float(rows[-1]["lr"]) == float(rows[0]["lr"])


def test_the_lr_decays_per_paper_epoch_on_any_data():
    """0.95 per CIFAR-10 epoch (391 steps at batch 128), exactly the paper's schedule there; on
    digits (12 steps an epoch) the same lr at the same step, not 0.95 every 12 steps."""
    from dgrun import optim

    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = from_hydra(compose("config", overrides=["phenomenon=rethinking"]))
    options = cfg.scheduler.options
    GlobalHydra.instance().clear()
    build = optim.SCHEDULERS.build
    cifar = build("exponential", steps_per_epoch=391, total_steps=None, **options)
    digits = build("exponential", steps_per_epoch=12, total_steps=None, **options)
    assert [cifar(391 * e) for e in range(4)] == [0.95 ** e for e in range(4)]
    assert cifar(390) == 1.0 and digits(390) == 1.0 and digits(391 * 3 + 5) == 0.95 ** 3


def test_rethinking_sets_the_papers_training_setup():
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for model, lr in [("inception", 0.1), ("alexnet", 0.01), ("mlp1", 0.01)]:
            run = from_hydra(compose("config", overrides=["phenomenon=rethinking", f"model={model}"]))
            assert run.optimizer.name == "sgd" and run.optimizer.options["lr"] == lr
            assert run.optimizer.options["momentum"] == 0.9
            assert run.optimizer.options["weight_decay"] == 0.0
            assert run.scheduler.name == "exponential" and run.scheduler.options["gamma"] == 0.95
            assert run.trainer.batch_size == 128 and run.trainer.stop_at_interpolation
            assert run.pipeline["preprocess"] == "whiten" and not run.pipeline["augment"]
        user = from_hydra(compose("config", overrides=["phenomenon=rethinking", "optimizer.lr=0.5"]))
        assert user.optimizer.options["lr"] == 0.5  # the command line still wins
    GlobalHydra.instance().clear()


def test_whitening_is_per_image_as_in_tensorflow():
    import math

    import torch

    from dgrun.data.pipeline import Normalize

    x = torch.rand(5, 3, 28, 28)
    x[0] = 0.5  # a constant image: std 0 -> divided by 1/sqrt(N) instead
    out = Normalize.fit("whiten", x)(x)
    flat = out.reshape(5, -1)
    assert torch.allclose(flat[1:].mean(1), torch.zeros(4), atol=1e-5)
    assert torch.allclose(flat[1:].std(1, unbiased=False), torch.ones(4), atol=1e-4)
    assert torch.all(flat[0] == 0) and math.isfinite(float(flat.sum()))


@pytest.mark.slow
def test_digits_figure1_shows_what_the_paper_shows(tmp_path):
    """The offline Fig. 1b/1c at three corruption levels: every level is fit to 100%, test
    accuracy falls to chance, and fitting noisy labels takes longer than fitting clean ones."""
    sweep = tmp_path / "sweep"
    dgrun("-m", "experiment=zhang2017_fig1bc_digits", "corruption.prob=0.0,0.5,1.0", "seed=0",
          "trainer.progress=none", f"hydra.sweep.dir={sweep}", timeout=600)
    runs = [read_summary(sweep / str(i)) for i in range(3)]
    assert [r["corruption"]["prob"] for r in runs] == [0.0, 0.5, 1.0]
    assert all(r["final"]["train_acc"] == 1.0 and r["interpolation"]["reached"] for r in runs)
    clean, half, noise = (r["final"]["test_acc"] for r in runs)
    assert clean > 0.95 and 0.3 < half < 0.7 and noise < 0.2
    steps = [r["interpolation"]["step"] for r in runs]
    assert steps[1] > 2 * steps[0] and steps[2] > 2 * steps[0]
    assert (sweep / "report" / "threshold_vs_corruption.png").exists()
