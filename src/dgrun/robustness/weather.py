"""CIFAR-10-C's weather corruptions that need no image assets: fog and brightness.

(Snow, frost and spatter need ImageMagick's motion blur or the generator's frost photographs;
the loader in cifar10c.py reads the published files for those.)
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from dgrun.robustness.registry import corruption
from dgrun.robustness.rng import Draws


@corruption("fog", ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)))
def fog(x: Tensor, c: tuple[float, float], draws: Draws) -> Tensor:
    """Add a plasma fractal (the same on every channel), then rescale by max / (max + c[0])."""
    amount, decay = c
    n, _, h, w = x.shape
    size = 1 << max(1, math.ceil(math.log2(max(h, w))))  # the generator's 32 for CIFAR
    layer = plasma_fractal(n, size, decay, draws)[:, :h, :w].to(x.device, x.dtype)
    peak = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x + amount * layer.unsqueeze(1)) * peak / (peak + amount)


def plasma_fractal(n: int, size: int, decay: float, draws: Draws) -> Tensor:
    """(n, size, size) diamond-square height maps in [0, 1], one per image, computed on the
    host in float64 as the generator's `plasma_fractal(mapsize, wibbledecay)` does."""
    maps = torch.zeros(n, size, size, dtype=torch.float64)
    step, wibble = size, 100.0

    def wibbled_mean(total: Tensor) -> Tensor:
        noise = draws.uniform(tuple(total.shape), -wibble, wibble, torch.float64, "cpu")
        return total / 4 + wibble * noise

    while step >= 2:
        half = step // 2
        # Squares: each centre gets the mean of its four corners (wrapping), plus noise.
        corners = maps[:, 0::step, 0::step]
        total = corners + corners.roll(-1, dims=1)
        total = total + total.roll(-1, dims=2)
        maps[:, half::step, half::step] = wibbled_mean(total)
        # Diamonds: each edge midpoint gets the mean of its four neighbours, plus noise.
        centres = maps[:, half::step, half::step]
        corners = maps[:, 0::step, 0::step]
        total = centres + centres.roll(1, dims=1) + corners + corners.roll(-1, dims=2)
        maps[:, 0::step, half::step] = wibbled_mean(total)
        total = centres + centres.roll(1, dims=2) + corners + corners.roll(-1, dims=1)
        maps[:, half::step, 0::step] = wibbled_mean(total)
        step //= 2
        wibble /= decay
    maps = maps - maps.amin(dim=(1, 2), keepdim=True)
    return maps / maps.amax(dim=(1, 2), keepdim=True)


@corruption("brightness", (0.05, 0.1, 0.15, 0.2, 0.3))
def brightness(x: Tensor, shift: float, draws: Draws) -> Tensor:
    """Add `shift` to the HSV value (clipped at 1), keeping hue and saturation.

    With hue and saturation fixed every RGB channel is proportional to the value V = max(rgb),
    so the HSV round trip is a rescaling by V' / V; a black pixel (V = 0, saturation 0)
    becomes grey V'. On grey images this is min(g + shift, 1).
    """
    value = x.amax(dim=1, keepdim=True)
    lifted = (value + shift).clamp(max=1)
    return torch.where(value > 0, x * lifted / value.clamp_min(1e-12), lifted.expand_as(x))
