"""What every run is assembled from, whether it trains alone or as an ensemble's member:
its plan (budget, evaluation and checkpoint schedule), its data (the spot where a run's data
is derived from its seed), what its summary says was applied, the tracker folders it owns, and
restored state moved onto the run's device.

dgrun.run decides, holds and records; dgrun.ensemble stacks members; both build from here.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from dgrun import trackers
from dgrun.config import RunConfig, TrainerConfig
from dgrun.data import pipeline, subset
from dgrun.data.bundle import Bundle
from dgrun.rundir import RunDir
from dgrun.train import Plan


def log_points(per_decade: int, limit: int = 10**12) -> set[int]:
    points, k = set(), 0
    while (p := round(10 ** (k / per_decade))) <= limit:
        points.add(p)
        k += 1
    return points


def make_plan(t: TrainerConfig, n_train: int, seed: int) -> tuple[Plan, set[int]]:
    batch = n_train if t.batch_size is None else min(t.batch_size, n_train)
    spe = math.ceil(n_train / batch)
    budgets = [(t.max_steps, "max_steps")]
    if t.max_epochs is not None:
        budgets.append((t.max_epochs * spe, "max_epochs"))
    budgets = [b for b in budgets if b[0] is not None]
    max_steps, reason = min(budgets) if budgets else (None, "max_time_s")
    unit = spe if t.unit == "epoch" else 1
    if t.eval_schedule == "log":
        eval_points = log_points(t.eval_per_decade)
        is_eval = eval_points.__contains__
    else:
        is_eval = lambda step: step % (t.eval_every * unit) == 0  # noqa: E731
    snapshot_points = log_points(4) if t.snapshots == "log" else set()
    every = t.checkpoint_every * unit
    is_ckpt = lambda step: (every > 0 and step % every == 0) or step in snapshot_points  # noqa
    plan = Plan(seed=seed, batch_size=batch, steps_per_epoch=spe, max_steps=max_steps,
                max_time_s=t.max_time_s, is_eval_step=is_eval, is_checkpoint_step=is_ckpt,
                stop_at_interpolation=t.stop_at_interpolation,
                interpolation_threshold=t.interpolation_threshold,
                interpolation_loss=t.interpolation_loss, grad_clip=t.grad_clip,
                eval_batch_size=t.eval_batch_size, max_steps_reason=reason,
                stall_patience=t.stall_patience, stall_min_delta=t.stall_min_delta,
                min_lr=t.min_lr, precision=t.precision, channels_last=t.channels_last)
    return plan, snapshot_points


def load_data(cfg: RunConfig, device: torch.device) -> Bundle:
    """The run's data on its device: corrupted once, drawn from `cfg.corruption_seed` (the
    run's seed unless corruption.seed fixes it), and its training subset (`cfg.subset_seed`).
    An ensemble member calls it with its own config (seed S+k), so each member's corruption
    and subset are those of its separate run; so are its data when the dataset's own seed
    follows the run's (`cfg.dataset_options`)."""
    return pipeline.load(cfg.dataset.name, cfg.dataset_options, seed=cfg.corruption_seed,
                         corruption_name=cfg.corruption.name, prob=cfg.corruption.prob,
                         apply_to_test=cfg.corruption.apply_to_test, **cfg.pipeline,
                         subset_fraction=cfg.subset.fraction, subset_seed=cfg.subset_seed,
                         ).to(device)


def describe(cfg: RunConfig, bundle: Bundle, device: torch.device) -> dict[str, Any]:
    """What the run applied, as summary.json records it (a report labels runs by this)."""
    corrupted = int(bundle.train.corrupted.sum())
    return {
        "seed": cfg.seed, "dataset": cfg.dataset.name, "model": cfg.model.name,
        "corruption": {"name": cfg.corruption.name, "prob": cfg.corruption.prob,
                       "seed": cfg.corruption_seed,
                       "apply_to_test": cfg.corruption.apply_to_test,
                       "train_rows_changed": corrupted},
        "optimizer": cfg.optimizer.name, "objective": cfg.objective.name,
        "input_shape": list(bundle.meta.input_shape),
        "train_size": len(bundle.train), "test_size": len(bundle.test),
        "device": str(device), "threads": torch.get_num_threads(),
        **describe_subset(cfg, bundle),
    }


def describe_subset(cfg: RunConfig, bundle: Bundle) -> dict[str, Any]:
    """summary.json's `subset` (its rows: subset.npy), when the run trains on one."""
    if bundle.subset is None:
        return {}
    return {"subset": {"fraction": cfg.subset.fraction, "seed": cfg.subset_seed,
                       "size": len(bundle.subset), "file": subset.RECORD_FILE}}


# Where each tracker writes inside the run directory by default (MLflow: unless it is given
# its own tracking_uri), so `trainer.resume=false` removes those too.
TRACKER_FOLDERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlruns"}


def claim_tracker_files(record: RunDir, logger: dict[str, dict]) -> None:
    if not logger:
        return
    record.claim(record.path / trackers.STATE_FILE)
    for name, options in logger.items():
        if name in TRACKER_FOLDERS and not options.get("tracking_uri"):
            record.folder(TRACKER_FOLDERS[name], whole=True)


def on_device(tree: Any, device: torch.device) -> Any:
    """Every tensor of a restored state (checkpoints load onto the CPU) on the run's device."""
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: on_device(v, device) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(on_device(v, device) for v in tree)
    return tree


def restore_extras(payload: dict, objective, probes, device: torch.device) -> None:
    """The objective's and the probes' saved state, on the run's device (a probe keeps its
    own dtypes in load_state_dict)."""
    objective.load_state_dict(on_device(payload.get("objective", {}), device))
    saved = payload.get("probes", {})
    for probe in probes:
        if probe.name in saved:
            probe.load_state_dict(on_device(saved[probe.name], device))
