"""The probe contract: how a phenomenon measures itself without the loop knowing it.

At each evaluation the loop builds one `Evaluation` and hands it to every probe:

    probe.measure(ev) -> {column: value}        # extra metrics.csv columns (tensors are fine)
    probe.summarize(rows) -> {field: value}     # once at the end, merged into summary.json
    probe.marks(summary) -> [(step, label)]     # vertical lines on the run's plots
    probe.plots(rows, summary, out_dir, marks)  # extra figures in plots/
    probe.state_dict() / load_state_dict()      # per-example state rides in the checkpoint

`Evaluation` computes each split's logits once, on demand, so ten probes that all need test
predictions cost one forward pass. Values stay on the device until the loop syncs the whole
row in one transfer. Detection (memorization, generalization, abrupt transitions) is a
`summarize` over the rows, testable on synthetic curves without training anything.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional, Sequence
import torch
from torch import Tensor, nn

from dgrun.data.bundle import Split

log = logging.getLogger("dgrun")

Value = float | int | Tensor



class Evaluation:
    """One evaluation's shared view of the model and data (eval mode, no gradients)."""

    def __init__(self, model: nn.Module, train: Split, test: Split, *,
                 prepare: Optional[Callable[[Tensor], Tensor]] = None, batch_size: int = 4096,
                 step: int = 0, lr: float = 0.0, val: Optional[Split] = None):
        self.model, self.train, self.test, self.val = model, train, test, val
        # Stored rows -> model inputs (images: uint8 or [0, 1] pixels -> normalized floats).
        self.prepare = prepare or (lambda x: x)
        self.batch_size, self.step, self.lr = batch_size, step, lr
        self._logits: dict[str, Tensor] = {}

    def split(self, name: str) -> Split:
        split = {"train": self.train, "test": self.test, "val": self.val}[name]
        if split is None:
            raise KeyError(f"this dataset has no {name} split")
        return split

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Logits for stored rows (pixels for images), in eval mode, in evaluation-sized chunks.

        A chunk that runs out of device memory is retried at half the size, and the smaller
        size is kept (`batch_size`; the loop carries it to later evaluations)."""
        was_training = self.model.training
        self.model.eval()
        try:
            while True:
                try:
                    return torch.cat([self.model(self.prepare(x[i:i + self.batch_size])).float()
                                      for i in range(0, len(x), self.batch_size)])
                except torch.OutOfMemoryError:
                    if self.batch_size == 1:
                        raise
                    self.batch_size //= 2
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    log.warning("evaluation ran out of device memory; trainer.eval_batch_size "
                                "is now %d for this run", self.batch_size)
        finally:
            self.model.train(was_training)

    def logits(self, name: str) -> Tensor:
        """(N, classes) float logits of a whole split, computed once per evaluation."""
        if name not in self._logits:
            self._logits[name] = self.predict(self.split(name).x)
        return self._logits[name]

    def correct(self, name: str) -> Tensor:
        return self.logits(name).argmax(dim=-1) == self.split(name).y


class Probe:
    """A phenomenon's measurements. Subclasses override what they need; every hook is optional."""

    name: str = "probe"

    def measure(self, ev: Evaluation) -> dict[str, Value]:
        return {}

    def summarize(self, rows: list[dict]) -> dict:
        return {}

    def marks(self, summary: dict) -> list[tuple[int, str]]:
        return []

    def plots(self, rows: list[dict], summary: dict, out_dir: Path,
              marks: Sequence[tuple[int, str]] = ()) -> list[Path]:
        """Extra figures; `marks` are every probe's marks (and the interpolation step), to draw
        the run's events on them too."""
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

