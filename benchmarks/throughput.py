"""Training throughput: MLP 1x512 on CIFAR-shaped synthetic data, three ways of feeding it.

    python benchmarks/throughput.py --threads 1 --epochs 2 --out benchmarks/results.jsonl

Methods (the model, loss, optimizer and batch size are the same in all three):

  dataloader  the seed studies' way: a per-item Dataset (__getitem__ returns one (x, y) pair)
              and DataLoader(shuffle=True, batch_size=B); num_workers from --workers.
  dgrun       dgrun's own loop, dgrun.train.fit, with a Plan that evaluates only at the end and
              no-op hooks (no checkpoints, no progress); data as device tensors, batches from
              the seeded per-epoch permutation. Timed by fit's own training clock
              (State.train_time_s), which excludes evaluation; the fit call's wall time,
              evaluation included, is recorded as wall_s.
  bare        a bare tensor loop: one randperm per epoch, x[perm[i:i+B]], forward, backward,
              step. The practical upper bound on a machine.
  cli         the `dgrun` command itself, as a user runs it: the same samples written as real
              CIFAR-10 pickle batches (32x32 uint8, centre-cropped to 28x28 by the pipeline,
              normalized per batch), `dgrun dataset=cifar10 model=mlp1 ...` with evaluation
              only at the end; its summary.json's throughput.train_samples_per_s (training
              time only). Start-up, data loading and evaluation are reported as wall_s.

Each method gets a freshly initialised model (same seed), a short warm-up, then --epochs timed
epochs. Results print as a table and, with --out, append as JSON lines.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from dgrun import models, optim
from dgrun.data.bundle import Split
from dgrun.losses import LOSSES
from dgrun.train import Plan, State, fit

SHAPE = (3, 28, 28)
CLASSES = 10
METHODS = ("dataloader", "dgrun", "bare", "cli")
WARMUP_STEPS = 20


# ---------------------------------------------------------------------------------------------
# Machine and setup

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *SHAPE), generator=gen)              # float32 in [0, 1), like the pipeline
    y = torch.randint(0, CLASSES, (n,), generator=gen)      # random labels: throughput only
    return x, y


def make_model(device: torch.device, seed: int):
    torch.manual_seed(seed)
    model = models.create("mlp1", SHAPE, CLASSES, "image").to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, opt


def train_step(model, opt, xb, yb) -> torch.Tensor:
    loss = F.cross_entropy(model(xb), yb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


# ---------------------------------------------------------------------------------------------
# 1. DataLoader over a per-item Dataset

class PerItem(Dataset):
    """The seed studies' shape of dataset: one (x, y) pair per __getitem__."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def bench_dataloader(x, y, args, device, workers: int) -> dict:
    model, opt = make_model(device, args.seed)
    loader = DataLoader(PerItem(x, y), batch_size=args.batch_size, shuffle=True,
                        num_workers=workers, persistent_workers=workers > 0,
                        pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(args.seed))
    model.train()
    # Warm-up: a few batches (also starts the workers when there are any).
    for k, (xb, yb) in enumerate(loader):
        train_step(model, opt, xb.to(device, non_blocking=True), yb.to(device, non_blocking=True))
        if k + 1 >= WARMUP_STEPS:
            break
    sync(device)
    start = time.perf_counter()
    for _ in range(args.epochs):
        for xb, yb in loader:
            train_step(model, opt, xb.to(device, non_blocking=True),
                       yb.to(device, non_blocking=True))
    sync(device)
    seconds = time.perf_counter() - start
    return {"train_s": seconds, "wall_s": seconds, "workers": workers}


# ---------------------------------------------------------------------------------------------
# 2. dgrun's loop

class NoHooks:
    """Hooks that record nothing: no rows written, no checkpoints, no stop requests."""

    def on_step(self, state: State) -> None:
        pass

    def on_eval(self, state: State, row: dict) -> None:
        pass

    def save(self, state: State, reason: str) -> None:
        pass

    def stop_requested(self) -> Optional[str]:
        return None


def dgrun_plan(seed: int, batch_size: int, n: int, max_steps: int) -> Plan:
    return Plan(seed=seed, batch_size=batch_size, steps_per_epoch=math.ceil(n / batch_size),
                max_steps=max_steps, max_time_s=None,
                is_eval_step=lambda step: False,          # fit still evaluates at the last step
                is_checkpoint_step=lambda step: False,
                stop_at_interpolation=False)


def bench_dgrun(x, y, args, device) -> dict:
    xd, yd = x.to(device), y.to(device)
    train, test = Split(xd, yd), Split(xd[:1000], yd[:1000])
    torch.manual_seed(args.seed)
    model = models.create("mlp1", SHAPE, CLASSES, "image").to(device)
    n, bs = len(train), args.batch_size
    spe = math.ceil(n / bs)
    # As run.py builds them: SGD through optim.build (LambdaLR, constant schedule) and the
    # registered cross-entropy.
    opt, sched = optim.build(model, "sgd", {"lr": 0.01, "momentum": 0.9}, "constant", {},
                             steps_per_epoch=spe, total_steps=args.epochs * spe)
    loss_fn, eval_loss = LOSSES.build("cross_entropy")
    hooks = NoHooks()
    # Warm-up on a small slice (fit evaluates the whole train split at its start and end).
    small = Split(xd[:WARMUP_STEPS * bs], yd[:WARMUP_STEPS * bs])
    objective = lambda out, y, rows: loss_fn(out, y)  # noqa: E731 (ERM, as run.py builds it)
    fit(model, small, test, opt, sched, objective, eval_loss,
        dgrun_plan(args.seed, bs, len(small), WARMUP_STEPS), State(), hooks)
    sync(device)
    plan = dgrun_plan(args.seed, bs, n, args.epochs * spe)
    start = time.perf_counter()
    state = fit(model, train, test, opt, sched, objective, eval_loss, plan, State(), hooks)
    sync(device)
    wall = time.perf_counter() - start
    assert state.step == args.epochs * spe, (state.step, state.status, state.stop_reason)
    return {"train_s": state.train_time_s, "wall_s": wall, "status": state.status}


# ---------------------------------------------------------------------------------------------
# 3. Bare tensor loop

def bench_bare(x, y, args, device) -> dict:
    xd, yd = x.to(device), y.to(device)
    model, opt = make_model(device, args.seed)
    n, bs = len(yd), args.batch_size
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    perm = torch.randperm(n, generator=gen).to(device)
    for i in range(0, WARMUP_STEPS * bs, bs):
        idx = perm[i:i + bs]
        train_step(model, opt, xd[idx], yd[idx])
    sync(device)
    start = time.perf_counter()
    for _ in range(args.epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            train_step(model, opt, xd[idx], yd[idx])
    sync(device)
    seconds = time.perf_counter() - start
    return {"train_s": seconds, "wall_s": seconds}


# ---------------------------------------------------------------------------------------------
# 4. The dgrun command

def write_cifar10(root, n: int, seed: int) -> None:
    """n training images in CIFAR-10's real pickle layout (5 data batches, a test batch)."""
    import pickle

    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per = math.ceil(n / 5)
    for i in range(5):
        rows = min(per, n - i * per)
        batch = {b"data": rng.integers(0, 256, (rows, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, CLASSES, rows).tolist()}
        with open(folder / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": rng.integers(0, 256, (1000, 3072), dtype=np.uint8),
                     b"labels": rng.integers(0, CLASSES, 1000).tolist()}, f)


def bench_cli(args, device) -> dict:
    import subprocess
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_cifar10(tmp / "data", args.samples, args.seed)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dgrun.cli", "dataset=cifar10",
                        f"dataset.root={tmp / 'data'}", "dataset.center_crop=28",
                        "model=mlp1", f"trainer.max_epochs={args.epochs}",
                        f"trainer.eval_every={args.epochs}", "trainer.stop_at_interpolation=false",
                        f"trainer.batch_size={args.batch_size}", f"threads={args.threads}",
                        f"device={device}", "quiet=true", "trainer.progress=none",
                        f"hydra.run.dir={tmp / 'run'}"], check=True, capture_output=True)
        wall = time.perf_counter() - start
        summary = json.loads((tmp / "run" / "summary.json").read_text())
    return {"train_s": summary["time_s"], "wall_s": wall, "status": summary["status"]}


# ---------------------------------------------------------------------------------------------
# Driver

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--samples", type=int, default=50_000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--which", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--workers", default="0",
                   help="DataLoader num_workers to try, comma-separated (e.g. 0,2)")
    p.add_argument("--repeat", type=int, default=1,
                   help="measure each method this many times (interleaved); the table shows "
                        "the median, every measurement goes to --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="append results as JSON lines to this file")
    args = p.parse_args(argv)
    args.which = [m.strip() for m in args.which.split(",") if m.strip()]
    unknown = set(args.which) - set(METHODS)
    if unknown:
        p.error(f"unknown method(s) {sorted(unknown)}; choose from {','.join(METHODS)}")
    args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is visible")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x, y = make_data(args.samples, args.seed)
    common = {
        "samples": args.samples, "epochs": args.epochs, "batch_size": args.batch_size,
        "threads": args.threads, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "python": platform.python_version(),
        "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "loadavg_1m": os.getloadavg()[0],
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    runs = []
    for m in args.which:
        if m == "dataloader":
            runs += [(f"dataloader(w={w})", lambda w=w: bench_dataloader(x, y, args, device, w))
                     for w in args.workers]
        elif m == "dgrun":
            runs.append(("dgrun", lambda: bench_dgrun(x, y, args, device)))
        elif m == "cli":
            runs.append(("cli", lambda: bench_cli(args, device)))
        else:
            runs.append(("bare", lambda: bench_bare(x, y, args, device)))

    print(f"MLP 1x512, {args.samples} x {SHAPE} float32, batch {args.batch_size}, "
          f"{args.epochs} epochs, {args.threads} thread(s), {device}, torch {torch.__version__}, "
          f"{common['cpu']} ({os.cpu_count()} cpus), load {common['loadavg_1m']:.2f}",
          flush=True)
    results: dict[str, list[dict]] = {name: [] for name, _ in runs}
    for r in range(args.repeat):
        for name, bench in runs:
            out = bench()
            seconds = out.pop("train_s")
            row = {"method": name, "repeat": r,
                   "samples_per_s": args.samples * args.epochs / seconds,
                   "s_per_epoch": seconds / args.epochs, **out, **common}
            results[name].append(row)
            print(f"  {name:<16} {row['samples_per_s']:>10,.0f} samples/s  "
                  f"{row['s_per_epoch']:7.2f} s/epoch", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")

    med = {name: statistics.median(r["s_per_epoch"] for r in rows) for name, rows in results.items()}
    print()
    print("| method           | samples/s | s/epoch | vs bare |")
    print("|------------------|----------:|--------:|--------:|")
    for name, s in med.items():
        vs = f"{s / med['bare']:.2f}x" if "bare" in med else "-"
        print(f"| {name:<16} | {args.samples / s:>9,.0f} | {s:>7.2f} | {vs:>7} |")
    if "bare" in med and "dgrun" in med:
        print(f"\ndgrun loop overhead vs bare: {100 * (med['dgrun'] / med['bare'] - 1):+.1f}%")
    loaders = [n for n in med if n.startswith("dataloader")]
    if "dgrun" in med and loaders:
        for n in loaders:
            print(f"dgrun speedup vs {n}: {med[n] / med['dgrun']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
