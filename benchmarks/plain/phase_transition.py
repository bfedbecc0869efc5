"""`dgrun phenomenon=phase_transition` as a plain PyTorch script: a width-1000 ReLU MLP on
(50, 3)-sparse parity from fresh samples each step, batch 32, SGD lr 0.1 without momentum,
hinge loss, 4000 steps, evaluated every 50 on 1000 fixed points each for train and test.
Same seeds as dgrun's seed=0, so the same numbers.

    python benchmarks/plain/phase_transition.py --out /tmp/plain-phase
"""
import time

import torch

from _shared import arguments, derive_seed, evaluate, write

args = arguments(__doc__)
N, K, BATCH, STEPS, EVERY = 50, 3, 32, 4000, 50

support = torch.randperm(N, generator=torch.Generator().manual_seed(
    derive_seed(0, "support")))[:K].sort().values


def sample(count, gen):
    x = torch.randint(0, 2, (count, N), generator=gen, dtype=torch.float32).mul_(2).sub_(1)
    return x, (x[:, support] < 0).sum(dim=1).remainder_(2)


fixed = lambda name: sample(1000, torch.Generator().manual_seed(derive_seed(0, name)))  # noqa
test_x, test_y = fixed("test")
train_x, train_y = fixed("train_sample")

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(N, 1000), torch.nn.ReLU(),
                            torch.nn.Linear(1000, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.0)


def hinge_sum(out, y):
    return torch.nn.functional.multi_margin_loss(out, y, reduction="sum") * 2


rows, train_time = [], 0.0


def record(step):
    train_loss, train_acc = evaluate(model, train_x, train_y, hinge_sum)
    test_loss, test_acc = evaluate(model, test_x, test_y, hinge_sum)
    rows.append({"step": step, "train_loss": train_loss, "train_acc": train_acc,
                 "test_loss": test_loss, "test_acc": test_acc})


record(0)
gen = torch.Generator()
start = time.perf_counter()
for step in range(STEPS):
    xb, yb = sample(BATCH, gen.manual_seed(derive_seed(0, "stream", step)))
    loss = (torch.nn.functional.multi_margin_loss(model(xb), yb, reduction="none") * 2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if (step + 1) % EVERY == 0:
        train_time += time.perf_counter() - start
        record(step + 1)
        start = time.perf_counter()
write(args.out, rows, STEPS, train_time)
