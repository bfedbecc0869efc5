"""Datasets that need no download: they ship inside installed packages or are generated.

These make `dgrun` work offline on a fresh machine and keep the test suite honest (real data,
real learning curves) without network access.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from dgrun.data import DATASETS
from dgrun.data.bundle import Bundle, Meta, Split
from dgrun.errors import UserError


def _seeded_split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"dataset.test_fraction must be in (0, 1), got {test_fraction}",
                        "use e.g. dataset.test_fraction=0.2")
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return order[n_test:], order[:n_test]


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 8, 8), labels) from the CSV file in scikit-learn's wheel, read directly:
    importing sklearn.datasets costs ~2 s, which every run on digits would pay at start."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(spec.submodule_search_locations[0], "datasets", "data",
                            "digits.csv.gz")
        if os.path.isfile(path):
            table = np.loadtxt(path, delimiter=",")
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # a layout we do not know: the public loader

    d = load_digits()
    return d.images, d.target


@DATASETS.register("digits", modality="image", shape=(1, 8, 8), classes=10)
def digits(*, test_fraction: float = 0.2, split_seed: int = 0) -> Bundle:
    """scikit-learn's 1,797 8x8 handwritten digits (16 grey levels), shipped in its wheel."""
    images, target = load_digits_arrays()
    x = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    y = torch.from_numpy(target.astype(np.int64))
    train, test = _seeded_split(len(y), test_fraction, split_seed)
    train, test = torch.from_numpy(train), torch.from_numpy(test)
    meta = Meta("digits", "image", (1, 8, 8), 10, class_names=tuple(str(i) for i in range(10)))
    return Bundle(Split(x[train], y[train]), Split(x[test], y[test]), meta)


@DATASETS.register("mnist1d", modality="vector")
def mnist1d(*, num_samples: int = 5000, train_split: float = 0.8, seed: int = 42) -> Bundle:
    """Greydanus's MNIST-1D (40-dim sequences, 10 classes), generated offline.

    `make_dataset` reseeds Python's and NumPy's global generators, so their states are restored
    afterwards: generating the data must not change the run's own randomness. Never its
    `get_dataset()`, which tries a download and writes a pickle into the working directory.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = int(num_samples), float(train_split), int(seed)
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    split = lambda x, y: Split(torch.from_numpy(x.astype(np.float32)),  # noqa: E731
                               torch.from_numpy(y.astype(np.int64)))
    meta = Meta("mnist1d", "vector", (d["x"].shape[1],), 10)
    return Bundle(split(d["x"], d["y"]), split(d["x_test"], d["y_test"]), meta)
