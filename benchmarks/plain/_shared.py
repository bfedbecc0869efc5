"""What the plain scripts share: dgrun's seed derivation (so they draw the same data), a
chunked evaluation, and the metrics file. Plain PyTorch and the standard library only."""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import time
from pathlib import Path

import torch

START = time.perf_counter()


def derive_seed(seed: int, *names: object) -> int:
    text = "/".join(str(p) for p in (seed, *names))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def arguments(doc: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for metrics.csv and result.json")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    return args


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
