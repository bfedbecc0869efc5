"""The data contract every dataset fits: tensors plus the metadata models are sized from.

image    x: (N, C, H, W) pixels, uint8 in 0..255 or float32 in 0..1
vector   x: (N, D) float32
tokens   x: (N, T) int64 token ids below `meta.vocab_size`
y is int64 (N,) class ids. `corrupted` marks rows a corruption changed (all False until then).
`group` (optional) holds a per-row group id, e.g. (label, spurious attribute) for worst-group
accuracy. `stream` (optional) draws fresh training batches instead of indexing x: called as
stream(step, batch_size, device) -> (x, y), deterministic in (seed, step); x and y then hold a
fixed sample that evaluation measures.

`Bundle.prepare` turns stored rows into model inputs, batch by batch (for images: pixels ->
float -> the normalization fitted on the training split). Keeping pixels as stored lets the
robustness probes corrupt and attack in pixel space, and keeps uint8 images small on the
device. `Bundle.val` is an optional held-out split (e.g. the balanced set of last-layer
retraining); corruption never touches it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
from torch import Tensor

MODALITIES = ("image", "vector", "tokens")


@dataclass
class Split:
    x: Tensor
    y: Tensor
    corrupted: Optional[Tensor] = None
    group: Optional[Tensor] = None
    stream: Optional[Callable[[int, int, torch.device], tuple[Tensor, Tensor]]] = None

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} rows but y has {len(self.y)}")
        if self.corrupted is None:
            self.corrupted = torch.zeros(len(self.y), dtype=torch.bool, device=self.y.device)

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device | str) -> "Split":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Split(move(self.x), move(self.y), move(self.corrupted), move(self.group),
                     self.stream)

    def replace(self, **changes) -> "Split":
        return replace(self, **changes)


@dataclass(frozen=True)
class Meta:
    name: str
    modality: str
    input_shape: tuple[int, ...]
    num_classes: int
    vocab_size: Optional[int] = None
    class_names: Optional[tuple[str, ...]] = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, not {self.modality!r}")


def identity(x: Tensor) -> Tensor:
    return x


@dataclass
class Bundle:
    train: Split
    test: Split
    meta: Meta
    val: Optional[Split] = None
    prepare: Callable[[Tensor], Tensor] = identity
    # The training rows as indices into the full training split, when a run trains on a
    # random subset of it (dgrun.data.subset); None: the whole split.
    subset: Optional[Tensor] = None

    def to(self, device: torch.device | str) -> "Bundle":
        val = None if self.val is None else self.val.to(device)
        # A fitted normalization holds its statistics as tensors: they move with the data.
        prepare = self.prepare.to(device) if hasattr(self.prepare, "to") else self.prepare
        return replace(self, train=self.train.to(device), test=self.test.to(device), val=val,
                       prepare=prepare)

    def replace(self, **changes) -> "Bundle":
        return replace(self, **changes)
