"""What the plain scripts share: dgrun's seed derivation (so they draw the same data), the
digits and their split, per-channel standardization, a chunked evaluation, and the metrics
file. Plain PyTorch, numpy and the standard library only."""
from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

START = time.perf_counter()


def derive_seed(seed: int, *names: object) -> int:
    text = "/".join(str(p) for p in (seed, *names))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def arguments(doc: str, more=None) -> argparse.Namespace:
    """--out and --threads (set here), and what `more(parser)` adds."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for metrics.csv and result.json")
    p.add_argument("--threads", type=int, default=1)
    if more is not None:
        more(p)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    return args


def sklearn_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits as (N, 1, 8, 8) floats in [0, 1] and their digits, read
    from the CSV file in its wheel (as dgrun reads them: scikit-learn is not imported)."""
    path = os.path.join(importlib.util.find_spec("sklearn").submodule_search_locations[0],
                        "datasets", "data", "digits.csv.gz")
    table = np.loadtxt(path, delimiter=",")
    images = torch.from_numpy(table[:, :-1].reshape(-1, 8, 8).astype(np.float32) / 16.0)
    return images.unsqueeze(1), torch.from_numpy(table[:, -1].astype(np.int64))


def digits_split(seed: int = 0, test_fraction: float = 0.2):
    """dgrun's `digits` dataset: (train_x, train_y, test_x, test_y), a seeded 80/20 split."""
    x, y = sklearn_digits()
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    train, test = torch.from_numpy(order[n_test:]), torch.from_numpy(order[:n_test])
    return x[train], y[train], x[test], y[test]


def standardizer(train_x: torch.Tensor):
    """dgrun's preprocess=standardize: minus the training split's per-channel mean, divided by
    its std (statistics in float64; a constant channel, std < 1/255, is only centred)."""
    count = len(train_x) * train_x.shape[2] * train_x.shape[3]
    mean = train_x.sum(dim=(0, 2, 3), dtype=torch.float64) / count
    squares = train_x.square().sum(dim=(0, 2, 3), dtype=torch.float64)
    std = ((squares - count * mean.pow(2)) / (count - 1)).clamp_min(0).sqrt()
    std = torch.where(std < 1 / 255, torch.ones_like(std), std)
    mean, std = mean.float().view(1, -1, 1, 1), std.float().view(1, -1, 1, 1)
    return lambda b: (b - mean) / std


@torch.no_grad()
def evaluate(model, x, y, loss_sum, prepare=lambda b: b, chunk: int = 4096):
    """(mean loss, accuracy) in eval mode, 4096 rows at a time (as dgrun evaluates)."""
    model.eval()
    total, correct = 0.0, 0
    for i in range(0, len(y), chunk):
        out = model(prepare(x[i:i + chunk])).float()
        total += float(loss_sum(out, y[i:i + chunk]))
        correct += int((out.argmax(dim=1) == y[i:i + chunk]).sum())
    model.train()
    return total / len(y), correct / len(y)


def write(out: str, rows: list[dict], steps: int, train_time_s: float) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    final = rows[-1]
    (folder / "result.json").write_text(json.dumps({
        "steps": steps, "train_acc": final["train_acc"], "test_acc": final["test_acc"],
        "time_s": train_time_s, "steps_per_s": steps / train_time_s,
        "process_s": time.perf_counter() - START}, indent=1))
