"""Attribution across a transition, and attribution by group.

transition: the same attribution method on checkpoints just before and just after a detected
step (grokking's generalization step, the worst-group catch-up, an abrupt transition), scored
on the same test rows; each training row's influence on them, before and after, and the rows
whose influence changes most.

bias: influence aggregated by group (Split.group, e.g. (label, spurious attribute) pairs):
how much each training group supports each test group, and the training rows that push
hardest against the worst test group (the ones teaching the spurious shortcut).
"""
from __future__ import annotations

import re
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from dgrun.analysis.attribution import Attribution, METHODS, lrs_at
from dgrun.analysis.base import (ANALYSES, Checkpoint, Result, RunArtifacts, kept_weights, load,
                                 pixels01, predict, require_checkpoints, sample_indices, spread)
from dgrun.analysis.options import Count, Index
from dgrun.analysis.figures import plt, save
from dgrun.data.bundle import Split
from dgrun.errors import UserError

# Where detected transition steps live in summary.json, in the order they are tried.
STEP_KEYS = ("grokking.generalization_step", "groups.worst_group_catch_up_step",
             "transitions.test_acc_step", "transitions.train_acc_step")


def find_step(summary: dict, keys: Sequence[str] = STEP_KEYS) -> tuple[Optional[int], str]:
    """The first `section.field` of `keys` holding a step in the summary, and its key."""
    for key in keys:
        node = summary
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, (int, float)) and not isinstance(node, bool):
            return int(node), key
    return None, ""


def around(checkpoints: Sequence[Checkpoint], step: int,
           window: int = 1) -> tuple[list[Checkpoint], list[Checkpoint]]:
    """The `window` checkpoints at or before `step`, and the `window` after it."""
    before = [c for c in checkpoints if c[0] <= step][-window:]
    after = [c for c in checkpoints if c[0] > step][:window]
    if not before or not after:
        have = [s for s, _ in checkpoints]
        raise UserError(f"no checkpoints on both sides of step {step} (the run kept {have})",
                        "keep checkpoints along training (trainer.checkpoint_every=N) or pick "
                        "another step")
    return before, after


def transition_attribution(model: nn.Module, checkpoints: Sequence[Checkpoint], train: Split,
                           test: Split, *, step: int, window: int = 1, method: str = "trak",
                           prepare: Callable[[Tensor], Tensor] = lambda t: t,
                           lrs: Optional[Mapping[int, float]] = None,
                           test_indices: Optional[Tensor] = None, flipped_only: bool = True,
                           top_k: int = 20, proj_dim: Optional[int] = 512, seed: int = 0,
                           output: str = "margin", batch_size: int = 64) -> Result:
    """Influence of every training row on the chosen test rows, before vs after `step`.

    Test rows: `test_indices` (default all); with `flipped_only`, those of them the model gets
    wrong before and right after the step, when there are any (what the transition taught).
    Influence of a training row = its mean score over those test rows.

    tables: `changes` (train_index, label, corrupted, group, before, after, change, rank by
    |change|). summary: the step, the checkpoints used, the test selection, the top rows.
    """
    METHODS.get(method)
    before, after = around(checkpoints, step, window)
    idx = torch.arange(len(test)) if test_indices is None else test_indices.cpu()
    selection = "all chosen"
    if flipped_only:
        right = []
        with kept_weights(model):
            for state in (before[-1][1], after[0][1]):
                logits = predict(load(model, state), test.x[idx.to(test.x.device)], prepare)
                right.append(logits.argmax(1).cpu() == test.y.cpu()[idx])
        flipped = ~right[0] & right[1]
        if flipped.any():
            idx, selection = idx[flipped], "wrong before, right after"
    x_test = test.x[idx.to(test.x.device)]
    y_test = test.y[idx.to(test.y.device)]
    sides = {}
    for name, chosen in (("before", before), ("after", after)):
        a = Attribution(model, chosen, train.x, train.y, x_test, y_test, prepare=prepare,
                        lrs=lrs, proj_dim=proj_dim, seed=seed, output=output,
                        batch_size=batch_size)
        sides[name] = a.scores(method).mean(0)
    change = sides["after"] - sides["before"]
    order = change.abs().argsort(descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, len(order) + 1)
    table = pd.DataFrame({
        "train_index": np.arange(len(train)), "label": train.y.cpu().numpy(),
        "corrupted": train.corrupted.cpu().numpy(),
        "group": (train.group.cpu().numpy() if train.group is not None
                  else np.full(len(train), -1)),
        "before": sides["before"].numpy(), "after": sides["after"].numpy(),
        "change": change.numpy(), "rank": rank.numpy()}).sort_values("rank")
    top = table.head(top_k)
    # The rows themselves, for the figure: who they are matters more than their index.
    shown = torch.tensor(top.head(SHOWN)["train_index"].tolist(), dtype=torch.long)
    rows = train.x.cpu()[shown]
    arrays = {"top_x": (pixels01(rows) if rows.dim() == 4 else rows).numpy()}
    summary = {"step": step, "method": method,
               "before_steps": [s for s, _ in before], "after_steps": [s for s, _ in after],
               "test_selection": selection, "num_test": len(idx),
               "top_changed": top["train_index"].tolist(),
               "top_changed_corrupted": int(top["corrupted"].sum()),
               "corrupted_fraction": float(train.corrupted.float().mean()),
               "correlation_before_after": float(np.corrcoef(sides["before"].numpy(),
                                                             sides["after"].numpy())[0, 1])}
    return Result({"changes": table}, summary, arrays)


SHOWN = 10  # the largest changes drawn, numbered, with the rows themselves beside them


def plot_transition(result: Result, out_dir) -> list:
    t, s = result.tables["changes"], result.summary
    top = t.head(SHOWN)
    shown = result.arrays.get("top_x")
    fig = plt.figure(figsize=(11, 5))
    grid = fig.add_gridspec(2, 7)
    ax = fig.add_subplot(grid[:, :4])
    clean, bad = t[~t["corrupted"]], t[t["corrupted"]]
    ax.scatter(clean["before"], clean["after"], s=6, alpha=0.5, label="clean")
    if len(bad):
        ax.scatter(bad["before"], bad["after"], s=10, color="red", alpha=0.7, label="corrupted")
    ax.scatter(top["before"], top["after"], s=40, facecolors="none", edgecolors="black",
               label=f"the {len(top)} largest changes (numbered, shown right)")
    for rank, (_, r) in enumerate(top.iterrows(), start=1):
        ax.annotate(str(rank), (r["before"], r["after"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    if shown is not None:
        _show_rows(fig, grid, top, shown)
    lo = float(min(t["before"].min(), t["after"].min()))
    hi = float(max(t["before"].max(), t["after"].max()))
    ax.plot([lo, hi], [lo, hi], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel(f"influence before (steps {s['before_steps']})")
    ax.set_ylabel(f"influence after (steps {s['after_steps']})")
    ax.set_title(f"{s['method']} influence across step {s['step']}\n"
                 f"on {s['num_test']} test rows ({s['test_selection']})")
    ax.legend(fontsize=8)
    return [save(fig, out_dir, "influence_change")]


def _show_rows(fig, grid, top: pd.DataFrame, rows: np.ndarray) -> None:
    """The numbered rows: thumbnails for images, the tokens for sequences (an (a, b) pair of a
    modular task), the label either way; corrupted labels in red."""
    labels = [(int(r["label"]), bool(r["corrupted"])) for _, r in top.iterrows()]
    if rows.ndim == 4:
        cells = grid[:, 4:].subgridspec(-(-len(rows) // 3), 3)
        for i, (pixels, (label, bad)) in enumerate(zip(rows, labels)):
            ax = fig.add_subplot(cells[i // 3, i % 3])
            img = np.transpose(pixels, (1, 2, 0))
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img.clip(0, 1),
                      cmap="gray" if img.shape[-1] == 1 else None)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{i + 1}: y={label}", fontsize=7, color="red" if bad else "black")
        return
    ax = fig.add_subplot(grid[:, 4:])
    ax.axis("off")
    # A token shared by every row (the "=" closing an equation) says nothing: left out.
    same_end = rows.ndim == 2 and rows.shape[1] > 1 and bool((rows[:, -1] == rows[0, -1]).all())
    for i, (row, (label, bad)) in enumerate(zip(rows, labels)):
        if row.dtype.kind in "iu":  # tokens: the operands
            what = "(" + ", ".join(str(int(v)) for v in (row[:-1] if same_end else row)) + ")"
        else:
            what = f"row {int(top.iloc[i]['train_index'])}"
        ax.text(0.0, 1 - (i + 0.5) / max(len(rows), 1), f"{i + 1}: {what} -> y={label}"
                + (" (corrupted)" if bad else ""), fontsize=9, va="center",
                color="red" if bad else "black", transform=ax.transAxes)
    ax.set_title("the rows", fontsize=9)


@ANALYSES.register("transition", plot=plot_transition)
def transition_from_run(run: RunArtifacts, /, *, step: Optional[Index] = None,
                        summary_key: Optional[str] = None, window: Count = 1,
                        method: str = "trak", num_test: Count = 256, top_k: Count = 20,
                        proj_dim: Optional[Count] = 512, output: str = "margin") -> Result:
    """The step is `step`, else summary_key's value, else the first of STEP_KEYS found."""
    if step is None:
        step, key = find_step(run.summary, [summary_key] if summary_key else STEP_KEYS)
        if step is None:
            raise UserError("the run's summary names no transition step "
                            f"(looked for {summary_key or ', '.join(STEP_KEYS)})",
                            "pass step=<N> (or summary_key=section.field)")
    b = run.bundle
    return transition_attribution(run.model, run.checkpoints, b.train, b.test, step=step,
                                  window=window, method=method, prepare=b.prepare,
                                  lrs=lrs_at(run.rows, [s for s, _ in run.checkpoints]),
                                  test_indices=sample_indices(len(b.test), num_test, run.seed),
                                  top_k=top_k, proj_dim=proj_dim, seed=run.seed, output=output)


# --- bias attribution ------------------------------------------------------------------------

def bias_attribution(model: nn.Module, checkpoints: Sequence[Checkpoint], train: Split,
                     test: Split, *, method: str = "trak",
                     prepare: Callable[[Tensor], Tensor] = lambda t: t,
                     lrs: Optional[Mapping[int, float]] = None,
                     test_indices: Optional[Tensor] = None, top_k: int = 20,
                     proj_dim: Optional[int] = 512, seed: int = 0, output: str = "margin",
                     batch_size: int = 64, group_names: Optional[Sequence[str]] = None
                     ) -> Result:
    """Influence summed over training groups, per test group; who pushes the worst group down.
    `group_names` (meta.extra["groups"], by group id) name the groups in the summary and figure.

    The worst test group is the one the last checkpoint gets least right. A training row's
    push on it is its mean score over that group's test rows: most negative = it lowers the
    correct-class margin of the group the model fails, typically a majority-group row whose
    label agrees with the spurious attribute.

    tables: `groups` (test_group, train_group; total_score: the training group's summed
    scores, mean_score: per training row; both averaged over the test group's rows),
    `test_groups` (group, accuracy, count), `pushers` (train_index, label, group, corrupted,
    push on the worst group, most negative first).
    """
    if train.group is None or test.group is None:
        raise UserError("bias attribution needs group ids on the train and test splits",
                        "use a dataset with groups, e.g. dataset=colored_digits or waterbirds")
    require_checkpoints(checkpoints, "bias attribution")
    METHODS.get(method)
    idx = torch.arange(len(test)) if test_indices is None else test_indices.cpu()
    x_test, y_test = test.x[idx.to(test.x.device)], test.y.cpu()[idx]
    g_test, g_train = test.group.cpu()[idx], train.group.cpu()
    with kept_weights(model):
        right = predict(load(model, checkpoints[-1][1]), x_test, prepare).argmax(1).cpu() == y_test
    a = Attribution(model, checkpoints, train.x, train.y, x_test, y_test.to(test.y.device),
                    prepare=prepare, lrs=lrs, proj_dim=proj_dim, seed=seed, output=output,
                    batch_size=batch_size)
    scores = a.scores(method)  # (n_test, n_train)
    test_groups = torch.unique(g_test)
    accuracy = pd.DataFrame({"group": test_groups.numpy(),
                             "accuracy": [float(right[g_test == g].float().mean())
                                          for g in test_groups],
                             "count": [int((g_test == g).sum()) for g in test_groups]})
    worst = int(accuracy.loc[accuracy["accuracy"].idxmin(), "group"])
    # (test group x train group) sums as two one-hot matmuls: no loop over rows.
    tg = (g_test[:, None] == test_groups[None, :]).double()
    train_groups = torch.unique(g_train)
    rg = (g_train[:, None] == train_groups[None, :]).double()
    per_test_row = scores.double() @ rg                       # (n_test, train groups)
    total = (tg.T @ per_test_row) / tg.sum(0)[:, None]        # mean over test rows of a group
    counts = rg.sum(0)
    groups = pd.DataFrame([{"test_group": int(tgid), "train_group": int(rgid),
                            "total_score": float(total[i, j]),
                            "mean_score": float(total[i, j] / counts[j]),
                            "num_train": int(counts[j])}
                           for i, tgid in enumerate(test_groups)
                           for j, rgid in enumerate(train_groups)])
    push = scores[g_test == worst].double().mean(0)
    order = push.argsort()[:top_k]
    pushers = pd.DataFrame({"train_index": order.numpy(), "label": train.y.cpu()[order].numpy(),
                            "group": g_train[order].numpy(),
                            "corrupted": train.corrupted.cpu()[order].numpy(),
                            "push_on_worst_group": push[order].numpy()})
    on_worst = groups[groups["test_group"] == worst]
    summary = {"method": method, "checkpoint_steps": [s for s, _ in checkpoints],
               "group_names": {str(g): (group_names[g] if group_names and g < len(group_names)
                                        else str(g))
                               for g in sorted(set(g_train.tolist()) | set(g_test.tolist()))},
               "worst_test_group": worst,
               "worst_group_accuracy": float(accuracy["accuracy"].min()),
               "pusher_groups": {str(k): int(v) for k, v in
                                 pushers["group"].value_counts().items()},
               # The whole group's push (total), not one row's: a large majority group of
               # well-fit rows, each weak, is what teaches a shortcut.
               "most_negative_train_group_on_worst": int(
                   on_worst.sort_values("total_score")["train_group"].iloc[0]),
               "most_positive_train_group_on_worst": int(
                   on_worst.sort_values("mean_score")["train_group"].iloc[-1])}
    return Result({"groups": groups, "test_groups": accuracy, "pushers": pushers}, summary,
                  {"scores": scores.numpy()})


def plot_bias(result: Result, out_dir) -> list:
    g, s = result.tables["groups"], result.summary
    sizes = g.drop_duplicates("train_group").set_index("train_group")["num_train"]
    names = s.get("group_names") or {}

    def name(group: int) -> str:  # "y=1,color=red" -> "y=1, red"
        text = names.get(str(group), str(group))
        return re.sub(r",\s*\w+=", ", ", text)

    panels = (("mean_score", "per training row (mean)"),
              ("total_score", "whole training group (sum)"))
    n_test, n_train = g["test_group"].nunique(), g["train_group"].nunique()
    fig, axes = plt.subplots(1, 2, figsize=(2.4 * n_train + 4, 0.8 * n_test + 2.6))
    for ax, (column, title) in zip(axes, panels):
        mat = g.pivot(index="test_group", columns="train_group", values=column)
        lim = float(np.nanmax(np.abs(mat.values))) or 1.0
        im = ax.imshow(mat.values, cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_xticks(range(mat.shape[1]), [f"{name(c)}\n(n={sizes[c]})" for c in mat.columns],
                      fontsize=7)
        ax.set_yticks(range(mat.shape[0]), [name(r) + (" (worst)" if r == s["worst_test_group"]
                                                       else "") for r in mat.index], fontsize=8)
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                v = mat.values[i, j]
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=8,
                        color="white" if abs(v) > 0.6 * lim else "black")
        fig.colorbar(im, ax=ax, shrink=0.8)
        ax.set_xlabel("training group")
        ax.set_ylabel("test group")
        ax.set_title(f"influence {title}", fontsize=10)
    fig.suptitle(f"{s['method']} influence on each test group, by training group (mean over "
                 f"the test group's rows)\nworst test group {name(s['worst_test_group'])}: "
                 f"accuracy "
                 f"{s['worst_group_accuracy']:.2f}", fontsize=10)
    fig.tight_layout()
    return [save(fig, out_dir, "influence_by_group")]


@ANALYSES.register("bias", plot=plot_bias)
def bias_from_run(run: RunArtifacts, /, *, method: str = "trak", num_checkpoints: Count = 2,
                  num_test: Count = 512, top_k: Count = 20, proj_dim: Optional[Count] = 512,
                  output: str = "margin") -> Result:
    chosen = spread(run.checkpoints, num_checkpoints, skip_init=True)
    b = run.bundle
    return bias_attribution(run.model, chosen, b.train, b.test, method=method, prepare=b.prepare,
                            lrs=lrs_at(run.rows, [s for s, _ in chosen]),
                            test_indices=sample_indices(len(b.test), num_test, run.seed),
                            top_k=top_k, proj_dim=proj_dim, seed=run.seed, output=output,
                            group_names=b.meta.extra.get("groups"))
