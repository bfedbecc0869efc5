"""The linear datamodeling score (Park et al. 2023, TRAK, Sec. 2): is an attribution right?

An attribution tau(z, i) predicts the output of a model trained on a subset S of the training
rows as sum_{i in S} tau(z, i). Train models on held-out random subsets S_1..S_M, measure the
output f(z) of each (the margin, TRAK's output), and per test row z take the Spearman
correlation over the M subsets between the predicted and the measured outputs; the LDS is its
mean over test rows. 0 is chance, 1 a perfect ranking of the subset models.

Also here: the checkpoints of independently trained models (`models=DIR`), the setting in
which the paper recommends TRAK, as an alternative to the checkpoints of one run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata
from torch import Tensor

from dgrun.analysis.base import Checkpoint, Result, kept_weights
from dgrun.errors import UserError


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of a[:, j] with b[:, j] for every column j (NaN where a column
    is constant)."""
    ra, rb = rankdata(a, axis=0), rankdata(b, axis=0)
    ra, rb = ra - ra.mean(0), rb - rb.mean(0)
    denom = np.sqrt((ra ** 2).sum(0) * (rb ** 2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (ra * rb).sum(0) / denom, np.nan)


def linear_datamodeling_score(scores: Tensor, rows_in: Tensor,
                              measured: Tensor) -> tuple[float, np.ndarray]:
    """scores (T, N) an attribution of T test rows to N training rows; rows_in (M, N) bool
    the subsets; measured (M, T) the subset models' outputs on the T test rows.
    -> (LDS, the per-test-row correlations)."""
    if scores.shape[1] != rows_in.shape[1] or scores.shape[0] != measured.shape[1]:
        raise ValueError(f"shapes disagree: scores {tuple(scores.shape)}, subsets "
                         f"{tuple(rows_in.shape)}, outputs {tuple(measured.shape)}")
    predicted = rows_in.double().cpu() @ scores.double().cpu().T  # (M, T)
    per_test = spearman_columns(predicted.numpy(), measured.double().cpu().numpy())
    return float(np.nanmean(per_test)) if np.isfinite(per_test).any() else float("nan"), per_test


def add_lds(result: Result, test_index: Tensor, y_train: Tensor, models) -> Result:
    """Score every method in an attribution `result` against the subset models `models` (a
    SubsetModels over the same training set): `lds` per method in the summary, `lds.csv`."""
    full = models.bundle.train.y.cpu()
    if len(full) != len(y_train) or not torch.equal(full, y_train.cpu()):
        sizes = (f"{len(full)} rows vs {len(y_train)}" if len(full) != len(y_train)
                 else f"{len(full)} rows each, other labels")
        raise UserError(f"the subset models in lds= trained on subsets of a different "
                        f"training set than this run's ({sizes})",
                        "train them and this run on the same data: the same pinned "
                        "dataset.split_seed (dataset.seed for generated data) and "
                        "corruption.seed, plus dataset.subset_fraction=F for the subset models")
    measured = models.test_margin[:, test_index.cpu()]
    rows, per_method = [], result.summary["per_method"]
    for name in result.summary["methods"]:
        value, per_test = linear_datamodeling_score(
            torch.from_numpy(result.arrays[f"scores_{name}"]), models.rows_in, measured)
        finite = per_test[np.isfinite(per_test)]
        se = float(finite.std(ddof=1) / np.sqrt(len(finite))) if len(finite) > 1 else None
        per_method[name]["lds"] = value
        rows.append({"method": name, "lds": value, "se": se, "num_test": len(finite),
                     "num_models": len(models.rows_in)})
    result.tables["lds"] = pd.DataFrame(rows)
    result.summary["lds"] = {r["method"]: r["lds"] for r in rows}
    result.summary["lds_models"] = {"count": len(models.rows_in),
                                    "subset_fraction": models.fraction,
                                    "dir": str(Path(models.paths[0]).parent)}
    return result


def independent_checkpoints(paths: Sequence[Path], model: torch.nn.Module,
                            device: str = "cpu") -> tuple[list[Checkpoint], dict[int, float]]:
    """The last checkpoint of each run in `paths` as (k, state_dict), k = 0, 1, ..., and each
    one's last learning rate keyed the same way (for TracIn)."""
    from dgrun.reopen import reopen

    checkpoints, lrs = [], {}
    for k, path in enumerate(paths):
        run = reopen(path, device)
        state = run.model_at(None).state_dict()
        try:
            with kept_weights(model):  # only to check that it fits
                model.load_state_dict(state)
        except RuntimeError as e:
            raise UserError(f"{path} holds a different model than the analysed run "
                            f"({str(e).splitlines()[0]})", "pass models= trained with the "
                            "same model settings") from None
        checkpoints.append((k, state))
        lr = [r["lr"] for r in run.rows if r.get("lr") is not None]
        if lr:
            lrs[k] = float(lr[-1])
    return checkpoints, lrs
