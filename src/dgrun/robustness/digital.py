"""CIFAR-10-C's digital corruptions: contrast, saturate, pixelate, JPEG, elastic transform."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dgrun.robustness import filters
from dgrun.robustness.registry import corruption
from dgrun.robustness.rng import Draws


@corruption("contrast", (0.75, 0.5, 0.4, 0.3, 0.15))
def contrast(x: Tensor, factor: float, draws: Draws) -> Tensor:
    """Pull each channel towards its own spatial mean."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    return (x - mean) * factor + mean


@corruption("saturate", ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)), colour_only=True)
def saturate(x: Tensor, c: tuple[float, float], draws: Draws) -> Tensor:
    """HSV saturation S -> clip(S * c[0] + c[1], 0, 1), hue and value kept (skimage's round
    trip in closed form).

    With V = max and D = max - min, channel k is V - S * V * (V - x_k) / D, so a new S' gives
    V - S' * V * (V - x_k) / D. A grey pixel (D = 0) has hue 0 (red) in skimage's convention,
    so S' = c[1] > 0 tints it: (V, V (1 - S'), V (1 - S')), as in CIFAR-10-C.
    """
    factor, offset = c
    value = x.amax(dim=1, keepdim=True)
    spread = value - x.amin(dim=1, keepdim=True)
    sat = torch.where(value > 0, spread / value.clamp_min(1e-12), torch.zeros_like(value))
    new_sat = (sat * factor + offset).clamp(0, 1)
    coloured = value - new_sat * value * (value - x) / spread.clamp_min(1e-12)
    red = torch.zeros_like(x)
    red[:, 0] = 1.0
    grey = value * (1 - new_sat * (1 - red))
    return torch.where(spread > 0, coloured, grey)


@corruption("pixelate", (0.95, 0.9, 0.85, 0.75, 0.65))
def pixelate(x: Tensor, fraction: float, draws: Draws) -> Tensor:
    """PIL BOX resize down to int(side * fraction), then back up, on uint8 pixels."""
    h, w = x.shape[-2:]
    small_h, small_w = max(1, int(h * fraction)), max(1, int(w * fraction))
    u8 = torch.round(x * 255)
    u8 = filters.pil_box_resize(filters.pil_box_resize(u8, small_h, small_w), h, w)
    return u8 / 255


@corruption("jpeg_compression", (80, 65, 58, 50, 40))
def jpeg_compression(x: Tensor, quality: int, draws: Draws) -> Tensor:
    """Pillow's JPEG encoder at `quality`, then decoded.

    The one corruption that leaves the device: JPEG coding is Pillow's, image by image.
    """
    u8 = torch.round(x * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    grey = u8.shape[-1] == 1
    out = np.empty_like(u8)
    for i, image in enumerate(u8):
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if grey else image).save(buffer, "JPEG", quality=quality)
        decoded = np.asarray(Image.open(buffer))
        out[i] = decoded[..., None] if grey else decoded
    return torch.from_numpy(out).to(x.device).permute(0, 3, 1, 2).to(x.dtype) / 255


# Fractions of the image side (the generator's IMSIZE * (...) with IMSIZE = 32): the
# displacement scale alpha, the smoothing sigma of the displacement field, the affine jitter.
@corruption("elastic_transform", ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06),
                                  (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)))
def elastic_transform(x: Tensor, c: tuple[float, float, float], draws: Draws) -> Tensor:
    """A random affine warp (three points jittered), then a smooth random displacement field.

    Borders as in the generator: reflect-101 for the warp (cv2.warpAffine), half-sample
    reflection for the displacement (scipy's map_coordinates). Interpolation is in float;
    OpenCV 5's warpAffine agrees to 1e-5, older OpenCV rounded sample positions to 1/32 pixel.
    """
    n, _, h, w = x.shape
    side = min(h, w)
    alpha, sigma, jitter = (f * side for f in c)
    # The affine part, solved and inverted in float64 on the host (three points an image).
    cx, cy, sq = float(w // 2), float(h // 2), float(side // 3)
    src = torch.tensor([[cx + sq, cy + sq], [cx + sq, cy - sq], [cx - sq, cy - sq]],
                       dtype=torch.float64).expand(n, 3, 2)
    dst = src + draws.uniform((n, 3, 2), -jitter, jitter, torch.float32, "cpu").double()
    x = filters.warp_affine(x, filters.affine_from_points(src, dst).to(x.device))
    # The displacement field: uniform noise, Gaussian-smoothed (truncate 3), times alpha.
    field = draws.uniform((n, 2, h, w), -1.0, 1.0, torch.float64).to(x.dtype)
    field = filters.gaussian_blur(field, sigma, mode="reflect", truncate=3.0) * alpha
    rows, cols = torch.meshgrid(torch.arange(h, device=x.device, dtype=x.dtype),
                                torch.arange(w, device=x.device, dtype=x.dtype), indexing="ij")
    return filters.sample_bilinear(x, rows + field[:, 1], cols + field[:, 0], "reflect")
