"""Memorization and influence estimates from subset models (Feldman & Zhang 2020, "What
neural networks memorize and why").

From M models, each trained on a random subset of the training rows:

    mem(i)       = acc on row i over the models trained with i - over the models without i
    infl(i, j)   = the same difference, measured on test row j

Each is a difference of two means of 0/1 outcomes, so its standard error is
sqrt(s_in^2 / n_in + s_out^2 / n_out) with n_in, n_out the number of models with and without
the row (about M * fraction and M * (1 - fraction)): it shrinks as 1/sqrt(M). Feldman & Zhang
trained 2,000-4,000 ResNets on 70% subsets of CIFAR-100; a few dozen small models already
separate mislabeled rows (high memorization) from clean ones on digits.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata
from torch import Tensor

from dgrun.analysis.base import ANALYSES, Result, pixels01
from dgrun.analysis.figures import plt, save
from dgrun.analysis.options import Count, Index


def in_out_difference(rows_in: Tensor, outcome: Tensor) -> tuple[Tensor, Tensor]:
    """rows_in (M, N) bool, outcome (M, K) -> (N, K) mean outcome over the models with row i
    minus over the models without it, and its standard error (NaN where either side has
    fewer than two models)."""
    inside = rows_in.double()
    outside = 1.0 - inside
    y = outcome.double()
    n_in, n_out = inside.sum(0)[:, None], outside.sum(0)[:, None]
    mean_in = inside.T @ y / n_in
    mean_out = outside.T @ y / n_out
    # Sample variances from sums of squares: E[y^2] - E[y]^2, times n / (n - 1).
    var_in = (inside.T @ y.square() / n_in - mean_in.square()) * n_in / (n_in - 1)
    var_out = (outside.T @ y.square() / n_out - mean_out.square()) * n_out / (n_out - 1)
    se = (var_in.clamp_min(0) / n_in + var_out.clamp_min(0) / n_out).sqrt()
    se = torch.where((n_in < 2) | (n_out < 2), torch.full_like(se, float("nan")), se)
    return mean_in - mean_out, se


def auc(scores: np.ndarray, positive: np.ndarray) -> Optional[float]:
    """The probability that a positive row outscores a negative one (ties count half): the
    area under the ROC curve, by the Mann-Whitney rank sum. None without both kinds."""
    positive = np.asarray(positive, dtype=bool)
    keep = np.isfinite(scores)
    scores, positive = np.asarray(scores)[keep], positive[keep]
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def memorization(rows_in: Tensor, train_correct: Tensor, test_correct: Tensor,
                 corrupted: Tensor, *, labels: Optional[Tensor] = None, top_k: int = 5,
                 x_train: Optional[Tensor] = None, gallery: int = 16) -> Result:
    """Memorization of every training row and influence of training rows on test rows.

    rows_in (M, N) bool: which rows model m trained on; train_correct (M, N), test_correct
    (M, T): whether model m predicts each row right; corrupted (N,) the rows' corruption flag.
    tables: `memorization` (index, memorization, se, corrupted, label, models_in,
    models_out), `influence` (each test row's `top_k` most influential training rows, with
    standard errors). summary: the number of models, the mean memorization of clean and of
    corrupted rows, and the AUC of the score against the corruption flag.
    """
    m, n = rows_in.shape
    rows_in = rows_in.cpu().bool()
    n_in = rows_in.sum(0)
    mem_all, se_all = in_out_difference(rows_in, train_correct.cpu())
    mem, se = mem_all.diagonal(), se_all.diagonal()
    corrupted = corrupted.cpu().bool()
    table = pd.DataFrame({"index": np.arange(n), "memorization": mem.numpy(),
                          "se": se.numpy(), "corrupted": corrupted.numpy(),
                          "label": (labels.cpu().numpy() if labels is not None
                                    else np.full(n, -1)),
                          "models_in": n_in.numpy(), "models_out": (m - n_in).numpy()})
    infl, infl_se = in_out_difference(rows_in, test_correct.cpu())  # (N, T)
    k = min(top_k, n)
    values, top = infl.T.topk(k, dim=1)  # per test row
    t = infl.shape[1]
    influence = pd.DataFrame({
        "test_index": np.repeat(np.arange(t), k), "rank": np.tile(np.arange(1, k + 1), t),
        "train_index": top.reshape(-1).numpy(), "influence": values.reshape(-1).numpy(),
        "se": infl_se.T.gather(1, top).reshape(-1).numpy(),
        "corrupted": corrupted[top.reshape(-1)].numpy()})
    finite = np.isfinite(table["memorization"].to_numpy())
    clean, bad = finite & ~table["corrupted"].to_numpy(), finite & table["corrupted"].to_numpy()
    summary = {
        "num_models": m, "num_train": n, "num_test": t,
        "subset_fraction": float(rows_in.float().mean()),
        "models_in_per_row": {"min": int(n_in.min()), "mean": float(n_in.float().mean()),
                              "max": int(n_in.max())},
        "rows_without_estimate": int((~finite).sum()),
        "mean_se": float(np.nanmean(se.numpy())) if finite.any() else None,
        "mean_memorization": {"clean": float(table["memorization"][clean].mean())
                              if clean.any() else None,
                              "corrupted": float(table["memorization"][bad].mean())
                              if bad.any() else None},
        "corrupted_rows": int(corrupted.sum()),
        "auc_vs_corrupted": auc(table["memorization"].to_numpy(), corrupted.numpy()),
        "top_influence_mean": float(values[:, 0].mean()) if k else None,
    }
    order = np.argsort(-np.nan_to_num(mem.numpy(), nan=-np.inf))[:gallery]
    arrays = {"memorization": mem.numpy(), "corrupted": corrupted.numpy(), "top_rows": order}
    if x_train is not None and x_train.dim() == 4:
        arrays["top_pixels"] = pixels01(x_train[torch.from_numpy(order)].cpu()).numpy()
    if labels is not None:
        arrays["top_labels"] = labels.cpu().numpy()[order]
    return Result({"memorization": table, "influence": influence}, summary, arrays)


def plot_memorization(result: Result, out_dir) -> list:
    arr, s = result.arrays, result.summary
    mem, bad = arr["memorization"], arr["corrupted"].astype(bool)
    keep = np.isfinite(mem)
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(-1, 1, 41)
    ax.hist(mem[keep & ~bad], bins=bins, alpha=0.6, density=True, label="clean rows")
    if (keep & bad).any():
        ax.hist(mem[keep & bad], bins=bins, alpha=0.6, density=True, color="tab:red",
                label="corrupted rows")
    ax.set_xlabel("memorization score (acc with the row - acc without it)")
    ax.set_ylabel("density")
    auc_text = f", AUC vs corrupted {s['auc_vs_corrupted']:.3f}" \
        if s.get("auc_vs_corrupted") is not None else ""
    ax.set_title(f"Memorization from {s['num_models']} subset models{auc_text}")
    ax.legend()
    paths = [save(fig, out_dir, "memorization_distribution")]

    rows = arr["top_rows"]
    if "top_pixels" in arr:
        cols = min(8, len(rows))
        lines = int(np.ceil(len(rows) / cols))
        fig, axes = plt.subplots(lines, cols, figsize=(1.5 * cols, 1.8 * lines), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, i, pixels in zip(axes.flat, rows, arr["top_pixels"]):
            img = np.transpose(pixels, (1, 2, 0))
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img.clip(0, 1),
                      cmap="gray" if img.shape[-1] == 1 else None)
            label = f" y={arr['top_labels'][list(rows).index(i)]}" if "top_labels" in arr else ""
            ax.set_title(f"#{i}{label}\nmem {mem[i]:.2f}", fontsize=7,
                         color="red" if bad[i] else "black")
        fig.suptitle("Most memorized training rows (corrupted in red)")
    else:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.bar(range(len(rows)), mem[rows], color=["tab:red" if bad[i] else "tab:blue"
                                                   for i in rows])
        ax.set_xticks(range(len(rows)), [str(i) for i in rows], rotation=90, fontsize=7)
        ax.set_xlabel("training row (corrupted in red)")
        ax.set_ylabel("memorization")
        ax.set_title("Most memorized training rows")
    paths.append(save(fig, out_dir, "most_memorized"))
    return paths


@ANALYSES.register("memorization", plot=plot_memorization, over="models")
def memorization_from_models(models, /, *, top_k: Count = 5, gallery: Index = 16) -> Result:
    """`dgrun analyze SWEEP_OR_ENSEMBLE memorization`: `models` is a SubsetModels."""
    b = models.bundle
    result = memorization(models.rows_in, models.train_correct, models.test_correct,
                          b.train.corrupted, labels=b.train.y, top_k=top_k, x_train=b.train.x,
                          gallery=gallery)
    result.summary["models"] = [str(p) for p in models.paths]
    return result
