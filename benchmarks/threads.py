"""CPU threads vs training speed, through the `dgrun` command: the measurement behind
`threads=auto` (dgrun.runtime.choose_threads).

    python benchmarks/threads.py --repeat 2 --out benchmarks/results.jsonl
    python benchmarks/threads.py --busy --active --cases "digits mlp3,cifar mlp1"

For each case (a model on data of some size) it runs `dgrun` with threads=1, threads=2 (or
--threads) and threads=auto, interleaved, and reads summary.json: training samples per second
(evaluation excluded), the process's wall time and the thread count `auto` chose (and why).
The multiply-adds of one training step's forward pass are printed beside each case.

--busy measures each case a second time on a busy machine: one process per CPU spinning in a
Python loop for the whole measurement (a shared workstation, a login node). --active adds
threads=N with OMP_WAIT_POLICY=ACTIVE, OpenMP's spinning wait (dgrun sets PASSIVE): what
threads=N cost before dgrun chose the wait policy.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
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


def torch_version() -> str:
    import torch

    return torch.__version__


def step_macs(overrides: list[str]) -> float:
    import torch

    from dgrun import models, runtime
    from dgrun.catalog import _compose, data_meta

    cfg = _compose(overrides)
    meta = data_meta(cfg)
    model = models.create(cfg.model.name, meta.input_shape, meta.num_classes, meta.modality)
    return runtime.step_macs(model, torch.zeros(cfg.trainer.batch_size or 128,
                                                *meta.input_shape))


def run(overrides: list[str], setting: str, tmp: Path) -> dict:
    """One `dgrun` process; setting is a thread count, "auto", or "N active"."""
    run_dir = Path(tempfile.mkdtemp(dir=tmp))
    threads, _, active = setting.partition(" ")
    env = {**os.environ, **({"OMP_WAIT_POLICY": "ACTIVE"} if active else {})}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dgrun.cli", *overrides, f"threads={threads}",
                    "trainer.stop_at_interpolation=false", "quiet=true", "trainer.progress=none",
                    f"hydra.run.dir={run_dir}"], check=True, capture_output=True, env=env)
    wall = time.perf_counter() - start
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"samples_per_s": summary["throughput"]["train_samples_per_s"], "wall_s": wall,
            "threads_used": summary["threads"], "threads_why": summary.get("threads_why")}


class Busy:
    """One process per CPU spinning in a Python loop, for as long as the block lasts."""

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                      for _ in range(os.cpu_count() or 1)]
        time.sleep(2)  # let the load show in /proc/pressure/cpu
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            proc.kill()
            proc.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", default="2", help="the multi-threaded setting to compare")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--cifar-samples", type=int, default=10_000)
    p.add_argument("--cases", help="comma-separated case names (default: all)")
    p.add_argument("--busy", action="store_true", help="also measure on a busy machine")
    p.add_argument("--active", action="store_true",
                   help="also threads=N with OpenMP's spinning wait (OMP_WAIT_POLICY=ACTIVE)")
    p.add_argument("--out")
    args = p.parse_args()
    chosen = args.cases.split(",") if args.cases else list(CASES)
    unknown = [c for c in chosen if c not in CASES]
    if unknown:
        p.error(f"unknown case {unknown[0]!r}; cases: {', '.join(CASES)}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_cifar10(tmp / "data", args.cifar_samples, 0)
        print(f"{cpu_model()} ({os.cpu_count()} cpus), torch {torch_version()}, load "
              f"{os.getloadavg()[0]:.2f}")
        settings = ["1", args.threads, "auto"] + ([f"{args.threads} active"] if args.active else [])
        print("| case | step MACs | machine | " + " | ".join(
            f"threads={s}" for s in settings) + " | auto chose | auto wall / threads=1 wall |")
        print("|---|---:|---|" + "---:|" * len(settings) + "---|---:|")
        for case in chosen:
            template = CASES[case]
            overrides = [o.replace("{data}", str(tmp / "data")) for o in template]
            macs = step_macs(overrides)
            for machine in ["as found", "busy"] if args.busy else ["as found"]:
                with Busy() if machine == "busy" else contextlib.nullcontext():
                    results = {s: [] for s in settings}
                    loads = []
                    for _ in range(args.repeat):
                        for setting in settings:
                            loads.append(os.getloadavg()[0])
                            results[setting].append(out := run(overrides, setting, tmp))
                            if args.out:
                                with open(args.out, "a") as f:
                                    f.write(json.dumps({
                                        "benchmark": "threads", "case": case, "machine": machine,
                                        "threads": setting, **out, "step_macs": macs,
                                        "cpu": cpu_model(), "cpus": os.cpu_count(),
                                        "torch": torch_version(), "loadavg_1m": loads[-1],
                                        "date": datetime.datetime.now().isoformat(
                                            timespec="seconds"),
                                    }) + "\n")
                median = {k: statistics.median(r["samples_per_s"] for r in v)
                          for k, v in results.items()}
                wall = {k: statistics.median(r["wall_s"] for r in v) for k, v in results.items()}
                chose = results["auto"][-1]
                print(f"| {case} | {macs / 1e9:.3g}G | {machine} (load {min(loads):.1f}-"
                      f"{max(loads):.1f}) | " + " | ".join(f"{median[s]:,.0f}" for s in settings)
                      + f" | {chose['threads_used']} ({chose['threads_why']}) | "
                      f"{wall['auto'] / wall['1']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
