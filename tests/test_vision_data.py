"""The vision loaders read tiny files written in each dataset's real on-disk format."""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

import dgrun.data.vision as vision
from dgrun.data import DATASETS
from dgrun.errors import UserError

RNG = np.random.default_rng(0)


def _pixels(n: int, c: int, h: int, w: int) -> np.ndarray:
    return RNG.integers(0, 256, size=(n, c, h, w), dtype=np.uint8)


def _dump(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


# --- CIFAR -------------------------------------------------------------------------------------


def _write_cifar10(root: Path, per_batch: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    train_x, train_y = _pixels(5 * per_batch, 3, 32, 32), RNG.integers(0, 10, 5 * per_batch)
    test_x, test_y = _pixels(per_batch, 3, 32, 32), RNG.integers(0, 10, per_batch)
    for i in range(5):
        rows = slice(i * per_batch, (i + 1) * per_batch)
        # The real rows: 1024 red, 1024 green, 1024 blue, each a row-major 32x32.
        _dump(folder / f"data_batch_{i + 1}",
              {b"data": train_x[rows].reshape(per_batch, 3072), b"labels": train_y[rows].tolist()})
    _dump(folder / "test_batch", {b"data": test_x.reshape(per_batch, 3072), b"labels": test_y.tolist()})
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer",
             b"dog", b"frog", b"horse", b"ship", b"truck"]
    _dump(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return train_x, train_y, test_x, test_y


def test_cifar10_round_trips_pixels_labels_and_names(tmp_path):
    train_x, train_y, test_x, test_y = _write_cifar10(tmp_path)
    bundle = DATASETS.build("cifar10", root=str(tmp_path))
    assert bundle.train.x.shape == (20, 3, 32, 32) and bundle.test.x.shape == (4, 3, 32, 32)
    assert bundle.train.x.dtype == torch.uint8 and bundle.train.y.dtype == torch.int64
    assert np.array_equal(bundle.train.x.numpy(), train_x)
    assert np.array_equal(bundle.test.x.numpy(), test_x)
    assert bundle.train.y.tolist() == train_y.tolist() and bundle.test.y.tolist() == test_y.tolist()
    assert bundle.meta.input_shape == (3, 32, 32) and bundle.meta.num_classes == 10
    assert bundle.meta.class_names[0] == "airplane" and bundle.meta.class_names[9] == "truck"
    assert bundle.meta.modality == "image" and bundle.meta.name == "cifar10"


def test_cifar_row_layout_is_channel_planes_of_row_major_images(tmp_path):
    _write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    row = np.zeros(3072, dtype=np.uint8)
    row[0] = 11  # red, pixel (0, 0)
    row[1] = 12  # red, pixel (0, 1)
    row[32] = 13  # red, pixel (1, 0)
    row[1024] = 21  # green, pixel (0, 0)
    row[2048 + 32 * 31 + 31] = 31  # blue, pixel (31, 31)
    _dump(folder / "test_batch", {b"data": row[None], b"labels": [7]})
    image = DATASETS.build("cifar10", root=str(tmp_path)).test.x[0]
    assert image[0, 0, 0] == 11 and image[0, 0, 1] == 12 and image[0, 1, 0] == 13
    assert image[1, 0, 0] == 21 and image[2, 31, 31] == 31
    assert int(image.sum()) == 11 + 12 + 13 + 21 + 31


def test_cifar100_reads_fine_labels_and_names(tmp_path):
    folder = tmp_path / "cifar-100-python"
    train_x, test_x = _pixels(6, 3, 32, 32), _pixels(3, 3, 32, 32)
    _dump(folder / "train", {b"data": train_x.reshape(6, -1), b"fine_labels": [0, 5, 99, 3, 2, 1],
                             b"coarse_labels": [0] * 6})
    _dump(folder / "test", {b"data": test_x.reshape(3, -1), b"fine_labels": [42, 0, 99],
                            b"coarse_labels": [0] * 3})
    _dump(folder / "meta", {b"fine_label_names": [f"class{i}".encode() for i in range(100)]})
    bundle = DATASETS.build("cifar100", root=str(tmp_path))
    assert np.array_equal(bundle.train.x.numpy(), train_x) and np.array_equal(bundle.test.x.numpy(), test_x)
    assert bundle.train.y.tolist() == [0, 5, 99, 3, 2, 1] and bundle.test.y.tolist() == [42, 0, 99]
    assert bundle.meta.num_classes == 100 and bundle.meta.class_names[99] == "class99"


def test_missing_cifar_names_the_expected_path(tmp_path):
    with pytest.raises(UserError) as caught:
        DATASETS.build("cifar10", root=str(tmp_path))
    assert str(tmp_path / "cifar-10-batches-py") in caught.value.problem
    assert "data_batch_1..5" in caught.value.problem and "dataset.download=true" in caught.value.fix


def test_truncated_cifar_batch_names_the_file(tmp_path):
    _write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(UserError, match="data_batch_3"):
        DATASETS.build("cifar10", root=str(tmp_path))


# --- MNIST / Fashion-MNIST ---------------------------------------------------------------------


def _idx(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(f">i{array.ndim}i", magic, *array.shape) + array.astype(np.uint8).tobytes()


def _write_mnist(folder: Path, gz: bool) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True)
    arrays = {
        "train-images-idx3-ubyte": _pixels(5, 1, 28, 28)[:, 0],
        "train-labels-idx1-ubyte": RNG.integers(0, 10, 5).astype(np.uint8),
        "t10k-images-idx3-ubyte": _pixels(3, 1, 28, 28)[:, 0],
        "t10k-labels-idx1-ubyte": RNG.integers(0, 10, 3).astype(np.uint8),
    }
    for name, array in arrays.items():
        data = _idx(array, 2051 if array.ndim == 3 else 2049)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped"])
def test_mnist_reads_idx_files(tmp_path, gz):
    arrays = _write_mnist(tmp_path / "MNIST" / "raw", gz)
    bundle = DATASETS.build("mnist", root=str(tmp_path))
    assert bundle.train.x.shape == (5, 1, 28, 28) and bundle.test.x.shape == (3, 1, 28, 28)
    assert bundle.train.x.dtype == torch.uint8 and bundle.test.y.dtype == torch.int64
    assert np.array_equal(bundle.train.x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(bundle.test.x[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert bundle.train.y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert bundle.test.y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert bundle.meta.input_shape == (1, 28, 28) and bundle.meta.num_classes == 10


def test_fashion_mnist_lives_in_its_own_folder_and_names_classes(tmp_path):
    arrays = _write_mnist(tmp_path / "FashionMNIST" / "raw", gz=True)
    bundle = DATASETS.build("fashion_mnist", root=str(tmp_path))
    assert bundle.test.y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert bundle.meta.class_names[0] == "T-shirt/top" and bundle.meta.class_names[9] == "Ankle boot"
    with pytest.raises(UserError, match="MNIST"):
        DATASETS.build("mnist", root=str(tmp_path))


def test_truncated_idx_file_names_the_file(tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    _write_mnist(folder, gz=False)
    images = folder / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-10])
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte.*truncated"):
        DATASETS.build("mnist", root=str(tmp_path))


def test_truncated_gzip_names_the_file(tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    _write_mnist(folder, gz=True)
    labels = folder / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:15])
    with pytest.raises(UserError, match="train-labels-idx1-ubyte.gz"):
        DATASETS.build("mnist", root=str(tmp_path))


def test_missing_mnist_names_the_expected_path(tmp_path):
    with pytest.raises(UserError) as caught:
        DATASETS.build("mnist", root=str(tmp_path))
    assert str(tmp_path / "MNIST" / "raw") in caught.value.problem


# --- SVHN --------------------------------------------------------------------------------------


def _write_svhn_mat(path: Path, images: np.ndarray, labels: list[int]) -> None:
    # The real layout: X is (32, 32, 3, N) uint8, y is (N, 1) with digit 0 stored as 10.
    scipy.io.savemat(str(path), {"X": images.transpose(2, 3, 1, 0),
                                 "y": np.array(labels, dtype=np.uint8)[:, None]})


def test_svhn_reads_mat_files_and_maps_10_to_0(tmp_path):
    folder = tmp_path / "svhn"
    folder.mkdir()
    train_x, test_x = _pixels(4, 3, 32, 32), _pixels(2, 3, 32, 32)
    _write_svhn_mat(folder / "train_32x32.mat", train_x, [10, 1, 9, 10])
    _write_svhn_mat(folder / "test_32x32.mat", test_x, [5, 10])
    bundle = DATASETS.build("svhn", root=str(tmp_path))
    assert bundle.train.x.shape == (4, 3, 32, 32) and bundle.train.x.dtype == torch.uint8
    assert np.array_equal(bundle.train.x.numpy(), train_x) and np.array_equal(bundle.test.x.numpy(), test_x)
    assert bundle.train.y.tolist() == [0, 1, 9, 0] and bundle.test.y.tolist() == [5, 0]
    assert bundle.train.y.dtype == torch.int64 and bundle.meta.num_classes == 10


def test_truncated_svhn_names_the_file(tmp_path):
    folder = tmp_path / "svhn"
    folder.mkdir()
    _write_svhn_mat(folder / "train_32x32.mat", _pixels(4, 3, 32, 32), [1, 2, 3, 4])
    _write_svhn_mat(folder / "test_32x32.mat", _pixels(2, 3, 32, 32), [1, 2])
    test_file = folder / "test_32x32.mat"
    test_file.write_bytes(test_file.read_bytes()[:300])
    with pytest.raises(UserError, match="test_32x32.mat"):
        DATASETS.build("svhn", root=str(tmp_path))


# --- Tiny ImageNet -----------------------------------------------------------------------------

# Flat colours survive JPEG almost exactly, so pixels can be checked to within rounding.
COLOURS = {"n02": (200, 30, 40), "n01": (10, 220, 90)}


def _write_tiny_imagenet(root: Path) -> Path:
    from PIL import Image

    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("n02\nn01\n")
    (folder / "words.txt").write_text(
        "n01\tgoldfish, Carassius auratus\nn02\ttabby, tabby cat\nn99\tunused\n"
    )
    for wnid, colour in COLOURS.items():
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (64, 64), colour).save(images / f"{wnid}_{i}.JPEG", quality=95)
    val = folder / "val" / "images"
    val.mkdir(parents=True)
    Image.new("RGB", (64, 64), COLOURS["n02"]).save(val / "val_0.JPEG", quality=95)
    Image.new("L", (64, 64), 128).save(val / "val_1.JPEG", quality=95)  # greyscale, as some real ones are
    (folder / "val" / "val_annotations.txt").write_text(
        "val_0.JPEG\tn02\t0\t0\t63\t63\nval_1.JPEG\tn01\t1\t2\t3\t4\n"
    )
    return folder


def test_tiny_imagenet_reads_folders_and_val_annotations(tmp_path):
    _write_tiny_imagenet(tmp_path)
    bundle = DATASETS.build("tiny_imagenet", root=str(tmp_path))
    assert bundle.train.x.shape == (4, 3, 64, 64) and bundle.test.x.shape == (2, 3, 64, 64)
    assert bundle.train.x.dtype == torch.uint8 and bundle.train.y.dtype == torch.int64
    # Classes are the sorted wnids: n01 -> 0, n02 -> 1.
    assert bundle.train.y.tolist() == [0, 0, 1, 1] and bundle.test.y.tolist() == [1, 0]
    assert bundle.meta.class_names == ("goldfish, Carassius auratus", "tabby, tabby cat")
    assert bundle.meta.input_shape == (3, 64, 64) and bundle.meta.num_classes == 2
    first = bundle.train.x[0].to(torch.int16)
    expected = torch.tensor(COLOURS["n01"], dtype=torch.int16)[:, None, None]
    assert int((first - expected).abs().max()) <= 2
    grey = bundle.test.x[1].to(torch.int16)
    assert int((grey - 128).abs().max()) <= 2  # greyscale comes back as three equal channels


def test_tiny_imagenet_decodes_once_then_reads_its_cache(tmp_path, monkeypatch):
    import os
    import time

    from PIL import Image

    from dgrun.data import vision

    folder = _write_tiny_imagenet(tmp_path)
    first = DATASETS.build("tiny_imagenet", root=str(tmp_path))
    assert len(list((folder / vision.CACHE).glob("*/*.npy"))) == 2

    def no_decoding(paths):
        raise AssertionError("decoded again although the cache is current")

    monkeypatch.setattr(vision, "_decode_all", no_decoding)
    cached = DATASETS.build("tiny_imagenet", root=str(tmp_path))
    assert torch.equal(cached.train.x, first.train.x) and torch.equal(cached.test.x, first.test.x)
    monkeypatch.undo()
    image = folder / "val" / "images" / "val_0.JPEG"
    Image.new("RGB", (64, 64), (0, 0, 255)).save(image, quality=95)  # a changed image
    os.utime(image, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = DATASETS.build("tiny_imagenet", root=str(tmp_path))
    assert not torch.equal(changed.test.x[0], first.test.x[0])


def test_tiny_imagenet_missing_val_image_names_the_file(tmp_path):
    folder = _write_tiny_imagenet(tmp_path)
    (folder / "val" / "images" / "val_1.JPEG").unlink()
    with pytest.raises(UserError, match="val_1.JPEG"):
        DATASETS.build("tiny_imagenet", root=str(tmp_path))


def test_missing_tiny_imagenet_names_the_expected_path(tmp_path):
    with pytest.raises(UserError) as caught:
        DATASETS.build("tiny_imagenet", root=str(tmp_path))
    assert str(tmp_path / "tiny-imagenet-200") in caught.value.problem


# --- downloading and the default root ----------------------------------------------------------


def _offline(*args, **kwargs):
    raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")


@pytest.mark.parametrize("name, attribute", [
    ("cifar10", "CIFAR10"), ("cifar100", "CIFAR100"), ("mnist", "MNIST"),
    ("fashion_mnist", "FashionMNIST"), ("svhn", "SVHN"),
])
def test_download_offline_is_a_user_error(tmp_path, monkeypatch, name, attribute):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, attribute, _offline)
    with pytest.raises(UserError) as caught:
        DATASETS.build(name, root=str(tmp_path), download=True)
    assert "could not download" in caught.value.problem and "name resolution" in caught.value.problem
    assert str(tmp_path) in caught.value.fix


def test_tiny_imagenet_download_offline_is_a_user_error(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", _offline)
    with pytest.raises(UserError, match="could not download Tiny ImageNet"):
        DATASETS.build("tiny_imagenet", root=str(tmp_path), download=True)


def test_download_is_skipped_when_the_files_are_there(tmp_path, monkeypatch):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _offline)
    _write_cifar10(tmp_path)
    assert len(DATASETS.build("cifar10", root=str(tmp_path), download=True).train) == 20


def test_default_root_honours_dgrun_data_then_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("DGRUN_DATA", str(tmp_path / "data"))
    assert vision.default_root() == tmp_path / "data"
    monkeypatch.delenv("DGRUN_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert vision.default_root() == tmp_path / "cache" / "dgrun" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert vision.default_root() == tmp_path / "home" / ".cache" / "dgrun" / "data"


def test_builders_use_the_default_root_and_expand_user(tmp_path, monkeypatch):
    _write_cifar10(tmp_path / "data")
    monkeypatch.setenv("DGRUN_DATA", str(tmp_path / "data"))
    assert len(DATASETS.build("cifar10").test) == 4
    monkeypatch.setenv("HOME", str(tmp_path))
    assert len(DATASETS.build("cifar10", root="~/data").test) == 4


def test_every_builder_takes_root_and_download():
    for name in ("cifar10", "cifar100", "mnist", "fashion_mnist", "svhn", "tiny_imagenet"):
        assert DATASETS.options(name) == ["root", "download"]
        assert DATASETS.tags(name)["modality"] == "image"
