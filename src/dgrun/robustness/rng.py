"""Seeded random draws for corruptions and attacks, independent of the device and of time.

Every draw comes from a CPU generator keyed by a stable hash of its purpose, e.g.
(seed, "corruption", name, severity, chunk), and is then moved to the images' device. So the
same images get the same noise at every evaluation, on a CPU and on a GPU alike, and drawing
never touches the global generators the training loop uses.
"""
from __future__ import annotations

import torch
from torch import Tensor

from dgrun.seeding import derive_seed


class Draws:
    """One purpose's random stream: `Draws(device, seed, "corruption", name, severity)`."""

    def __init__(self, device: torch.device | str, seed: int, *purpose: object):
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(derive_seed(seed, *purpose))

    def uniform(self, shape: tuple[int, ...], low: float = 0.0, high: float = 1.0,
                dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                ) -> Tensor:
        u = torch.rand(shape, generator=self.generator, dtype=dtype)
        return (u * (high - low) + low).to(self.device if device is None else device)

    def normal(self, shape: tuple[int, ...], std: float = 1.0) -> Tensor:
        return (torch.randn(shape, generator=self.generator) * std).to(self.device)

    def poisson(self, rate: Tensor) -> Tensor:
        # The rates go to the CPU for the draw: torch.poisson takes no CPU generator for a
        # device tensor, and a device generator would give each device different noise.
        return torch.poisson(rate.detach().float().cpu(), generator=self.generator).to(rate.device)

    def integers(self, low: int, high: int, shape: tuple[int, ...]) -> Tensor:
        """Integers in [low, high), on the CPU (they index host-side bookkeeping)."""
        return torch.randint(low, high, shape, generator=self.generator)
