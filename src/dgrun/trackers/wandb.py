"""Weights & Biases: offline by default, into <run_dir>/wandb.

    wandb sync outputs/DATE/TIME/wandb/offline-run-*       upload later, when you choose

Only `mode: online` (set by the user: logger.wandb.mode=online) talks to a server. The history's
x-axis is the training step; the config goes in as the run config (dotted keys); the summary
is merged into the run summary; plots are logged as images at the final step. A resumed dgrun
run continues the same W&B run id (each process writes its own offline-run-*-<id> directory;
`wandb sync` puts them together).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

from dgrun.errors import UserError
from dgrun.trackers.base import Tracker, default_run_name, require, scalars

log = logging.getLogger("dgrun")

MODES = ("offline", "online", "disabled")


class WandbTracker(Tracker):
    requires, extra = "wandb", "wandb"

    def __init__(self, *, mode: str = "offline", project: str = "dgrun",
                 entity: Optional[str] = None, name: Optional[str] = None,
                 group: Optional[str] = None, tags: Optional[list[str]] = None,
                 notes: Optional[str] = None, settings: Optional[dict[str, Any]] = None):
        super().__init__()
        if mode not in MODES:
            raise UserError(f"logger.wandb.mode={mode!r} is not a W&B mode",
                            f"choose one of: {', '.join(MODES)}")
        if mode != "online":
            # wandb reports its own internal errors to a server unless told not to; offline
            # means no network. Read when wandb starts its service, so set before the import.
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        self.wandb = require("wandb", self.extra)
        self.mode, self.project, self.entity, self.name = mode, project, entity, name
        self.group, self.tags, self.notes = group, list(tags or []), notes
        # console="off": dgrun owns the terminal (progress bar, logging); silent: no banners.
        try:
            self.settings = self.wandb.Settings(**{"silent": True, "console": "off",
                                                   **(settings or {})})
        except Exception as e:
            raise UserError(f"logger.wandb.settings is not valid W&B settings ({e})".replace(
                "\n", " "), "see wandb.Settings for the keys and values it takes") from None
        self.run = None

    def start(self, run_dir: Path, config: dict[str, Any], resume: bool) -> None:
        run_id = self.state.get("run_id") if resume else None
        self.run = self.wandb.init(
            mode=self.mode, dir=str(run_dir), project=self.project, entity=self.entity,
            name=self.name or default_run_name(run_dir), group=self.group, tags=self.tags,
            notes=self.notes, config=config, id=run_id, resume="allow" if run_id else None,
            # Our own run object, never wandb's global one: other code may hold that.
            allow_val_change=bool(run_id), reinit="create_new", settings=self.settings)
        self.state.update({"run_id": self.run.id, "project": self.project})
        if self.mode == "offline":
            log.info("wandb: offline run %s in %s; upload it with `wandb sync %s`", self.run.id,
                     run_dir / "wandb", Path(self.run.dir).parent)

    def log_metrics(self, row: dict[str, Any]) -> None:
        self.run.log(scalars(row), step=int(row["step"]))

    def log_images(self, paths: list[Path], step: int) -> None:
        # W&B drops a step below the last one it saw.
        step = max(step, int(self.state.get("last_step") or 0))
        self.run.log({f"plots/{p.stem}": self.wandb.Image(str(p)) for p in paths}, step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        self.run.summary.update(summary)
        run, self.run = self.run, None
        run.finish(exit_code=1 if summary.get("status") == "failed" else 0)

    def close(self) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            run.finish(exit_code=1)
