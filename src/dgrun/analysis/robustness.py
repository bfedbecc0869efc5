"""Robustness of a run's model at any checkpoint it kept: accuracy on the seeded test subset
under each CIFAR-10-C corruption and severity (computed on the device), or on the published
CIFAR-10-C files (`cifar10c_root=DIR`), and under an adversarial attack (pixel-space budget).
The same measurement the `robustness` probe takes during training, for runs trained without
it."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from dgrun.analysis.base import ANALYSES, Result, RunArtifacts, kept_weights, load
from dgrun.analysis.options import Count, Index, NonNegative, Severity
from dgrun.errors import UserError
from dgrun.files import write_figure


def plot_robustness(result: Result, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = result.tables["corruptions"]
    if table.empty:
        return []
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    # One colour per corruption (tab20: 20 of them; the default cycle repeats after 10).
    colours = plt.get_cmap("tab20").colors
    for i, (name, part) in enumerate(table.groupby("corruption")):
        ax.plot(part["severity"], part["accuracy"], marker="o", label=name,
                color=colours[i % len(colours)])
    summary = result.summary
    ax.axhline(summary["clean_acc"], color="black", linestyle="--", label="clean")
    if summary.get("adv_acc") is not None:
        ax.axhline(summary["adv_acc"], color="red", linestyle=":", label="adversarial")
    ax.set_xlabel("severity")
    ax.set_ylabel("accuracy")
    ax.set_xticks(sorted(table["severity"].unique()))
    ax.set_title(f"robustness at step {summary['step']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    path = out_dir / "robustness.png"
    try:
        write_figure(fig, path, bbox_inches="tight")
    finally:
        plt.close(fig)
    return [path]


@ANALYSES.register("robustness", plot=plot_robustness)
def robustness_from_run(run: RunArtifacts, /, *, step: Optional[Index] = None,
                        corruptions: str | Sequence[str] = "all",
                        severities: Sequence[Severity] = (1, 2, 3, 4, 5),
                        n: Optional[Count] = 1000, attack: str = "pgd", norm: str = "linf",
                        eps: NonNegative = 8 / 255, steps: Count = 10, n_adv: Count = 256,
                        cifar10c_root: Optional[str] = None) -> Result:
    from dgrun.robustness.attacks import AttackSpec
    from dgrun.robustness.suite import evaluate_cifar10c, evaluate_robustness

    if run.bundle.meta.modality != "image":
        raise UserError(f"robustness needs image data; this run trained on "
                        f"{run.bundle.meta.modality} data", "analyze an image run")
    checkpoints = dict(run.checkpoints)
    step = max(checkpoints) if step is None else int(step)
    if step not in checkpoints:
        raise UserError(f"the run kept no checkpoint at step {step} (it has "
                        f"{', '.join(map(str, sorted(checkpoints)))})", "pick one of those")
    spec = None if attack == "none" else AttackSpec(kind=attack, norm=norm, eps=float(eps),
                                                    steps=int(steps))
    with kept_weights(run.model) as model:
        load(model, checkpoints[step])
        test = run.bundle.test
        columns = evaluate_robustness(model, run.bundle.prepare, test.x, test.y,
                                      corruptions=corruptions, severities=list(severities),
                                      attack=spec, n=n, n_adv=n_adv, seed=run.seed)
        if cifar10c_root is not None:
            files = evaluate_cifar10c(model, run.bundle.prepare, cifar10c_root,
                                      severities=list(severities), n=n, seed=run.seed)
            columns.update({f"cifar10c_{k}": v for k, v in files.items()})
    rows = []
    for key, value in columns.items():
        parts = key.rsplit("_", 1)
        if key.startswith("corruption_acc_") and parts[1].isdigit():
            rows.append({"corruption": parts[0].removeprefix("corruption_acc_"),
                         "severity": int(parts[1]), "accuracy": value})
    summary = {"step": step, **{k: v for k, v in columns.items()
                                if not (k.rsplit("_", 1)[-1].isdigit())}}
    return Result({"corruptions": pd.DataFrame(rows, columns=["corruption", "severity",
                                                                "accuracy"])}, summary)
