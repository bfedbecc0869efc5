"""Grouped datasets read from disk: Colored MNIST, Waterbirds and CelebA (Sagawa et al. 2020).

Nothing here downloads: Waterbirds and CelebA are distributed behind forms and drives, so the
files must be put in place by hand, in their standard layouts under `dataset.root` (default
$DGRUN_DATA, else ~/.cache/dgrun/data):

    waterbird_complete95_forest2water2/metadata.csv   img_id,img_filename,y,split,place
    waterbird_complete95_forest2water2/<img_filename>
    celeba/list_attr_celeba.txt, celeba/list_eval_partition.txt, celeba/img_align_celeba/*.jpg

Photos are decoded with Pillow, cropped to a centred square and resized to `image_size`
(Pillow's ImageOps.fit), and stored as uint8 (N, 3, S, S). Memory is N * 3 * S^2 bytes: at the
default S=64 Waterbirds takes 145 MB and CelebA 2.5 GB. Groups follow `dgrun.data.spurious`;
`Bundle.val` is the dataset's own validation split subsampled to equal group sizes.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from dgrun.data import DATASETS
from dgrun.data.bundle import Bundle, Meta
from dgrun.data.spurious import (colored_bundle, extra, generator, group_balanced_rows,
                                 grouped_split)
from dgrun.data.vision import _reading, _root
from dgrun.errors import UserError

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}  # both datasets' partition column


def _require_files(title: str, paths: Sequence[Path]) -> None:
    for path in paths:
        if not path.exists():
            raise UserError(f"{title} not found: expected {path}",
                            f"put the {title} files there (standard layout) "
                            "or set dataset.root=DIR")


def _image_size(size: int) -> int:
    if int(size) < 1:
        raise UserError(f"dataset.image_size={size} must be a positive integer",
                        "e.g. dataset.image_size=64")
    return int(size)


def _decode_square(path: Path, size: int) -> np.ndarray:
    from PIL import Image, ImageOps

    if not path.is_file():
        raise UserError(f"image not found: expected {path}",
                        "the dataset is incomplete; put the missing files back")
    with _reading(path), Image.open(path) as image:
        image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when that suffices
        square = ImageOps.fit(image.convert("RGB"), (size, size), Image.Resampling.BILINEAR)
        return np.asarray(square, dtype=np.uint8).transpose(2, 0, 1)


def _decode_all(paths: Sequence[Path], size: int) -> torch.Tensor:
    # Filled in place: one uint8 array for the whole split, never a list of them plus a copy.
    images = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for i, path in enumerate(paths):
        images[i] = _decode_square(path, size)
    return torch.from_numpy(images)


def _grouped_photos(name: str, files: dict[str, list[Path]], labels: dict[str, np.ndarray],
                    attrs: dict[str, np.ndarray], size: int, seed: int, label_names: Sequence[str],
                    attribute: str, attr_names: Sequence[str]) -> Bundle:
    """Decode each split's photos; the val split keeps an equal number of rows per group."""
    splits = {}
    for part in ("train", "val", "test"):
        y, a = torch.from_numpy(labels[part]), torch.from_numpy(attrs[part])
        paths = files[part]
        if part == "val":
            keep = group_balanced_rows(y * 2 + a, generator(name, seed, "val rows"))
            y, a, paths = y[keep], a[keep], [paths[i] for i in keep.tolist()]
        if len(y) == 0:
            raise UserError(f"{name} has no {part} rows", "the metadata looks incomplete")
        splits[part] = grouped_split(_decode_all(paths, size), y, a, 2)
    meta = Meta(name, "image", (3, size, size), 2, class_names=tuple(label_names),
                extra=extra(label_names, attribute, attr_names))
    return Bundle(splits["train"], splits["test"], meta, val=splits["val"])


# --- Colored MNIST ------------------------------------------------------------------------------


@DATASETS.register("colored_mnist", modality="image")
def colored_mnist(*, root: Optional[str] = None, rho: float = 0.9, test_color: str = "random",
                  binary: bool = True, num_colors: Optional[int] = None,
                  val_fraction: float = 0.1, seed: int = 0) -> Bundle:
    """Colored MNIST from MNIST's idx files (dgrun's `mnist` reader: same root and layout).

    Same colouring and groups as `colored_digits` (strokes painted red/green, y=0 for 0-4),
    (3, 28, 28) uint8. Train and val come from the 60,000 training digits (val: a `val_fraction`
    of them, cut by `seed`, class-balanced, colours spread evenly), test from the 10,000.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"dataset.val_fraction={val_fraction} must be in (0, 1)",
                        "use e.g. dataset.val_fraction=0.1")
    mnist = DATASETS.build("mnist", root=root)
    order = torch.randperm(len(mnist.train), generator=generator("colored_mnist", seed, "split"))
    n_val = int(round(len(order) * val_fraction))
    val, train = order[:n_val], order[n_val:]
    parts = {"train": (mnist.train.x[train], mnist.train.y[train]),
             "val": (mnist.train.x[val], mnist.train.y[val]),
             "test": (mnist.test.x, mnist.test.y)}
    return colored_bundle("colored_mnist", parts, rho=rho, test_color=test_color, binary=binary,
                          num_colors=num_colors, seed=seed)


# --- Waterbirds ---------------------------------------------------------------------------------

WATERBIRDS_DIR = "waterbird_complete95_forest2water2"


@DATASETS.register("waterbirds", modality="image")
def waterbirds(*, root: Optional[str] = None, image_size: int = 64, seed: int = 0) -> Bundle:
    """Waterbirds (Sagawa et al. 2020): y = waterbird (1) or landbird (0), spurious attribute =
    the background place, water (1) or land (0). Splits from metadata.csv's `split` column
    (0 train, 1 val, 2 test); groups y * 2 + place."""
    size = _image_size(image_size)
    folder = _root(root) / WATERBIRDS_DIR
    metadata = folder / "metadata.csv"
    _require_files("Waterbirds", [metadata])
    with _reading(metadata), open(metadata, newline="") as f:
        rows = list(csv.DictReader(f))
        missing = {"img_filename", "y", "split", "place"} - set(rows[0] if rows else {})
        if missing:
            raise UserError(f"{metadata} lacks the column(s) {', '.join(sorted(missing))}",
                            "it should have img_id,img_filename,y,split,place")
        files, labels, attrs = {}, {}, {}
        for part, code in SPLIT_CODES.items():
            mine = [r for r in rows if int(r["split"]) == code]
            files[part] = [folder / r["img_filename"] for r in mine]
            labels[part] = np.array([int(r["y"]) for r in mine], dtype=np.int64)
            attrs[part] = np.array([int(r["place"]) for r in mine], dtype=np.int64)
    return _grouped_photos("waterbirds", files, labels, attrs, size, seed,
                           ["landbird", "waterbird"], "place", ["land", "water"])


# --- CelebA -------------------------------------------------------------------------------------


def _celeba_attributes(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """list_attr_celeba.txt: a count line, a line of 40 names, then `file v1 ... v40` (+-1)."""
    with _reading(path):
        lines = path.read_text().splitlines()
        names = lines[1].split()
        body = [line.split() for line in lines[2:] if line.strip()]
        files = [fields[0] for fields in body]
        values = np.array([[int(v) for v in fields[1:]] for fields in body], dtype=np.int64)
        if values.shape[1:] != (len(names),):
            raise ValueError(f"rows have {values.shape[1:]} values for {len(names)} attributes")
    return names, files, values


@DATASETS.register("celeba", modality="image")
def celeba(*, root: Optional[str] = None, target: str = "Blond_Hair", spurious: str = "Male",
           image_size: int = 64, seed: int = 0) -> Bundle:
    """CelebA as in Sagawa et al. 2020: y = `target` attribute (Blond_Hair), spurious attribute
    = `spurious` (Male); 1 where the file says +1. Splits from list_eval_partition.txt
    (0 train, 1 val, 2 test); groups y * 2 + spurious; files under root/celeba/ as torchvision
    lays them out."""
    size = _image_size(image_size)
    folder = _root(root) / "celeba"
    attr_file, partition_file = folder / "list_attr_celeba.txt", folder / "list_eval_partition.txt"
    images = folder / "img_align_celeba"
    _require_files("CelebA", [attr_file, partition_file, images])
    names, files, values = _celeba_attributes(attr_file)
    for option, attribute in (("target", target), ("spurious", spurious)):
        if attribute not in names:
            raise UserError(f"dataset.{option}={attribute!r} is not a CelebA attribute",
                            f"choose one of: {', '.join(names)}")
    with _reading(partition_file):
        partition = dict(line.split() for line in partition_file.read_text().splitlines()
                         if line.strip())
        codes = np.array([int(partition[f]) for f in files], dtype=np.int64)
    y_all = (values[:, names.index(target)] == 1).astype(np.int64)
    a_all = (values[:, names.index(spurious)] == 1).astype(np.int64)
    files_by, labels, attrs = {}, {}, {}
    for part, code in SPLIT_CODES.items():
        rows = np.flatnonzero(codes == code)
        files_by[part] = [images / files[i] for i in rows]
        labels[part], attrs[part] = y_all[rows], a_all[rows]
    return _grouped_photos("celeba", files_by, labels, attrs, size, seed,
                           [f"not_{target}", target], spurious, ["0", "1"])
