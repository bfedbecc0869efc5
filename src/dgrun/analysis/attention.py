"""Attention maps over checkpoints, and the Fourier view of a modular-arithmetic embedding.

Attention: for a transformer exposing `attention_maps(x) -> (layers, batch, heads, T, T)`,
the per-head patterns on a few inputs at each checkpoint, their mean over the batch, and the
entropy of the last position's attention (the position the model predicts from).

Fourier (Nanda et al. 2023, "Progress measures for grokking via mechanistic
interpretability"): the first p rows of `model.token_embedding.weight` (the numbers 0..p-1)
written in the real Fourier basis of Z_p (a constant, then cos and sin of 2 pi k x / p for
k = 1..p//2, each unit norm). The norm per frequency k is the length of the embedding's
cos-k and sin-k components together. After grokking a sparse set of key frequencies carries
almost all of it; here they are the fewest frequencies holding `energy` of the squared norm
outside the constant term.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from matplotlib.ticker import MaxNLocator
import pandas as pd
import torch
from torch import Tensor, nn

from dgrun.analysis.base import (ANALYSES, Checkpoint, Result, RunArtifacts, kept_weights, load,
                                 model_device, require_checkpoints, spread)
from dgrun.analysis.options import Count, Fraction
from dgrun.analysis.figures import mark_steps, plt, save
from dgrun.analysis.dynamics import marks_from_summary
from dgrun.errors import UserError
from dgrun.probes.attention_heads import last_position_statistics


# --- Fourier view ----------------------------------------------------------------------------

# The basis, per-frequency norms and key frequencies are shared with the modular_progress probe.
from dgrun.probes.fourier import (fourier_basis, frequency_norms,  # noqa: E402,F401
                                  key_frequencies)


def embedding_of(model: nn.Module, p: int) -> Tensor:
    emb = getattr(model, "token_embedding", None)
    if emb is None or not hasattr(emb, "weight"):
        raise UserError("the model has no token_embedding for the Fourier view",
                        "use a token model (model=transformer) on modular arithmetic")
    if emb.weight.shape[0] < p:
        raise UserError(f"the token embedding has {emb.weight.shape[0]} rows, fewer than p={p}",
                        "pass the modulus p of the dataset")
    return emb.weight[:p]


def fourier_over_checkpoints(model: nn.Module, checkpoints: Sequence[Checkpoint], p: int, *,
                             energy: float = 0.9) -> Result:
    """Norm per frequency of the embedding at each checkpoint, and its key frequencies.

    tables: `frequencies` (step, frequency, norm, share of the squared norm),
    `key_frequencies` (step, count, frequencies, share they hold).
    summary: the last checkpoint's key frequencies, how many, and their share of the norm.
    """
    require_checkpoints(checkpoints, "the Fourier view")
    freq_rows, key_rows = [], []
    with kept_weights(model):
        for step, state in checkpoints:
            norms = frequency_norms(embedding_of(load(model, state), p))
            share = norms.pow(2) / norms.pow(2).sum().clamp_min(1e-30)
            keys = key_frequencies(norms, energy)
            freq_rows.append(pd.DataFrame({"step": step, "frequency": np.arange(1, len(norms) + 1),
                                           "norm": norms.numpy(), "share": share.numpy()}))
            key_rows.append({"step": step, "count": len(keys),
                             "frequencies": " ".join(map(str, keys)),
                             "share": float(share[torch.tensor(keys) - 1].sum())})
    keys = key_rows[-1]
    summary = {"p": p, "energy": energy, "num_frequencies": p // 2,
               "key_frequencies": [int(k) for k in keys["frequencies"].split()],
               "num_key_frequencies": keys["count"], "key_share": keys["share"],
               "num_key_frequencies_first": key_rows[0]["count"]}
    return Result({"frequencies": pd.concat(freq_rows, ignore_index=True),
                   "key_frequencies": pd.DataFrame(key_rows)}, summary)


# --- attention maps --------------------------------------------------------------------------

@torch.no_grad()
def attention_over_checkpoints(model: nn.Module, checkpoints: Sequence[Checkpoint],
                               x: Tensor) -> Result:
    """Per-head attention on token rows `x` (B, T) at each checkpoint.

    tables: `heads` (step, layer, head, entropy of the last position's attention in nats,
    and its weight on each key position as columns key_0..key_{T-1}; means over the batch).
    arrays: `maps` (checkpoints, layers, heads, T, T), batch means.
    """
    require_checkpoints(checkpoints, "the attention analysis")
    if not hasattr(model, "attention_maps"):
        raise UserError("the model exposes no attention_maps(x)",
                        "use a transformer model (model=transformer)")
    x = x.to(model_device(model))
    maps, rows = [], []
    with kept_weights(model):
        for step, state in checkpoints:
            att = load(model, state).attention_maps(x).float().cpu()  # (L, B, H, T, T)
            mean = att.mean(1)
            maps.append(mean.numpy())
            entropy, weight = last_position_statistics(att)           # (L, H), (L, H, T)
            for layer in range(att.shape[0]):
                for head in range(att.shape[2]):
                    rows.append({"step": step, "layer": layer, "head": head,
                                 "last_entropy": float(entropy[layer, head]),
                                 **{f"key_{t}": float(weight[layer, head, t])
                                    for t in range(att.shape[-1])}})
    summary = {"checkpoint_steps": [s for s, _ in checkpoints], "num_inputs": len(x),
               "layers": int(maps[0].shape[0]), "heads": int(maps[0].shape[1]),
               "seq_len": int(maps[0].shape[-1])}
    return Result({"heads": pd.DataFrame(rows)}, summary, {"maps": np.stack(maps)})


def plot_attention(result: Result, out_dir) -> list:
    paths = []
    if "maps" in result.arrays:
        maps = result.arrays["maps"]
        s = result.summary.get("attention", result.summary)
        steps = s["checkpoint_steps"]
        shown = np.unique(np.linspace(0, len(steps) - 1, min(5, len(steps))).round().astype(int))
        n_cols = s["layers"] * s["heads"]
        fig, axes = plt.subplots(len(shown), n_cols, figsize=(1.8 * n_cols + 0.6,
                                                              1.8 * len(shown)), squeeze=False)
        for i, ci in enumerate(shown):
            for layer in range(s["layers"]):
                for head in range(s["heads"]):
                    ax = axes[i, layer * s["heads"] + head]
                    im = ax.imshow(maps[ci, layer, head], cmap="viridis", vmin=0, vmax=1)
                    ax.set_xticks(range(s["seq_len"]))
                    ax.set_yticks(range(s["seq_len"]))
                    ax.tick_params(labelsize=6)
                    if i == 0:
                        ax.set_title(f"layer {layer} head {head}", fontsize=8)
                    if i == len(shown) - 1:
                        ax.set_xlabel("key position", fontsize=7)
            axes[i, 0].set_ylabel(f"step {steps[ci]}\nquery position", fontsize=7)
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.7, label="attention weight")
        fig.suptitle(f"Attention patterns, mean over {s['num_inputs']} inputs")
        paths.append(save(fig, out_dir, "attention_maps"))
    if "frequencies" in result.tables:
        paths += _plot_fourier(result, out_dir)
    if "heads" in result.tables:
        paths += _plot_head_evolution(result.tables["heads"], out_dir)
    return paths


def _plot_head_evolution(heads: pd.DataFrame, out_dir) -> list:
    """attention_heads.png: per head, the last position's entropy and its share on each
    position over the checkpoints (the attention_heads probe's columns, from checkpoints)."""
    keys = sorted((c for c in heads.columns if c.startswith("key_")), key=lambda c: int(c[4:]))
    fig, axes = plt.subplots(1 + len(keys), 1, figsize=(6.5, 2.4 * (1 + len(keys)) + 0.5),
                             sharex=True, squeeze=False)
    for (layer, head), rows in heads.groupby(["layer", "head"]):
        label = f"layer {layer} head {head}"
        axes[0, 0].plot(rows["step"], rows["last_entropy"], "o-", ms=3, label=label)
        for ax, key in zip(axes[1:, 0], keys):
            ax.plot(rows["step"], rows[key], "o-", ms=3, label=label)
    axes[0, 0].set_ylabel("entropy (nats)")
    for ax, key in zip(axes[1:, 0], keys):
        ax.set_ylabel(f"share on position {key[4:]}")
        ax.set_ylim(-0.02, 1.02)
    for ax in axes[:, 0]:
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    axes[0, 0].set_title("Last position's attention per head over checkpoints")
    axes[-1, 0].set_xlabel("checkpoint step")
    return [save(fig, out_dir, "attention_heads")]


def _plot_fourier(result: Result, out_dir) -> list:
    freqs, keys = result.tables["frequencies"], result.tables["key_frequencies"]
    s = result.summary.get("fourier", result.summary)
    steps = sorted(freqs["step"].unique())
    grid = freqs.pivot(index="frequency", columns="step", values="norm").to_numpy()
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 7), gridspec_kw={"height_ratios": [2, 1]})
    im = ax.imshow(grid, aspect="auto", origin="lower", cmap="magma",
                   extent=(-0.5, len(steps) - 0.5, 0.5, grid.shape[0] + 0.5))
    ax.set_xticks(range(len(steps)), [str(t) for t in steps], rotation=45, fontsize=7)
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel("frequency k")
    key = s["key_frequencies"]
    # Key frequencies mean something only once a few carry the norm (a sparse spectrum);
    # before that nearly every frequency is "key", and none is coloured as one.
    sparse = len(key) <= max(3, grid.shape[0] // 4)
    said = (f"key frequencies at the end: {key}" if sparse else
            f"{len(key)} of {grid.shape[0]} frequencies carry {s['energy']:.0%} (not sparse yet)")
    ax.set_title(f"Token embedding in the Fourier basis of Z_{s['p']}: norm per frequency\n"
                 + said)
    fig.colorbar(im, ax=ax, label="norm")
    ax2.plot(keys["step"], keys["count"], "o-")
    ax2.set_xlabel("step")
    ax2.set_ylabel(f"# frequencies for {s['energy']:.0%}\nof the squared norm")
    ax2.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set_ylim(0, grid.shape[0] + 1)  # against all p//2 frequencies, not stretched from 49 to 50
    ax2.grid(alpha=0.3)
    marks = result.summary.get("marks") or []
    if marks:
        mark_steps(ax2, marks)
        ax2.legend(fontsize=7)
    fig.tight_layout()
    paths = [save(fig, out_dir, "fourier_embedding")]
    last = freqs[freqs["step"] == steps[-1]]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(last["frequency"], last["norm"], color=["tab:red" if sparse and f in key
                                                  else "tab:blue" for f in last["frequency"]])
    ax.set_xlabel("frequency k")
    ax.set_ylabel("norm")
    ax.set_title(f"Embedding norm per frequency at step {steps[-1]} "
                 + ("(key frequencies in red)" if sparse else "(no sparse set of key "
                                                              "frequencies yet)"))
    paths.append(save(fig, out_dir, "fourier_last"))
    return paths


@ANALYSES.register("attention", plot=plot_attention)
def attention_from_run(run: RunArtifacts, /, *, num_checkpoints: Count = 12,
                       num_inputs: Count = 64, p: Optional[Count] = None,
                       energy: Fraction = 0.9) -> Result:
    """Attention maps when the model has attention_maps; the Fourier view when it has a
    token_embedding (p defaults to the dataset's meta.extra['p'], else its class count)."""
    b, model = run.bundle, run.model
    chosen = spread(run.checkpoints, num_checkpoints)
    tables, summary, arrays = {}, {}, {}
    if hasattr(model, "attention_maps"):
        att = attention_over_checkpoints(model, chosen, b.test.x[:num_inputs])
        tables.update(att.tables)
        arrays.update(att.arrays)
        summary["attention"] = att.summary
    if hasattr(model, "token_embedding"):
        p = p or b.meta.extra.get("p") or b.meta.num_classes
        four = fourier_over_checkpoints(model, run.checkpoints, int(p), energy=energy)
        tables.update(four.tables)
        summary["fourier"] = four.summary
        summary["marks"] = run.marks if run.marks is not None else marks_from_summary(
            run.summary)
    if not summary:
        raise UserError("the model has neither attention_maps nor a token_embedding",
                        "use a transformer model (model=transformer)")
    return Result(tables, summary, arrays)
