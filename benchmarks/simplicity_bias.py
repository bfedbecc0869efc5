"""Does ERM show simplicity bias on colored_digits, and how fast? (issue 10 measurement)

Trains an MLP on `colored_digits` with the same pieces a dgrun run uses (dataset builder,
models.create, objectives, the groups and dfr probes) in a minimal loop: per-channel
standardization fitted on train (dataset.preprocess=standardize), SGD with momentum, batch 128,
an evaluation every `--eval-every` steps. Prints the curve and the probes' summaries.

    python benchmarks/simplicity_bias.py --rho 0.9 --steps 3000 --objective erm
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from dgrun import models, probes
from dgrun.data import DATASETS
from dgrun.objectives import OBJECTIVES
from dgrun.probes import Evaluation
from dgrun.seeding import derive_seed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="colored_digits")
    ap.add_argument("--rho", type=float, default=0.9)
    ap.add_argument("--test-color", default="random")
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--dfr-every", type=int, default=10)
    ap.add_argument("--objective", default="erm")
    ap.add_argument("--eta", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)

    opts = {"rho": args.rho}
    if args.dataset == "colored_digits":
        opts["test_color"] = args.test_color
    bundle = DATASETS.build(args.dataset, **opts)
    x = bundle.train.x
    dims = (0, 2, 3) if x.dim() == 4 else (0,)
    mean, std = x.mean(dims, keepdim=True)[:1], x.std(dims, keepdim=True)[:1].clamp_min(1e-6)
    prepare = lambda t: (t - mean) / std  # noqa: E731
    torch.manual_seed(args.seed)
    model = models.create(args.model, bundle.meta.input_shape, bundle.meta.num_classes,
                          bundle.meta.modality, width=args.width, depth=args.depth)
    opt = (torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9,
                           weight_decay=args.weight_decay) if args.optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay))
    objective = OBJECTIVES.build(args.objective, train=bundle.train,
                                 num_groups=len(bundle.meta.extra["groups"]),
                                 per_example_loss=lambda o, y: F.cross_entropy(
                                     o, y, reduction="none"),
                                 **({"eta": args.eta} if args.objective == "group_dro" else {}))
    spec = {"groups": {"splits": ["test", "train"]}, "dfr": {"every": args.dfr_every}}
    probe_list = probes.build(spec, meta=bundle.meta, seed=args.seed)

    rows, n, train_time = [], len(bundle.train), 0.0
    order = None

    def evaluate(step: int) -> None:
        ev = Evaluation(model, bundle.train, bundle.test, prepare=prepare, step=step,
                        val=bundle.val)
        row = {"step": step, "time_s": train_time,
               "train_acc": float(ev.correct("train").float().mean()),
               "test_acc": float(ev.correct("test").float().mean())}
        for p in probe_list:
            row.update({k: float(v) for k, v in p.measure(ev).items()})
        rows.append(row)
        if not args.quiet:
            dfr = (f"  dfr {row['dfr_test_acc']:.3f}/{row['dfr_test_worst_group_acc']:.3f}"
                   if "dfr_test_acc" in row else "")
            print(f"step {step:5d} t={train_time:6.1f}s train {row['train_acc']:.3f} "
                  f"test {row['test_avg_acc']:.3f} worst {row['test_worst_group_acc']:.3f} "
                  f"train-worst {row['train_worst_group_acc']:.3f}{dfr}", flush=True)

    evaluate(0)
    for step in range(args.steps):
        t0 = time.perf_counter()
        epoch, pos = divmod(step * args.batch_size, n)
        pos //= args.batch_size
        if pos == 0 or order is None:
            g = torch.Generator().manual_seed(derive_seed(args.seed, "order", epoch))
            order = torch.randperm(n, generator=g)
        idx = order[pos * args.batch_size:(pos + 1) * args.batch_size]
        loss = objective(model(prepare(bundle.train.x[idx])), bundle.train.y[idx], idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        train_time += time.perf_counter() - t0
        if (step + 1) % args.eval_every == 0:
            evaluate(step + 1)
    summary = {}
    for p in probe_list:
        summary.update(p.summarize(rows))
    summary["train_time_s"] = round(train_time, 2)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
