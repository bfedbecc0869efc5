"""Models trained on random subsets of one training set (`dataset.subset_fraction`, an
ensemble or a sweep over seeds), as the memorization and datamodeling analyses need them:
which rows each model trained on, and what each model says about every row.

    models = SubsetModels.load(find_run_dirs([path]))
    models.rows_in      (M, N) bool: model m trained on row i of the full training split
    models.train_correct, models.test_correct   (M, N) / (M, T) bool
    models.test_margin  (M, T): logit_y - logsumexp of the other logits (TRAK's output)

Every model must have trained on a subset of the same training set: same dataset, same
corruption draw (a fixed `corruption.seed` when the data are corrupted), so that row i is the
same (input, label) for all of them. The full split is rebuilt once from the first run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from dgrun.analysis.base import predict
from dgrun.analysis.gradients import OUTPUTS
from dgrun.data import pipeline, subset
from dgrun.data.bundle import Bundle
from dgrun.errors import UserError


def full_bundle(cfg, device: str = "cpu") -> Bundle:
    """A run's data as its config builds them, without its subset: the full training split."""
    return pipeline.load(cfg.dataset.name, cfg.dataset_options, seed=cfg.corruption_seed,
                         corruption_name=cfg.corruption.name, prob=cfg.corruption.prob,
                         apply_to_test=cfg.corruption.apply_to_test, **cfg.pipeline).to(device)


def data_key(cfg) -> tuple:
    """What decides the full training set (two runs with equal keys share it row for row)."""
    # The resolved options: a split seed left to follow the run's seed differs run by run.
    return (cfg.dataset.name, repr(sorted(cfg.dataset_options.items())),
            repr(sorted(cfg.pipeline.items())), cfg.corruption.name, cfg.corruption.prob,
            cfg.corruption_seed if cfg.corruption.name != "none" else None)


@dataclass
class SubsetModels:
    paths: list[Path]
    bundle: Bundle            # the full training split and the test split
    rows_in: Tensor           # (M, N) bool
    train_correct: Tensor     # (M, N) bool
    test_correct: Tensor      # (M, T) bool
    test_margin: Tensor       # (M, T) float

    @property
    def fraction(self) -> float:
        return float(self.rows_in.float().mean())

    @classmethod
    def load(cls, run_dirs: Sequence[Path], device: str = "cpu",
             least: int = 2) -> "SubsetModels":
        from dgrun.reopen import reopen

        runs = [reopen(d, device) for d in run_dirs]
        if len(runs) < least:
            raise UserError(f"{len(runs)} run(s) found; this analysis needs at least {least} "
                            "models trained on random subsets",
                            "train them with dataset.subset_fraction=0.5 trainer.ensemble=N")
        for run in runs:
            if "subset" not in run.summary or not (run.path / subset.RECORD_FILE).is_file():
                raise UserError(f"{run.path} trained on its whole training split (no "
                                f"{subset.RECORD_FILE})", "pass models trained with "
                                "dataset.subset_fraction=F (e.g. 0.5; trainer.ensemble=N)")
        first = runs[0]
        for run in runs[1:]:
            if data_key(run.cfg) != data_key(first.cfg):
                why = ("their training split is drawn from each run's seed: pin it with "
                       "dataset.split_seed=S (dataset.seed=S for generated data)"
                       if run.cfg.data_follows_seed else
                       "their corruption is drawn from each run's seed"
                       if run.cfg.corruption.seed is None and run.cfg.corruption.name != "none"
                       else "their dataset or corruption settings differ")
                raise UserError(f"{run.path} and {first.path} trained on subsets of different "
                                f"training sets ({why})", "train every subset model on the "
                                "same data: fix corruption.seed=S when corrupting")
        bundle = full_bundle(first.cfg, device)
        n, margin = len(bundle.train), OUTPUTS.get("margin").value
        rows_in = torch.zeros(len(runs), n, dtype=torch.bool)
        train_correct = torch.zeros(len(runs), n, dtype=torch.bool)
        test_correct = torch.zeros(len(runs), len(bundle.test), dtype=torch.bool)
        test_margin = torch.zeros(len(runs), len(bundle.test))
        for m, run in enumerate(runs):
            rows = torch.from_numpy(np.load(run.path / subset.RECORD_FILE)).long()
            if len(rows) and int(rows.max()) >= n:
                raise UserError(f"{run.path / subset.RECORD_FILE} names row {int(rows.max())}"
                                f" of a {n}-row training split", "re-train that run")
            rows_in[m, rows] = True
            model = run.model_at(None)
            logits = predict(model, bundle.train.x, bundle.prepare).cpu()
            train_correct[m] = logits.argmax(1) == bundle.train.y.cpu()
            logits = predict(model, bundle.test.x, bundle.prepare).cpu()
            test_correct[m] = logits.argmax(1) == bundle.test.y.cpu()
            test_margin[m] = margin(logits, bundle.test.y.cpu())
        return cls([r.path for r in runs], bundle, rows_in, train_correct, test_correct,
                   test_margin)
