"""Per-example tracking (`trainer.track_examples=true`): at every evaluation, each training
row's probability of its (trained-on) label and whether the prediction was right.

Kept compactly on the device (float16 probabilities, bool correctness: 3 bytes per row per
evaluation, 15 MB for 50,000 rows over 100 evaluations) and saved with every checkpoint, so a
resumed run's history is exact. `dgrun analyze RUN cartography` reads it from the last
checkpoint (Swayamdipta et al. 2020's dataset maps).
"""
from __future__ import annotations

import torch

from dgrun.probes import PROBES
from dgrun.probes.base import Evaluation, Probe


class Examples(Probe):
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.prob: list[torch.Tensor] = []
        self.correct: list[torch.Tensor] = []

    def measure(self, ev: Evaluation) -> dict:
        y = ev.train.y
        prob = ev.logits("train").softmax(dim=-1).gather(1, y.unsqueeze(1)).squeeze(1)
        self.steps.append(ev.step)
        self.prob.append(prob.to(torch.float16))
        self.correct.append(ev.correct("train"))
        return {}

    def state_dict(self) -> dict:
        if not self.steps:
            return {"steps": torch.zeros(0, dtype=torch.long)}
        return {"steps": torch.tensor(self.steps), "true_prob": torch.stack(self.prob),
                "correct": torch.stack(self.correct)}

    def load_state_dict(self, state: dict) -> None:
        self.steps = [int(s) for s in state["steps"]]
        if self.steps:  # in the dtypes measure() appends, whatever the checkpoint holds
            self.prob = list(state["true_prob"].to(torch.float16).unbind(0))
            self.correct = list(state["correct"].to(torch.bool).unbind(0))


@PROBES.register("examples")
def examples(*, meta, seed) -> Examples:
    """Per-example probability of the label and correctness at every evaluation (cartography)."""
    return Examples()
