"""Peak host memory and data memory on the device, per dataset, through dgrun's data pipeline.

    python benchmarks/memory.py                      # digits, mnist1d, colored_digits,
                                                     # CIFAR-10 and Tiny ImageNet sized data
    python benchmarks/memory.py --tiny-per-class 500 # the full 100,000 Tiny ImageNet images

Each dataset loads in a fresh subprocess (pipeline.load, then .to(device)) so its peak resident
set size (ru_maxrss) is its own. CIFAR-10 and Tiny ImageNet are written first as files in their
real layouts (random pixels: the sizes are what matter). "device" is the bytes of the tensors
the run keeps on the device; "as float32" is what the same data cost before images were kept as
uint8 and normalized per batch. Tiny ImageNet is also loaded twice: the first load decodes the
JPEGs, the second reads the decoded-array cache.
"""
from __future__ import annotations

import argparse
import json
import math
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, resource, sys, time
import torch
from dgrun.data import pipeline
name, options, preprocess, device = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
bundle = pipeline.load(name, options, seed=0, preprocess=preprocess).to(device)
seconds = time.perf_counter() - start
tensors = [t for s in (bundle.train, bundle.test, bundle.val) if s is not None
           for t in (s.x, s.y, s.corrupted, s.group) if t is not None]
stored = sum(t.numel() * t.element_size() for t in tensors)
as_float = sum(t.numel() * (4 if t is s.x else t.element_size())
               for s in (bundle.train, bundle.test, bundle.val) if s is not None
               for t in (s.x, s.y, s.corrupted, s.group) if t is not None)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rows": len(bundle.train) + len(bundle.test), "device_bytes": stored,
                  "float32_bytes": as_float, "peak_rss_kb": peak, "import_rss_kb": base,
                  "load_s": seconds, "dtype": str(bundle.train.x.dtype)}))
"""


def write_cifar10(root: Path, n: int) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per = math.ceil(n / 5)
    for i in range(5):
        batch = {b"data": rng.integers(0, 256, (per, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, per).tolist()}
        (folder / f"data_batch_{i + 1}").write_bytes(pickle.dumps(batch))
    test = {b"data": rng.integers(0, 256, (10000, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, 10000).tolist()}
    (folder / "test_batch").write_bytes(pickle.dumps(test))


def write_tiny_imagenet(root: Path, per_class: int, val_per_class: int) -> None:
    from PIL import Image

    folder = root / "tiny-imagenet-200"
    wnids = [f"n{i:08d}" for i in range(200)]
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rng = np.random.default_rng(0)
    lines = []
    for wnid in wnids:
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(images / f"{wnid}_{i}.JPEG", quality=90)
        for i in range(val_per_class):
            name = f"val_{wnid}_{i}.JPEG"
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
                folder / "val" / "images" / name, quality=90)
            lines.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def measure(name: str, options: dict, preprocess: str, device: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, name, json.dumps(options), preprocess,
                          device], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--cifar-samples", type=int, default=50_000)
    p.add_argument("--tiny-per-class", type=int, default=50,
                   help="training images per class (the real set has 500)")
    p.add_argument("--out", help="append results as JSON lines")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_cifar10(root, args.cifar_samples)
        started = time.perf_counter()
        write_tiny_imagenet(root, args.tiny_per_class, max(1, args.tiny_per_class // 10))
        print(f"(wrote the Tiny ImageNet files in {time.perf_counter() - started:.0f} s)")
        cases = [("digits", {}, "standardize"), ("mnist1d", {}, "standardize"),
                 ("colored_digits", {}, "standardize"),
                 ("cifar10", {"root": str(root)}, "whiten"),
                 ("tiny_imagenet", {"root": str(root)}, "standardize"),
                 ("tiny_imagenet", {"root": str(root)}, "standardize")]
        for i, (name, options, preprocess) in enumerate(cases):
            result = measure(name, options, preprocess, args.device)
            label = name + (" (cached)" if name == "tiny_imagenet" and i == len(cases) - 1
                            else "")
            rows.append({"dataset": label, **result, "device": args.device})
    print("| dataset | rows | stored as | on the device | as float32 | peak host RSS | load |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dataset']} | {r['rows']:,} | {r['dtype'].replace('torch.', '')} | "
              f"{r['device_bytes'] / 2**20:,.1f} MiB | {r['float32_bytes'] / 2**20:,.1f} MiB | "
              f"{r['peak_rss_kb'] / 2**10:,.0f} MiB | {r['load_s']:.1f} s |")
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
