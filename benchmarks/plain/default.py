"""dgrun's default job (`dgrun`) as a plain PyTorch script: MLP 1x512 on scikit-learn's 8x8
digits (seeded 80/20 split, standardized per channel with the training split's statistics),
batch 128, SGD lr 0.01 momentum 0.9, cross-entropy, evaluated every epoch until the training
set is fit (100% train accuracy) or 500 epochs. Same seeds as dgrun's seed=0, so the same
numbers.

    python benchmarks/plain/default.py --out /tmp/plain-default

`--epochs 100 --past-fit` is `dgrun phenomenon=robustness`'s training: 100 epochs whatever the
train accuracy. The preset's `robustness` probe (14 image corruptions at 5 severities and a
10-step PGD attack, every 5th evaluation) is not here: `dgrun phenomenon=robustness
~probes.robustness` is that run's work.
"""
import time

import torch

from _shared import arguments, derive_seed, digits_split, evaluate, standardizer, write

args = arguments(__doc__, lambda p: (
    p.add_argument("--epochs", type=int, default=500),
    p.add_argument("--past-fit", action="store_true", help="train on after 100%% train acc")))
train_x, train_y, test_x, test_y = digits_split()
prepare = standardizer(train_x)

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 512), torch.nn.ReLU(),
                            torch.nn.Linear(512, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
ce_sum = lambda out, t: torch.nn.functional.cross_entropy(out, t, reduction="sum")  # noqa
n, batch = len(train_y), 128
steps_per_epoch = -(-n // batch)
rows, train_time, step = [], 0.0, 0


def record():
    train_loss, train_acc = evaluate(model, train_x, train_y, ce_sum, prepare)
    test_loss, test_acc = evaluate(model, test_x, test_y, ce_sum, prepare)
    rows.append({"step": step, "train_loss": train_loss, "train_acc": train_acc,
                 "test_loss": test_loss, "test_acc": test_acc})


record()
for epoch in range(args.epochs):
    start = time.perf_counter()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(
        derive_seed(0, "order", epoch)))
    for i in range(steps_per_epoch):
        idx = perm[i * batch:(i + 1) * batch]
        loss = torch.nn.functional.cross_entropy(model(prepare(train_x[idx])), train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    train_time += time.perf_counter() - start
    record()
    if rows[-1]["train_acc"] >= 1.0 and not args.past_fit:
        break
write(args.out, rows, step, train_time)
