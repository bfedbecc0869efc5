"""Batched image filters that reproduce the library calls of CIFAR-10-C's generator.

Hendrycks & Dietterich built CIFAR-10-C with scipy, scikit-image, OpenCV and Pillow, one image
at a time. The pieces here compute the same things as torch ops over a whole (N, C, H, W)
batch, on any device:

    gaussian_blur      skimage.filters.gaussian / scipy.ndimage.gaussian_filter, as two
                       banded matrix products with the border folded in
    filter2d           cv2.filter2D (correlation, BORDER_REFLECT_101)
    sample_bilinear    scipy.ndimage.map_coordinates(order=1, mode='reflect')
    warp_affine        cv2.warpAffine, in float (OpenCV 5 agrees to 1e-5; older OpenCV
                       rounded sample positions to 1/32 pixel)
    zoom_matrix        the clipped zoom of zoom blur: scipy.ndimage.zoom(order=1) of a centre crop
    pil_box_resize     PIL.Image.resize(..., Image.BOX) on uint8 values, bit for bit

Borders are index maps, so a pad may be wider than the image (a 17-pixel kernel on 8x8 digits):
    nearest     a a | a b c d | d d        (scipy 'nearest', skimage's default)
    reflect     b a | a b c d | d c        (scipy 'reflect', half-sample symmetric)
    reflect101  c b | a b c d | c b        (OpenCV's default, scipy 'mirror')
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def border_index(i: Tensor, n: int, mode: str) -> Tensor:
    """Map integer positions (any range) to valid indices 0..n-1 under a border rule."""
    if mode == "nearest":
        return i.clamp(0, n - 1)
    if mode == "reflect":
        j = i.remainder(2 * n)
        return torch.where(j >= n, 2 * n - 1 - j, j)
    if mode == "reflect101":
        if n == 1:
            return torch.zeros_like(i)
        period = 2 * (n - 1)
        j = i.remainder(period)
        return torch.where(j >= n, period - j, j)
    raise ValueError(f"unknown border mode {mode!r}")


def pad(x: Tensor, top: int, bottom: int, left: int, right: int, mode: str) -> Tensor:
    h, w = x.shape[-2:]
    rows = border_index(torch.arange(-top, h + bottom, device=x.device), h, mode)
    cols = border_index(torch.arange(-left, w + right, device=x.device), w, mode)
    return x.index_select(-2, rows).index_select(-1, cols)


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage's Gaussian weights: radius int(truncate * sigma + 0.5), summing to 1."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (float(sigma) ** 2) * x ** 2)
    return phi / phi.sum()


@lru_cache(maxsize=256)
def _banded(n: int, kernel1d: tuple[float, ...], mode: str) -> np.ndarray:
    """(n, n) matrix of a 1-D correlation with `kernel1d` and its border rule folded in."""
    r = len(kernel1d) // 2
    a = np.zeros((n, n))
    for i in range(n):
        taps = border_index(torch.arange(i - r, i + r + 1), n, mode).numpy()
        np.add.at(a[i], taps, kernel1d)
    return a


def separable(x: Tensor, kernel1d: np.ndarray, mode: str) -> Tensor:
    """Correlate every channel of (N, C, H, W) with `kernel1d` along H and along W, as two
    small matrix products (borders folded into the matrices)."""
    h, w = x.shape[-2:]
    taps = tuple(float(k) for k in kernel1d)
    rows = torch.as_tensor(_banded(h, taps, mode), dtype=x.dtype, device=x.device)
    cols = torch.as_tensor(_banded(w, taps, mode), dtype=x.dtype, device=x.device)
    return rows @ x @ cols.T


def gaussian_blur(x: Tensor, sigma: float, mode: str = "nearest", truncate: float = 4.0,
                  ) -> Tensor:
    """skimage.filters.gaussian(x, sigma, multichannel=True): spatial axes only."""
    if sigma <= 0:
        return x
    return separable(x, gaussian_kernel1d(sigma, truncate), mode)


def filter2d(x: Tensor, kernel: np.ndarray, mode: str = "reflect101") -> Tensor:
    """cv2.filter2D(x, -1, kernel) per channel: correlation, anchor at the kernel's centre."""
    n, c, h, w = x.shape
    kh, kw = kernel.shape
    k = torch.as_tensor(kernel, dtype=x.dtype, device=x.device).view(1, 1, kh, kw)
    flat = pad(x.reshape(n * c, 1, h, w), kh // 2, (kh - 1) // 2, kw // 2, (kw - 1) // 2, mode)
    return F.conv2d(flat, k).reshape(n, c, h, w)


def sample_bilinear(x: Tensor, ys: Tensor, xs: Tensor, mode: str) -> Tensor:
    """x (N, C, H, W) read at float source coordinates ys, xs (N, H', W'), linearly
    interpolated between the border-extended samples around each point."""
    n, c, h, w = x.shape
    y0, x0 = ys.floor(), xs.floor()
    fy, fx = (ys - y0).unsqueeze(1), (xs - x0).unsqueeze(1)
    y0, x0 = y0.long(), x0.long()
    flat = x.reshape(n, c, h * w)

    def at(yi: Tensor, xi: Tensor) -> Tensor:
        index = border_index(yi, h, mode) * w + border_index(xi, w, mode)
        index = index.reshape(n, 1, -1).expand(n, c, -1)
        return flat.gather(2, index).reshape(n, c, *ys.shape[1:])

    top = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx
    bottom = at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx
    return top * (1 - fy) + bottom * fy


@lru_cache(maxsize=256)
def zoom_matrix(n: int, factor: float) -> np.ndarray:
    """(n, n) linear map of CIFAR-10-C's `clipped_zoom` along one axis of length n.

    The centre ceil(n / factor) samples are zoomed by scipy.ndimage.zoom(order=1): the output
    has round(ceil(n / factor) * factor) samples, sample i reads input coordinate
    i * (in - 1) / (out - 1); then the centre n samples are kept.
    """
    crop = int(np.ceil(n / factor))
    top = (n - crop) // 2
    out = int(round(crop * factor))
    trim = (out - n) // 2
    a = np.zeros((n, n))
    scale = (crop - 1) / (out - 1) if out > 1 else 0.0
    for row in range(n):
        t = (row + trim) * scale
        k = min(int(np.floor(t)), crop - 1)
        f = t - k
        if k + 1 <= crop - 1 and f > 0:
            a[row, top + k] += 1 - f
            a[row, top + k + 1] += f
        else:
            a[row, top + k] += 1.0
    return a


def zoom(x: Tensor, factor: float) -> Tensor:
    """CIFAR-10-C's clipped_zoom on every image and channel of (N, C, H, W)."""
    h, w = x.shape[-2:]
    rows = torch.as_tensor(zoom_matrix(h, factor), dtype=x.dtype, device=x.device)
    cols = torch.as_tensor(zoom_matrix(w, factor), dtype=x.dtype, device=x.device)
    return rows @ x @ cols.T


PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point precision for 8-bit resampling


@lru_cache(maxsize=256)
def pil_box_coefficients(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) integer weights of Pillow's BOX resampling (Resample.c: precompute_coeffs,
    then normalize_coeffs_8bpc), so that out = clip8((in @ W.T + 2**21) >> 22)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        k = np.array([1.0 if -0.5 < (x + xmin - center + 0.5) / filterscale <= 0.5 else 0.0
                      for x in range(xmax)])
        if k.sum() != 0:
            k /= k.sum()
        weights[xx, xmin:xmin + xmax] = k
    return np.where(weights < 0, np.trunc(-0.5 + weights * (1 << PRECISION_BITS)),
                    np.trunc(0.5 + weights * (1 << PRECISION_BITS)))


def pil_box_resize(x: Tensor, height: int, width: int) -> Tensor:
    """PIL's `img.resize((width, height), Image.BOX)` on uint8 values held in a float tensor.

    Horizontal pass first, rounded to uint8, then the vertical pass, as Pillow does. The sums
    are integers below 2**53, so float64 holds them exactly on every device.
    """
    shape, dtype = x.shape, x.dtype
    x = x.double()
    if width != shape[-1]:
        k = torch.as_tensor(pil_box_coefficients(shape[-1], width), device=x.device)
        x = _clip8(x @ k.T)
    if height != shape[-2]:
        k = torch.as_tensor(pil_box_coefficients(shape[-2], height), device=x.device)
        x = _clip8(k @ x)
    return x.to(dtype)


def _clip8(sums: Tensor) -> Tensor:
    return torch.floor((sums + (1 << (PRECISION_BITS - 1))) / (1 << PRECISION_BITS)).clamp(0, 255)


def affine_from_points(src: Tensor, dst: Tensor) -> Tensor:
    """cv2.getAffineTransform for a batch: (N, 3, 2) point triples -> (N, 2, 3) maps src->dst."""
    ones = torch.ones(*src.shape[:-1], 1, dtype=src.dtype, device=src.device)
    a = torch.cat([src, ones], dim=-1)                       # (N, 3, 3)
    return torch.linalg.solve(a, dst).transpose(1, 2)        # rows: x' and y'


def warp_affine(x: Tensor, m: Tensor, mode: str = "reflect101") -> Tensor:
    """cv2.warpAffine(x, M, (W, H), borderMode=...): output (u, v) reads input M^-1 (u, v)."""
    n, _, h, w = x.shape
    linear, shift = m[:, :, :2], m[:, :, 2:]
    inverse = torch.linalg.inv(linear)
    vv, uu = torch.meshgrid(torch.arange(h, dtype=m.dtype, device=m.device),
                            torch.arange(w, dtype=m.dtype, device=m.device), indexing="ij")
    grid = torch.stack([uu.reshape(-1), vv.reshape(-1)]).expand(n, 2, h * w)
    src = inverse @ (grid - shift)                            # (N, 2, H*W): x then y
    return sample_bilinear(x, src[:, 1].reshape(n, h, w).to(x.dtype),
                           src[:, 0].reshape(n, h, w).to(x.dtype), mode)


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """CIFAR-10-C's `disk`: an aliased disk of summed weight 1, smoothed by a 3x3 (radius <= 8)
    or 5x5 Gaussian of sigma alias_blur (cv2.GaussianBlur), trimmed to its nonzero support."""
    grid = np.arange(-8, 8 + 1) if radius <= 8 else np.arange(-radius, radius + 1)
    ksize = 3 if radius <= 8 else 5
    xx, yy = np.meshgrid(grid, grid)
    disk = (xx ** 2 + yy ** 2 <= radius ** 2).astype(np.float64)
    disk /= disk.sum()
    t = np.arange(ksize) - (ksize - 1) / 2
    g = np.exp(-t ** 2 / (2 * alias_blur ** 2))
    g /= g.sum()
    size = len(grid)
    padded = np.pad(disk, ksize // 2, mode="reflect")          # numpy 'reflect' = reflect101
    rows = sum(g[i] * padded[i:i + size, :] for i in range(ksize))
    smooth = sum(g[i] * rows[:, i:i + size] for i in range(ksize))
    # The disk sits inside its frame, so trimming to its support only drops zeros, and a
    # small kernel fits images smaller than the 17x17 frame.
    keep = int(math.floor(radius)) + ksize // 2
    side = size // 2
    if radius <= 8 and keep < side:
        smooth = smooth[side - keep:side + keep + 1, side - keep:side + keep + 1]
    return smooth
