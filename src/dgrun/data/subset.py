"""Training on a random fraction of the training split: the subset models that memorization
scores (Feldman & Zhang 2020) and the linear datamodeling score (Park et al. 2023) are
measured from.

The rows are drawn from the subset seed alone (`dataset.subset_seed`, by default the run's
seed), after the corruption: with a fixed `corruption.seed`, row i is the same (image, label,
corruption flag) in every subset model, and only which rows each model saw differs. A resumed
run draws the same rows again. `Bundle.subset` keeps the chosen rows as indices into the full
training split; the run records them as `subset.npy`.
"""
from __future__ import annotations

from typing import Optional

import torch

from dgrun.data.bundle import Bundle, Split
from dgrun.errors import UserError
from dgrun.seeding import derive_seed

RECORD_FILE = "subset.npy"


def subset_size(n: int, fraction: float) -> int:
    return max(1, min(n, round(fraction * n)))


def draw(n: int, fraction: float, seed: int) -> torch.Tensor:
    """`round(fraction * n)` distinct rows of n (at least one), sorted; deterministic in seed."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "subset"))
    return torch.randperm(n, generator=gen)[:subset_size(n, fraction)].sort().values


def take(split: Split, rows: torch.Tensor) -> Split:
    def cut(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t[rows.to(t.device)]

    return split.replace(x=cut(split.x), y=cut(split.y), corrupted=cut(split.corrupted),
                         group=cut(split.group))


def apply(bundle: Bundle, fraction: Optional[float], seed: int) -> Bundle:
    """The bundle with its training split cut to a random `fraction` of its rows (None: as is)."""
    if fraction is None:
        return bundle
    if bundle.train.stream is not None:
        raise UserError(f"dataset.subset_fraction needs a fixed training set, but "
                        f"'{bundle.meta.name}' draws fresh samples every step",
                        "set dataset.train_size=N (a fixed training set), or "
                        "dataset.subset_fraction=null")
    rows = draw(len(bundle.train), fraction, seed)
    return bundle.replace(train=take(bundle.train, rows), subset=rows)
