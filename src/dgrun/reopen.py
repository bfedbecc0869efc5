"""Reopen a finished (or checkpointed) run: its config, its data exactly as it trained on them,
and its model at any checkpoint it kept. What `dgrun analyze` works from.

    run = reopen(Path("outputs/2026-11-24/10-00-00"))
    bundle = run.bundle()                    # same seed, corruption and preprocessing
    for step, payload in run.load_checkpoints():   # what it kept, oldest first, each read once
        model = run.model_at(step)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from dgrun import checkpoint, readback
from dgrun.errors import UserError
from dgrun.rundir import RunDir


@dataclass
class ReopenedRun:
    path: Path
    config: dict[str, Any]          # the resolved config it trained with
    summary: dict[str, Any]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    notes: list[str] = field(default_factory=list)  # what reading it skipped, for the user

    @cached_property
    def cfg(self):
        from omegaconf import OmegaConf

        from dgrun.config import from_hydra, register_schemas

        register_schemas()
        return from_hydra(OmegaConf.create(self.config))

    @cached_property
    def rows(self) -> list[dict]:
        return readback.read_metrics_rows(self.path / "metrics.csv")

    def bundle(self):
        """The run's data, built as the run built it (seeded corruption included)."""
        if not hasattr(self, "_bundle"):
            from dgrun.assemble import load_data

            self._bundle = load_data(self.cfg, self.device)
        return self._bundle

    def read_checkpoints(self, map_location: str | torch.device | None = None,
                         ) -> Iterator[tuple[int, dict]]:
        """(step, payload) of the checkpoints on disk, newest first, one per step.

        Each file is read once, and its step is the one inside that read: a live run replaces
        last.pt between any two reads, so a step learnt from one read and weights from another
        can disagree. A file that vanished after the listing, or is damaged, is skipped with a
        line in `notes`."""
        seen: set[int] = set()
        for path in checkpoint.candidates(RunDir(self.path).checkpoints):
            named = checkpoint.SNAPSHOT.match(path.name)  # step_00001234.pt: its step is known
            if named and int(named.group(1)) in seen:
                continue
            try:
                payload = checkpoint.load_file(path, map_location or self.device)
                step = int(payload["state"]["step"])
            except (ValueError, KeyError, TypeError) as e:
                gone = isinstance(e.__cause__, FileNotFoundError) or not path.exists()
                self.notes.append(f"skipped {path}: " + ("it vanished while being read (the run "
                                  "is still writing)" if gone else str(e)))
                continue
            if step not in seen:
                seen.add(step)
                yield step, payload

    def load_checkpoints(self, map_location: str | torch.device | None = None,
                         ) -> list[tuple[int, dict]]:
        """(step, payload) of every readable checkpoint, oldest first (see read_checkpoints)."""
        return sorted(self.read_checkpoints(map_location), key=lambda kept: kept[0])

    def steps(self) -> list[int]:
        return [step for step, _ in self.load_checkpoints()]

    def fresh_model(self) -> torch.nn.Module:
        from dgrun import models

        meta = self.bundle().meta
        return models.create(self.cfg.model.name, meta.input_shape, meta.num_classes,
                             meta.modality, vocab_size=meta.vocab_size,
                             **self.cfg.model.options).to(self.device)

    def model_at(self, step: Optional[int] = None) -> torch.nn.Module:
        """The model with the weights of the checkpoint at `step` (None: the latest), in eval
        mode. A step the run kept no checkpoint for is one line naming the steps it has."""
        kept = []
        for found, payload in self.read_checkpoints():
            if step is None or found == step:
                model = self.fresh_model()
                model.load_state_dict(payload["model"])
                return model.eval()
            kept.append(found)
        if not kept:
            raise UserError(f"{self.path} has no checkpoint",
                            "re-run it (checkpoints are written at the end of every run)")
        raise UserError(f"{self.path} kept no checkpoint at step {step} (it has "
                        f"{', '.join(map(str, sorted(kept)))})",
                        "pick one of those, or re-run with trainer.snapshots=log "
                        "(or every) to keep more")


def reopen(path: Path, device: str = "cpu") -> ReopenedRun:
    """A run directory -> ReopenedRun, or UserError when it holds no run dgrun can rebuild."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a directory", "pass a run directory")
    summary = readback.read_summary(path / "summary.json")
    config = summary.get("config")
    if not config:
        payload = checkpoint.load_latest(RunDir(path).checkpoints)
        config = (payload or {}).get("config")
    if not config:
        raise UserError(f"{path} holds no dgrun run (no summary.json or checkpoint with its "
                        "config)", "pass the directory of a run (one with checkpoints/)")
    return ReopenedRun(path, config, summary, torch.device(device))
