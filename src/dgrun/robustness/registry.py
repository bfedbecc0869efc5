"""The registry of image corruptions: its own room, so that the corruption families (blur,
noise, digital, weather) and `corruptions.py`, which applies them, import it and not each
other. `corruptions.py` imports the families once, to fill it."""
from __future__ import annotations

from typing import Callable, Sequence

from torch import Tensor

from dgrun.registry import Registry
from dgrun.robustness.rng import Draws

CORRUPTIONS = Registry("image corruption")
SEVERITIES = (1, 2, 3, 4, 5)
Corruption = Callable[[Tensor, object, Draws], Tensor]  # (pixels, this severity's params, draws)


def corruption(name: str, params: Sequence, *, colour_only: bool = False,
               ) -> Callable[[Corruption], Corruption]:
    """Register `fn(x, c, draws)`, where c is `params[severity - 1]`."""
    if len(params) != len(SEVERITIES):
        raise ValueError(f"corruption '{name}' needs {len(SEVERITIES)} severities' parameters")
    return CORRUPTIONS.register(name, params=tuple(params), colour_only=colour_only)
