"""`dgrun analyze RUN progress`: Nanda et al.'s progress measures over a run's checkpoints.

As in the paper, the key frequencies are those of the *last* checkpoint (the trained model),
and every checkpoint's restricted and excluded loss is computed with them, so the curves show
how early the final algorithm was already forming. The live `modular_progress` probe, which
cannot know the final frequencies, uses each evaluation's own; this is the ex-post view.

tables: `progress` (step, train_loss, test_loss, restricted_loss, excluded_loss, fourier_gini,
sum_sq_weights, num_key_frequencies at that checkpoint). summary: the key frequencies, the
embedding's, and the phases detected from the table (`detect_phases`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import pandas as pd
from torch import nn

from dgrun.analysis.base import (ANALYSES, Checkpoint, Result, RunArtifacts, kept_weights, load,
                                 predict, require_checkpoints, spread)
from dgrun.analysis.options import Count, Positive
from dgrun.errors import UserError
from dgrun.losses import LOSSES
from dgrun.probes.fourier import OPERATION_SIGNS
from dgrun.probes.modular_progress import (LogitView, all_pairs, chance_loss, detect_phases,
                                           embedding_measures, logit_key_frequencies)


def progress_over_checkpoints(model: nn.Module, checkpoints: Sequence[Checkpoint], *, p: int,
                              operation: str, train_x, train_y, test_x, test_y,
                              loss: str = "cross_entropy", min_share: float = 0.5,
                              key_frequencies: Optional[list[int]] = None, vocab: int = 0
                              ) -> Result:
    require_checkpoints(checkpoints, "the progress measures")
    sign = OPERATION_SIGNS.get(operation)
    if sign is None:
        raise UserError(f"the progress measures need dataset.operation=add or sub, not "
                        f"{operation}", "the Fourier algorithm is over addition mod p")
    eval_sum = LOSSES.build(loss)[1]
    table = all_pairs(p)
    train_pairs = train_x[:, 0].cpu() * p + train_x[:, 1].cpu()
    vocab = vocab or p + 1
    rows = []
    with kept_weights(model):
        def logits_at(state):
            return predict(load(model, state), table)[:, :p].cpu().reshape(p, p, p)

        keys = key_frequencies
        if keys is None:
            keys = logit_key_frequencies(logits_at(checkpoints[-1][1]), sign, min_share)
        for step, state in checkpoints:
            view = LogitView(logits_at(state), sign)
            row = {"step": step}
            for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
                out = predict(model, x)
                row[f"{name}_loss"] = float(eval_sum(out, y.to(out.device))) / len(y)
            row.update(view.measures(keys, eval_sum, train_pairs, train_y.cpu()))
            embedded = embedding_measures(model, p, vocab)
            row["fourier_gini"] = embedded["fourier_gini"]
            row["sum_sq_weights"] = sum(float(w.detach().pow(2).sum())
                                        for w in model.parameters())
            row["num_key_frequencies"] = len(view.key_frequencies(min_share))
            rows.append(row)
    frame = pd.DataFrame(rows)
    summary = {"p": p, "operation": operation, "loss": loss, "key_frequencies": list(keys),
               "key_frequencies_from_step": checkpoints[-1][0], "min_share": min_share,
               "embedding_frequencies": embedded["embedding_frequencies"],
               "checkpoint_steps": [s for s, _ in checkpoints],
               "chance_loss": chance_loss(eval_sum, p),
               **detect_phases(rows, chance_loss(eval_sum, p))}
    return Result({"progress": frame}, summary)


def plot_progress(result: Result, out_dir) -> list:
    from dgrun.probes.modular_progress import PHASE_LABELS
    from dgrun.probes.progress_figures import plot_progress as draw

    s = result.summary
    marks = [(s[k], label) for k, label in PHASE_LABELS if s.get(k) is not None]
    rows = result.tables["progress"].to_dict("records")
    return draw(rows, marks, out_dir, title="Progress measures over checkpoints, key "
                f"frequencies of step {s['key_frequencies_from_step']}")


@ANALYSES.register("progress", plot=plot_progress)
def progress_from_run(run: RunArtifacts, /, *, num_checkpoints: Count = 40,
                      min_share: Positive = 0.5,
                      key_frequencies: Optional[list[Count]] = None) -> Result:
    """Restricted/excluded loss, Fourier Gini and phases at each checkpoint (modular runs)."""
    b = run.bundle
    if b.meta.name != "modular":
        raise UserError(f"the progress analysis measures modular arithmetic, not "
                        f"dataset={b.meta.name}", "analyze a dataset=modular run")
    loss = ((run.summary.get("config") or {}).get("trainer") or {}).get("loss",
                                                                      "cross_entropy")
    return progress_over_checkpoints(
        run.model, spread(run.checkpoints, num_checkpoints), p=int(b.meta.extra["p"]),
        operation=b.meta.extra["operation"], train_x=b.train.x, train_y=b.train.y,
        test_x=b.test.x, test_y=b.test.y, loss=loss, min_share=min_share,
        key_frequencies=key_frequencies, vocab=b.meta.vocab_size or 0)
