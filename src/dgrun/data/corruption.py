"""The randomization tests of Zhang et al. 2017, applied once, seeded, before training.

A corruption builder sees the training split once (to draw a shared pixel permutation or to
measure pixel statistics) and returns a function that corrupts any split the same way, so the
test split gets the very same permutation and statistics as the training split.

Each corrupted split marks its changed rows in `Split.corrupted`: rows whose label differs from
the original (a label redrawn uniformly may land on the true class, and then it is not marked),
or every row for the pixel corruptions.
"""
from __future__ import annotations

from typing import Callable

import torch

from dgrun.data.bundle import Bundle, Meta, Split
from dgrun.errors import UserError
from dgrun.registry import Registry
from dgrun.seeding import derive_seed

CORRUPTIONS = Registry("corruption")
PIXEL_CORRUPTIONS = ("shuffled_pixels", "random_pixels", "gaussian_pixels")
Corrupt = Callable[[Split, torch.Generator], Split]


def apply(bundle: Bundle, name: str, *, seed: int, prob: float = 0.0,
          apply_to_test: bool = True) -> Bundle:
    """Corrupt `bundle`. Deterministic in (seed, name, prob).

    A corruption registered with `applied_prob` changes every row (or none) whatever `prob`
    says; the config refuses any other prob for it, so the recorded prob is the applied one.
    """
    if name != "none" and bundle.train.stream is not None:
        # Streamed batches are drawn fresh every step: corrupting the fixed sample that
        # measures train accuracy would leave the data actually trained on clean.
        raise UserError(f"corruption '{name}' needs a fixed training set, but "
                        f"'{bundle.meta.name}' draws fresh samples every step",
                        "set dataset.train_size=N (a fixed training set), or corruption=none")
    gen = torch.Generator().manual_seed(derive_seed(seed, "corruption"))
    corrupt = CORRUPTIONS.build(name, bundle.train, bundle.meta, gen, prob=prob)
    train = corrupt(bundle.train, gen)
    test = corrupt(bundle.test, gen) if apply_to_test else bundle.test
    return bundle.replace(train=train, test=test)


@CORRUPTIONS.register("none", applied_prob=0.0)
def none(train: Split, meta: Meta, gen: torch.Generator, prob: float = 0.0) -> Corrupt:
    return lambda split, gen: split


def _relabel(split: Split, gen: torch.Generator, prob: float, num_classes: int) -> Split:
    n = len(split)
    chosen = torch.rand(n, generator=gen) < prob
    drawn = torch.randint(num_classes, (n,), generator=gen)
    y = torch.where(chosen, drawn, split.y)
    return split.replace(y=y, corrupted=y != split.y)


@CORRUPTIONS.register("partial_labels")
def partial_labels(train: Split, meta: Meta, gen: torch.Generator, prob: float = 0.0) -> Corrupt:
    """Each label, independently with probability `prob`, becomes a uniform random class."""
    return lambda split, gen: _relabel(split, gen, prob, meta.num_classes)


@CORRUPTIONS.register("random_labels", applied_prob=1.0)
def random_labels(train: Split, meta: Meta, gen: torch.Generator, prob: float = 1.0) -> Corrupt:
    """Every label redrawn uniformly: partial_labels at prob 1.

    Not a fixed class permutation: that keeps the data learnable and is a different experiment.
    """
    return lambda split, gen: _relabel(split, gen, 1.0, meta.num_classes)


def _positions(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """View x as (N, channels, positions): pixels move with all their channels together."""
    if x.dim() == 4:
        n, c, h, w = x.shape
        return x.reshape(n, c, h * w), x.shape
    if x.dim() == 2:
        return x.reshape(x.shape[0], 1, x.shape[1]), x.shape
    raise UserError(f"pixel corruptions need image or vector data, got shape {tuple(x.shape)}",
                    "use a label corruption for this dataset")


@CORRUPTIONS.register("shuffled_pixels", applied_prob=1.0)
def shuffled_pixels(train: Split, meta: Meta, gen: torch.Generator, prob: float = 0.0) -> Corrupt:
    """One random permutation of pixel positions, the same for every image, train and test."""
    flat, _ = _positions(train.x)
    perm = torch.randperm(flat.shape[-1], generator=gen)

    def corrupt(split: Split, gen: torch.Generator) -> Split:
        flat, shape = _positions(split.x)
        x = flat[:, :, perm].reshape(shape)
        return split.replace(x=x, corrupted=torch.ones(len(split), dtype=torch.bool))

    return corrupt


@CORRUPTIONS.register("random_pixels", applied_prob=1.0)
def random_pixels(train: Split, meta: Meta, gen: torch.Generator, prob: float = 0.0) -> Corrupt:
    """An independent random permutation of pixel positions for each image."""

    def corrupt(split: Split, gen: torch.Generator) -> Split:
        flat, shape = _positions(split.x)
        perms = torch.rand(flat.shape[0], flat.shape[-1], generator=gen).argsort(dim=1)
        x = torch.gather(flat, 2, perms.unsqueeze(1).expand_as(flat)).reshape(shape)
        return split.replace(x=x, corrupted=torch.ones(len(split), dtype=torch.bool))

    return corrupt


@CORRUPTIONS.register("gaussian_pixels", applied_prob=1.0)
def gaussian_pixels(train: Split, meta: Meta, gen: torch.Generator, prob: float = 0.0) -> Corrupt:
    """Pixels drawn from a Gaussian with the training set's per-channel mean and std."""
    flat, _ = _positions(train.x)
    # Per channel for images; per feature for vectors (their "channels" are positions).
    dims = (0, 2) if train.x.dim() == 4 else (0,)
    ref = flat if train.x.dim() == 4 else flat.squeeze(1)
    mean, std = ref.float().mean(dim=dims), ref.float().std(dim=dims)

    def corrupt(split: Split, gen: torch.Generator) -> Split:
        noise = torch.randn(split.x.shape, generator=gen)
        if split.x.dim() == 4:
            x = noise * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)
        else:
            x = noise * std + mean
        return split.replace(x=x, corrupted=torch.ones(len(split), dtype=torch.bool))

    return corrupt
