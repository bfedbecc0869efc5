"""A model's accuracy on the corruption suite and under attack, on a seeded set of images.

    evaluate_robustness(model, prepare, pixels, labels, ...)  -> {column: float}
    evaluate_cifar10c(model, prepare, root, ...)              -> {column: float}

Both work on any checkpoint of any run: they need only the model, its `prepare` (stored pixels
-> model inputs) and pixels. The training-time probe (dgrun.probes.robustness) uses the same
pieces, so the probe's last row and an evaluation of the last checkpoint agree.

Columns: clean_acc, corruption_acc (mean over the chosen corruptions and severities),
corruption_acc_<name> (mean over severities), corruption_acc_<name>_<severity>, adv_acc.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from dgrun.errors import UserError
from dgrun.robustness import cifar10c
from dgrun.robustness.attacks import AttackSpec, Prepare, adversarial_accuracy
from dgrun.robustness.corruptions import SEVERITIES, corrupt, names
from dgrun.seeding import derive_seed

CHUNK = 1000  # images corrupted together; noise is keyed by the chunk, so this is fixed


def unit_pixels(x: Tensor) -> Tensor:
    """Stored image rows (uint8 0..255 or float 0..1) -> float pixels in [0, 1].

    Anything else (vectors, tokens, normalized floats) is a UserError: corruptions and the
    attack budget are defined on pixels.
    """
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise UserError(f"robustness needs images (N, 1 or 3, H, W); the data has shape "
                        f"{tuple(x.shape)}", "use it on an image dataset")
    if x.dtype == torch.uint8:
        return x.float() / 255
    if not x.is_floating_point():
        raise UserError(f"robustness needs uint8 or float pixels, not {x.dtype}",
                        "store images as pixels")
    low, high = torch.aminmax(x)
    if low < -1e-6 or high > 1 + 1e-6:
        raise UserError(f"robustness needs pixels in [0, 1]; the images range from "
                        f"{float(low):.3g} to {float(high):.3g}",
                        "keep stored images as pixels and normalize in Bundle.prepare")
    return x.float()


def seeded_subset(total: int, n: Optional[int], seed: int) -> Tensor:
    """Indices of a fixed random subset of n of `total` rows (all rows when n is None or too
    large); the first k of them are the subset of size k."""
    order = torch.randperm(total, generator=torch.Generator().manual_seed(
        derive_seed(seed, "robustness", "subset")))
    return order if n is None else order[:n]


def corrupted_uint8(x: Tensor, name: str, severity: int, seed: int) -> Tensor:
    """Corrupt float pixels chunk by chunk and round to uint8, as CIFAR-10-C's files store them
    (the files truncate; rounding keeps the mean unbiased)."""
    return torch.cat([
        torch.round(corrupt(x[i:i + CHUNK], name, severity, seed=seed, chunk=i // CHUNK) * 255)
        .to(torch.uint8) for i in range(0, len(x), CHUNK)])


def predictor(model: nn.Module, prepare: Prepare, batch_size: int = 512,
              ) -> Callable[[Tensor], Tensor]:
    """Pixels -> logits in eval mode without gradients, `batch_size` images at a time."""

    @torch.no_grad()
    def predict(x: Tensor) -> Tensor:
        was_training = model.training
        model.eval()
        try:
            return torch.cat([model(prepare(x[i:i + batch_size])).float()
                              for i in range(0, len(x), batch_size)])
        finally:
            model.train(was_training)

    return predict


def accuracy(predict: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> Tensor:
    """Accuracy as a device scalar; uint8 images are turned into float pixels first."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x
    return (predict(x).argmax(dim=-1) == y).float().mean()


def summarize_corruptions(accs: dict[tuple[str, int], Tensor], per_severity: bool = True,
                          ) -> dict[str, Tensor]:
    """{(name, severity): acc} -> corruption_acc, corruption_acc_<name> and (per_severity)
    corruption_acc_<name>_<severity>."""
    columns: dict[str, Tensor] = {}
    if per_severity:
        for (name, severity), acc in accs.items():
            columns[f"corruption_acc_{name}_{severity}"] = acc
    for name in dict.fromkeys(n for n, _ in accs):
        columns[f"corruption_acc_{name}"] = torch.stack(
            [a for (n, _), a in accs.items() if n == name]).mean()
    columns["corruption_acc"] = torch.stack(list(accs.values())).mean()
    return columns


def evaluate_robustness(model: nn.Module, prepare: Prepare, pixels: Tensor, labels: Tensor, *,
                        corruptions: str | Iterable[str] = "all",
                        severities: Sequence[int] = SEVERITIES,
                        attack: Optional[AttackSpec] = AttackSpec(), n: Optional[int] = None,
                        n_adv: Optional[int] = 256, seed: int = 0, batch_size: int = 512,
                        ) -> dict[str, float]:
    """Accuracy of `model` on a seeded subset of n images (all when None): clean, under each
    corruption and severity, and under `attack` on the first n_adv of them (None: all; no
    attack when `attack` is None). Pixels are uint8 0..255 or float 0..1 on the model's
    device; the model sees prepare(pixels)."""
    subset = seeded_subset(len(labels), n, seed).to(labels.device)
    x, y = unit_pixels(pixels[subset]), labels[subset]
    predict = predictor(model, prepare, batch_size)
    columns: dict[str, Tensor] = {"clean_acc": accuracy(predict, x, y)}
    chosen = names(corruptions, channels=x.shape[1])
    if chosen and severities:
        columns.update(summarize_corruptions({
            (name, s): accuracy(predict, corrupted_uint8(x, name, s, seed), y)
            for name in chosen for s in severities}))
    if attack is not None:
        k = len(x) if n_adv is None else min(n_adv, len(x))
        columns["adv_acc"] = adversarial_accuracy(model, prepare, x[:k], y[:k], attack,
                                                  seed=seed, batch_size=batch_size)
    return _to_host(columns)


def evaluate_cifar10c(model: nn.Module, prepare: Prepare, root: str | Path, *,
                      corruptions: str | Iterable[str] = "all",
                      severities: Sequence[int] = SEVERITIES, n: Optional[int] = None,
                      seed: int = 0, batch_size: int = 512,
                      device: torch.device | str | None = None) -> dict[str, float]:
    """Accuracy on the published CIFAR-10-C images in `root` (see cifar10c.py), on the same
    seeded subset of n test images for every corruption and severity (all when None)."""
    if device is None:
        first = next(model.parameters(), None)
        device = "cpu" if first is None else first.device
    predict = predictor(model, prepare, batch_size)
    accs = {}
    for name in cifar10c.available(root, corruptions):
        for s in severities:
            x, y = cifar10c.load_cifar10c(root, name, s)
            subset = seeded_subset(len(y), n, seed)
            accs[name, s] = accuracy(predict, x[subset].to(device), y[subset].to(device))
    return _to_host(summarize_corruptions(accs))


def _to_host(columns: dict[str, Tensor]) -> dict[str, float]:
    keys = list(columns)
    values = torch.stack([torch.as_tensor(columns[k]).float().reshape(()) for k in keys])
    return dict(zip(keys, values.tolist()))
