"""CPU threads vs training speed, through the `dgrun` command: the measurement behind
`threads=auto` (dgrun.runtime.SMALL_STEP_MACS).

    python benchmarks/threads.py --repeat 2 --out benchmarks/results.jsonl

For each case (a model on data of some size) it runs `dgrun` with threads=1, threads=2 (or
--threads) and threads=auto, interleaved, and reads summary.json: training samples per second
(evaluation excluded) and the thread count `auto` chose. The multiply-adds of one training
step's forward pass are printed beside each case.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import cpu_model, write_cifar10  # noqa: E402

CASES = {  # name -> overrides (CIFAR cases read the fake data written to {data})
    "digits mlp1 (default job)": ["trainer.max_epochs=40"],
    "digits mlp3": ["model=mlp3", "trainer.max_epochs=20"],
    "cifar mlp1 batch 32": ["dataset=cifar10", "dataset.root={data}", "dataset.center_crop=28",
                            "model=mlp1", "trainer.batch_size=32", "trainer.max_epochs=1"],
    "cifar mlp1": ["dataset=cifar10", "dataset.root={data}", "dataset.center_crop=28",
                   "model=mlp1", "trainer.max_epochs=1"],
    "cifar wrn-16-3": ["dataset=cifar10", "dataset.root={data}", "model=wrn",
                       "trainer.max_steps=6"],
}


def step_macs(overrides: list[str]) -> float:
    import torch

    from dgrun import models, runtime
    from dgrun.catalog import _compose, data_meta

    cfg = _compose(overrides)
    meta = data_meta(cfg)
    model = models.create(cfg.model.name, meta.input_shape, meta.num_classes, meta.modality)
    return runtime.step_macs(model, torch.zeros(cfg.trainer.batch_size or 128,
                                                *meta.input_shape))


def run(overrides: list[str], threads: str, tmp: Path) -> dict:
    run_dir = Path(tempfile.mkdtemp(dir=tmp))
    subprocess.run([sys.executable, "-m", "dgrun.cli", *overrides, f"threads={threads}",
                    "trainer.stop_at_interpolation=false", "quiet=true", "trainer.progress=none",
                    f"hydra.run.dir={run_dir}"], check=True, capture_output=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"samples_per_s": summary["throughput"]["train_samples_per_s"],
            "threads_used": summary["threads"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", default="2", help="the multi-threaded setting to compare")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--cifar-samples", type=int, default=10_000)
    p.add_argument("--cases", help="comma-separated case names (default: all)")
    p.add_argument("--out")
    args = p.parse_args()
    chosen = args.cases.split(",") if args.cases else list(CASES)
    unknown = [c for c in chosen if c not in CASES]
    if unknown:
        p.error(f"unknown case {unknown[0]!r}; cases: {', '.join(CASES)}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_cifar10(tmp / "data", args.cifar_samples, 0)
        print(f"{cpu_model()} ({os.cpu_count()} cpus), load {os.getloadavg()[0]:.2f}")
        print("| case | step MACs | threads=1 | threads=" + args.threads
              + " | threads=auto (chose) |")
        print("|---|---:|---:|---:|---:|")
        for case in chosen:
            template = CASES[case]
            overrides = [o.replace("{data}", str(tmp / "data")) for o in template]
            macs = step_macs(overrides)
            results = {"1": [], args.threads: [], "auto": []}
            chose = None
            for _ in range(args.repeat):
                for setting in results:
                    out = run(overrides, setting, tmp)
                    results[setting].append(out["samples_per_s"])
                    chose = out["threads_used"] if setting == "auto" else chose
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(json.dumps({
                                "benchmark": "threads", "case": case, "threads": setting,
                                **out, "step_macs": macs, "cpu": cpu_model(),
                                "loadavg_1m": os.getloadavg()[0],
                                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                            }) + "\n")
            median = {k: statistics.median(v) for k, v in results.items()}
            print(f"| {case} | {macs / 1e9:.3g}G | {median['1']:,.0f} | "
                  f"{median[args.threads]:,.0f} | {median['auto']:,.0f} ({chose}) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
