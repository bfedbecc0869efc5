"""What every analysis shares: its result, the run it reads, and how a result is written.

An analysis is a plain function over explicit arguments (a model, tensors, metric rows, a list
of (step, state_dict) checkpoints) returning a `Result`: named tables (pandas DataFrames), a
small JSON-able summary, and the arrays its figures need. `ANALYSES` maps the names of
`dgrun analyze RUN_DIR WHAT` to an adapter `from_run(run: RunArtifacts, **options) -> Result`
and a figure writer `plot(result, out_dir) -> [paths]`; `write` puts a result on disk.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from dgrun.data.bundle import Bundle
from dgrun.errors import UserError
from dgrun.files import write_text
from dgrun.registry import Registry

ANALYSES = Registry("analysis")

Checkpoint = tuple[int, dict]  # (step, model state_dict)


@dataclass
class Result:
    """tables -> `<name>.csv`, summary -> `summary.json`; arrays feed the figures only."""

    tables: dict[str, pd.DataFrame]
    summary: dict
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class ExampleTrace:
    """Per-example tracking of one run: at each tracked evaluation (`steps`, ascending), the
    probability of the true label of every training row (`true_prob`, (evals, N)) and, when
    tracked, whether the prediction was right (`correct`, (evals, N) bool)."""

    steps: Sequence[int]
    true_prob: Tensor
    correct: Optional[Tensor] = None


@dataclass
class RunArtifacts:
    """Everything `dgrun analyze` loads from a run directory, for the adapters in ANALYSES.

    `model` has the run's architecture (on `device`); adapters load checkpoints into it and
    restore its weights afterwards. `checkpoints` are (step, state_dict), ascending in step.
    `marks` are the probes' (step, label) marks for the run's summary; None lets an analysis
    read them from the summary itself.
    """

    bundle: Bundle
    model: nn.Module
    checkpoints: list[Checkpoint] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    examples: Optional[ExampleTrace] = None
    marks: Optional[list[tuple[int, str]]] = None
    seed: int = 0


# --- models and checkpoints ------------------------------------------------------------------

@contextlib.contextmanager
def kept_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Analyses load checkpoint after checkpoint into the caller's model; this puts the
    caller's weights and train/eval mode back however the block ends."""
    saved = copy.deepcopy(model.state_dict())
    was_training = model.training
    try:
        yield model
    finally:
        model.load_state_dict(saved)
        model.train(was_training)


def load(model: nn.Module, state: dict) -> nn.Module:
    model.load_state_dict(state)
    return model.eval()


def model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def require_checkpoints(checkpoints: Sequence[Checkpoint], what: str, least: int = 1) -> None:
    if len(checkpoints) < least:
        raise UserError(f"{what} needs at least {least} saved checkpoint(s), the run has "
                        f"{len(checkpoints)}",
                        "train with trainer.checkpoint_every=N so the run keeps checkpoints "
                        "along the way")


def spread(checkpoints: Sequence[Checkpoint], count: int, *,
           skip_init: bool = False) -> list[Checkpoint]:
    """`count` checkpoints evenly spaced over the run, always including the last one."""
    pool = [c for c in checkpoints if not (skip_init and c[0] == 0)] or list(checkpoints)
    if count >= len(pool):
        return list(pool)
    picks = np.unique(np.round(np.linspace(len(pool) - 1, 0, count)).astype(int))
    return [pool[i] for i in sorted(picks)]


def last_module_called(model: nn.Module, x: Tensor, kind: type) -> tuple[str, nn.Module]:
    """The last module of type `kind` the forward pass of `x` calls, by its name.

    Call order, not registration order: a model may define its head before its body."""
    names = {m: n for n, m in model.named_modules()}
    called: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: called.append(mod))
             for m in model.modules() if isinstance(m, kind)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    if not called:
        raise UserError(f"the model has no {kind.__name__} layer for this analysis",
                        "pick a model that has one, or name the layer explicitly")
    return names[called[-1]], called[-1]


def batched(n: int, batch_size: int) -> Iterator[slice]:
    for i in range(0, n, batch_size):
        yield slice(i, min(i + batch_size, n))


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, prepare: Callable[[Tensor], Tensor] = lambda t: t,
            batch_size: int = 1024) -> Tensor:
    """Logits of stored rows `x` (prepared batch by batch), in eval mode, as float."""
    device = model_device(model)
    model.eval()
    return torch.cat([model(prepare(x[s].to(device))).float() for s in batched(len(x),
                                                                               batch_size)])


def sample_indices(n: int, count: Optional[int], seed: int) -> Tensor:
    """A seeded, sorted sample of `count` row indices out of `n` (all when count is None)."""
    if count is None or count >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:count].sort().values


def pixels01(x: Tensor) -> Tensor:
    """Stored image rows (uint8 0..255 or float 0..1) as float in [0, 1]."""
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


# --- writing ---------------------------------------------------------------------------------

def jsonable(value):
    """Summary values -> plain JSON (numpy/tensor scalars to numbers, NaN/inf to null)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return jsonable(value.tolist())
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write(result: Result, out_dir: Path, plot: Optional[Callable] = None) -> list[Path]:
    """Tables as CSV, the summary as summary.json, and the figures; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, table in result.tables.items():
        path = out_dir / f"{name}.csv"
        write_text(path, table.to_csv(index=False))
        written.append(path)
    path = out_dir / "summary.json"
    write_text(path, json.dumps(jsonable(result.summary), indent=2) + "\n")
    written.append(path)
    if plot is not None:
        written += plot(result, out_dir)
    return written


def analyze(what: str, run: RunArtifacts, out_dir: Path, **options) -> list[Path]:
    """`dgrun analyze RUN_DIR WHAT`: run the analysis `what` on a loaded run, write
    out_dir/{*.csv, summary.json, *.png}. Unknown names, unknown options and values of the
    wrong type or range fail as UserError (dgrun.analysis.options)."""
    from dgrun.analysis.options import check

    result = ANALYSES.get(what)(run, **check(what, ANALYSES.get(what), options))
    return write(result, out_dir, ANALYSES.tags(what).get("plot"))
