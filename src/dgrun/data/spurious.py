"""What every grouped (spurious-correlation) dataset shares: attributes, group ids, balance.

A grouped dataset pairs each row's label y (the *core* concept the model should learn) with a
*spurious attribute* a in 0..num_attr-1 (a colour, a background, a simple image block) that
agrees with the label more or less often. Conventions every builder here follows:

    group id      g = y * num_attr + a            (Split.group, int64)
    group names   meta.extra["groups"][g], e.g. "y=0,color=red"
    aligned value the attribute value that "agrees" with label y is y % num_attr
    train         the attribute agrees with the label in exactly round(rho * n_y) rows of each
                  class y; the others are spread evenly over the other values
    test          `random` (agreement 1/num_attr: attribute independent of the label),
                  `flipped` (agreement 0: never the aligned value) or `aligned` (rho, as train)
    Bundle.val    group-balanced: the same number of rows in every group (up to one row when
                  a class does not split evenly), held out from train and test; it is what
                  last-layer retraining (the `dfr` probe) fits on

meta.extra also carries "attribute" (the spurious attribute's name) and "num_attr".
Assignments are stratified per class rather than drawn row by row, so the train correlation
is rho exactly (up to rounding) and the balanced splits are balanced exactly, not just on
average; all randomness comes from a torch.Generator seeded by the dataset's own options.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from dgrun.data.bundle import Bundle, Meta, Split
from dgrun.errors import UserError

TEST_MODES = ("random", "flipped", "aligned")


def check_rho(rho: float, option: str = "rho") -> float:
    rho = float(rho)
    if not 0.0 <= rho <= 1.0:
        raise UserError(f"dataset.{option}={rho} is not a probability",
                        f"use a value in [0, 1], e.g. dataset.{option}=0.95")
    return rho


def agreement(mode: str, rho: float, num_attr: int, option: str) -> float:
    """The fraction of rows whose attribute is the aligned value, for a test `mode`."""
    table = {"random": 1.0 / num_attr, "flipped": 0.0, "aligned": rho}
    if mode not in table:
        raise UserError(f"dataset.{option}={mode!r} is not a test mode",
                        f"choose one of: {', '.join(TEST_MODES)}")
    return table[mode]


def generator(*names: object) -> torch.Generator:
    """A CPU generator seeded from a dataset's options (stable across processes)."""
    from dgrun.seeding import derive_seed

    return torch.Generator().manual_seed(derive_seed(*names))


def assign_attribute(y: Tensor, agree: float, num_attr: int, gen: torch.Generator) -> Tensor:
    """Spurious attribute per row: in each class y, exactly round(agree * n_y) rows (chosen at
    random) get the aligned value y % num_attr; the rest are dealt round-robin, in random order,
    over the other num_attr - 1 values, so they are as evenly spread as the counts allow."""
    attr = torch.empty_like(y)
    for c in y.unique().tolist():
        rows = (y == c).nonzero().squeeze(1)
        rows = rows[torch.randperm(len(rows), generator=gen)]
        n_aligned = int(round(agree * len(rows)))
        aligned = c % num_attr
        attr[rows[:n_aligned]] = aligned
        rest = len(rows) - n_aligned
        if rest:
            others = torch.tensor([a for a in range(num_attr) if a != aligned], dtype=y.dtype)
            start = int(torch.randint(len(others), (), generator=gen))
            attr[rows[n_aligned:]] = others[(torch.arange(rest) + start) % len(others)]
    return attr


def class_balanced_rows(y: Tensor, gen: torch.Generator) -> Tensor:
    """Row indices (sorted) keeping as many rows of every class as the rarest class has."""
    classes = y.unique()
    n = min(int((y == c).sum()) for c in classes)
    picks = []
    for c in classes:
        rows = (y == c).nonzero().squeeze(1)
        picks.append(rows[torch.randperm(len(rows), generator=gen)[:n]])
    return torch.cat(picks).sort().values


def group_balanced_rows(group: Tensor, gen: torch.Generator) -> Tensor:
    """Row indices (sorted) keeping as many rows of every present group as the rarest has."""
    return class_balanced_rows(group, gen)


def group_ids(y: Tensor, attr: Tensor, num_attr: int) -> Tensor:
    return y * num_attr + attr


def group_names(num_classes: int, attribute: str, attr_names: Sequence[str]) -> list[str]:
    """["y=0,color=red", "y=0,color=green", "y=1,color=red", ...] in group-id order (labels by
    class id: the class names are in meta.class_names)."""
    return [f"y={label},{attribute}={value}" for label in range(num_classes)
            for value in attr_names]


def grouped_split(x: Tensor, y: Tensor, attr: Tensor, num_attr: int) -> Split:
    return Split(x, y, group=group_ids(y, attr, num_attr))


def extra(label_names: Sequence[str], attribute: str, attr_names: Sequence[str],
          **more) -> dict:
    """meta.extra for a grouped dataset (see the module docstring)."""
    return {"groups": group_names(len(label_names), attribute, attr_names), "attribute": attribute,
            "num_attr": len(attr_names), **more}


def three_way(n: int, test_fraction: float, val_fraction: float,
              gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """A seeded permutation of range(n) cut into (train, val, test) index sets."""
    for name, value in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0.0 < value < 1.0:
            raise UserError(f"dataset.{name}={value} must be in (0, 1)",
                            f"use e.g. dataset.{name}=0.2")
    if test_fraction + val_fraction >= 1.0:
        raise UserError(f"dataset.test_fraction + dataset.val_fraction = "
                        f"{test_fraction + val_fraction} leaves no training rows",
                        "make their sum smaller than 1")
    order = torch.randperm(n, generator=gen)
    n_test, n_val = int(round(n * test_fraction)), int(round(n * val_fraction))
    return order[n_test + n_val:], order[n_test:n_test + n_val], order[:n_test]


# --- colour ------------------------------------------------------------------------------------

# RGB in [0, 1]. The first two, red and green, are the binary datasets' two colours.
PALETTE = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "magenta": (1.0, 0.0, 1.0), "cyan": (0.0, 1.0, 1.0),
    "orange": (1.0, 0.5, 0.0), "purple": (0.5, 0.0, 1.0), "white": (1.0, 1.0, 1.0),
    "teal": (0.0, 0.5, 0.5),
}


def palette(num_colors: int) -> list[str]:
    if not 2 <= num_colors <= len(PALETTE):
        raise UserError(f"dataset.num_colors={num_colors} is out of range",
                        f"use 2..{len(PALETTE)} colours")
    return list(PALETTE)[:num_colors]


def colorize(gray: Tensor, attr: Tensor, colors: Sequence[str], chunk: int = 8192) -> Tensor:
    """(N, 1, H, W) grey strokes -> (N, 3, H, W): each stroke painted in its row's colour on a
    black background. Floats stay floats in [0, 1]; uint8 stays uint8 (painted in chunks, so
    60,000 MNIST digits never exist as one float copy)."""
    rgb = torch.tensor([PALETTE[c] for c in colors], dtype=torch.float32)[attr]  # (N, 3)
    out_dtype = torch.uint8 if gray.dtype == torch.uint8 else torch.float32
    out = torch.empty((len(gray), 3, *gray.shape[2:]), dtype=out_dtype)
    for start in range(0, len(gray), chunk):
        rows = slice(start, start + chunk)
        painted = gray[rows].float() * rgb[rows, :, None, None]
        out[rows] = painted.round() if out_dtype == torch.uint8 else painted
    return out


def colored_bundle(name: str, parts: dict[str, tuple[Tensor, Tensor]], *, rho: float,
                   test_color: str, binary: bool, num_colors: int | None, seed: int) -> Bundle:
    """Coloured digits (Colored MNIST): `parts` maps train/val/test to (grey (N,1,H,W), digit).

    The label is the digit, or with `binary` whether it is 5..9 (y=0 for 0-4, y=1 for 5-9, as in
    Arjovsky et al.). The colour is the spurious attribute (module docstring): it agrees with the
    label in a fraction rho of each training class; the val split keeps the same number of rows
    of each class and spreads the colours evenly (balanced groups).
    """
    rho = check_rho(rho)
    num_classes = 2 if binary else 10
    colors = palette(num_classes if num_colors is None else int(num_colors))
    label_names = ["0-4", "5-9"] if binary else [str(d) for d in range(10)]
    agree = {"train": rho, "val": 1.0 / len(colors),
             "test": agreement(test_color, rho, len(colors), "test_color")}
    splits = {}
    for part, (gray, digit) in parts.items():
        y = (digit >= 5).long() if binary else digit.long()
        if part == "val":
            keep = class_balanced_rows(y, generator(name, seed, "val rows"))
            gray, y = gray[keep], y[keep]
        attr = assign_attribute(y, agree[part], len(colors), generator(name, seed, part, "color"))
        splits[part] = grouped_split(colorize(gray, attr, colors), y, attr, len(colors))
    meta = Meta(name, "image", tuple(splits["train"].x.shape[1:]), num_classes,
                class_names=tuple(label_names),
                extra=extra(label_names, "color", colors, rho=rho, test_mode=test_color))
    return Bundle(splits["train"], splits["test"], meta, val=splits["val"])
