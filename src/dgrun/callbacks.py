"""Hydra callbacks. `ReportCallback` makes `dgrun report` of a sweep when the sweep ends.

Wired in the root config:

    hydra:
      callbacks:
        report:
          _target_: dgrun.callbacks.ReportCallback

Hydra calls `on_multirun_end` only when every job of the sweep succeeded, so the report stays
its own command and this is a convenience: when a job fails, `on_job_end` says so and gives the
command that makes the report by hand once the sweep is over. A report that cannot be made never
fails the sweep: the runs are the record, the report can always be made again.
"""
from __future__ import annotations

import logging
import shlex
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("dgrun")


def report_command(sweep_dir: str) -> str:
    return f"dgrun report {shlex.quote(str(sweep_dir))}"


class ReportCallback(Callback):
    def __init__(self, html: bool = False, enabled: bool = True) -> None:
        self.html = html          # also write report.html (needs plotly: dgrun[report])
        self.enabled = enabled    # hydra.callbacks.report.enabled=false turns it off for a sweep
        self.failed: list[str] = []

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status != JobStatus.FAILED:
            return
        overrides = " ".join(job_return.overrides or []) or "(no overrides)"
        self.failed.append(overrides)
        sweep_dir = OmegaConf.select(config, "hydra.sweep.dir")
        mode = OmegaConf.select(config, "hydra.mode")
        if sweep_dir is not None and getattr(mode, "name", mode) == "MULTIRUN":
            log.warning("job %s failed (%s); Hydra makes no sweep report when a job fails: "
                        "when the sweep is over, run `%s`", overrides,
                        _describe(job_return._return_value), report_command(sweep_dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        sweep_dir = str(config.hydra.sweep.dir)
        command = report_command(sweep_dir)
        if self.failed:
            log.warning("%d job(s) failed; no report made: run `%s`", len(self.failed), command)
            return
        from dgrun.report import main

        try:
            code = main([sweep_dir] + (["--html"] if self.html else []))
        except Exception as e:  # the sweep's results stand whatever happens here
            log.warning("the sweep report failed (%s); run `%s`", _describe(e), command)
            return
        if code != 0:
            log.warning("no sweep report made; run `%s`", command)


def _describe(error: Any) -> str:
    return f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
