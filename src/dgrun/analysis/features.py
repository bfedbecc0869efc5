"""Penultimate features over training: PCA / t-SNE views and linear-probe accuracy.

The penultimate features are the input of the model's last nn.Linear (the one its forward pass
calls last), caught with a forward hook, so any classifier with a linear head works unchanged;
a model whose head is a raw parameter (quadratic_mlp) says what they are with `penultimate(x)`.
A linear probe (logistic regression fitted on train features, scored on test features) asks
how linearly decodable the labels are at each checkpoint, apart from the head the model has.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.manifold import TSNE
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn

from dgrun.analysis.base import (ANALYSES, Checkpoint, Result, RunArtifacts, batched, kept_weights,
                                 last_module_called, load, model_device, require_checkpoints,
                                 sample_indices, spread)
from dgrun.analysis.options import Count, Positive
from dgrun.analysis.figures import plt, save
from dgrun.data.bundle import Split
from dgrun.plots import looks_log_spaced


@torch.no_grad()
def penultimate_features(model: nn.Module, x: Tensor,
                         prepare: Callable[[Tensor], Tensor] = lambda t: t,
                         batch_size: int = 1024, return_logits: bool = False):
    """(N, D) float inputs of the last nn.Linear called on stored rows `x` (eval mode);
    with return_logits, also the (N, classes) logits of the same pass."""
    model.eval()
    device = model_device(model)
    if callable(getattr(model, "penultimate", None)):
        feats, logits = [], []
        for s in batched(len(x), batch_size):
            inputs = prepare(x[s].to(device))
            feats.append(model.penultimate(inputs).reshape(len(inputs), -1).float())
            logits.append(model(inputs).float())
        out = torch.cat(feats)
        return (out, torch.cat(logits)) if return_logits else out
    _, head = last_module_called(model, prepare(x[:1].to(device)), nn.Linear)
    caught: list[Tensor] = []
    hook = head.register_forward_hook(lambda m, inputs, out: caught.append(inputs[0]))
    feats, logits = [], []
    try:
        for s in batched(len(x), batch_size):
            caught.clear()
            logits.append(model(prepare(x[s].to(device))).float())
            # A transformer head sees (B, d) at the last position; keep whatever it saw, flat.
            feats.append(caught[-1].reshape(len(logits[-1]), -1).float())
    finally:
        hook.remove()
    out = torch.cat(feats)
    return (out, torch.cat(logits)) if return_logits else out


def linear_probe(train_f: np.ndarray, train_y: np.ndarray, test_f: np.ndarray,
                 test_y: np.ndarray, *, C: float = 1.0, seed: int = 0) -> tuple[float, float]:
    """(train accuracy, test accuracy) of a standardized logistic regression."""
    if len(np.unique(train_y)) < 2:
        return float("nan"), float("nan")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000,
                                                             random_state=seed))
    clf.fit(train_f, train_y)
    return float(clf.score(train_f, train_y)), float(clf.score(test_f, test_y))


def feature_dynamics(model: nn.Module, checkpoints: Sequence[Checkpoint], train: Split,
                     test: Split, *, prepare: Callable[[Tensor], Tensor] = lambda t: t,
                     train_indices: Optional[Tensor] = None,
                     test_indices: Optional[Tensor] = None, tsne: bool = False,
                     probe_C: float = 1.0, seed: int = 0) -> Result:
    """At each checkpoint: penultimate features of the chosen rows, a linear probe, PCA
    (fitted on the train features) and optionally t-SNE of train and test rows together.

    tables: `probe` (step, probe_train_acc, probe_test_acc, model_train_acc, model_test_acc,
    feature_dim, pca_explained_2), `embedding` (step, split, index, label, corrupted, pc1,
    pc2[, tsne1, tsne2]). summary: final and best probe test accuracy and their steps.
    """
    require_checkpoints(checkpoints, "the features analysis")
    tr = torch.arange(len(train)) if train_indices is None else train_indices.cpu()
    te = torch.arange(len(test)) if test_indices is None else test_indices.cpu()
    xtr, ytr = train.x[tr.to(train.x.device)], train.y.cpu()[tr].numpy()
    xte, yte = test.x[te.to(test.x.device)], test.y.cpu()[te].numpy()
    corrupted = train.corrupted.cpu()[tr].numpy()
    probe_rows, embed = [], []
    with kept_weights(model):
        for step, state in checkpoints:
            load(model, state)
            ftr, ltr = penultimate_features(model, xtr, prepare, return_logits=True)
            fte, lte = penultimate_features(model, xte, prepare, return_logits=True)
            ftr, fte = ftr.cpu().numpy(), fte.cpu().numpy()
            p_train, p_test = linear_probe(ftr, ytr, fte, yte, C=probe_C, seed=seed)
            # Collapsed features (a dead layer) have nothing to embed; sklearn's t-SNE even
            # crashes the process on identical points (PCA init divides by a zero std).
            flat = float(np.ptp(np.concatenate([ftr, fte]), axis=0).max()) < 1e-12
            pca = None if flat else PCA(n_components=2, random_state=seed).fit(ftr)
            probe_rows.append({
                "step": step, "probe_train_acc": p_train, "probe_test_acc": p_test,
                "model_train_acc": float((ltr.argmax(1).cpu().numpy() == ytr).mean()),
                "model_test_acc": float((lte.argmax(1).cpu().numpy() == yte).mean()),
                "feature_dim": ftr.shape[1],
                "pca_explained_2": (float("nan") if flat
                                    else float(pca.explained_variance_ratio_.sum()))})
            both = np.concatenate([ftr, fte])
            frame = pd.DataFrame({
                "step": step, "split": ["train"] * len(ftr) + ["test"] * len(fte),
                "index": np.concatenate([tr.numpy(), te.numpy()]),
                "label": np.concatenate([ytr, yte]),
                "corrupted": np.concatenate([corrupted, np.zeros(len(fte), bool)])})
            frame[["pc1", "pc2"]] = np.zeros((len(both), 2)) if flat else pca.transform(both)
            if tsne and flat:
                frame[["tsne1", "tsne2"]] = np.zeros((len(both), 2))
            elif tsne:
                perplexity = float(min(30, max(2, (len(both) - 1) // 3)))
                frame[["tsne1", "tsne2"]] = TSNE(n_components=2, perplexity=perplexity,
                                                 init="pca", random_state=seed
                                                 ).fit_transform(both)
            embed.append(frame)
    probe = pd.DataFrame(probe_rows)
    best = int(probe["probe_test_acc"].fillna(-1).idxmax())
    summary = {"checkpoint_steps": [s for s, _ in checkpoints], "num_train": len(tr),
               "num_test": len(te),
               "final_probe_test_acc": probe["probe_test_acc"].iloc[-1],
               "final_model_test_acc": probe["model_test_acc"].iloc[-1],
               "best_probe_test_acc": probe["probe_test_acc"].iloc[best],
               "best_probe_step": int(probe["step"].iloc[best]), "tsne": tsne}
    return Result({"probe": probe, "embedding": pd.concat(embed, ignore_index=True)}, summary)


def plot_features(result: Result, out_dir) -> list:
    probe, embed = result.tables["probe"], result.tables["embedding"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(probe["step"], probe["probe_test_acc"], "o-", label="linear probe, test")
    ax.plot(probe["step"], probe["probe_train_acc"], "o--", label="linear probe, train")
    ax.plot(probe["step"], probe["model_test_acc"], "s-", label="model head, test")
    if looks_log_spaced(probe["step"].tolist()):  # snapshots=log keeps log-spaced checkpoints
        ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Linear-probe accuracy of penultimate features")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    paths = [save(fig, out_dir, "linear_probe")]
    for kind in ("pc", "tsne"):
        if f"{kind}1" in embed:
            paths.append(_scatter_grid(embed, kind, out_dir))
    return paths


def _scatter_grid(embed: pd.DataFrame, kind: str, out_dir):
    steps = sorted(embed["step"].unique())
    steps = [steps[i] for i in np.unique(np.linspace(0, len(steps) - 1, min(6, len(steps)))
                                         .astype(int))]
    # Panels in rows of three (six side by side made a 2292x405 strip).
    cols = min(3, len(steps))
    rows = -(-len(steps) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols + 1.4, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(steps):]:
        ax.set_visible(False)
    labels = sorted(embed["label"].unique())
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "viridis")
    color = {lab: cmap(i % 10 if len(labels) <= 10 else i / max(1, len(labels) - 1))
             for i, lab in enumerate(labels)}
    for ax, step in zip(axes.flat, steps):
        d = embed[embed["step"] == step]
        for split, marker in (("train", "o"), ("test", "^")):
            part = d[(d["split"] == split) & ~d["corrupted"].astype(bool)]
            ax.scatter(part[f"{kind}1"], part[f"{kind}2"], s=3, marker=marker, alpha=0.4,
                       linewidths=0, c=[color[v] for v in part["label"]])
        bad = d[d["corrupted"].astype(bool)]
        if len(bad):
            ax.scatter(bad[f"{kind}1"], bad[f"{kind}2"], s=14, marker="x", c="black",
                       linewidths=0.8)
        ax.set_title(f"step {step}", fontsize=9)
        ax.set_xlabel(f"{kind}1")
        ax.set_ylabel(f"{kind}2")
    if len(labels) <= 10:
        handles = [plt.Line2D([], [], marker="o", linestyle="", color=color[lab],
                              label=f"label {lab}") for lab in labels]
        axes[0, cols - 1].legend(handles=handles, fontsize=7, loc="upper left",
                                 bbox_to_anchor=(1.02, 1.0))
    name = "PCA" if kind == "pc" else "t-SNE"
    fig.suptitle(f"Penultimate features ({name}): o train, ^ test, x corrupted train rows")
    fig.tight_layout()
    return save(fig, out_dir, f"features_{'pca' if kind == 'pc' else 'tsne'}")


@ANALYSES.register("features", plot=plot_features)
def features_from_run(run: RunArtifacts, /, *, num_checkpoints: Count = 8,
                      num_train: Count = 2000, num_test: Count = 2000, tsne: bool = False,
                      probe_C: Positive = 1.0) -> Result:
    b = run.bundle
    return feature_dynamics(run.model, spread(run.checkpoints, num_checkpoints), b.train, b.test,
                            prepare=b.prepare,
                            train_indices=sample_indices(len(b.train), num_train, run.seed),
                            test_indices=sample_indices(len(b.test), num_test, run.seed + 1),
                            tsne=tsne, probe_C=probe_C, seed=run.seed)
