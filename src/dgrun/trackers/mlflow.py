"""MLflow: a local file store in <run_dir>/mlruns by default; `tracking_uri` for any other store.

    mlflow ui --backend-store-uri outputs/DATE/TIME/mlruns     (the UI needs the full `mlflow`)
    logger.mlflow.tracking_uri=http://host:5000                 a tracking server you run

The config goes in as params (dotted keys), the metrics rows as metric history at the training
step, plots as artifacts under plots/, the summary as the artifact summary.json plus its
numbers as `summary.<key>` metrics and its status as the run status. A resumed dgrun run
continues the same MLflow run (same store, run id kept in trackers.json).
"""
from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from dgrun.trackers.base import Tracker, default_run_name, flatten, require, scalars

log = logging.getLogger("dgrun")

# summary["status"] -> MLflow's run status.
STATUS = {"completed": "FINISHED", "stopped": "FINISHED", "diverged": "FINISHED",
          "failed": "FAILED", "preempted": "KILLED"}
BATCH = 100  # MLflow takes at most 100 params or tags per log_batch
# Characters MLflow refuses in a metric or param name (a probe may name a column freely).
NOT_A_KEY = re.compile(r"[^\w\-. :/]")


def key(name: str) -> str:
    return NOT_A_KEY.sub("_", name)


class MlflowTracker(Tracker):
    requires, extra = "mlflow", "mlflow"

    def __init__(self, *, tracking_uri: Optional[str] = None, experiment: str = "dgrun",
                 run_name: Optional[str] = None, tags: Optional[dict[str, Any]] = None):
        super().__init__()
        # mlflow sends usage telemetry from `import mlflow` on unless told not to; dgrun
        # reaches no network the user did not configure. A user's own setting wins.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        require("mlflow", self.extra)
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.run_name, self.tags = run_name, {k: str(v) for k, v in (tags or {}).items()}
        self.client = None
        self.run_id: Optional[str] = None

    def start(self, run_dir: Path, config: dict[str, Any], resume: bool) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        uri = self.tracking_uri or (Path(run_dir) / "mlruns").resolve().as_uri()
        if urlparse(uri).scheme in ("", "file"):
            # MLflow 3 refuses its file store unless asked (it prefers a database); a store in
            # the run directory, next to metrics.csv, is what dgrun wants by default.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        if resume and self.state.get("tracking_uri") == uri and self.state.get("run_id"):
            try:
                self.client.update_run(self.state["run_id"], status="RUNNING")
                self.run_id = self.state["run_id"]
                return  # params are logged once: MLflow refuses to change a logged param
            except Exception as e:  # gone (store deleted, other server): a new run, if it can
                log.warning("mlflow run %s cannot be continued (%s); starting a new one",
                            self.state["run_id"], e)
        self.state.clear()  # a new tracker run: nothing of it is logged yet
        experiment = self.client.get_experiment_by_name(self.experiment)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self._create_experiment())
        run = self.client.create_run(experiment_id, run_name=self.run_name or
                                     default_run_name(run_dir), tags=self.tags)
        self.run_id = run.info.run_id
        self.state.update({"run_id": self.run_id, "tracking_uri": uri,
                           "experiment_id": experiment_id})
        params = [Param(key(k), str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in config.items()]
        for i in range(0, len(params), BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + BATCH])

    def log_metrics(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        step, stamp = int(row["step"]), int(time.time() * 1000)
        metrics = [Metric(key(k), v, stamp, step) for k, v in scalars(row).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_images(self, paths: list[Path], step: int) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path), artifact_path="plots")

    def finish(self, summary: dict[str, Any]) -> None:
        from mlflow.entities import Metric, RunTag

        self.client.log_dict(self.run_id, summary, "summary.json")
        step, stamp = int(self.state.get("last_step") or 0), int(time.time() * 1000)
        flat = flatten(summary)
        numbers = {k: v for k, v in flat.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        metrics = [Metric(key(f"summary.{k}"), float(v), stamp, step)
                   for k, v in numbers.items()]
        tags = [RunTag(f"dgrun.{k}", str(flat[k])) for k in ("status", "stop_reason") if k in flat]
        self.client.log_batch(self.run_id, metrics=metrics, tags=tags)
        self.client.set_terminated(self.run_id, status=STATUS.get(summary.get("status"),
                                                                  "FINISHED"))
        self.run_id = None

    def _create_experiment(self) -> str:
        try:
            return self.client.create_experiment(self.experiment)
        except Exception:
            # Another job of the sweep created it between our look and our create.
            experiment = self.client.get_experiment_by_name(self.experiment)
            if experiment is None:
                raise
            return experiment.experiment_id
