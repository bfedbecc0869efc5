"""`dgrun phenomenon=robustness`'s training as a plain PyTorch script: dgrun's default job (MLP
1x512 on scikit-learn's 8x8 digits, seeded 80/20 split, standardized per channel, batch 128,
SGD lr 0.01 momentum 0.9, cross-entropy) for 100 epochs whatever the train accuracy, evaluated
every epoch. Same seeds as dgrun's seed=0, so the same numbers. The preset's `robustness`
probe (14 image corruptions at 5 severities and a 10-step PGD attack, every 5th evaluation) is
not here: `dgrun phenomenon=robustness ~probes.robustness` is this script's work.

    python benchmarks/plain/robustness.py --out /tmp/plain-robustness
"""
import time

import torch

from _shared import arguments, derive_seed, digits_split, evaluate, standardizer, write

args = arguments(__doc__)
EPOCHS, BATCH = 100, 128
train_x, train_y, test_x, test_y = digits_split()
prepare = standardizer(train_x)

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 512), torch.nn.ReLU(),
                            torch.nn.Linear(512, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
ce_sum = lambda out, t: torch.nn.functional.cross_entropy(out, t, reduction="sum")  # noqa
n = len(train_y)
steps_per_epoch = -(-n // BATCH)
rows, train_time, step = [], 0.0, 0


def record():
    train_loss, train_acc = evaluate(model, train_x, train_y, ce_sum, prepare)
    test_loss, test_acc = evaluate(model, test_x, test_y, ce_sum, prepare)
    rows.append({"step": step, "train_loss": train_loss, "train_acc": train_acc,
                 "test_loss": test_loss, "test_acc": test_acc})


record()
for epoch in range(EPOCHS):
    start = time.perf_counter()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(
        derive_seed(0, "order", epoch)))
    for i in range(steps_per_epoch):
        idx = perm[i * BATCH:(i + 1) * BATCH]
        loss = torch.nn.functional.cross_entropy(model(prepare(train_x[idx])), train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    train_time += time.perf_counter() - start
    record()
write(args.out, rows, step, train_time)
