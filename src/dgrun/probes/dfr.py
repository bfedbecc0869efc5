"""Deep feature reweighting (Kirichenko et al. 2023, "Last layer re-training is sufficient for
robustness to spurious correlations"): has the network learned the core feature even while
its last layer leans on the spurious one?

At every `every`-th evaluation (the 1st, the every+1-th, ...) the probe takes the penultimate
features (the input of the last nn.Linear the model runs, caught with a forward hook, so it
works for every dgrun model) of the group-balanced `val` split, fits a fresh logistic
regression on them (features standardized on val; L1 by default, as in the paper; seeded),
and reports how that retrained last layer does on test:

    dfr_test_acc, dfr_test_worst_group_acc

A model whose own worst-group accuracy is low but whose DFR worst-group accuracy is high has
the core feature in its representation already. Other evaluations leave the columns blank.
Feature extraction and the fit run on the host: this is a periodic probe, not the hot path.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from dgrun.data.bundle import Meta, Split
from dgrun.errors import UserError
from dgrun.probes import PROBES
from dgrun.probes.base import Evaluation, Probe
from dgrun.probes.groups import group_accuracies, worst_group
from dgrun.seeding import derive_seed


def last_linear(model: nn.Module, probe_input: Tensor, run) -> nn.Linear:
    """The nn.Linear that runs last when the model sees `probe_input` (via run(x))."""
    order: list[nn.Linear] = []
    handles = [m.register_forward_hook(lambda mod, inp, out: order.append(mod))
               for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        run(probe_input)
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise UserError(f"probe 'dfr' needs a model that ends in nn.Linear; "
                        f"{type(model).__name__} runs none", "drop probes.dfr for this model")
    return order[-1]


def penultimate_features(ev: Evaluation, x: Tensor, layer: nn.Linear) -> Tensor:
    """(N, D) inputs of `layer` for stored rows x, as the model computes its logits.

    Token models may apply their head at every position and read one: the features are then
    taken at the position whose head output equals the logits (checked, the last by default).
    """
    inputs, outputs = [], []

    def keep(mod, inp, out):
        inputs.append(inp[0].detach())
        outputs.append(out.detach())

    handle = layer.register_forward_hook(keep)
    try:
        logits = ev.predict(x)
    finally:
        handle.remove()
    feats, head = torch.cat(inputs).float(), torch.cat(outputs).float()
    if feats.dim() == 3 and head.shape[0] == logits.shape[0]:
        feats, head = feats[:, -1], head[:, -1]
    if feats.dim() != 2 or head.shape != logits.shape or not torch.allclose(head, logits,
                                                                            atol=1e-4, rtol=1e-4):
        raise UserError(f"probe 'dfr' cannot tell which features make this model's logits "
                        f"(its last nn.Linear gives {tuple(head.shape)}, the model "
                        f"{tuple(logits.shape)})",
                        "drop probes.dfr for this model")
    return feats


def _logistic_regression(C: float, l1_ratio: float, seed: int):
    """sklearn's LogisticRegression with an L1/L2 mix, across the versions that spell it
    differently (`penalty` was deprecated in 1.8 in favour of l1_ratio alone)."""
    import inspect

    from sklearn.linear_model import LogisticRegression

    solver = "liblinear" if l1_ratio in (0.0, 1.0) else "saga"
    options = dict(C=C, solver=solver, random_state=seed, max_iter=1000)
    if inspect.signature(LogisticRegression).parameters["penalty"].default == "deprecated":
        return LogisticRegression(l1_ratio=l1_ratio, **options)
    penalty = {0.0: "l2", 1.0: "l1"}.get(l1_ratio, "elasticnet")
    extra = {} if penalty != "elasticnet" else {"l1_ratio": l1_ratio}
    return LogisticRegression(penalty=penalty, **options, **extra)


def fit_and_score(train_feats: Tensor, train_y: Tensor, test_feats: Tensor, test: Split,
                  num_groups: int, C: float, l1_ratio: float, seed: int) -> dict[str, float]:
    """Fit a logistic-regression last layer on (train_feats, train_y); test accuracy and
    worst-group accuracy of its predictions."""
    x_fit = train_feats.cpu().numpy().astype(np.float64)
    mean, std = x_fit.mean(0), x_fit.std(0) + 1e-8
    model = _logistic_regression(C, l1_ratio, seed)
    model.fit((x_fit - mean) / std, train_y.cpu().numpy())
    pred = model.predict((test_feats.cpu().numpy().astype(np.float64) - mean) / std)
    correct = torch.from_numpy(pred).to(test.y.device) == test.y
    acc, counts = group_accuracies(correct, test.group, num_groups)
    return {"dfr_test_acc": float(correct.float().mean()),
            "dfr_test_worst_group_acc": float(worst_group(acc, counts))}


class DeepFeatureReweighting(Probe):
    def __init__(self, num_groups: int, every: int, C: float, l1_ratio: float, seed: int):
        self.num_groups, self.every = num_groups, every
        self.C, self.l1_ratio, self.seed = C, l1_ratio, seed
        self.evaluations = 0  # evaluations seen: which ones refit is decided by this count
        self.layer: Optional[nn.Linear] = None

    def measure(self, ev: Evaluation) -> dict:
        turn = self.evaluations % self.every == 0
        self.evaluations += 1
        if not turn:
            return {}
        if ev.val is None or ev.val.group is None or ev.test.group is None:
            raise UserError("probe 'dfr' needs a dataset with groups and a balanced val split",
                            "use a grouped dataset (colored_digits, lms, dominoes, text_bias, "
                            "colored_mnist, waterbirds, celeba) or drop probes.dfr")
        if self.layer is None:
            self.layer = last_linear(ev.model, ev.val.x[:2], ev.predict)
        val = penultimate_features(ev, ev.val.x, self.layer)
        test = penultimate_features(ev, ev.test.x, self.layer)
        return fit_and_score(val, ev.val.y, test, ev.test, self.num_groups, self.C,
                             self.l1_ratio, self.seed)

    def summarize(self, rows: list[dict]) -> dict:
        done = [r for r in rows if r.get("dfr_test_worst_group_acc") not in (None, "")]
        if not done:
            return {"dfr": {"final_step": None}}
        last = done[-1]
        best = max(done, key=lambda r: float(r["dfr_test_worst_group_acc"]))
        return {"dfr": {"final_step": int(last["step"]),
                        "final_test_acc": float(last["dfr_test_acc"]),
                        "final_test_worst_group_acc": float(last["dfr_test_worst_group_acc"]),
                        "best_test_worst_group_acc": float(best["dfr_test_worst_group_acc"]),
                        "best_step": int(best["step"])}}

    def state_dict(self) -> dict:
        return {"evaluations": self.evaluations}

    def load_state_dict(self, state: dict) -> None:
        self.evaluations = int(state["evaluations"])


@PROBES.register("dfr")
def dfr(*, meta: Meta, seed: int, every: int = 1, C: float = 1.0, l1_ratio: float = 1.0) -> Probe:
    """Last-layer retraining on the balanced val split every `every` evaluations; `C` is the
    inverse regularization strength, `l1_ratio` 1 for L1 (the paper's), 0 for L2."""
    if not meta.extra.get("groups"):
        raise UserError(f"probe 'dfr' needs a dataset with groups and a balanced val split; "
                        f"'{meta.name}' has none", "use a grouped dataset or drop probes.dfr")
    if int(every) < 1 or float(C) <= 0 or not 0.0 <= float(l1_ratio) <= 1.0:
        raise UserError(f"probes.dfr: every={every}, C={C}, l1_ratio={l1_ratio}",
                        "every must be >= 1, C > 0 and l1_ratio in [0, 1]")
    return DeepFeatureReweighting(len(meta.extra["groups"]), int(every), float(C),
                                  float(l1_ratio), derive_seed(seed, "dfr") % 2**31)
