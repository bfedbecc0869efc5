"""Dataset cartography (Swayamdipta et al. 2020): where each training example sits in the
(variability, confidence) plane built from its training dynamics.

From the probability of the label trained on (the "gold" label of the paper; the noisy one on a
corrupted row) at each tracked evaluation, per example:
confidence = its mean, variability = its standard deviation, correctness = the fraction of
evaluations predicting it right. Regions, with the paper's reading: easy-to-learn (confident,
stable), hard-to-learn (unconfident, stable: often mislabeled), ambiguous (variable).
An example is "learned" at the first evaluation after which it is always predicted right.
The evaluation at step 0 (the untrained model) is left out, as the paper averages over epochs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from dgrun.analysis.base import ANALYSES, Result, RunArtifacts
from dgrun.analysis.options import Fraction
from dgrun.analysis.figures import plt, save
from dgrun.errors import UserError

REGIONS = ("easy-to-learn", "ambiguous", "hard-to-learn")


def learned_steps(correct: Tensor, steps: Sequence[int]) -> Tensor:
    """(N,) float: the step of the first evaluation after which each example is always
    correct (NaN if it is wrong at the last evaluation)."""
    # Suffix-AND over evaluations: 1 from the learning evaluation on, 0 before.
    always_after = correct.flip(0).long().cumprod(0).flip(0)
    run = always_after.sum(0)
    first = (len(correct) - run).clamp(max=len(correct) - 1)
    out = torch.as_tensor(list(steps), dtype=torch.float64)[first.cpu()]
    out[run.cpu() == 0] = float("nan")
    return out


def cartography(true_prob: Tensor, steps: Sequence[int], *, correct: Optional[Tensor] = None,
                corrupted: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                variability_threshold: float = 0.2, confidence_threshold: float = 0.5,
                late_quantile: float = 0.9) -> Result:
    """Data map of one run from its tracked per-example probabilities.

    true_prob: (evals, N) probability of the true label at each evaluation in `steps`.
    correct: (evals, N) bool predictions-right; without it, p > 0.5 stands in (which is
    sufficient for an argmax hit, so correctness is then a lower bound).
    Region: ambiguous if variability >= variability_threshold, else easy-to-learn if
    confidence >= confidence_threshold, else hard-to-learn. "Late" examples: learned after
    the `late_quantile` quantile of the learning steps, or never learned.

    tables: `examples` (index, label, corrupted, confidence, variability, correctness,
    learned_step, late, region), `regions` (region, count, corrupted, clean, corrupted share).
    summary: counts per region, confidence clean vs corrupted, share of corrupted rows that are
    hard-to-learn, late threshold and counts.
    """
    p = true_prob.double().cpu()
    if p.dim() != 2 or p.shape[0] != len(steps):
        raise UserError(f"true_prob must be (evaluations, examples) with one row per step, got "
                        f"shape {tuple(p.shape)} for {len(steps)} steps",
                        "pass the tracked (evals, N) probabilities and their steps")
    # The paper averages over the ends of epochs: the evaluation at step 0 is the untrained
    # model, whose guesses would count as a "learned" or "ambiguous" moment of training.
    trained = [i for i, step in enumerate(steps) if step > 0]
    if 0 < len(trained) < len(steps):
        p, steps = p[trained], [steps[i] for i in trained]
        correct = None if correct is None else correct[trained]
    if p.numel() and not (0.0 <= float(p.min()) and float(p.max()) <= 1.0 + 1e-6):
        raise UserError("true_prob holds values outside [0, 1]",
                        "pass probabilities (a compact store must be decoded first)")
    n = p.shape[1]
    right = (p > 0.5) if correct is None else correct.cpu().bool()
    corrupted = torch.zeros(n, dtype=torch.bool) if corrupted is None else corrupted.cpu().bool()
    confidence = p.mean(0)
    variability = p.std(0, unbiased=False)
    correctness = right.double().mean(0)
    learned = learned_steps(right, steps)
    done = learned[~learned.isnan()]
    late_at = float(torch.quantile(done, late_quantile)) if len(done) else float("nan")
    late = learned.isnan() | (learned > late_at)
    region = np.where(variability.numpy() >= variability_threshold, "ambiguous",
                      np.where(confidence.numpy() >= confidence_threshold, "easy-to-learn",
                               "hard-to-learn"))
    examples = pd.DataFrame({
        "index": np.arange(n),
        "label": (labels.cpu().numpy() if labels is not None else np.full(n, -1)),
        "corrupted": corrupted.numpy(), "confidence": confidence.numpy(),
        "variability": variability.numpy(), "correctness": correctness.numpy(),
        "learned_step": learned.numpy(), "late": late.numpy(), "region": region})
    regions = pd.DataFrame([{
        "region": r, "count": int((region == r).sum()),
        "corrupted": int(((region == r) & corrupted.numpy()).sum()),
        "clean": int(((region == r) & ~corrupted.numpy()).sum())} for r in REGIONS])
    regions["corrupted_share"] = regions["corrupted"] / regions["count"].where(
        regions["count"] > 0)
    bad, good = corrupted.numpy(), ~corrupted.numpy()
    summary = {
        "num_examples": n, "num_evaluations": len(steps),
        "correctness_source": "tracked" if correct is not None else "p>0.5",
        "thresholds": {"variability": variability_threshold,
                       "confidence": confidence_threshold, "late_quantile": late_quantile},
        "regions": {r: int((region == r).sum()) for r in REGIONS},
        "num_corrupted": int(bad.sum()),
        "mean_confidence_clean": float(confidence.numpy()[good].mean()) if good.any() else None,
        "mean_confidence_corrupted": float(confidence.numpy()[bad].mean()) if bad.any() else None,
        "corrupted_hard_to_learn_share":
            float((region[bad] == "hard-to-learn").mean()) if bad.any() else None,
        "clean_hard_to_learn_share":
            float((region[good] == "hard-to-learn").mean()) if good.any() else None,
        "late_step_threshold": late_at, "num_late": int(late.sum()),
        "num_never_learned": int(learned.isnan().sum()),
        "late_corrupted_share": float(bad[late.numpy()].mean()) if late.any() else None,
        "latest_learned": examples.sort_values("learned_step", ascending=False,
                                               na_position="first")["index"].head(20).tolist(),
    }
    return Result({"examples": examples, "regions": regions}, summary,
                  {"steps": np.asarray(list(steps), dtype=float)})


def plot_cartography(result: Result, out_dir) -> list:
    ex = result.tables["examples"]
    s = result.summary
    fig, ax = plt.subplots(figsize=(6.5, 5))
    clean = ex[~ex["corrupted"]]
    sc = ax.scatter(clean["variability"], clean["confidence"], c=clean["correctness"],
                    cmap="viridis", vmin=0, vmax=1, s=8, alpha=0.7, label="clean")
    bad = ex[ex["corrupted"]]
    if len(bad):
        ax.scatter(bad["variability"], bad["confidence"], s=22, facecolors="none",
                   edgecolors="red", linewidths=0.9, label="corrupted")
    t = s["thresholds"]
    ax.axvline(t["variability"], color="grey", linestyle=":", linewidth=1)
    ax.plot([0, t["variability"]], [t["confidence"]] * 2, color="grey", linestyle=":",
            linewidth=1)
    box = {"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1}
    ax.text(0.01, 0.99, "easy-to-learn", transform=ax.transAxes, va="top", fontsize=8,
            bbox=box)
    ax.text(0.01, 0.01, "hard-to-learn", transform=ax.transAxes, fontsize=8, bbox=box)
    ax.text(0.99, 0.99, "ambiguous", transform=ax.transAxes, ha="right", va="top",
            fontsize=8, bbox=box)
    fig.colorbar(sc, ax=ax, label="correctness (fraction of evaluations right)")
    ax.set_xlabel("variability (std of p(label trained on))")
    ax.set_ylabel("confidence (mean p(label trained on))")
    ax.set_xlim(-0.01, max(0.5, float(ex["variability"].max()) + 0.02))
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Data map: {s['num_examples']} training rows, {s['num_evaluations']} "
                 "evaluations")
    ax.legend(loc="center right", fontsize=8, bbox_to_anchor=(1.0, 0.35))
    paths = [save(fig, out_dir, "data_map")]

    fig, ax = plt.subplots(figsize=(6, 4))
    learned = ex.dropna(subset=["learned_step"])
    steps = result.arrays["steps"]
    # Most rows are learned early and a few much later: a log axis once the evaluations span a
    # decade. One bin per evaluation (edges halfway between them) while that stays readable.
    log_x = len(steps) > 1 and steps[0] > 0 and steps[-1] / steps[0] >= 10
    if 1 < len(steps) <= 60:
        edges = np.concatenate([[max(steps[0] - 0.5 * (steps[1] - steps[0]), 0.5 * steps[0])],
                                (steps[1:] + steps[:-1]) / 2,
                                [steps[-1] + 0.5 * (steps[-1] - steps[-2])]])
    elif log_x:
        edges = np.geomspace(steps[0] * 0.9, steps[-1] * 1.1, 41)
    else:
        edges = np.linspace(steps[0], steps[-1] + 1, 41)
    never = ex[ex["learned_step"].isna()]
    for flag, name, color in ((False, "clean", "tab:blue"), (True, "corrupted", "tab:red")):
        part = learned[learned["corrupted"] == flag]["learned_step"]
        missing = int((never["corrupted"] == flag).sum())
        if len(part) or missing:
            ax.hist(part, bins=edges, alpha=0.6, color=color,
                    label=f"{name} ({missing} never learned)")
    ax.axvline(s["late_step_threshold"], color="grey", linestyle="--",
               label=f"late: after step {s['late_step_threshold']:g}")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel("step after which the example is always predicted right")
    ax.set_ylabel("training rows")
    ax.set_title(f"When examples are learned ({s['num_never_learned']} never learned)")
    ax.legend(fontsize=8)
    paths.append(save(fig, out_dir, "learned_step"))
    return paths


@ANALYSES.register("cartography", plot=plot_cartography)
def cartography_from_run(run: RunArtifacts, /, *, variability_threshold: Fraction = 0.2,
                         confidence_threshold: Fraction = 0.5,
                         late_quantile: Fraction = 0.9) -> Result:
    if run.examples is None:
        raise UserError("this run did not track per-example probabilities",
                        "train it again with trainer.track_examples=true")
    train = run.bundle.train
    return cartography(run.examples.true_prob, run.examples.steps, correct=run.examples.correct,
                       corrupted=train.corrupted, labels=train.y,
                       variability_threshold=variability_threshold,
                       confidence_threshold=confidence_threshold, late_quantile=late_quantile)
