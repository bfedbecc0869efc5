"""Runs per second: `trainer.ensemble=N` (N seeds in one process) against N runs one by one.

    python benchmarks/ensemble.py [--sizes 1,2,4,8,16,32,64] [--steps 120] [--threads 1]
                                  [--device cpu|cuda] [--max-sequential K] [--out FILE]
                                  [--set KEY=VALUE ...]

dgrun's default job (MLP 1x512 on sklearn digits, batch 128, SGD lr 0.01) with a fixed step
budget (trainer.max_steps=--steps, no stop at the threshold; evaluations every epoch, a
checkpoint and the plots at the end), through the real code paths, in this process:

  ensemble    dgrun.run.run with trainer.ensemble=N: seeds 0..N-1 as one vmapped stack
              (also for N=1, so the stack's own overhead shows)
  sequential  dgrun.run.run once per seed 0..N-1, one after the other

Both write complete run directories (metrics, summaries, checkpoints, plots) into a temporary
folder. `wall` is the whole call (data, build, training, evaluations, checkpoints, plots);
`train` is the training clock the runs record (summary time_s: evaluation and checkpoints
excluded; for the ensemble the one shared clock). `--max-sequential K` times only K sequential
runs for each N > K and scales them by N/K (marked in the output). `--set` adds overrides to
both, e.g. `--set dataset.subset_fraction=0.5` for N subset models (each seed its own subset,
the memorization and LDS setting).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import cpu_model  # noqa: E402




def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1,2,4,8,16,32,64",
                   type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--steps", type=int, default=120, help="training steps per run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-sequential", type=int, default=None,
                   help="time at most this many sequential runs per size, scaled to N")
    p.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra override for every run (repeatable)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from hydra import compose, initialize_config_dir

    from dgrun import run
    from dgrun.config import config_dir, from_hydra, plain, register_schemas

    register_schemas()
    base = [f"threads={args.threads}", f"device={args.device}", "trainer.progress=none",
            "quiet=true", f"trainer.max_steps={args.steps}", "trainer.max_epochs=null",
            "trainer.stop_at_interpolation=false", *args.overrides]
    job_name = "mlp1 on digits (default job), batch 128, sgd lr 0.01"
    common = {
        "job": job_name + "".join(f", {o}" for o in args.overrides), "steps": args.steps,
        "threads": args.threads, "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_model(),
        "cpu_count": os.cpu_count(), "loadavg_1m": os.getloadavg()[0],
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    print(f"{common['job']}, {args.steps} steps a run, {args.threads} thread(s), {args.device}"
          f"{' (' + common['device_name'] + ')' if common['device_name'] else ''}, torch "
          f"{torch.__version__}, {common['cpu']} ({os.cpu_count()} cpus), load "
          f"{common['loadavg_1m']:.2f}", flush=True)
    print(f"{'N':>4} {'method':<11} {'wall s':>8} {'runs/s':>8} {'train s':>8} "
          f"{'train runs/s':>12} {'vs seq (wall)':>13} {'vs seq (train)':>14}", flush=True)

    with tempfile.TemporaryDirectory(prefix="dgrun-bench-") as tmp, \
            initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        def job(*overrides):
            cfg = compose("config", overrides=[*base, *overrides])
            return from_hydra(cfg), plain(cfg)

        def timed(fn, *a):
            start = time.perf_counter()
            summary = fn(*a)
            return time.perf_counter() - start, summary

        def one_ensemble(n: int, where: Path) -> tuple[float, float]:
            cfg, config = job(f"trainer.ensemble={n}")
            wall, summary = timed(run.run, cfg, where, config)
            assert summary["status"] == "completed", summary
            return wall, summary["time_s"]

        def sequential(n: int, where: Path) -> tuple[float, float, int]:
            timed_runs = min(n, args.max_sequential or n)
            wall = train = 0.0
            for seed in range(timed_runs):
                cfg, config = job(f"seed={seed}")
                w, summary = timed(run.run, cfg, where / f"seed{seed}", config)
                assert summary["status"] == "completed", summary
                wall, train = wall + w, train + summary["time_s"]
            return wall * n / timed_runs, train * n / timed_runs, timed_runs

        # Imports, font caches, allocator: paid once before anything is timed.
        one_ensemble(2, Path(tmp) / "warm-ensemble")
        sequential(1, Path(tmp) / "warm-seq")
        for n in args.sizes:
            seq_wall, seq_train, timed_runs = sequential(n, Path(tmp) / f"seq{n}")
            ens_wall, ens_train = one_ensemble(n, Path(tmp) / f"ens{n}")
            rows = [
                {"method": "sequential", "n": n, "wall_s": seq_wall, "train_s": seq_train,
                 "timed_runs": timed_runs},
                {"method": "ensemble", "n": n, "wall_s": ens_wall, "train_s": ens_train,
                 "speedup_wall": seq_wall / ens_wall, "speedup_train": seq_train / ens_train},
            ]
            for row in rows:
                row.update(runs_per_s=n / row["wall_s"], train_runs_per_s=n / row["train_s"],
                           **common)
                scaled = "" if row.get("timed_runs", n) == n else f" ({timed_runs} timed)"
                ratios = (f"{row['speedup_wall']:>12.2f}x {row['speedup_train']:>13.2f}x"
                          if row["method"] == "ensemble" else "")
                print(f"{n:>4} {row['method']:<11} {row['wall_s']:>8.2f} {row['runs_per_s']:>8.2f}"
                      f" {row['train_s']:>8.2f} {row['train_runs_per_s']:>12.2f} {ratios}{scaled}",
                      flush=True)
                if args.out is not None:
                    with open(args.out, "a") as f:
                        f.write(json.dumps({"benchmark": "ensemble", **row}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
