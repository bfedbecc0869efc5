"""From a dataset name to device-resident tensors: load -> corrupt -> crop, and the fitted
normalization that the loop applies per batch.

Corruption comes before preprocessing, as in Zhang et al.: shuffled or Gaussian pixels are then
whitened like real images. Everything here runs once per run; batches are cut later by index.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

import torch

from dgrun.data import DATASETS, corruption, subset
from dgrun.data.bundle import Bundle, Split
from dgrun.errors import UserError

PREPROCESSING = ("none", "standardize", "whiten")
# A channel whose pixels vary by less than one grey level over the training split is constant.
CONSTANT_CHANNEL_STD = 1 / 255


def validate_pipeline(preprocess: Optional[str] = "none", center_crop: Optional[int] = None,
                      augment: Optional[dict] = None) -> None:
    if (preprocess or "none") not in PREPROCESSING:
        raise UserError(f"dataset.preprocess={preprocess!r} is not a preprocessing",
                        f"choose one of: {', '.join(PREPROCESSING)}")
    if center_crop is not None and (not isinstance(center_crop, int) or center_crop < 1):
        raise UserError(f"dataset.center_crop={center_crop!r} must be a positive integer or null",
                        "e.g. dataset.center_crop=28")


def load(name: str, loader_options: Optional[dict] = None, *, seed: int,
         corruption_name: str = "none", prob: float = 0.0, apply_to_test: bool = True,
         preprocess: Optional[str] = "none", center_crop: Optional[int] = None,
         augment: Optional[dict] = None, subset_fraction: Optional[float] = None,
         subset_seed: int = 0) -> Bundle:
    """`loader_options` go to the dataset's builder; `augment` is applied per batch by the loop.
    `subset_fraction`: train on that random fraction of the (corrupted) training rows, drawn
    from `subset_seed` (dgrun.data.subset).

    Images stay pixels (uint8 as loaded, float in [0, 1] once a pixel corruption made them so);
    the returned Bundle's `prepare` normalizes them batch by batch, with statistics fitted on
    the training split here, once.
    """
    bundle = DATASETS.build(name, **(loader_options or {}))
    if bundle.meta.modality == "image" and corruption_name in corruption.PIXEL_CORRUPTIONS:
        bundle = bundle.replace(train=_as_float(bundle.train), test=_as_float(bundle.test))
    bundle = corruption.apply(bundle, corruption_name, seed=seed, prob=prob,
                              apply_to_test=apply_to_test)
    bundle = subset.apply(bundle, subset_fraction, subset_seed)
    if center_crop is not None:
        bundle = _center_crop(bundle, center_crop)
    if bundle.meta.modality != "image" or (preprocess or "none") == "none":
        prepare = Normalize("none") if bundle.meta.modality == "image" else None
    else:
        prepare = Normalize.fit(preprocess, bundle.train.x)
    return bundle if prepare is None else bundle.replace(prepare=prepare)


def _as_float(split: Split) -> Split:
    return split.replace(x=to_unit(split.x))


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Pixels as float in [0, 1], whether stored as uint8 or already float."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def _center_crop(bundle: Bundle, size: int) -> Bundle:
    if bundle.meta.modality != "image":
        raise UserError(f"dataset.center_crop needs image data; '{bundle.meta.name}' is "
                        f"{bundle.meta.modality} data", "set dataset.center_crop=null")
    c, h, w = bundle.meta.input_shape
    if size > min(h, w):
        raise UserError(f"dataset.center_crop={size} is larger than the {h}x{w} images of "
                        f"'{bundle.meta.name}'", f"use a size up to {min(h, w)}, or null")
    top, left = (h - size) // 2, (w - size) // 2

    def crop(s: Optional[Split]) -> Optional[Split]:
        return None if s is None else s.replace(
            x=s.x[:, :, top:top + size, left:left + size].contiguous())

    meta = replace(bundle.meta, input_shape=(c, size, size))
    return bundle.replace(train=crop(bundle.train), test=crop(bundle.test), val=crop(bundle.val),
                          meta=meta)


class Normalize:
    """Stored pixels -> model inputs, one batch at a time.

    none         pixels as float in [0, 1]
    standardize  minus the training split's per-channel mean, divided by its std (1 for a
                 constant channel: a change to it reaches the model at its size in pixels)
    whiten       per image: minus its mean, divided by max(its std, 1/sqrt(pixels)), as
                 TensorFlow's per_image_standardization (Zhang et al.'s preprocessing)
    Differentiable, so attacks can optimise pixels through it.
    """

    def __init__(self, how: str, mean: Optional[torch.Tensor] = None,
                 std: Optional[torch.Tensor] = None):
        self.how, self.mean, self.std = how, mean, std

    @classmethod
    def fit(cls, how: str, x: torch.Tensor, chunk_elements: int = 2**22) -> "Normalize":
        if how != "standardize":
            return cls(how)
        # Statistics of the training split only (the test split must not leak into training),
        # accumulated in float64 a few MB at a time: no float copy of the whole set at once.
        total = torch.zeros(x.shape[1], dtype=torch.float64)
        squares = torch.zeros(x.shape[1], dtype=torch.float64)
        chunk = max(1, chunk_elements // max(1, x[0].numel()))
        for i in range(0, len(x), chunk):
            part = to_unit(x[i:i + chunk])
            total += part.sum(dim=(0, 2, 3), dtype=torch.float64)
            squares += part.square().sum(dim=(0, 2, 3), dtype=torch.float64)
        count = len(x) * x.shape[2] * x.shape[3]
        mean = total / count
        var = (squares - count * mean.pow(2)) / max(1, count - 1)
        std = var.clamp_min(0).sqrt()
        # A channel that never changes (colored digits' blue) would divide by ~0 and multiply
        # any change to it (noise, an attack's random start) by a million: it is only centred.
        std = torch.where(std < CONSTANT_CHANNEL_STD, torch.ones_like(std), std)
        return cls(how, mean.float().view(1, -1, 1, 1), std.float().view(1, -1, 1, 1))

    def to(self, device) -> "Normalize":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Normalize(self.how, move(self.mean), move(self.std))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = to_unit(x)
        if self.how == "standardize":
            return (x - self.mean) / self.std
        if self.how == "whiten":
            flat = x.reshape(len(x), -1)
            mean = flat.mean(dim=1, keepdim=True)
            std = flat.std(dim=1, unbiased=False, keepdim=True).clamp_min(
                1.0 / math.sqrt(flat.shape[1]))
            return ((flat - mean) / std).reshape(x.shape)
        return x
