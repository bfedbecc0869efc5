"""From a dataset name to device-resident tensors: load -> float -> corrupt -> crop -> normalize.

Corruption comes before preprocessing, as in Zhang et al.: shuffled or Gaussian pixels are then
whitened like real images. Everything here runs once per run; batches are cut later by index.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from dgrun.data import DATASETS, corruption
from dgrun.data.bundle import Bundle, Split
from dgrun.errors import UserError

PREPROCESSING = ("none", "standardize", "whiten")


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
         augment: Optional[dict] = None) -> Bundle:
    """`loader_options` go to the dataset's builder; `augment` is applied per batch by the loop."""
    bundle = DATASETS.build(name, **(loader_options or {}))
    if bundle.meta.modality == "image":
        bundle = bundle.replace(train=_as_float(bundle.train), test=_as_float(bundle.test))
    bundle = corruption.apply(bundle, corruption_name, seed=seed, prob=prob,
                              apply_to_test=apply_to_test)
    if center_crop is not None:
        bundle = _center_crop(bundle, center_crop)
    return _normalize(bundle, preprocess or "none")


def _as_float(split: Split) -> Split:
    x = split.x
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    return split.replace(x=x)


def _center_crop(bundle: Bundle, size: int) -> Bundle:
    if bundle.meta.modality != "image":
        raise UserError(f"dataset.center_crop needs image data; '{bundle.meta.name}' is "
                        f"{bundle.meta.modality} data", "set dataset.center_crop=null")
    c, h, w = bundle.meta.input_shape
    if size > min(h, w):
        raise UserError(f"dataset.center_crop={size} is larger than the {h}x{w} images of "
                        f"'{bundle.meta.name}'", f"use a size up to {min(h, w)}, or null")
    top, left = (h - size) // 2, (w - size) // 2
    crop = lambda s: s.replace(x=s.x[:, :, top:top + size, left:left + size].contiguous())  # noqa
    meta = bundle.meta.__class__(**{**vars(bundle.meta), "input_shape": (c, size, size)})
    return Bundle(crop(bundle.train), crop(bundle.test), meta)


def _normalize(bundle: Bundle, how: str) -> Bundle:
    if how == "none" or bundle.meta.modality == "tokens":
        return bundle
    if how == "standardize":
        # Statistics of the training split only: the test split must not leak into training.
        x = bundle.train.x
        dims = (0, 2, 3) if x.dim() == 4 else (0,)
        mean, std = x.mean(dim=dims, keepdim=True), x.std(dim=dims, keepdim=True)
        std = std.clamp_min(1e-6)  # constant pixels (digits' borders) would divide by zero
        scale = lambda s: s.replace(x=(s.x - mean[0:1]) / std[0:1])  # noqa: E731
        return bundle.replace(train=scale(bundle.train), test=scale(bundle.test))
    # "whiten": per-image standardization as in TensorFlow (Zhang et al.'s preprocessing).
    return bundle.replace(train=_whiten(bundle.train), test=_whiten(bundle.test))


def _whiten(split: Split) -> Split:
    x = split.x
    flat = x.reshape(len(x), -1)
    mean = flat.mean(dim=1, keepdim=True)
    std = flat.std(dim=1, unbiased=False, keepdim=True).clamp_min(1.0 / math.sqrt(flat.shape[1]))
    return split.replace(x=((flat - mean) / std).reshape(x.shape))
