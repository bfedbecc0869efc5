"""Which training examples a test prediction leans on: TRAK, TracIn, gradient cosine, kNN.

Scores are (n_test, n_train) matrices, higher = the training example pushes the test example's
correct-class output up more. Four methods, each named for what it is:

    trak         Park et al. 2023. Per checkpoint m: projected gradients Phi_m (train) and
                 phi_m(z) (test) of the margin f, tau_m(z) = phi_m(z) (Phi_m^T Phi_m)^-1 Phi_m^T;
                 ensembled: tau(z) = mean_m tau_m(z) * mean_m Q_m, Q = diag(1 - p_i) of the
                 training rows (the paper's Algorithm 1; no soft-thresholding).
    tracin       Pruthi et al. 2020 (TracInCP): sum over checkpoints of
                 lr_m * grad L(train_i) . grad L(z).
    grad_cosine  mean over checkpoints of cos(grad L(train_i), grad L(z)). A similarity of
                 gradients, not TRAK (no kernel, no reweighting).
    knn          minus the Euclidean distance between penultimate features (the input of the
                 model's last nn.Linear) at the last checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from dgrun.analysis.base import (ANALYSES, Checkpoint, Result, RunArtifacts, kept_weights, load,
                                 pixels01, require_checkpoints, sample_indices, spread)
from dgrun.analysis.options import Count
from dgrun.analysis.features import penultimate_features
from dgrun.analysis.figures import plt, save
from dgrun.analysis.gradients import OUTPUTS, Projector, projected_gradients, selected_parameters
from dgrun.data.bundle import Split
from dgrun.errors import UserError
from dgrun.registry import Registry


@dataclass
class CheckpointGradients:
    step: int
    train: Tensor    # (n_train, k) projected grad f
    train_q: Tensor  # (n_train,) -dL/df
    test: Tensor
    test_q: Tensor


class Attribution:
    """The shared inputs of every method, each computed once, on first use.

    `x_*` are stored rows (pixels for images) that `prepare` turns into model inputs; `lrs`
    maps a checkpoint's step to the learning rate in force there (TracIn only). The model's
    own weights are put back after every computation.
    """

    def __init__(self, model: nn.Module, checkpoints: Sequence[Checkpoint], x_train: Tensor,
                 y_train: Tensor, x_test: Tensor, y_test: Tensor, *,
                 prepare: Callable[[Tensor], Tensor] = lambda t: t,
                 lrs: Optional[Mapping[int, float]] = None, proj_dim: Optional[int] = 512,
                 seed: int = 0, output: str = "margin", batch_size: int = 64,
                 params: Optional[Sequence[str]] = None, influence: Optional[dict] = None):
        require_checkpoints(checkpoints, "attribution")
        self.model, self.checkpoints = model, list(checkpoints)
        self.x_train, self.y_train, self.x_test, self.y_test = x_train, y_train, x_test, y_test
        self.prepare, self.lrs = prepare, dict(lrs or {})
        self.proj_dim, self.seed, self.batch_size = proj_dim, seed, batch_size
        self.output = OUTPUTS.get(output)
        self.names = selected_parameters(model, params)
        self.influence = dict(influence or {})  # the influence method's solver options

    @cached_property
    def gradients(self) -> list[CheckpointGradients]:
        numels = {n: p.numel() for n, p in self.model.named_parameters() if n in self.names}
        out = []
        with kept_weights(self.model) as model:
            for m, (step, state) in enumerate(self.checkpoints):
                load(model, state)
                projector = Projector(numels, self.proj_dim, seed=self.seed, model_id=m)
                grads = [projected_gradients(model, x, y, output=self.output,
                                             projector=projector, names=self.names,
                                             prepare=self.prepare, batch_size=self.batch_size)
                         for x, y in ((self.x_train, self.y_train), (self.x_test, self.y_test))]
                out.append(CheckpointGradients(step, *grads[0], *grads[1]))
        return out

    @cached_property
    def features(self) -> tuple[Tensor, Tensor]:
        with kept_weights(self.model) as model:
            load(model, self.checkpoints[-1][1])
            return (penultimate_features(model, self.x_train, self.prepare),
                    penultimate_features(model, self.x_test, self.prepare))

    def scores(self, method: str) -> Tensor:
        return METHODS.get(method)(self).float().cpu()


METHODS = Registry("attribution method")


@METHODS.register("trak")
def trak(a: Attribution) -> Tensor:
    total, q = 0.0, 0.0
    for g in a.gradients:
        phi = g.train.double()
        # pinv: equals the inverse when Phi has full column rank, and stays defined (the
        # projection onto Phi's row space) when k exceeds the number of training rows.
        kernel_inv = torch.linalg.pinv(phi.T @ phi, hermitian=True)
        total = total + g.test.double() @ kernel_inv @ phi.T
        q = q + g.train_q.double()
    m = len(a.gradients)
    return (total / m) * (q / m)[None, :]


@METHODS.register("tracin")
def tracin(a: Attribution) -> Tensor:
    missing = [g.step for g in a.gradients if g.step not in a.lrs]
    if missing:
        raise UserError(f"TracIn needs the learning rate at checkpoint steps {missing}",
                        "pass lrs={step: lr} (read from the run's metrics rows)")
    total = 0.0
    for g in a.gradients:
        # grad L = -q grad f on both sides: the signs cancel in the product.
        test, train = g.test * g.test_q[:, None], g.train * g.train_q[:, None]
        total = total + a.lrs[g.step] * test @ train.T
    return total


@METHODS.register("grad_cosine")
def grad_cosine(a: Attribution) -> Tensor:
    total = 0.0
    for g in a.gradients:
        test = torch.nn.functional.normalize(-g.test * g.test_q[:, None], dim=1)
        train = torch.nn.functional.normalize(-g.train * g.train_q[:, None], dim=1)
        total = total + test @ train.T
    return total / len(a.gradients)


@METHODS.register("knn")
def knn(a: Attribution) -> Tensor:
    train, test = a.features
    return -torch.cdist(test.double(), train.double())


# --- tables ----------------------------------------------------------------------------------

def top_influences(scores: Tensor, k: int, *, method: str, test_index: Tensor,
                   y_test: Tensor, y_train: Tensor, corrupted: Tensor) -> pd.DataFrame:
    """Long table: for each test row, its k highest-scoring training rows, by rank."""
    k = min(k, scores.shape[1])
    values, idx = scores.topk(k, dim=1)
    n_test = scores.shape[0]
    return pd.DataFrame({
        "method": method,
        "test_index": test_index.cpu().repeat_interleave(k).numpy(),
        "test_label": y_test.cpu().repeat_interleave(k).numpy(),
        "rank": np.tile(np.arange(1, k + 1), n_test),
        "train_index": idx.reshape(-1).numpy(),
        "train_label": y_train.cpu()[idx.reshape(-1)].numpy(),
        "score": values.reshape(-1).numpy(),
        "corrupted": corrupted.cpu()[idx.reshape(-1)].numpy(),
    })


def agreement(tops: dict[str, Tensor]) -> pd.DataFrame:
    """Mean overlap |A & B| / k of two methods' top-k sets, per pair of methods."""
    rows = []
    names = list(tops)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            same = (tops[a][:, :, None] == tops[b][:, None, :]).any(-1).float().mean()
            rows.append({"method_a": a, "method_b": b, "top_k_overlap": float(same)})
    return pd.DataFrame(rows, columns=["method_a", "method_b", "top_k_overlap"])


def attribute(model: nn.Module, checkpoints: Sequence[Checkpoint], train: Split, test: Split, *,
              prepare: Callable[[Tensor], Tensor] = lambda t: t,
              methods: Sequence[str] = ("trak", "tracin", "grad_cosine", "knn"),
              lrs: Optional[Mapping[int, float]] = None, test_indices: Optional[Tensor] = None,
              top_k: int = 10, proj_dim: Optional[int] = 512, seed: int = 0,
              output: str = "margin", batch_size: int = 64,
              params: Optional[Sequence[str]] = None, influence: Optional[dict] = None,
              keep: Optional[dict] = None) -> Result:
    """Top-k influential training rows of each chosen test row, per method, and how many of
    them are corrupted.

    tables: `top` (method, test_index, rank, train_index, score, corrupted, labels),
    `corrupted_in_top` (method, test_index, count), `agreement` (top-k overlap of methods).
    summary: per method the mean number of corrupted rows in a top-k and what chance gives
    (k times the corrupted fraction). arrays: `scores_<method>` (n_test, n_train).
    `influence`: the influence method's solver options (dgrun.analysis.influence).
    """
    for name in methods:
        METHODS.get(name)
    test_index = torch.arange(len(test)) if test_indices is None else test_indices.cpu()
    dev = test.x.device
    a = Attribution(model, checkpoints, train.x, train.y, test.x[test_index.to(dev)],
                    test.y[test_index.to(test.y.device)], prepare=prepare, lrs=lrs,
                    proj_dim=proj_dim, seed=seed, output=output, batch_size=batch_size,
                    params=params, influence=influence)
    if keep is not None:  # a caller that wants the computation's by-products (the solve)
        keep["attribution"] = a
    corrupted = train.corrupted.cpu()
    k = min(top_k, len(train))
    tables, tops, arrays, summary = [], {}, {}, {}
    rate = float(corrupted.float().mean())
    for name in methods:
        scores = a.scores(name)
        arrays[f"scores_{name}"] = scores.numpy()
        tops[name] = scores.topk(k, dim=1).indices
        tables.append(top_influences(scores, k, method=name, test_index=test_index,
                                     y_test=a.y_test, y_train=train.y, corrupted=corrupted))
        counts = corrupted[tops[name]].sum(1).float()
        summary[name] = {"mean_corrupted_in_top_k": float(counts.mean()),
                         "top1_corrupted_fraction": float(corrupted[tops[name][:, 0]].float()
                                                          .mean())}
    top = pd.concat(tables, ignore_index=True)
    per_test = (top.groupby(["method", "test_index"], sort=False)["corrupted"].sum()
                .rename("corrupted_in_top_k").reset_index())
    summary = {"methods": list(methods), "top_k": k, "num_test": len(test_index),
               "num_train": len(train), "checkpoint_steps": [s for s, _ in checkpoints],
               "proj_dim": proj_dim, "corrupted_fraction": rate,
               "chance_corrupted_in_top_k": k * rate, "per_method": summary}
    if proj_dim is not None and proj_dim >= len(train) and "trak" in methods:
        # Phi^T Phi (k x k) has rank <= n: pinv gives the minimum-norm fit of phi(z) by the
        # training gradients, an interpolating regime TRAK's paper does not use (k << n).
        summary["note"] = (f"proj_dim {proj_dim} >= {len(train)} training rows: TRAK's kernel "
                           "is singular; prefer proj_dim well below the training set size")
    if train.x.dim() == 4:  # images: keep the pixels of a small gallery for the figure
        shown = min(4, len(test_index))
        arrays["gallery_test"] = pixels01(a.x_test[:shown].cpu()).numpy()
        first = tops[methods[0]][:shown, :min(k, 6)]
        arrays["gallery_train"] = pixels01(train.x.cpu()[first.reshape(-1)]).reshape(
            *first.shape, *train.x.shape[1:]).numpy()
        arrays["gallery_corrupted"] = corrupted[first].numpy()
        arrays["gallery_train_labels"] = train.y.cpu()[first].numpy()
        arrays["gallery_test_labels"] = a.y_test[:shown].cpu().numpy()
        # The paper corrupts test labels too: a test row's label may be noise as well.
        arrays["gallery_test_corrupted"] = test.corrupted.cpu()[test_index[:shown]].numpy()
    return Result({"top": top, "corrupted_in_top": per_test,
                   "agreement": agreement(tops)}, summary, arrays)


# --- figures ---------------------------------------------------------------------------------

def _image(ax, pixels: np.ndarray) -> None:
    img = np.transpose(pixels, (1, 2, 0))
    ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img.clip(0, 1),
              cmap="gray" if img.shape[-1] == 1 else None)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_attribution(result: Result, out_dir) -> list:
    s = result.summary
    per = s["per_method"]
    names = list(per)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(names, [per[n]["mean_corrupted_in_top_k"] for n in names], color="tab:blue")
    ax.axhline(s["chance_corrupted_in_top_k"], color="grey", linestyle="--",
               label=f"chance ({s['corrupted_fraction']:.0%} corrupted)")
    ax.set_xlabel("attribution method")
    ax.set_ylabel(f"corrupted rows among top {s['top_k']} (mean)")
    ax.set_title(f"Corrupted training rows among the top-{s['top_k']} influences\n"
                 f"({s['num_test']} test rows, {len(s['checkpoint_steps'])} checkpoint(s))")
    ax.legend()
    paths = [save(fig, out_dir, "corrupted_in_top_k")]
    if "gallery_test" in result.arrays:
        paths.append(_gallery(result, out_dir, names[0]))
    return paths


def _gallery(result: Result, out_dir, method: str):
    arr = result.arrays
    tests, trains = arr["gallery_test"], arr["gallery_train"]
    rows, cols = trains.shape[0], trains.shape[1] + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
    for r in range(rows):
        _image(axes[r, 0], tests[r])
        noisy = bool(arr.get("gallery_test_corrupted", np.zeros(rows, bool))[r])
        axes[r, 0].set_title(f"test, y={arr['gallery_test_labels'][r]}"
                             + (" corrupt" if noisy else ""), fontsize=8,
                             color="red" if noisy else "black")
        for c in range(1, cols):
            ax = axes[r, c]
            _image(ax, trains[r, c - 1])
            bad = bool(arr["gallery_corrupted"][r, c - 1])
            ax.set_title(f"#{c} y={arr['gallery_train_labels'][r, c - 1]}"
                         + (" corrupt" if bad else ""), fontsize=8,
                         color="red" if bad else "black")
            if bad:
                for spine in ax.spines.values():
                    spine.set_edgecolor("red")
                    spine.set_linewidth(2)
    fig.suptitle(f"Most influential training images ({method}); corrupted labels in red "
                 "(test and train)")
    return save(fig, out_dir, f"top_influences_{method}")


# --- from a run ------------------------------------------------------------------------------

def lrs_at(rows: Sequence[dict], steps: Sequence[int]) -> dict[int, float]:
    """The lr of the metrics row at each step (or the last row before it)."""
    known = sorted((int(float(r["step"])), float(r["lr"])) for r in rows
                   if r.get("lr") not in (None, ""))
    out = {}
    for step in steps:
        before = [lr for s, lr in known if s <= step]
        if before:
            out[step] = before[-1]
    return out


@ANALYSES.register("attribution", plot=plot_attribution)
def attribution_from_run(run: RunArtifacts, /, *, methods: Sequence[str] = ("trak", "tracin",
                         "grad_cosine", "knn"), num_checkpoints: Count = 4, num_test: Count = 32,
                         top_k: Count = 10, proj_dim: Optional[Count] = 512,
                         output: str = "margin", batch_size: Count = 64,
                         params: Optional[Sequence[str]] = None, lds: Optional[str] = None,
                         models: Optional[str] = None) -> Result:
    """`num_checkpoints` evenly spaced over the run (the initialization skipped), a seeded
    sample of `num_test` test rows. `models=DIR`: instead, the last checkpoint of every run
    in DIR (independently trained models of this run's kind: TRAK's recommended ensemble).
    `lds=DIR`: each method's linear datamodeling score against the subset models in DIR
    (dgrun.analysis.datamodels)."""
    from dgrun.analysis import datamodels
    from dgrun.analysis.subset_models import SubsetModels
    from dgrun.report import find_run_dirs

    b = run.bundle
    if lds is not None and b.subset is not None:
        raise UserError("lds= scores an attribution over the whole training split, but this "
                        "run trained on a subset of it", "analyse a run trained without "
                        "dataset.subset_fraction")
    subset_models = None if lds is None else SubsetModels.load(find_run_dirs([Path(lds)]))
    if models is None:
        chosen = spread(run.checkpoints, num_checkpoints, skip_init=True)
        require_checkpoints(chosen, "attribution")
        lrs = lrs_at(run.rows, [s for s, _ in chosen])
    else:
        chosen, lrs = datamodels.independent_checkpoints(find_run_dirs([Path(models)]),
                                                         run.model)
    test_indices = sample_indices(len(b.test), num_test, run.seed)
    result = attribute(run.model, chosen, b.train, b.test, prepare=b.prepare, methods=methods,
                       lrs=lrs, test_indices=test_indices, top_k=top_k, proj_dim=proj_dim,
                       seed=run.seed, output=output, batch_size=batch_size, params=params)
    if models is not None:
        result.summary["checkpoints_from"] = {"dir": models, "models": len(chosen)}
    if subset_models is not None:
        datamodels.add_lds(result, test_indices, b.train.y, subset_models)
    return result
