"""The published CIFAR-10-C files (Hendrycks & Dietterich 2019, zenodo.org/record/2535967).

Layout of the directory (what the archive unpacks to):

    <root>/<corruption>.npy   (5 * M, 32, 32, 3) uint8: severity s is rows (s - 1) * M .. s * M
    <root>/labels.npy         (5 * M,) the test labels, repeated once per severity

with M = 10,000 test images; row i of every severity block is test image i. Files are memory
mapped, so asking for one severity reads only its block.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import Tensor

from dgrun.errors import UserError
from dgrun.robustness.registry import SEVERITIES

# The nineteen corruptions of the release, in the order of the generator's table.
CIFAR10C_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
    "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
    "elastic_transform", "pixelate", "jpeg_compression", "speckle_noise", "gaussian_blur",
    "spatter", "saturate",
)
DOWNLOAD = "download CIFAR-10-C from https://zenodo.org/record/2535967 and unpack it there"


def load_cifar10c(root: str | Path, corruption: str, severity: int) -> tuple[Tensor, Tensor]:
    """(pixels, labels) of one corruption at one severity: uint8 (M, C, H, W) and int64 (M,)."""
    if severity not in SEVERITIES:
        raise UserError(f"CIFAR-10-C severity {severity!r} is not one of {SEVERITIES}",
                        "pick severities from 1 to 5")
    images = _open(Path(root) / f"{corruption}.npy")
    labels = _open(Path(root) / "labels.npy")
    if images.ndim not in (3, 4) or len(images) % len(SEVERITIES) or len(labels) != len(images):
        raise UserError(f"{Path(root) / f'{corruption}.npy'} has shape {images.shape} and "
                        f"labels.npy {labels.shape}; expected (5 * M, H, W, C) and (5 * M,)",
                        DOWNLOAD)
    per = len(images) // len(SEVERITIES)
    rows = slice((severity - 1) * per, severity * per)
    x = torch.from_numpy(np.array(images[rows], dtype=np.uint8))  # a copy: the map is read-only
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(np.asarray(labels[rows]).astype(np.int64))
    return x, y


def available(root: str | Path, which: str | Iterable[str] = "all") -> list[str]:
    """The corruptions to read from `root` ('all': the release's nineteen), each file checked."""
    which = [which] if isinstance(which, str) else list(which)
    chosen = list(CIFAR10C_CORRUPTIONS) if which == ["all"] else which
    for name in chosen + ["labels"]:
        if not (Path(root) / f"{name}.npy").is_file():
            _missing(Path(root) / f"{name}.npy")
    return chosen


def _open(path: Path) -> np.ndarray:
    if not path.is_file():
        _missing(path)
    return np.load(path, mmap_mode="r")


def _missing(path: Path) -> None:
    raise UserError(f"CIFAR-10-C file {path} not found", DOWNLOAD)
