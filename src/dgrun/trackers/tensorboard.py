"""TensorBoard: event files in <run_dir>/tensorboard, written with torch.utils.tensorboard.

    tensorboard --logdir outputs/DATE/TIME         one run
    tensorboard --logdir multirun/DATE/TIME        a sweep: every run, and the HPARAMS tab

Scalars are the metrics rows' columns under their metrics.csv names, at the training step.
The config goes in as hparams (the HPARAMS tab compares the runs of a sweep), the plots as
images, the summary as text, and the status as the hparams session's end.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from dgrun.trackers.base import Tracker, hparam_value, require, scalars

# summary["status"] -> the hparams plugin's session status. A preempted run will go on.
STATUS = {"completed": "STATUS_SUCCESS", "stopped": "STATUS_SUCCESS",
          "diverged": "STATUS_SUCCESS", "failed": "STATUS_FAILURE",
          "preempted": "STATUS_RUNNING"}


class TensorBoardTracker(Tracker):
    requires, extra = "tensorboard", "tensorboard"
    # purge_step hides what the interrupted process logged after the resume point.
    rewrites_history = True

    def __init__(self) -> None:
        super().__init__()
        require("tensorboard", self.extra)  # torch.utils.tensorboard needs it
        self._tb = require("torch.utils.tensorboard", self.extra)
        self.writer = None
        self.log_dir: Optional[Path] = None

    def start(self, run_dir: Path, config: dict[str, Any], resume: bool) -> None:
        self.log_dir = Path(run_dir) / "tensorboard"
        if resume:
            # Opened at the first row, with purge_step at that row's step: TensorBoard then
            # drops the interrupted process's events from there on and shows the re-measured
            # rows once.
            return
        # purge_step=0: a fresh run in a used directory (trainer.resume=false) hides the old
        # run's events instead of drawing two curves on one axis.
        self._open(purge_step=0)
        self.writer.file_writer.add_summary(_session_start(config), 0)
        self.writer.flush()

    def log_metrics(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        if self.writer is None:
            self._open(purge_step=step)
        wall = time.time()
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, step, walltime=wall)
        # Flushed per row: a run killed later must not lose rows logged before its checkpoint.
        self.writer.flush()

    def log_images(self, paths: list[Path], step: int) -> None:
        import numpy as np
        from PIL import Image

        if self.writer is None:
            self._open(purge_step=None)
        for path in paths:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(f"plots/{path.stem}", pixels, step, dataformats="HWC")
        self.writer.flush()

    def finish(self, summary: dict[str, Any]) -> None:
        if self.writer is None:
            self._open(purge_step=None)
        step = int(self.state.get("last_step") or 0)
        text = "```\n" + json.dumps(summary, indent=2, default=str) + "\n```"
        self.writer.add_text("summary", text, step)
        status = STATUS.get(summary.get("status"), "STATUS_UNKNOWN")
        self.writer.file_writer.add_summary(_session_end(status), step)
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.close()

    def _open(self, purge_step: Optional[int]) -> None:
        self.writer = self._tb.SummaryWriter(str(self.log_dir), purge_step=purge_step)


# The hparams plugin's session summaries, built here rather than with torch's `hparams()`:
# that one writes booleans as numbers and every session's end as a success.

def _session_start(config: dict[str, Any]):
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    info = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for key, value in config.items():
        value = hparam_value(value)
        kind = ("bool_value" if isinstance(value, bool) else
                "string_value" if isinstance(value, str) else "number_value")
        setattr(info.hparams[key], kind, value)
    return _hparams_summary(metadata.SESSION_START_INFO_TAG,
                            plugin_data_pb2.HParamsPluginData(session_start_info=info))


def _session_end(status: str):
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    info = plugin_data_pb2.SessionEndInfo(status=api_pb2.Status.Value(status),
                                          end_time_secs=time.time())
    return _hparams_summary(metadata.SESSION_END_INFO_TAG,
                            plugin_data_pb2.HParamsPluginData(session_end_info=info))


def _hparams_summary(tag: str, content):
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata

    return Summary(value=[Summary.Value(tag=tag,
                                        metadata=metadata.create_summary_metadata(content))])
