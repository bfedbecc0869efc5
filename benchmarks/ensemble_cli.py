"""`trainer.ensemble=N` against `dgrun -m seed=0,...,N-1` (one process, runs one after another),
through the `dgrun` command: whole-process wall time and peak memory.

    python benchmarks/ensemble_cli.py --repeat 3 --out benchmarks/ensemble_results.jsonl
    python benchmarks/ensemble_cli.py --device cuda --members 16      # on a GPU

Both write N complete run directories with the same numbers (tests/test_ensemble.py); the
repeats alternate which goes first. Prints medians and the ratio.
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
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import cpu_model  # noqa: E402


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak resident MiB) of one process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", default="1")
    p.add_argument("--preset", default="phenomenon=grokking")
    p.add_argument("--out")
    args = p.parse_args()
    seeds = ",".join(str(s) for s in range(args.members))
    common = [sys.executable, "-m", "dgrun.cli", *args.preset.split(), f"device={args.device}",
              f"threads={args.threads}", "quiet=true", "trainer.progress=none"]
    got: dict[str, list[tuple[float, float]]] = {"ensemble": [], "sweep": []}
    for r in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            commands = {
                "ensemble": [*common, f"trainer.ensemble={args.members}",
                             f"hydra.run.dir={tmp}/ensemble"],
                "sweep": [*common[:3], "-m", *common[3:], f"seed={seeds}",
                          f"hydra.sweep.dir={tmp}/sweep", "hydra.callbacks.report.enabled=false"],
            }
            for which in (["ensemble", "sweep"] if r % 2 == 0 else ["sweep", "ensemble"]):
                load = os.getloadavg()[0]
                wall, rss = timed(commands[which])
                got[which].append((wall, rss))
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps({
                            "benchmark": "ensemble_cli", "which": which, "preset": args.preset,
                            "members": args.members, "repeat": r, "wall_s": wall,
                            "peak_rss_mib": rss, "device": args.device,
                            "threads": args.threads, "cpu": cpu_model(), "cpus": os.cpu_count(),
                            "torch": torch.__version__, "loadavg_1m": load,
                            "date": datetime.datetime.now().isoformat(timespec="seconds"),
                        }) + "\n")
    wall = {k: statistics.median(w for w, _ in v) for k, v in got.items()}
    rss = {k: statistics.median(m for _, m in v) for k, v in got.items()}
    print(f"{cpu_model()} ({os.cpu_count()} cpus), torch {torch.__version__}, device "
          f"{args.device}, threads={args.threads}, {args.preset}, {args.members} seeds")
    print("| way | wall s (median) | peak RSS MiB | all walls |")
    print("|---|---:|---:|---|")
    for k in got:
        print(f"| {k} | {wall[k]:.1f} | {rss[k]:.0f} | "
              f"{', '.join(f'{w:.1f}' for w, _ in got[k])} |")
    print(f"ensemble / sweep wall: {wall['ensemble'] / wall['sweep']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
