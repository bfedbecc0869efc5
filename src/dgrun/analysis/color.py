"""Colour bias of an image dataset: what colour alone says about the label.

Per image: mean and std of R, G, B, mean saturation and value, and a hue histogram weighted by
saturation (grey pixels have no hue to speak of). Per class: those statistics averaged. Then a
colour-only classifier (standardized logistic regression on these features, fitted on train,
scored on test): its per-class recall and precision say which classes colour alone separates
(both at least `threshold`) — the shortcut a model can take instead of shape (Colored MNIST,
Waterbirds' backgrounds).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import precision_recall_fscore_support
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from matplotlib.colors import hsv_to_rgb
from torch import Tensor

from dgrun.analysis.base import ANALYSES, Result, RunArtifacts, batched, pixels01, sample_indices
from dgrun.analysis.options import Count, Fraction
from dgrun.analysis.figures import plt, save
from dgrun.data.bundle import Split
from dgrun.errors import UserError


def rgb_to_hsv(rgb: Tensor) -> Tensor:
    """(N, 3, H, W) RGB in [0, 1] -> (N, 3, H, W) HSV, hue in [0, 1)."""
    r, g, b = rgb.unbind(1)
    value, arg = rgb.max(1)
    chroma = value - rgb.min(1).values
    safe = chroma.clamp_min(1e-12)
    hue = torch.where(arg == 0, ((g - b) / safe) % 6,
                      torch.where(arg == 1, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    hue = torch.where(chroma > 0, hue, torch.zeros_like(hue))
    saturation = torch.where(value > 0, chroma / value.clamp_min(1e-12), torch.zeros_like(value))
    return torch.stack([hue % 1.0, saturation, value], 1)


def color_features(x: Tensor, bins: int = 12, batch_size: int = 2048) -> Tensor:
    """(N, 8 + bins): mean RGB, std RGB, mean saturation, mean value, and the
    saturation-weighted hue histogram (sums to the mean saturation)."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise UserError(f"colour analysis needs RGB images (N, 3, H, W), got shape "
                        f"{tuple(x.shape)}", "analyze a colour image dataset")
    out = []
    for s in batched(len(x), batch_size):
        rgb = pixels01(x[s])
        hsv = rgb_to_hsv(rgb)
        hue_bin = (hsv[:, 0] * bins).long().clamp(max=bins - 1).flatten(1)   # (B, HW)
        weight = hsv[:, 1].flatten(1) / hue_bin.shape[1]
        hist = torch.zeros(len(rgb), bins, device=rgb.device).scatter_add_(1, hue_bin, weight)
        out.append(torch.cat([rgb.mean((2, 3)), rgb.std((2, 3)), hsv[:, 1:].mean((2, 3)), hist],
                             1).cpu())
    return torch.cat(out)


FEATURE_NAMES = ["mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b", "saturation", "value"]


def color_bias(train: Split, test: Optional[Split] = None, *, bins: int = 12,
               threshold: float = 0.9, class_names: Optional[Sequence[str]] = None,
               seed: int = 0, max_rows: Optional[int] = None) -> Result:
    """Colour statistics per class and a colour-only classifier's per-class accuracy.

    Without `test`, a seeded quarter of `train` is held out for scoring. `max_rows` caps the
    rows used from each split (a seeded sample).
    tables: `class_colors` (class, name, count, the features' class means, dominant hue),
    `hue_histograms` (class, bin, hue_from, hue_to, weight), `color_classifier` (class, name,
    recall, precision, support, separable).
    summary: overall colour-only test accuracy, chance, the separable classes.
    """
    tr = sample_indices(len(train), max_rows, seed)
    f_train, y_train = color_features(train.x[tr.to(train.x.device)], bins), train.y.cpu()[tr]
    if test is None:
        perm = torch.randperm(len(tr), generator=torch.Generator().manual_seed(seed))
        cut = len(tr) // 4
        f_test, y_test = f_train[perm[:cut]], y_train[perm[:cut]]
        f_train, y_train = f_train[perm[cut:]], y_train[perm[cut:]]
        scored_on = "held-out quarter of train"
    else:
        te = sample_indices(len(test), max_rows, seed + 1)
        f_test, y_test = color_features(test.x[te.to(test.x.device)], bins), test.y.cpu()[te]
        scored_on = "test"
    classes = torch.unique(torch.cat([y_train, y_test])).tolist()
    names = {c: (class_names[c] if class_names and c < len(class_names) else str(c))
             for c in classes}
    hue_names = [f"hue_{i}" for i in range(bins)]
    frame = pd.DataFrame(f_train.numpy(), columns=FEATURE_NAMES + hue_names)
    frame["class"] = y_train.numpy()
    means = frame.groupby("class").mean().reset_index()
    means.insert(1, "name", means["class"].map(names))
    means.insert(2, "count", frame.groupby("class").size().to_numpy())
    hist = means[hue_names].to_numpy()
    means["dominant_hue"] = (hist.argmax(1) + 0.5) / bins
    histograms = pd.DataFrame([{"class": c, "bin": i, "hue_from": i / bins,
                                "hue_to": (i + 1) / bins, "weight": float(hist[k, i])}
                               for k, c in enumerate(means["class"]) for i in range(bins)])
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    clf.fit(f_train.numpy(), y_train.numpy())
    pred = clf.predict(f_test.numpy())
    precision, recall, _, support = precision_recall_fscore_support(
        y_test.numpy(), pred, labels=classes, zero_division=0)
    per_class = pd.DataFrame({"class": classes, "name": [names[c] for c in classes],
                              "recall": recall, "precision": precision, "support": support})
    per_class["separable"] = (per_class["recall"] >= threshold) & \
        (per_class["precision"] >= threshold)
    counts = np.bincount(y_test.numpy(), minlength=max(classes) + 1)
    summary = {"accuracy": float((pred == y_test.numpy()).mean()),
               "majority_baseline": float(counts.max() / counts.sum()),
               "chance": 1.0 / len(classes), "threshold": threshold, "scored_on": scored_on,
               "separable_classes": per_class.loc[per_class["separable"], "class"].tolist(),
               "num_train": len(y_train), "num_test": len(y_test), "bins": bins}
    return Result({"class_colors": means, "hue_histograms": histograms,
                   "color_classifier": per_class}, summary)


def plot_color(result: Result, out_dir) -> list:
    means, hist = result.tables["class_colors"], result.tables["hue_histograms"]
    per, s = result.tables["color_classifier"], result.summary
    n = len(means)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 0.9 * n + 5), 3.8 + 0.05 * n))
    rgb = means[["mean_r", "mean_g", "mean_b"]].to_numpy()
    # Shown brightened to full value so the hue reads; the bar height is the real brightness.
    shown = rgb / np.maximum(rgb.max(1, keepdims=True), 1e-6)
    ax1.bar(range(n), rgb.mean(1), color=shown, edgecolor="black")
    ax1.set_xticks(range(n), means["name"], rotation=45 if n > 6 else 0, fontsize=8)
    ax1.set_xlabel("class")
    ax1.set_ylabel("mean brightness (bar colour: mean RGB)")
    ax1.set_title("Mean colour per class (train split)")
    colors = ["tab:green" if v else "tab:gray" for v in per["separable"]]
    ax2.bar(range(len(per)), per["recall"], color=colors)
    ax2.axhline(s["threshold"], color="black", linestyle="--", linewidth=1,
                label=f"separable threshold {s['threshold']:.2f}")
    ax2.axhline(s["chance"], color="grey", linestyle=":", label="chance")
    ax2.set_xticks(range(len(per)), per["name"], rotation=45 if n > 6 else 0, fontsize=8)
    ax2.set_ylim(0, 1.02)
    ax2.set_xlabel("class")
    ax2.set_ylabel("recall of a colour-only classifier")
    ax2.set_title(f"Colour alone, fitted on train: {s['accuracy']:.0%} accuracy on "
                  f"{s['scored_on']}", fontsize=10)
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    paths = [save(fig, out_dir, "color_by_class")]

    bins = int(hist["bin"].max()) + 1
    grid = hist.pivot(index="class", columns="bin", values="weight").to_numpy()
    fig, ax = plt.subplots(figsize=(7, 0.35 * n + 1.8))
    im = ax.imshow(grid, aspect="auto", cmap="Greys")
    ax.set_yticks(range(n), means["name"], fontsize=8)
    ax.set_xticks(range(bins), [f"{(i + 0.5) / bins * 360:.0f}" for i in range(bins)],
                  fontsize=7)
    for i in range(bins):  # a strip of the hue itself above each column
        hue_rgb = hsv_to_rgb([(i + 0.5) / bins, 1, 1])
        ax.add_patch(plt.Rectangle((i - 0.5, -1.1), 1, 0.5, color=hue_rgb, clip_on=False))
    ax.set_ylim(n - 0.5, -1.2)
    ax.set_xlabel("hue (degrees)")
    ax.set_ylabel("class")
    ax.set_title("Saturation-weighted hue histogram per class (train split)")
    fig.colorbar(im, ax=ax, label="mean weight")
    paths.append(save(fig, out_dir, "hue_histograms"))
    return paths


@ANALYSES.register("color", plot=plot_color)
def color_from_run(run: RunArtifacts, /, *, bins: Count = 12, threshold: Fraction = 0.9,
                   max_rows: Optional[Count] = 20000) -> Result:
    b = run.bundle
    return color_bias(b.train, b.test, bins=bins, threshold=threshold,
                      class_names=b.meta.class_names, seed=run.seed, max_rows=max_rows)
