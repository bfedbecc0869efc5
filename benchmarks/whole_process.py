"""Whole-process time of `dgrun phenomenon=X` against a plain PyTorch script that reproduces it
(benchmarks/plain/X.py): what a user waits for, start-up, evaluation and record included.

    python benchmarks/whole_process.py --repeat 3 --out benchmarks/whole_process.jsonl

Each repeat runs dgrun and the plain script back to back (the order alternates between
repeats), both with 1 thread, and checks that the plain script reproduced dgrun's train and
test accuracy, and every other accuracy column it writes (simplicity_bias: the groups'), at
every evaluation (a mismatch fails the benchmark: the two would not be doing the same work).
Prints a table of medians: process seconds, training steps per second (evaluation excluded),
and dgrun's ratio to the plain script.
"""
from __future__ import annotations

import argparse
import csv
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

HERE = Path(__file__).resolve().parent
CASES = {  # case -> (plain script [and its arguments], dgrun's overrides)
    "grokking": ("grokking", ["phenomenon=grokking"]),
    "phase_transition": ("phase_transition", ["phenomenon=phase_transition"]),
    "default": ("default", []),
    "rethinking": ("rethinking", ["phenomenon=rethinking"]),
    "robustness": ("default --epochs 100 --past-fit", ["phenomenon=robustness"]),
    # The presets without their hidden-progress probe (Fourier measures the plain scripts do
    # not compute): what dgrun adds to the same work.
    "grokking -modular_progress": ("grokking", ["phenomenon=grokking",
                                                "~probes.modular_progress"]),
    "phase_transition -parity_progress": ("phase_transition", ["phenomenon=phase_transition",
                                                               "~probes.parity_progress"]),
    "simplicity_bias": ("simplicity_bias", ["phenomenon=simplicity_bias"]),
    # Without last-layer retraining (a logistic regression fitted every 10th evaluation): the
    # plain script computes the `groups` probe's columns, not this one's.
    "simplicity_bias -dfr": ("simplicity_bias", ["phenomenon=simplicity_bias", "~probes.dfr"]),
    # Without the corruption and attack accuracies: the plain script only trains.
    "robustness -robustness": ("default --epochs 100 --past-fit",
                               ["phenomenon=robustness", "~probes.robustness"]),
}


def pressure() -> float | None:
    try:
        return float(Path("/proc/pressure/cpu").read_text().split("avg10=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return None


def timed(cmd: list[str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def is_accuracy(column: str) -> bool:
    """train_acc, test_worst_group_acc, test_acc_y_0_color_red, ..."""
    return column.endswith("_acc") or "_acc_" in column


def accuracies(metrics: Path) -> dict[int, dict[str, float]]:
    """Every evaluation's accuracy columns (train_acc, test_acc and the others, e.g. the
    per-group ones), by step; a blank cell (a probe that skipped that evaluation) is left out."""
    with open(metrics) as f:
        return {int(float(r["step"])): {k: float(v) for k, v in r.items()
                                        if is_accuracy(k) and v not in ("", None)}
                for r in csv.DictReader(f)}


def same_numbers(dgrun_dir: Path, plain_dir: Path) -> bool:
    """Every evaluation at the same steps with the same train and test accuracy, and the same
    value in every other accuracy column the plain script writes (dgrun stores float32)."""
    a, b = accuracies(dgrun_dir / "metrics.csv"), accuracies(plain_dir / "metrics.csv")
    return a.keys() == b.keys() and all(
        {"train_acc", "test_acc"} <= b[s].keys() <= a[s].keys()
        and all(abs(a[s][k] - b[s][k]) < 1e-6 for k in b[s]) for s in a)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cases", default="grokking,phase_transition,default,simplicity_bias,"
                                       "rethinking,robustness")
    p.add_argument("--out")
    args = p.parse_args()
    chosen = args.cases.split(",")
    unknown = [c for c in chosen if c not in CASES]
    if unknown:
        p.error(f"unknown case {unknown[0]!r}; cases: {', '.join(CASES)}")
    print(f"{cpu_model()} ({os.cpu_count()} cpus), torch {torch.__version__}, 1 thread")
    print("| case | dgrun s | plain s | ratio | dgrun steps/s | plain steps/s | ratio | "
          "load (1 min) | same accuracies |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|")
    for case in chosen:
        got: dict[str, list] = {"dgrun": [], "plain": [], "dgrun_sps": [], "plain_sps": []}
        loads, same = [], True
        for r in range(args.repeat):
            with tempfile.TemporaryDirectory() as tmp:
                tmp = Path(tmp)
                script, overrides = CASES[case]
                commands = {
                    "dgrun": [sys.executable, "-m", "dgrun.cli", *overrides, "threads=1",
                              "quiet=true", "trainer.progress=none",
                              f"hydra.run.dir={tmp / 'dgrun'}"],
                    "plain": [sys.executable, str(HERE / "plain" / f"{script.split()[0]}.py"),
                              *script.split()[1:], "--out", str(tmp / "plain"),
                              "--threads", "1"]}
                order = ["dgrun", "plain"] if r % 2 == 0 else ["plain", "dgrun"]
                for which in order:
                    load, psi = os.getloadavg()[0], pressure()
                    loads.append(load)
                    seconds = timed(commands[which])
                    if which == "dgrun":
                        summary = json.loads((tmp / "dgrun" / "summary.json").read_text())
                        sps = summary["throughput"]["steps_per_s"]
                    else:
                        sps = json.loads((tmp / "plain" / "result.json").read_text())[
                            "steps_per_s"]
                    got[which].append(seconds)
                    got[f"{which}_sps"].append(sps)
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(json.dumps({
                                "benchmark": "whole_process", "case": case, "which": which,
                                "repeat": r, "process_s": seconds, "steps_per_s": sps,
                                "threads": 1, "cpu": cpu_model(), "cpus": os.cpu_count(),
                                "torch": torch.__version__, "loadavg_1m": load,
                                "cpu_pressure_avg10": psi,
                                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                            }) + "\n")
                same &= same_numbers(tmp / "dgrun", tmp / "plain")
        m = {k: statistics.median(v) for k, v in got.items()}
        print(f"| {case} | {m['dgrun']:.2f} | {m['plain']:.2f} | {m['dgrun'] / m['plain']:.2f}x | "
              f"{m['dgrun_sps']:,.0f} | {m['plain_sps']:,.0f} | "
              f"{m['plain_sps'] / m['dgrun_sps']:.2f}x | {min(loads):.1f}-{max(loads):.1f} | "
              f"{'yes' if same else 'NO'} |", flush=True)
        if not same:
            print(f"{case}: the plain script did not reproduce dgrun's accuracies", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
