"""CIFAR-10-C's noise corruptions: independent per-pixel, per-channel noise."""
from __future__ import annotations

import torch
from torch import Tensor

from dgrun.robustness.registry import corruption
from dgrun.robustness.rng import Draws


@corruption("gaussian_noise", (0.04, 0.06, 0.08, 0.09, 0.10))
def gaussian_noise(x: Tensor, std: float, draws: Draws) -> Tensor:
    return x + draws.normal(tuple(x.shape), std)


@corruption("shot_noise", (500, 250, 100, 75, 50))
def shot_noise(x: Tensor, photons: float, draws: Draws) -> Tensor:
    """Poisson photon counts at `photons` per unit of intensity."""
    return draws.poisson(x * photons) / photons


@corruption("impulse_noise", (0.01, 0.02, 0.03, 0.05, 0.07))
def impulse_noise(x: Tensor, amount: float, draws: Draws) -> Tensor:
    """skimage's random_noise(mode='s&p'): each value is flipped with probability `amount`,
    to 1 or 0 with equal odds."""
    flipped = draws.uniform(tuple(x.shape)) < amount
    salted = draws.uniform(tuple(x.shape)) < 0.5
    return torch.where(flipped, salted.to(x.dtype), x)


@corruption("speckle_noise", (0.06, 0.10, 0.12, 0.16, 0.20))
def speckle_noise(x: Tensor, std: float, draws: Draws) -> Tensor:
    """Multiplicative Gaussian noise."""
    return x + x * draws.normal(tuple(x.shape), std)
