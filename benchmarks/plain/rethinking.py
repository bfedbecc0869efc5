"""`dgrun phenomenon=rethinking` as a plain PyTorch script: Zhang et al.'s recipe on
scikit-learn's 8x8 digits (seeded 80/20 split): every image whitened on its own (minus its
mean, divided by max(its std, 1/8)), MLP 1x512, batch 128, SGD lr 0.01 momentum 0.9, the lr
times 0.95 per 391 steps (the paper's CIFAR-10 epoch, staircase), cross-entropy, evaluated
every epoch until the training set is fit (100% train accuracy), 25 evaluations pass without
progress (no new best train accuracy, no train loss 1% below its best: dgrun's stall rule) or
2000 epochs. Same seeds as dgrun's seed=0, so the same numbers.

    python benchmarks/plain/rethinking.py --out /tmp/plain-rethinking
"""
import math
import time

import torch

from _shared import arguments, derive_seed, digits_split, evaluate, write

args = arguments(__doc__)
LR, GAMMA, DECAY_STEPS, BATCH, MAX_EPOCHS, PATIENCE = 0.01, 0.95, 391, 128, 2000, 25
train_x, train_y, test_x, test_y = digits_split()


def whiten(batch):
    """Per image: TensorFlow's per_image_standardization (Zhang et al.'s preprocessing)."""
    flat = batch.reshape(len(batch), -1)
    mean = flat.mean(dim=1, keepdim=True)
    std = flat.std(dim=1, unbiased=False, keepdim=True).clamp_min(1.0 / math.sqrt(flat.shape[1]))
    return ((flat - mean) / std).reshape(batch.shape)


torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 512), torch.nn.ReLU(),
                            torch.nn.Linear(512, 10))
opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
ce_sum = lambda out, t: torch.nn.functional.cross_entropy(out, t, reduction="sum")  # noqa
n = len(train_y)
steps_per_epoch = -(-n // BATCH)
rows, train_time, step = [], 0.0, 0


def record():
    train_loss, train_acc = evaluate(model, train_x, train_y, ce_sum, whiten)
    test_loss, test_acc = evaluate(model, test_x, test_y, ce_sum, whiten)
    rows.append({"step": step, "lr": opt.param_groups[0]["lr"], "train_loss": train_loss,
                 "train_acc": train_acc, "test_loss": test_loss, "test_acc": test_acc})


def stalled():
    """No new best train accuracy and no train loss 1% below its best in the last PATIENCE
    evaluations."""
    if len(rows) <= PATIENCE:
        return False
    before, window = rows[:-PATIENCE], rows[-PATIENCE:]
    best_acc = max(r["train_acc"] for r in before)
    best_loss = min(r["train_loss"] for r in before)
    return not any(r["train_acc"] > best_acc or r["train_loss"] < 0.99 * best_loss
                   for r in window)


record()
for epoch in range(MAX_EPOCHS):
    start = time.perf_counter()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(
        derive_seed(0, "order", epoch)))
    for i in range(steps_per_epoch):
        idx = perm[i * BATCH:(i + 1) * BATCH]
        loss = torch.nn.functional.cross_entropy(model(whiten(train_x[idx])), train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % DECAY_STEPS == 0:
            opt.param_groups[0]["lr"] = LR * GAMMA ** (step // DECAY_STEPS)
    train_time += time.perf_counter() - start
    record()
    if rows[-1]["train_acc"] >= 1.0 or stalled():
        break
write(args.out, rows, step, train_time)
