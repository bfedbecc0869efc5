"""Grouped datasets that need no download: coloured digits, LMS, dominoes, biased token strings.

Each one pits a *simple* feature (colour, a linear coordinate, an easy image block, one marker
token) against a *complex* one that defines the label, with the simple one agreeing with the
label with probability `rho` in train and not (random or flipped) in test. Groups, names and
the balanced val split follow the conventions in `dgrun.data.spurious`. Everything is
generated from the options alone (`seed` included): the same options give the same tensors.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from dgrun.data import DATASETS
from dgrun.data.bundle import Bundle, Meta, Split
from dgrun.data.spurious import (agreement, assign_attribute, check_rho, class_balanced_rows,
                                 colored_bundle, extra, generator, grouped_split, three_way)
from dgrun.errors import UserError


def _sklearn_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 8x8 digits as (N, 1, 8, 8) floats in [0, 1] and their digits."""
    from dgrun.data.embedded import load_digits_arrays

    images, target = load_digits_arrays()
    return (torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1),
            torch.from_numpy(target.astype(np.int64)))


def _positive_int(value: int, option: str) -> int:
    if int(value) < 1:
        raise UserError(f"dataset.{option}={value} must be a positive integer",
                        f"e.g. dataset.{option}=1000")
    return int(value)


def _balanced_labels(n: int, num_classes: int, gen: torch.Generator) -> Tensor:
    """n labels with every class equally often (up to one), in random order."""
    return (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]


# --- colored digits ----------------------------------------------------------------------------


@DATASETS.register("colored_digits", modality="image")
def colored_digits(*, rho: float = 0.9, test_color: str = "random", binary: bool = True,
                   num_colors: Optional[int] = None, test_fraction: float = 0.25,
                   val_fraction: float = 0.2, seed: int = 0) -> Bundle:
    """Colored MNIST on scikit-learn's 8x8 digits: (3, 8, 8) floats, strokes painted.

    Binary label by default (y=0: digits 0-4, y=1: 5-9) with two colours, red and green; the
    colour agrees with the label (red for y=0) in a fraction `rho` of each training class and is
    `random` or `flipped` in test. `binary=false`: the ten digits, ten colours by default.
    The 1,797 digits are cut into train/val/test by `seed`; the val split keeps as many rows of
    each class as the rarest has, with colours spread evenly (balanced groups).
    """
    gray, digit = _sklearn_digits()
    train, val, test = three_way(len(digit), test_fraction, val_fraction,
                                 generator("colored_digits", seed, "split"))
    parts = {name: (gray[rows], digit[rows])
             for name, rows in (("train", train), ("val", val), ("test", test))}
    return colored_bundle("colored_digits", parts, rho=rho, test_color=test_color,
                          binary=binary, num_colors=num_colors, seed=seed)


# --- LMS (Shah et al. 2020) --------------------------------------------------------------------


def _slab_coordinates(y: Tensor, num_coords: int, num_slabs: int, margin: float,
                      gen: torch.Generator) -> Tensor:
    """k-slab coordinates: [-1, 1] cut into k equal slabs, slab j belonging to class j % 2,
    each shrunk by `margin` at both ends (so neighbouring slabs are 2 * margin apart, the same
    gap as the linear coordinate's). A row draws, per coordinate, one of its class's slabs
    uniformly, then a point uniformly inside it."""
    n = len(y)
    per_class = (num_slabs - y + 1) // 2  # class 0 owns slabs 0, 2, 4...; class 1 owns 1, 3...
    pick = (torch.rand(n, num_coords, generator=gen) * per_class[:, None]).long()
    slab = 2 * pick + y[:, None]
    width = 2.0 / num_slabs
    offset = torch.rand(n, num_coords, generator=gen) * (width - 2 * margin)
    return -1.0 + slab * width + margin + offset


def _linear_coordinate(side: Tensor, margin: float, gen: torch.Generator) -> Tensor:
    """side 1: uniform in [margin, 1]; side 0: uniform in [-1, -margin]."""
    magnitude = margin + torch.rand(len(side), generator=gen) * (1.0 - margin)
    return torch.where(side == 1, magnitude, -magnitude)


@DATASETS.register("lms", modality="vector")
def lms(*, num_train: int = 4000, num_val: int = 1000, num_test: int = 2000,
        num_slab_coords: int = 49, num_slabs: int = 5, margin: float = 0.1, rho: float = 1.0,
        test_linear: str = "random", test_slabs: str = "aligned", seed: int = 0) -> Bundle:
    """Shah et al.'s LMS-k data: x = [linear, k-slab x num_slab_coords] (default LMS-5, d=50).

    Binary label y. The linear coordinate (the simple feature, the spurious attribute: which
    side of 0 it is on) lies in [margin, 1] for attribute 1 and [-1, -margin] for 0; with the
    default rho=1 it is fully predictive in train, as in the paper. Every slab coordinate (the
    complex feature) is fully predictive everywhere. In test, `test_linear=random` makes the
    linear side independent of y (Shah et al.'s S-randomized data: accuracy then shows whether
    the model used the slabs), `flipped` reverses it; `test_slabs=random` draws the slab
    coordinates for a random label instead (S^c-randomized: shows whether it used the linear
    one). Groups: y * 2 + side; val: balanced groups, slabs aligned.
    """
    num_slabs, num_coords = _positive_int(num_slabs, "num_slabs"), int(num_slab_coords)
    if num_slabs < 2 or num_coords < 0:
        raise UserError(f"dataset.num_slabs={num_slabs}, num_slab_coords={num_coords}",
                        "use at least 2 slabs and a non-negative number of slab coordinates")
    if not 0.0 <= margin < 1.0 / num_slabs:
        raise UserError(f"dataset.margin={margin} leaves no room in {num_slabs} slabs",
                        f"use a margin in [0, {1.0 / num_slabs:g})")
    rho = check_rho(rho)
    if test_slabs not in ("aligned", "random"):
        raise UserError(f"dataset.test_slabs={test_slabs!r} is not a test mode",
                        "choose aligned or random")
    sizes = {"train": _positive_int(num_train, "num_train"),
             "val": _positive_int(num_val, "num_val"), "test": _positive_int(num_test, "num_test")}
    agree = {"train": rho, "val": 0.5, "test": agreement(test_linear, rho, 2, "test_linear")}
    splits = {}
    for part, n in sizes.items():
        gen = generator("lms", seed, part)
        y = _balanced_labels(n, 2, gen)
        side = assign_attribute(y, agree[part], 2, gen)
        # Slab-randomized test: the slabs show the label's class in exactly half of each class.
        slab_label = (assign_attribute(y, 0.5, 2, gen) if part == "test" and test_slabs == "random"
                      else y)
        x = torch.cat([_linear_coordinate(side, margin, gen)[:, None],
                       _slab_coordinates(slab_label, num_coords, num_slabs, margin, gen)], dim=1)
        splits[part] = grouped_split(x, y, side, 2)
    meta = Meta("lms", "vector", (1 + num_coords,), 2, class_names=("0", "1"),
                extra=extra(["0", "1"], "linear", ["neg", "pos"], rho=rho, test_mode=test_linear))
    return Bundle(splits["train"], splits["test"], meta, val=splits["val"])


# --- dominoes (Shah et al. 2020's MNIST-CIFAR) -------------------------------------------------

DOMINO_SOURCES = ("digits", "mnist_cifar")


def _pair_rows(label: Tensor, classes: Sequence[int], option: str) -> tuple[Tensor, Tensor]:
    """Rows of a two-class task inside a multi-class dataset, and their 0/1 task labels."""
    if len(classes) != 2 or classes[0] == classes[1]:
        raise UserError(f"dataset.{option}={list(classes)} must name two different classes",
                        f"e.g. dataset.{option}=[0,1]")
    rows = ((label == classes[0]) | (label == classes[1])).nonzero().squeeze(1)
    return rows, (label[rows] == classes[1]).long()


def _stack(simple_pool: dict[int, Tensor], complex_x: Tensor, y: Tensor, agree: float,
           gen: torch.Generator) -> Split:
    """One domino per complex image: a simple image of class a on top, the complex one below.
    a is the spurious attribute (agreeing with y in a fraction `agree` of each class); the top
    image is drawn, with replacement, from the pool of simple images of class a."""
    attr = assign_attribute(y, agree, 2, gen)
    top = torch.empty((len(y), *simple_pool[0].shape[1:]), dtype=simple_pool[0].dtype)
    for a, pool in simple_pool.items():
        rows = (attr == a).nonzero().squeeze(1)
        top[rows] = pool[torch.randint(len(pool), (len(rows),), generator=gen)]
    return grouped_split(torch.cat([top, complex_x], dim=2), y, attr, 2)


def _digit_dominoes(simple_classes, test_fraction, val_fraction, seed):
    """Top: sklearn digit simple_classes[0] vs [1]; bottom: any digit, y = (digit >= 5)."""
    gray, digit = _sklearn_digits()
    parts = three_way(len(digit), test_fraction, val_fraction,
                      generator("dominoes", seed, "split"))
    out = {}
    for name, rows in zip(("train", "val", "test"), parts):
        pair, pair_label = _pair_rows(digit[rows], simple_classes, "simple_classes")
        pool = {a: gray[rows][pair[pair_label == a]] for a in (0, 1)}
        out[name] = (pool, gray[rows], (digit[rows] >= 5).long())
    return out, ("0-4", "5-9"), [str(c) for c in simple_classes]


def _mnist_cifar_dominoes(simple_classes, complex_classes, val_fraction, seed, root):
    """Top: MNIST simple_classes (28x28 padded to 32x32, grey to RGB); bottom: CIFAR-10
    complex_classes (default automobile vs truck). Train/val from the train files, test from
    the test files."""
    mnist = DATASETS.build("mnist", root=root)
    cifar = DATASETS.build("cifar10", root=root)
    complex_classes = (1, 9) if complex_classes is None else tuple(complex_classes)
    out = {}
    split_gen = generator("dominoes", seed, "split")
    for name, m, c in (("train", mnist.train, cifar.train), ("test", mnist.test, cifar.test)):
        pair, pair_label = _pair_rows(m.y, simple_classes, "simple_classes")
        digits = torch.nn.functional.pad(m.x[pair], (2, 2, 2, 2)).expand(-1, 3, -1, -1)
        rows, y = _pair_rows(c.y, complex_classes, "complex_classes")
        if name == "test":
            out["test"] = ({a: digits[pair_label == a] for a in (0, 1)}, c.x[rows], y)
            continue
        order = torch.randperm(len(rows), generator=split_gen)
        n_val = int(round(len(rows) * val_fraction))
        # The MNIST images are cut the same way, so no top image is shared by train and val.
        cut = torch.randperm(len(pair), generator=split_gen)
        k = int(round(len(pair) * val_fraction))
        for part, keep, tops in (("val", order[:n_val], cut[:k]),
                                 ("train", order[n_val:], cut[k:])):
            pool = {a: digits[tops][pair_label[tops] == a] for a in (0, 1)}
            out[part] = (pool, c.x[rows][keep], y[keep])
    names = [cifar.meta.class_names[i] if cifar.meta.class_names else str(i)
             for i in complex_classes]
    return out, tuple(names), [str(c) for c in simple_classes]


@DATASETS.register("dominoes", modality="image")
def dominoes(*, source: str = "digits", rho: float = 1.0, test_simple: str = "random",
             simple_classes: Sequence[int] = (0, 1),
             complex_classes: Optional[Sequence[int]] = None,
             root: Optional[str] = None, test_fraction: float = 0.25, val_fraction: float = 0.2,
             seed: int = 0) -> Bundle:
    """MNIST-CIFAR-style dominoes: two images stacked vertically, simple on top, complex below.

    The label y is the complex block's class; the top block's class (the spurious attribute)
    agrees with it in a fraction `rho` of each training class (default 1: both fully predictive,
    as in Shah et al.) and is `random` or `flipped` in test (`test_simple`).

    source=digits (offline): scikit-learn digits, top = digit simple_classes[0] vs [1] (an easy
    pair), bottom = any digit with y = (digit >= 5) (a many-shaped, harder concept); (1, 16, 8)
    floats; the 1,797 bottom digits are cut into train/val/test by `seed`.
    source=mnist_cifar: real MNIST and CIFAR-10 from `root` (dgrun's mnist and cifar10
    readers), bottom = CIFAR classes `complex_classes` (default [1, 9]: automobile, truck);
    (3, 64, 32) uint8. Val: a `val_fraction` of the train files, balanced groups.
    """
    if source not in DOMINO_SOURCES:
        raise UserError(f"dataset.source={source!r} is not a dominoes source",
                        f"choose one of: {', '.join(DOMINO_SOURCES)}")
    rho = check_rho(rho)
    simple_classes = tuple(int(c) for c in simple_classes)
    if source == "digits":
        if complex_classes is not None:
            raise UserError("dataset.complex_classes is for source=mnist_cifar",
                            "with source=digits the bottom label is always digit >= 5; "
                            "set dataset.complex_classes=null")
        parts, label_names, attr_names = _digit_dominoes(simple_classes, test_fraction,
                                                         val_fraction, seed)
    else:
        parts, label_names, attr_names = _mnist_cifar_dominoes(simple_classes, complex_classes,
                                                               val_fraction, seed, root)
    agree = {"train": rho, "val": 0.5, "test": agreement(test_simple, rho, 2, "test_simple")}
    splits = {}
    for part, (pool, bottom, y) in parts.items():
        if part == "val":
            keep = class_balanced_rows(y, generator("dominoes", seed, "val rows"))
            bottom, y = bottom[keep], y[keep]
        splits[part] = _stack(pool, bottom, y, agree[part], generator("dominoes", seed, part))
    meta = Meta("dominoes", "image", tuple(splits["train"].x.shape[1:]), 2,
                class_names=tuple(label_names),
                extra=extra(label_names, "top", attr_names, rho=rho, test_mode=test_simple))
    return Bundle(splits["train"], splits["test"], meta, val=splits["val"])


# --- biased token strings ----------------------------------------------------------------------

TEXT_RULES = ("majority", "parity")


@DATASETS.register("text_bias", modality="tokens")
def text_bias(*, num_train: int = 4000, num_val: int = 1000, num_test: int = 2000,
              length: int = 16, num_tokens: int = 8, rule: str = "majority",
              rule_length: Optional[int] = None, spurious_position: int = 0, rho: float = 0.95,
              test_spurious: str = "random", seed: int = 0) -> Bundle:
    """Token strings whose label follows a counting rule, with one marker token that agrees
    with the label in a fraction `rho` of training rows (`random`/`flipped` in test).

    Layout: `length` positions; position `spurious_position` holds a marker, token
    num_tokens + a (the spurious attribute a in {0, 1}); every other position holds a content
    token in 0..num_tokens-1, uniformly at random given the label. A content token is "high"
    when it is >= num_tokens / 2. The label reads the first `rule_length` content positions
    (default: all of them): `majority` -> y = 1 iff most of them are high (rule_length must be
    odd); `parity` -> y = the parity of the number of high ones (harder: every position
    matters). vocab_size = num_tokens + 2. Groups: y * 2 + a; val: balanced groups.
    """
    length, num_tokens = _positive_int(length, "length"), _positive_int(num_tokens, "num_tokens")
    if num_tokens % 2 or length < 2:
        raise UserError(f"dataset.num_tokens={num_tokens}, length={length}",
                        "use an even num_tokens (half are high, half low) and length >= 2")
    if rule not in TEXT_RULES:
        raise UserError(f"dataset.rule={rule!r} is not a rule",
                        f"choose one of: {', '.join(TEXT_RULES)}")
    if not 0 <= spurious_position < length:
        raise UserError(f"dataset.spurious_position={spurious_position} is outside the "
                        f"{length} positions", f"use 0..{length - 1}")
    k = length - 1 if rule_length is None else int(rule_length)
    if not 1 <= k <= length - 1 or (rule == "majority" and k % 2 == 0):
        raise UserError(f"dataset.rule_length={rule_length} does not fit rule {rule!r} with "
                        f"{length - 1} content positions",
                        "use 1..length-1 positions (an odd number for majority), or null")
    rho, half = check_rho(rho), num_tokens // 2
    content = [p for p in range(length) if p != spurious_position]
    rule_positions = torch.tensor(content[:k])
    agree = {"train": rho, "val": 0.5, "test": agreement(test_spurious, rho, 2, "test_spurious")}
    sizes = {"train": _positive_int(num_train, "num_train"),
             "val": _positive_int(num_val, "num_val"), "test": _positive_int(num_test, "num_test")}
    splits = {}
    for part, n in sizes.items():
        gen = generator("text_bias", seed, part)
        y = _balanced_labels(n, 2, gen)
        x = torch.randint(num_tokens, (n, length), generator=gen)
        high = (x[:, rule_positions] >= half).long()
        follows = high.sum(1) * 2 > k if rule == "majority" else high.sum(1) % 2 == 1
        wrong = follows.long() != y
        # Rows drawn with the wrong label are mapped by a bijection onto rows with the right
        # one, so content stays uniform given the label: complementing every rule position's
        # high/low (majority) or just the first one's (parity) flips the rule's answer.
        flip = rule_positions if rule == "majority" else rule_positions[:1]
        cols = x[:, flip]
        x[:, flip] = torch.where(wrong[:, None], (cols + half) % num_tokens, cols)
        attr = assign_attribute(y, agree[part], 2, gen)
        x[:, spurious_position] = num_tokens + attr
        splits[part] = grouped_split(x, y, attr, 2)
    meta = Meta("text_bias", "tokens", (length,), 2, vocab_size=num_tokens + 2,
                class_names=("0", "1"),
                extra=extra(["0", "1"], "marker", ["0", "1"], rho=rho, test_mode=test_spurious,
                            rule=rule))
    return Bundle(splits["train"], splits["test"], meta, val=splits["val"])
