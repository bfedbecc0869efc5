"""EK-FAC influence (Grosse et al. 2023) through the `kronfluence` package: the same score as
dgrun.analysis.influence, grad L(z_test)^T (G + damping I)^-1 grad L(z_i), with G the
eigenvalue-corrected Kronecker-factored approximation of the Gauss-Newton Hessian, fitted per
nn.Linear / nn.Conv2d layer. Scales to networks where exact inverse-HVPs do not; parameters
outside those layers (normalization, embeddings) are left out of the score.

Optional: `pip install kronfluence` (the `attribution` extra). dgrun's data are tensors, so
they go to kronfluence as a TensorDataset of prepared inputs; kronfluence writes its factors
to a temporary folder that is removed afterwards.
"""
from __future__ import annotations

import copy
import importlib.util
import logging
import tempfile
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from dgrun.analysis.attribution import METHODS, Attribution
from dgrun.analysis.base import batched, kept_weights, load, model_device
from dgrun.analysis.gradients import OUTPUTS
from dgrun.errors import UserError


def available() -> bool:
    return importlib.util.find_spec("kronfluence") is not None


def ekfac_scores(model: nn.Module, x_train: Tensor, y_train: Tensor, x_test: Tensor,
                 y_test: Tensor, *, prepare: Callable[[Tensor], Tensor] = lambda t: t,
                 damping: Optional[float] = None, batch_size: int = 64) -> Tensor:
    """(T, N) EK-FAC influence scores of classification rows (cross-entropy, the margin's
    loss), positive = training on z_i lowers z_test's loss. damping None: kronfluence's
    heuristic (0.1 x the mean eigenvalue)."""
    if not available():
        raise UserError("solver=ekfac needs the 'kronfluence' package, which is not installed",
                        "pip install 'dgrun[attribution]' (or pip install kronfluence), or "
                        "use solver=cg")
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    margin = OUTPUTS.get("margin").value
    device = model_device(model)

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:  # the true Fisher: labels drawn from the model's own prediction
                with torch.no_grad():
                    y = torch.multinomial(logits.float().softmax(-1), 1).squeeze(-1)
            return nn.functional.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return nn.functional.softplus(-margin(model(x), y)).sum()

    def dataset(x: Tensor, y: Tensor) -> torch.utils.data.TensorDataset:
        inputs = torch.cat([prepare(x[s].to(device)) for s in batched(len(x), 1024)])
        return torch.utils.data.TensorDataset(inputs, y.to(device))

    train, test = dataset(x_train, y_train), dataset(x_test, y_test)
    tracked = prepare_model(copy.deepcopy(model).eval(), Classification())
    quiet = logging.getLogger("kronfluence").level
    with tempfile.TemporaryDirectory(prefix="dgrun-ekfac-") as out:
        analyzer = Analyzer("dgrun", tracked, Classification(), cpu=device.type == "cpu",
                            disable_tqdm=True, output_dir=out, log_level=logging.WARNING)
        analyzer.fit_all_factors("ekfac", train, per_device_batch_size=max(batch_size, 128),
                                 factor_args=FactorArguments(strategy="ekfac"),
                                 overwrite_output_dir=True)
        analyzer.compute_pairwise_scores(
            "scores", "ekfac", test, train, per_device_query_batch_size=batch_size,
            per_device_train_batch_size=max(batch_size, 128),
            score_args=ScoreArguments(damping_factor=damping), overwrite_output_dir=True)
        scores = analyzer.load_pairwise_scores("scores")
    logging.getLogger("kronfluence").setLevel(quiet)
    return scores["all_modules"].float().cpu()



@METHODS.register("ekfac")
def ekfac_method(a: Attribution) -> Tensor:
    """EK-FAC influence at the last checkpoint (damping from `a.influence`, else kronfluence's
    heuristic)."""
    with kept_weights(a.model) as model:
        load(model, a.checkpoints[-1][1])
        return ekfac_scores(model, a.x_train, a.y_train, a.x_test, a.y_test, prepare=a.prepare,
                            damping=a.influence.get("damping"), batch_size=a.batch_size)
