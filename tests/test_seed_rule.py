"""One seed rule for every dataset: a dataset's own seed (`dataset.seed`, `dataset.split_seed`)
is null by default and follows the run's `seed`, so a seed sweep gives independent replicates
(data, split, initialization, order); pinning it holds the data fixed while `seed` varies."""
from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import FAST, read_metrics, train_here
from dgrun.cli import config_dir
from dgrun.config import DATASET_SEEDS, from_hydra, register_schemas
from dgrun.data import DATASETS, pipeline

# Shipped pinned on purpose: seed 42 *is* the published MNIST-1D.
PINNED = {"mnist1d": 42}


@pytest.fixture(scope="module")
def composer():
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        yield lambda *overrides: from_hydra(compose("config", overrides=list(overrides)))
    GlobalHydra.instance().clear()


def test_every_dataset_seed_follows_the_run_seed_unless_pinned(composer):
    seeded = []
    for path in sorted((config_dir() / "dataset").glob("*.yaml")):
        tokens = DATASETS.tags(path.stem)["modality"] == "tokens"
        model = "model=transformer" if tokens else "model=mlp"
        cfg = composer(f"dataset={path.stem}", model, "seed=7")
        for key in DATASET_SEEDS:
            if key in cfg.dataset.options:
                seeded.append(path.stem)
                assert cfg.dataset_options[key] == PINNED.get(path.stem, 7), (path.stem, key)
                pinned = composer(f"dataset={path.stem}", model, "seed=7", f"dataset.{key}=3")
                assert pinned.dataset_options[key] == 3
    assert {"sparse_parity", "digits", "modular", "colored_digits", "lms"} <= set(seeded)


def test_phase_transition_seeds_draw_their_own_hidden_subset_and_samples(composer):
    def data(*overrides):
        cfg = composer("phenomenon=phase_transition", *overrides)
        bundle = pipeline.load(cfg.dataset.name, cfg.dataset_options, seed=cfg.corruption_seed)
        return bundle.meta.extra["support"], bundle.train.stream(5, 8, "cpu")[0]

    support0, batch0 = data("seed=0")
    support1, batch1 = data("seed=1")
    assert support0 != support1 and not torch.equal(batch0, batch1)
    held = data("seed=1", "dataset.seed=0")  # pinned: seed 1 sees seed 0's data
    assert held[0] == support0 and torch.equal(held[1], batch0)


def test_an_ensemble_member_sees_the_data_of_its_own_seed(tmp_path):
    args = ["phenomenon=phase_transition", "trainer.max_steps=100", "trainer.eval_every=50",
            *FAST]
    train_here(tmp_path / "ens", *args, "trainer.ensemble=2")
    train_here(tmp_path / "seed1", *args, "seed=1")
    member, alone = read_metrics(tmp_path / "ens" / "member_1"), read_metrics(tmp_path / "seed1")
    for a, b in zip(member, alone, strict=True):
        assert float(a["test_acc"]) == pytest.approx(float(b["test_acc"]), abs=1e-6)
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-4)
