"""metrics.csv: one row per evaluation, appended as the run goes.

A crashed run still shows its curve. On resume the file is rewritten from the checkpoint's rows,
dropping rows the killed process wrote after its last checkpoint (the resumed run measures them
again, identically). A column that first appears in a later row (a probe that measures every
tenth evaluation) rewrites the file once with the wider header.
"""
from __future__ import annotations

import csv
import io
import math
import platform
import sys
from pathlib import Path
from typing import Any, Optional

from dgrun.files import write_atomic

COLUMNS = ["step", "epoch", "time_s", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
           "train_acc_clean", "train_acc_corrupted", "weight_norm"]


class MetricsFile:
    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict] = []
        self.columns: Optional[list[str]] = None

    def rewrite(self, rows: list[dict]) -> None:
        self.rows = list(rows)
        self.columns = self._columns(self.rows)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        if self.columns:
            writer.writerow(self.columns)
            writer.writerows([_fmt(r.get(c)) for c in self.columns] for r in self.rows)
        write_atomic(self.path, lambda f: f.write(buffer.getvalue().encode()), fsync=False)

    def append(self, row: dict) -> None:
        if self.columns is None or any(k not in self.columns for k in row):
            self.rewrite(self.rows + [row])
            return
        self.rows.append(row)
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(c)) for c in self.columns])

    @staticmethod
    def _columns(rows: list[dict]) -> list[str]:
        seen = dict.fromkeys(k for r in rows for k in r)
        return [c for c in COLUMNS if c in seen] + [k for k in seen if k not in COLUMNS]


def number(value: Any) -> Optional[float]:
    """A metrics-row cell as a float, or None when it is blank: missing, '', None, NaN or
    infinite (a probe that measures every Nth evaluation leaves the others blank)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


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
