"""Experiment trackers: optional sinks for what the run directory records anyway.

dgrun's run directory stays the record (metrics.csv, summary.json, plots/, checkpoints/). A
tracker shows the same rows, plots and summary in TensorBoard, Weights & Biases or MLflow. The
`logger` config group picks them; several at once through Hydra's list syntax:

    dgrun logger=tensorboard
    dgrun logger=[tensorboard,mlflow] logger.mlflow.experiment=zhang
    dgrun logger=wandb logger.wandb.mode=online logger.wandb.entity=me

The composed `logger` node is a mapping {tracker name: options} (conf/logger/<name>.yaml each
add one key; `none` adds nothing). Nothing reaches a network unless the user configured it:
W&B runs offline and MLflow writes a file store in the run directory unless told otherwise.

The API run.py uses, in this order:

    trackers = build(logger_config)
        # logger_config: {name: {option: value}} (the `logger` node as plain data; None or {}
        # for no tracker). Call it before training starts, with the other config checks:
        # UserError for an unknown tracker, an unknown option, or a tracker whose package is
        # missing ("... pip install 'dgrun[wandb]'"). Returns a TrackerSet (empty is fine).
    trackers.start(run_dir, config, resume)
        # when training starts. config: the resolved run config (nested dict; flattened to
        # dotted keys as hyperparameters). resume: True when run_dir's checkpoint is resumed;
        # the trackers then continue their runs recorded in <run_dir>/trackers.json.
    trackers.log_metrics(row)
        # at each evaluation, with the metrics row written to metrics.csv (it must have
        # "step"; None and NaN values are fine). After a resume, rows re-measured since the
        # checkpoint are not duplicated: TensorBoard purges from the first re-logged step,
        # W&B and MLflow are not sent steps they already have.
    trackers.log_images(plot_paths, step)
        # at the end, the files plot_run wrote, at the final training step.
    trackers.finish(summary)
        # at the end, with the summary.json dict (summary["status"] sets each tracker's run
        # status). Also on the failure path (status "failed"), so tracker runs are closed.

A tracker that raises at any point (full disk, server down, a bug inside the library) is
warned about once on the "dgrun" logger and dropped; the run and the other trackers go on.

Adding a backend: subclass `Tracker` (base.py), register it here with `TRACKERS.register`, and
add conf/logger/<name>.yaml holding `<name>: {options}`.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from dgrun.registry import Registry
from dgrun.trackers.base import Tracker, flatten
from dgrun.trackers.mlflow import MlflowTracker
from dgrun.trackers.tensorboard import TensorBoardTracker
from dgrun.trackers.tracker_set import STATE_FILE, TrackerSet
from dgrun.trackers.wandb import WandbTracker

TRACKERS = Registry("logger")
TRACKERS.register("tensorboard")(TensorBoardTracker)
TRACKERS.register("wandb")(WandbTracker)
TRACKERS.register("mlflow")(MlflowTracker)

__all__ = ["TRACKERS", "STATE_FILE", "Tracker", "TrackerSet", "build", "flatten"]


def build(specs: Optional[Mapping[str, Optional[Mapping[str, Any]]]]) -> TrackerSet:
    """{name: options} -> a TrackerSet of those trackers, in the order given.

    Raises UserError for an unknown name or option, or a missing package (naming the extra).
    """
    trackers = {}
    for name, options in (specs or {}).items():
        tracker = TRACKERS.build(name, **dict(options or {}))
        tracker.name = name
        trackers[name] = tracker
    return TrackerSet(trackers)
