"""CIFAR-10-C's blurs: Gaussian, defocus (disk), frosted glass and zoom."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from dgrun.robustness import filters
from dgrun.robustness.registry import corruption
from dgrun.robustness.rng import Draws


@corruption("gaussian_blur", (0.4, 0.6, 0.7, 0.8, 1.0))
def gaussian_blur(x: Tensor, sigma: float, draws: Draws) -> Tensor:
    return filters.gaussian_blur(x, sigma)


@corruption("defocus_blur", ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)))
def defocus_blur(x: Tensor, c: tuple[float, float], draws: Draws) -> Tensor:
    """Correlation with an antialiased disk of radius c[0] (alias blur c[1])."""
    radius, alias_blur = c
    return filters.filter2d(x, filters.disk_kernel(radius, alias_blur), "reflect101")


@corruption("glass_blur", ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)))
def glass_blur(x: Tensor, c: tuple[float, int, int], draws: Draws) -> Tensor:
    """Blur, round down to uint8, displace pixels locally, blur again.

    The generator visits the interior pixels bottom-right to top-left and "swaps" each with the
    pixel at a random offset (dy, dx) in [-delta, delta)^2 by `x[h, w], x[h', w'] = x[h', w'],
    x[h, w]`. On an RGB array both sides are views, so this copies x[h', w'] into x[h, w] and
    leaves x[h', w'] as it was: CIFAR-10-C's glass blur is that copy, not a swap. With
    delta = 1 (every severity) the offsets are in {-1, 0}, so each copy reads a pixel the pass
    has not written yet, and one pass is exactly a gather from the image before it.
    """
    sigma, delta, iterations = c
    x = torch.floor(filters.gaussian_blur(x, sigma).clamp(0, 1) * 255) / 255
    n, ch, h, w = x.shape
    rows = torch.arange(delta + 1, h - delta + 1)
    cols = torch.arange(delta + 1, w - delta + 1)
    for _ in range(iterations):
        offsets = draws.integers(-delta, delta, (2, n, len(rows), len(cols)))
        source = torch.arange(h * w).view(1, h, w).repeat(n, 1, 1)
        source[:, delta + 1:h - delta + 1, delta + 1:w - delta + 1] = (
            (rows.view(1, -1, 1) + offsets[0]) * w + cols.view(1, 1, -1) + offsets[1])
        source = source.reshape(n, 1, h * w).expand(n, ch, h * w).to(x.device)
        x = x.reshape(n, ch, h * w).gather(2, source).reshape(n, ch, h, w)
    return filters.gaussian_blur(x, sigma)


def _zoom_factors(top: float) -> np.ndarray:
    # np.arange, float steps and all: arange(1, 1.16, 0.01) stops at 1.15.
    return np.arange(1, top, 0.01)


@corruption("zoom_blur", tuple(_zoom_factors(t) for t in (1.06, 1.11, 1.16, 1.21, 1.26)))
def zoom_blur(x: Tensor, factors: np.ndarray, draws: Draws) -> Tensor:
    """The mean of the image and its centre zooms by each factor (linear interpolation)."""
    out = x.clone()
    for factor in factors:
        out += filters.zoom(x, float(factor))
    return out / (len(factors) + 1)
