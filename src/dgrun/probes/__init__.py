"""Probe registry. A probe builder takes plain keyword options plus the run's context:

    @PROBES.register("grokking")
    def grokking(*, meta: Meta, seed: int, train_threshold: float = 0.99, ...) -> Probe

`meta` (the dataset's Meta) and `seed` are passed by `build`, and so is `loss` (the run's
trainer.loss name) to the builders that take it; everything else comes from the
config's `probes:` mapping (`probes.grokking.train_threshold=0.95`), which a `phenomenon`
preset fills and users extend (`+probes.transitions={}`) or trim (`~probes.grokking`).
"""
from __future__ import annotations

from typing import Any

from dgrun.data.bundle import Meta
from dgrun.probes.base import Evaluation, Probe
from dgrun.registry import Registry

PROBES = Registry("probe")
CONTEXT = ("meta", "seed", "loss")  # builder arguments that come from the run, never a config

__all__ = ["PROBES", "Evaluation", "Probe", "build"]


def build(specs: dict[str, dict[str, Any]], *, meta: Meta, seed: int,
          loss: str = "cross_entropy") -> list[Probe]:
    """{name: options} -> probes, in the order given."""
    probes = []
    for name, options in specs.items():
        # Only the probes that measure a loss of their own take the run's loss function.
        context = {"loss": loss} if "loss" in PROBES.options(name) else {}
        probe = PROBES.build(name, meta=meta, seed=seed, **context, **(options or {}))
        probe.name = name
        probes.append(probe)
    return probes

# Importing the modules registers their probes.
from dgrun.probes import (attention_heads, dfr, dynamics, examples,  # noqa: E402,F401
                          groups, grokking, modular_progress, parity_progress, robustness,
                          sharpness, transitions)
