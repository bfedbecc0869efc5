"""Progress reporting: a rich bar on a terminal, plain periodic lines elsewhere (CI, SLURM logs)."""
from __future__ import annotations

import logging
import sys
import time
from typing import Optional

log = logging.getLogger("dgrun")


def _describe(row: Optional[dict]) -> str:
    if not row:
        return ""
    text = (f"train_loss {row['train_loss']:.4f} train_acc {row['train_acc']:.4f} "
            f"test_acc {row['test_acc']:.4f}")
    return text


class PlainProgress:
    def __init__(self, total: Optional[int], every_s: float):
        self.total, self.every_s = total, every_s
        self.last_print = time.monotonic()
        self.row: Optional[dict] = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def step(self, step: int) -> None:
        now = time.monotonic()
        if now - self.last_print >= self.every_s:
            self.last_print = now
            of = f"/{self.total}" if self.total else ""
            log.info("step %d%s %s", step, of, _describe(self.row))

    def eval(self, row: dict) -> None:
        self.row = row


class RichProgress(PlainProgress):
    def __init__(self, total: Optional[int], every_s: float):
        super().__init__(total, every_s)
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.bar = Progress(TextColumn("[bold]dgrun"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(),
                            TextColumn("{task.fields[metrics]}"), transient=False)
        self.task = self.bar.add_task("train", total=total, metrics="")

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def step(self, step: int) -> None:
        self.bar.update(self.task, completed=step)

    def eval(self, row: dict) -> None:
        self.row = row
        self.bar.update(self.task, metrics=_describe(row))


class NoProgress(PlainProgress):
    def step(self, step: int) -> None:
        pass


def make(kind: str, total: Optional[int], every_s: float) -> PlainProgress:
    if kind == "auto":
        kind = "rich" if sys.stderr.isatty() else "plain"
    return {"rich": RichProgress, "plain": PlainProgress, "none": NoProgress}[kind](total, every_s)
