"""Reopen a finished (or checkpointed) run: its config, its data exactly as it trained on them,
and its model at any checkpoint it kept. What `dgrun analyze` works from.

    run = reopen(Path("outputs/2026-11-24/10-00-00"))
    bundle = run.bundle()                    # same seed, corruption and preprocessing
    for step, path in run.checkpoints():     # the snapshots it kept, oldest first
        model = run.model_at(step)
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

import torch

from dgrun import checkpoint
from dgrun.errors import UserError
from dgrun.files import read_json
from dgrun.rundir import RunDir


@dataclass
class ReopenedRun:
    path: Path
    config: dict[str, Any]          # the resolved config it trained with
    summary: dict[str, Any]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @cached_property
    def cfg(self):
        from omegaconf import OmegaConf

        from dgrun.config import from_hydra, register_schemas

        register_schemas()
        return from_hydra(OmegaConf.create(self.config))

    @cached_property
    def rows(self) -> list[dict]:
        path = self.path / "metrics.csv"
        if not path.is_file():
            return []
        with open(path) as f:
            return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]

    def bundle(self):
        """The run's data, built as the run built it (seeded corruption included)."""
        if not hasattr(self, "_bundle"):
            from dgrun.data import pipeline

            cfg = self.cfg
            self._bundle = pipeline.load(
                cfg.dataset.name, cfg.dataset_options, seed=cfg.corruption_seed,
                corruption_name=cfg.corruption.name, prob=cfg.corruption.prob,
                apply_to_test=cfg.corruption.apply_to_test, **cfg.pipeline).to(self.device)
        return self._bundle

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, file) of every checkpoint on disk, oldest first; one file per step."""
        by_step: dict[int, Path] = {}
        for path in reversed(checkpoint.candidates(RunDir(self.path).checkpoints)):
            named = checkpoint.SNAPSHOT.match(path.name)  # step_00001234.pt: no need to load
            if named:
                by_step.setdefault(int(named.group(1)), path)
                continue
            try:
                step = int(checkpoint.load_file(path)["state"]["step"])
            except (ValueError, KeyError):
                continue  # a damaged file: skipped, as resume skips it
            by_step.setdefault(step, path)
        return sorted(by_step.items())

    def steps(self) -> list[int]:
        return [step for step, _ in self.checkpoints()]

    def fresh_model(self) -> torch.nn.Module:
        from dgrun import models

        meta = self.bundle().meta
        return models.create(self.cfg.model.name, meta.input_shape, meta.num_classes,
                             meta.modality, vocab_size=meta.vocab_size,
                             **self.cfg.model.options).to(self.device)

    def model_at(self, step: Optional[int] = None) -> torch.nn.Module:
        """The model with the weights of the checkpoint at `step` (None: the latest), in eval
        mode. A step the run kept no checkpoint for is one line naming the steps it has."""
        kept = dict(self.checkpoints())
        if not kept:
            raise UserError(f"{self.path} has no checkpoint",
                            "re-run it (checkpoints are written at the end of every run)")
        if step is None:
            step = max(kept)
        if step not in kept:
            raise UserError(f"{self.path} kept no checkpoint at step {step} (it has "
                            f"{', '.join(map(str, sorted(kept)))})",
                            "pick one of those, or re-run with trainer.snapshots=log "
                            "(or every) to keep more")
        model = self.fresh_model()
        model.load_state_dict(checkpoint.load_file(kept[step], map_location=self.device)["model"])
        return model.eval()


def reopen(path: Path, device: str = "cpu") -> ReopenedRun:
    """A run directory -> ReopenedRun, or UserError when it holds no run dgrun can rebuild."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a directory", "pass a run directory")
    summary = {}
    if (path / "summary.json").is_file():
        try:
            summary = read_json(path / "summary.json")
        except (OSError, ValueError):
            summary = {}
    config = summary.get("config")
    if not config:
        payload = checkpoint.load_latest(RunDir(path).checkpoints)
        config = (payload or {}).get("config")
    if not config:
        raise UserError(f"{path} holds no dgrun run (no summary.json or checkpoint with its "
                        "config)", "pass the directory of a run (one with checkpoints/)")
    return ReopenedRun(path, config, summary, torch.device(device))


def _number(text: str) -> Any:
    if text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return text
