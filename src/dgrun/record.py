"""Writing a run's record as it trains: metrics rows, checkpoints, summary.json, plots.

`Recorder` is the loop's Hooks: every evaluation appends a row, every checkpoint also brings
summary.json up to date (a killed run's summary says how far it got), and `finish` writes the
final summary and the figures.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from dgrun import checkpoint
from dgrun.data import subset
from dgrun.files import fsync_file, read_json, write_atomic, write_json
from dgrun.metrics import MetricsFile, versions
from dgrun.plots import divergence_step, plot_run
from dgrun.preemption import PreemptionGuard
from dgrun.probes import Probe
from dgrun.rundir import RunDir
from dgrun.seeding import rng_state
from dgrun.status import DIVERGED, STOPPED
from dgrun.trackers import STATE_FILE, TrackerSet
from dgrun.train import State

log = logging.getLogger("dgrun")


@dataclass
class Facts:
    """What a summary says about the run besides its state: fixed when the run is built."""
    described: dict[str, Any]            # seed, dataset, model, corruption, optimizer, ...
    params: int
    config: dict[str, Any]               # the resolved config the run trained with
    overrides: Optional[list[str]] = None
    resumed_at_steps: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    error: Optional[str] = None
    train_size: int = 0
    batch_size: int = 0
    subset_rows: Any = None              # a subset run's rows of the full training split


def throughput(state: State, n: int, batch: int) -> dict:
    """Training samples and steps per second of training time (evaluation excluded)."""
    if not state.train_time_s or not state.steps_per_epoch or not batch:
        return {"train_samples_per_s": None, "steps_per_s": None}
    epochs, position = divmod(state.step, state.steps_per_epoch)
    samples = epochs * n + min(position * batch, n)  # an epoch's last batch may be short
    return {"train_samples_per_s": samples / state.train_time_s,
            "steps_per_s": state.step / state.train_time_s}


def summarize(state: State, facts: Facts, probes: Sequence[Probe] = ()) -> dict:
    final = {k: v for k, v in (state.rows[-1] if state.rows else {}).items()
             if k not in ("step", "epoch", "time_s", "lr")}
    spe = state.steps_per_epoch or None
    summary = {
        "status": state.status, "stop_reason": state.stop_reason,
        "steps": state.step, "epochs": state.step / spe if spe else None,
        "time_s": state.train_time_s, "wall_s": time.time() - facts.started,
        "throughput": throughput(state, facts.train_size, facts.batch_size),
        "params": facts.params, "final": final, "interpolation": state.interpolation,
        **facts.described, "resumed_at_steps": facts.resumed_at_steps,
    }
    for probe in probes:
        summary.update(probe.summarize(state.rows))
    if facts.error:
        summary["error"] = facts.error
    summary.update(config=facts.config, overrides=facts.overrides, versions=versions())
    return summary


class Recorder:
    """The loop's hooks: where rows, checkpoints, progress and stop requests go."""

    def __init__(self, record: RunDir, facts: Facts, *, model, optimizer, scheduler,
                 probes: Sequence[Probe], snapshots: str, snapshot_points: set[int], bar,
                 guard: PreemptionGuard, objective=None, sinks: Optional[TrackerSet] = None):
        self.record, self.facts = record, facts
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.probes, self.snapshots, self.snapshot_points = probes, snapshots, snapshot_points
        self.bar, self.guard, self.objective = bar, guard, objective
        self.sinks = sinks if sinks is not None else TrackerSet({})
        self.metrics = MetricsFile(record.claim(record.metrics))
        # Checkpoint files come and go (previous.pt, snapshots, temporary files): a
        # checkpoints/ folder dgrun made is dgrun's whole; in a user's own, only its files.
        record.folder("checkpoints", whole=True)
        for name in (checkpoint.LAST, checkpoint.PREVIOUS):
            record.claim(record.checkpoints / name)

    def start(self, state: State) -> None:
        self.write_subset()
        self.metrics.rewrite(state.rows)
        self.write_summary(state)

    def write_subset(self) -> None:
        """subset.npy, for a run on a subset: which rows of the full training split it saw."""
        if self.facts.subset_rows is not None:
            rows = self.facts.subset_rows.cpu().numpy()
            write_atomic(self.record.claim(self.record.path / subset.RECORD_FILE),
                         lambda f: np.save(f, rows), fsync=False)

    def on_step(self, state: State) -> None:
        self.bar.step(state.step)

    def on_eval(self, state: State, row: dict) -> None:
        self.metrics.append(row)
        self.bar.eval(row)
        self.sinks.log_metrics(row)

    def save(self, state: State, reason: str) -> None:
        # "log" keeps its log-spaced steps plus the threshold, the end and preemption points.
        keep = {"none": False, "every": True,
                "log": state.step in self.snapshot_points or reason != "periodic"}[self.snapshots]
        keep = keep and state.status != DIVERGED  # NaN weights make no snapshot worth keeping
        payload = {"state": asdict(state), "model": self.model.state_dict(),
                   "optimizer": self.optimizer.state_dict(),
                   "scheduler": self.scheduler.state_dict(), "rng": rng_state(),
                   "probes": {p.name: p.state_dict() for p in self.probes},
                   "objective": self.objective.state_dict() if self.objective else {},
                   "config": self.facts.config}
        if keep:
            self.record.claim(checkpoint.snapshot_path(self.record.checkpoints, state.step))
        checkpoint.save(payload, self.record.checkpoints,
                        snapshot_step=state.step if keep else None)
        # The checkpoint's companions are made as durable as it (a power loss, not only a
        # kill): the rows appended since the last one, and the summary that describes it.
        fsync_file(self.record.metrics)
        self.write_summary(state, fsync=True)

    def stop_requested(self) -> Optional[str]:
        return self.guard.signal_name

    def write_summary(self, state: State, fsync: bool = False) -> dict:
        summary = summarize(state, self.facts, self.probes)
        write_json(self.record.claim(self.record.summary), summary, fsync=fsync)
        return summary

    def finish(self, state: State, *, log_x: bool, title: str) -> dict:
        summary = self.write_summary(state)
        marks = [m for p in self.probes for m in p.marks(summary)]
        if state.status == DIVERGED:
            marks.append((divergence_step(state.rows) or state.step, "diverged"))
        if state.status in (STOPPED, DIVERGED):
            # A run cut short says so on its figure, not only in summary.json.
            final = summary.get("final") or {}
            title += (f"\n{state.status} ({state.stop_reason}) at step {state.step}, train acc "
                      f"{final.get('train_acc', float('nan')):.2f}")
        plots = self.record.folder("plots")
        written = plot_run(state.rows, plots, interpolation_step=state.interpolation["step"],
                           log_x=log_x, title=title, marks=marks)
        if state.interpolation["step"] is not None:
            marks.insert(0, (state.interpolation["step"], "interpolation (train acc 1.0)"))
        for probe in self.probes:
            written += probe.plots(state.rows, summary, plots, marks=marks)
        for path in written:
            self.record.claim(path)
        self.sinks.log_images(written, state.step)
        self.sinks.finish(summary)
        return summary


TRACKERS_UNFINISHED = "the trackers' finish"


def missing_derived(record: RunDir) -> list[str]:
    """What a finished run should have and does not: the files its last moments write."""
    missing = []
    try:
        if not isinstance(read_json(record.summary), dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError):
        missing.append(record.summary.name)
    plots = {"plots/loss.png", "plots/accuracy.png"} | {
        e for e in record.owned() if e.startswith("plots/") and not e.endswith("/")}
    missing += sorted(p for p in plots if not (record.path / p).is_file())
    if subset.RECORD_FILE in record.owned() and not (record.path / subset.RECORD_FILE).is_file():
        missing.append(subset.RECORD_FILE)  # what memorization and LDS read of a subset model
    try:
        state = read_json(record.path / STATE_FILE)
        if any(isinstance(s, dict) and not s.get("finished") for s in state.values()):
            missing.append(TRACKERS_UNFINISHED)
    except (OSError, ValueError, AttributeError):
        pass  # no trackers (or a damaged state file: nothing to continue)
    return missing
