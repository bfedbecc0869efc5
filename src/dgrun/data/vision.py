"""On-disk image datasets: CIFAR-10/100, MNIST, Fashion-MNIST, SVHN and Tiny ImageNet.

The files are read by our own small readers rather than torchvision's dataset classes: those
verify md5 checksums and so refuse anything but the exact published files (including the tiny
fixtures the tests write). torchvision is used only to download, when `download=True`.

Every builder returns uint8 images (N, C, H, W) and int64 labels; the pipeline makes them float.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from dgrun.data import DATASETS
from dgrun.data.bundle import Bundle, Meta, Split
from dgrun.errors import UserError

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def default_root() -> Path:
    """Where datasets live unless a config says otherwise: $DGRUN_DATA, else the XDG cache."""
    if os.environ.get("DGRUN_DATA"):
        return Path(os.environ["DGRUN_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "dgrun" / "data"


def _root(root: str | None) -> Path:
    return default_root() if root is None else Path(root).expanduser()


# --- finding (and maybe downloading) the files -------------------------------------------------


def _require(
    title: str,
    expected: str,
    present: Callable[[], bool],
    download: bool,
    fetch: Callable[[], None],
) -> None:
    """Make sure a dataset's files are on disk, fetching them first when the user allowed it.

    `expected` describes the files (with their full paths) for the error message.
    """
    if present():
        return
    if download:
        try:
            fetch()
        except Exception as err:  # any network/extract failure means the same thing to the user
            raise UserError(
                f"could not download {title}: {type(err).__name__}: {err}",
                f"without internet, put the files yourself at {expected}",
            ) from err
    if not present():
        raise UserError(
            f"{title} not found: expected {expected}",
            f"put the {title} files there, set dataset.root=DIR, "
            "or set dataset.download=true (needs internet)",
        )


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn whatever a damaged file makes a parser raise into one line naming the file."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        raise UserError(
            f"cannot read {path}: {type(err).__name__}: {err}",
            "the file looks truncated or corrupt; delete it and fetch it again",
        ) from err


def _torchvision_datasets():
    # Imported late: only downloading needs torchvision, and the import costs about a second.
    import torchvision.datasets

    return torchvision.datasets


# --- assembling the bundle ---------------------------------------------------------------------


def _split(x: np.ndarray, y: np.ndarray, num_classes: int, source: Path) -> Split:
    y = np.asarray(y, dtype=np.int64).reshape(-1)
    if len(x) != len(y):
        raise UserError(f"{source} has {len(x)} images but {len(y)} labels",
                        "the files do not match; fetch them again")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise UserError(
            f"{source} has labels outside 0..{num_classes - 1} (found {y.min()}..{y.max()})",
            "the file looks corrupt; fetch it again",
        )
    return Split(torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8)), torch.from_numpy(y))


def _bundle(
    name: str, train: Split, test: Split, num_classes: int, class_names: Optional[Sequence[str]]
) -> Bundle:
    meta = Meta(
        name=name,
        modality="image",
        input_shape=tuple(train.x.shape[1:]),
        num_classes=num_classes,
        class_names=tuple(class_names) if class_names is not None else None,
    )
    return Bundle(train, test, meta)


# --- CIFAR (python pickle batches) -------------------------------------------------------------


def _unpickle(path: Path) -> dict:
    # The published batches were pickled by Python 2, so their keys and strings are bytes.
    # pickle can run code, but these are the files the dataset is distributed as.
    with _reading(path), open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _cifar_batches(paths: Sequence[Path], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for path in paths:
        batch = _unpickle(path)
        with _reading(path):
            # Each row is 1024 red, then 1024 green, then 1024 blue values, each a row-major 32x32.
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def _cifar_names(path: Path, key: bytes) -> list[str]:
    meta = _unpickle(path)
    with _reading(path):
        return [n.decode() if isinstance(n, bytes) else str(n) for n in meta[key]]


@DATASETS.register("cifar10", modality="image", shape=(3, 32, 32), classes=10)
def cifar10(*, root: str | None = None, download: bool = False) -> Bundle:
    base = _root(root)
    folder = base / "cifar-10-batches-py"
    train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
    test_file, meta_file = folder / "test_batch", folder / "batches.meta"
    _require(
        "CIFAR-10",
        f"{folder}/data_batch_1..5 and test_batch",
        lambda: all(p.is_file() for p in [*train_files, test_file]),
        download,
        lambda: _torchvision_datasets().CIFAR10(str(base), download=True),
    )
    names = _cifar_names(meta_file, b"label_names") if meta_file.is_file() else None
    num_classes = len(names) if names else 10
    train = _split(*_cifar_batches(train_files, b"labels"), num_classes, folder)
    test = _split(*_cifar_batches([test_file], b"labels"), num_classes, test_file)
    return _bundle("cifar10", train, test, num_classes, names)


@DATASETS.register("cifar100", modality="image", shape=(3, 32, 32), classes=100)
def cifar100(*, root: str | None = None, download: bool = False) -> Bundle:
    base = _root(root)
    folder = base / "cifar-100-python"
    train_file, test_file, meta_file = folder / "train", folder / "test", folder / "meta"
    _require(
        "CIFAR-100",
        f"{folder}/train and test",
        lambda: train_file.is_file() and test_file.is_file(),
        download,
        lambda: _torchvision_datasets().CIFAR100(str(base), download=True),
    )
    names = _cifar_names(meta_file, b"fine_label_names") if meta_file.is_file() else None
    num_classes = len(names) if names else 100
    train = _split(*_cifar_batches([train_file], b"fine_labels"), num_classes, train_file)
    test = _split(*_cifar_batches([test_file], b"fine_labels"), num_classes, test_file)
    return _bundle("cifar100", train, test, num_classes, names)


# --- MNIST-like (idx files) --------------------------------------------------------------------

IDX_IMAGES_MAGIC = 2051  # 0x00000803: uint8 data, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: uint8 data, 1 dimension
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def _idx_path(folder: Path, name: str) -> Optional[Path]:
    """The plain file if it was extracted, else the .gz as published."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(path: Path, magic: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with _reading(path), opener(path, "rb") as f:
        # A bytearray, not bytes: tensors made from read-only numpy buffers are unsafe to write.
        raw = bytearray(f.read())
    with _reading(path):
        (found,) = struct.unpack(">i", raw[:4])
        if found != magic:
            raise UserError(f"{path} is not an idx file of the expected kind (magic {found}, wanted {magic})",
                            "the file looks corrupt or misnamed; fetch it again")
        ndim = magic & 0xFF
        dims = struct.unpack(f">{ndim}i", raw[4 : 4 + 4 * ndim])
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        if data.size != int(np.prod(dims)):
            raise UserError(f"{path} is truncated: header says {dims} but it holds {data.size} bytes of data",
                            "delete it and fetch it again")
        return data.reshape(dims)


def _mnist_like(name: str, title: str, subdir: str, tv_class: str, root: str | None, download: bool,
                class_names: Sequence[str]) -> Bundle:
    base = _root(root)
    folder = base / subdir / "raw"
    names = [n for pair in MNIST_FILES.values() for n in pair]
    _require(
        title,
        f"{folder}/{{{', '.join(names)}}} (plain or .gz)",
        lambda: all(_idx_path(folder, n) for n in names),
        download,
        lambda: getattr(_torchvision_datasets(), tv_class)(str(base), download=True),
    )
    splits = {}
    for split, (images_name, labels_name) in MNIST_FILES.items():
        images_path = _idx_path(folder, images_name)
        images = _read_idx(images_path, IDX_IMAGES_MAGIC)[:, None]  # a channel axis: (N, 1, 28, 28)
        labels = _read_idx(_idx_path(folder, labels_name), IDX_LABELS_MAGIC)
        splits[split] = _split(images, labels, len(class_names), images_path)
    return _bundle(name, splits["train"], splits["test"], len(class_names), class_names)


@DATASETS.register("mnist", modality="image", shape=(1, 28, 28), classes=10)
def mnist(*, root: str | None = None, download: bool = False) -> Bundle:
    return _mnist_like("mnist", "MNIST", "MNIST", "MNIST", root, download, [str(d) for d in range(10)])


@DATASETS.register("fashion_mnist", modality="image", shape=(1, 28, 28), classes=10)
def fashion_mnist(*, root: str | None = None, download: bool = False) -> Bundle:
    return _mnist_like("fashion_mnist", "Fashion-MNIST", "FashionMNIST", "FashionMNIST", root, download,
                       FASHION_MNIST_NAMES)


# --- SVHN (.mat files) -------------------------------------------------------------------------


def _read_svhn(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat  # scipy is only needed for this one dataset

    with _reading(path):
        mat = loadmat(str(path))
        images = np.asarray(mat["X"], dtype=np.uint8).transpose(3, 2, 0, 1)  # (32,32,3,N) -> (N,3,32,32)
        labels = np.asarray(mat["y"], dtype=np.int64).reshape(-1)
    labels[labels == 10] = 0  # SVHN writes digit 0 as class 10
    return images, labels


@DATASETS.register("svhn", modality="image", shape=(3, 32, 32), classes=10)
def svhn(*, root: str | None = None, download: bool = False) -> Bundle:
    folder = _root(root) / "svhn"
    train_file, test_file = folder / "train_32x32.mat", folder / "test_32x32.mat"

    def fetch() -> None:
        for split in ("train", "test"):
            _torchvision_datasets().SVHN(str(folder), split=split, download=True)

    _require("SVHN", f"{folder}/train_32x32.mat and test_32x32.mat",
             lambda: train_file.is_file() and test_file.is_file(), download, fetch)
    train = _split(*_read_svhn(train_file), 10, train_file)
    test = _split(*_read_svhn(test_file), 10, test_file)
    return _bundle("svhn", train, test, 10, [str(d) for d in range(10)])


# --- Tiny ImageNet (folders of JPEGs) ----------------------------------------------------------

TINY_SIZE = 64


def _read_lines(path: Path) -> list[str]:
    with _reading(path):
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _decode_rgb(path: Path) -> np.ndarray:
    from PIL import Image  # comes with torchvision; only this dataset decodes images

    with _reading(path), Image.open(path) as image:
        # About 2% of Tiny ImageNet is greyscale; the model wants three channels everywhere.
        pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    if pixels.shape != (TINY_SIZE, TINY_SIZE, 3):
        raise UserError(f"{path} is {pixels.shape[1]}x{pixels.shape[0]}, not {TINY_SIZE}x{TINY_SIZE}",
                        "Tiny ImageNet images are all 64x64; fetch the dataset again")
    return pixels.transpose(2, 0, 1)


def _decode_all(paths: Sequence[Path]) -> np.ndarray:
    # Filled in place so 100k images cost one uint8 array, not a list of them plus a copy.
    images = np.empty((len(paths), 3, TINY_SIZE, TINY_SIZE), dtype=np.uint8)
    for i, path in enumerate(paths):
        images[i] = _decode_rgb(path)
    return images


CACHE = ".dgrun-cache"


def _decoded(folder: Path, parts: dict[str, Sequence[Path]]) -> list[np.ndarray]:
    """Every image of each part, decoded once and kept as one uint8 array file per part.

    Decoding 110k JPEGs takes minutes; reading the arrays back takes seconds. The cache lives
    under the data root, keyed by the files' names, sizes and modification times, so a changed
    or added image decodes afresh. A read-only data root just decodes every time.
    """
    import hashlib

    digest = hashlib.blake2b(digest_size=8)
    try:
        for name, paths in parts.items():
            digest.update(name.encode())
            for path in paths:
                stat = path.stat()
                digest.update(f"{path.relative_to(folder)}|{stat.st_size}|{stat.st_mtime_ns}"
                              .encode())
    except FileNotFoundError:  # decoding names the missing file in one line
        return [_decode_all(paths) for paths in parts.values()]
    cache = folder / CACHE / digest.hexdigest()
    files = {name: cache / f"{name}_x.npy" for name in parts}
    if all(f.is_file() for f in files.values()):
        try:
            return [np.load(files[name]) for name in parts]
        except (OSError, ValueError):
            pass  # a damaged cache: decode again and rewrite it
    arrays = [_decode_all(paths) for paths in parts.values()]
    try:
        cache.mkdir(parents=True, exist_ok=True)
        for (name, path), array in zip(files.items(), arrays):
            from dgrun.files import write_atomic

            write_atomic(path, lambda f, a=array: np.save(f, a), fsync=False)
    except OSError:
        pass  # a read-only data root: no cache
    return arrays


def _tiny_class_names(folder: Path, wnids: Sequence[str]) -> list[str]:
    """Human-readable names from words.txt when it is there, else the WordNet ids themselves."""
    words_file = folder / "words.txt"
    if not words_file.is_file():
        return list(wnids)
    words = dict(line.split("\t", 1) for line in _read_lines(words_file) if "\t" in line)
    return [words.get(w, w).strip() for w in wnids]


def _tiny_val(folder: Path, index: dict[str, int]) -> tuple[list[Path], list[int]]:
    annotations = folder / "val" / "val_annotations.txt"
    paths, labels = [], []
    for line in _read_lines(annotations):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise UserError(f"{annotations} has a bad line: {line!r}",
                            "the file looks corrupt; fetch it again")
        paths.append(folder / "val" / "images" / fields[0])
        labels.append(index[fields[1]])
    return paths, labels


@DATASETS.register("tiny_imagenet", modality="image", shape=(3, 64, 64), classes=200)
def tiny_imagenet(*, root: str | None = None, download: bool = False) -> Bundle:
    base = _root(root)
    folder = base / "tiny-imagenet-200"

    def fetch() -> None:
        # torchvision has no Tiny ImageNet class, but its archive helper does the fetching.
        import torchvision.datasets.utils as tv_utils

        tv_utils.download_and_extract_archive(TINY_IMAGENET_URL, str(base))

    _require(
        "Tiny ImageNet",
        f"{folder}/wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt",
        lambda: (folder / "wnids.txt").is_file() and (folder / "train").is_dir()
        and (folder / "val" / "val_annotations.txt").is_file(),
        download,
        fetch,
    )
    # Sorted, as torchvision's ImageFolder would, so class ids agree with other codebases.
    wnids = sorted(_read_lines(folder / "wnids.txt"))
    index = {w: i for i, w in enumerate(wnids)}
    train_paths, train_labels = [], []
    for wnid in wnids:
        found = sorted((folder / "train" / wnid / "images").glob("*.JPEG"))
        train_paths += found
        train_labels += [index[wnid]] * len(found)
    if not train_paths:
        raise UserError(f"Tiny ImageNet has no training images under {folder}/train/<wnid>/images/",
                        "the dataset looks incomplete; fetch it again")
    val_paths, val_labels = _tiny_val(folder, index)
    train_x, val_x = _decoded(folder, {"train": train_paths, "val": val_paths})
    train = _split(train_x, np.array(train_labels), len(wnids), folder / "train")
    test = _split(val_x, np.array(val_labels), len(wnids), folder / "val")
    return _bundle("tiny_imagenet", train, test, len(wnids), _tiny_class_names(folder, wnids))
