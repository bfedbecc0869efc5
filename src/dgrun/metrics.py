"""The run directory's record: metrics.csv (a row per evaluation) and summary.json.

metrics.csv is appended as the run goes, so a crashed run still shows its curve; on resume it
is rewritten from the checkpoint's rows, dropping rows the killed process wrote after its last
checkpoint (the resumed run measures them again, identically).
"""
from __future__ import annotations

import csv
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Optional

COLUMNS = ["step", "epoch", "time_s", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
           "train_acc_clean", "train_acc_corrupted", "weight_norm"]
STATUSES = ("running", "completed", "stopped", "diverged", "preempted", "failed")


class MetricsFile:
    def __init__(self, path: Path):
        self.path = path
        self.columns: Optional[list[str]] = None

    def rewrite(self, rows: list[dict]) -> None:
        self.columns = None
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("")
        os.replace(tmp, self.path)
        for row in rows:
            self.append(row)

    def append(self, row: dict) -> None:
        if self.columns is None:
            extras = [k for k in row if k not in COLUMNS]
            self.columns = [c for c in COLUMNS if c in row] + extras
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(self.columns)
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(c)) for c in self.columns])


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return repr(value)  # full precision: resumed and uninterrupted runs compare exactly
    return "" if value is None else value


def versions() -> dict[str, str]:
    import hydra
    import numpy
    import torch

    from dgrun import __version__

    return {"dgrun": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "numpy": numpy.__version__, "hydra": hydra.__version__,
            "platform": platform.platform()}


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
