"""Per-step overhead of dgrun's loop, with the compute made negligible.

    python benchmarks/loop_overhead.py [--repeat 3] [--threads 1]

A 16-wide MLP on 16-feature inputs, batch 128, 391 steps per epoch: the time per step is then
almost all Python and dispatch, so the loops compare by their fixed costs. Two variants,
interleaved:

  bare     randperm per epoch + slicing + forward/backward/step (as in throughput.py)
  dgrun    dgrun.train.fit: the step's derived seed (dropout noise, exact resume), the
           objective, LambdaLR, the non-finite flag, the hooks, the training clock
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from dgrun import models, optim
from dgrun.data.bundle import Split
from dgrun.losses import LOSSES
from dgrun.train import State, fit

try:
    from throughput import NoHooks, dgrun_plan, train_step      # run from benchmarks/
except ImportError:                                            # run as benchmarks/loop_overhead.py
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from throughput import NoHooks, dgrun_plan, train_step

N, BS, EPOCHS, FEATURES = 50_000, 128, 2, 16


def tiny_model():
    torch.manual_seed(0)
    return models.create("mlp1", (FEATURES,), 10, "vector", width=16)


def run_dgrun(x, y) -> float:
    spe = math.ceil(N / BS)
    model = tiny_model()
    opt, sched = optim.build(model, "sgd", {"lr": 0.01, "momentum": 0.9}, "constant", {},
                             steps_per_epoch=spe, total_steps=EPOCHS * spe)
    loss_fn, eval_loss = LOSSES.build("cross_entropy")
    objective = lambda out, y_, rows: loss_fn(out, y_)  # noqa: E731 (ERM, as run.py builds)
    state = fit(model, Split(x, y), Split(x[:1000], y[:1000]), opt, sched, objective,
                eval_loss, dgrun_plan(0, BS, N, EPOCHS * spe), State(), NoHooks())
    return state.train_time_s / state.step


def run_bare(x, y) -> float:
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    steps, start = 0, time.perf_counter()
    for _ in range(EPOCHS):
        perm = torch.randperm(N, generator=gen)
        for i in range(0, N, BS):
            idx = perm[i:i + BS]
            train_step(model, opt, x[idx], y[idx])
            steps += 1
    return (time.perf_counter() - start) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(N, FEATURES, generator=gen), torch.randint(0, 10, (N,), generator=gen)
    results: dict[str, list[float]] = {"bare": [], "dgrun": []}
    for _ in range(args.repeat):
        results["bare"].append(run_bare(x, y))
        results["dgrun"].append(run_dgrun(x, y))
    best = {k: min(v) * 1e6 for k, v in results.items()}
    for k, v in results.items():
        print(f"{k:<8} best {best[k]:6.0f} us/step   all {[round(s * 1e6) for s in v]}")
    print(f"dgrun fixed cost over bare: {best['dgrun'] - best['bare']:.0f} us/step")


if __name__ == "__main__":
    main()
