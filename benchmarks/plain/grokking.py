"""`dgrun phenomenon=grokking` as a plain PyTorch script: Gromov's quadratic MLP (width 256)
on x + y mod 97, 25% of the table to train on, full batch, AdamW lr 1e-2 without weight decay,
MSE on one-hot targets, 400 steps, evaluated at dgrun's log-spaced steps (30 a decade).
Same seeds as dgrun's seed=0, so the same numbers.

    python benchmarks/plain/grokking.py --out /tmp/plain-grokking
"""
import time

import torch

from _shared import arguments, evaluate, write

args = arguments(__doc__)
P, WIDTH, STEPS, PER_DECADE = 97, 256, 400, 30

# Data: every pair (x, y), tokens [x, y, =], a seeded random 25% split.
x, y = torch.cartesian_prod(torch.arange(P), torch.arange(P)).unbind(dim=1)
tokens, labels = torch.stack([x, y, torch.full_like(x, P)], dim=1), (x + y) % P
order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
n_train = round(len(labels) * 0.25)
train_x, train_y = tokens[order[:n_train]], labels[order[:n_train]]
test_x, test_y = tokens[order[n_train:]], labels[order[n_train:]]


class QuadraticMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        std = 0.5 / (2 * WIDTH) ** (1 / 3)
        self.w_in = torch.nn.Parameter(torch.randn(2 * (P + 1), WIDTH) * std)
        self.w_out = torch.nn.Parameter(torch.randn(WIDTH, P) * std)

    def forward(self, t):
        offsets = torch.arange(2) * (P + 1)
        return self.w_in[t[:, :2] + offsets].sum(dim=1).square() @ self.w_out


torch.manual_seed(0)
model = QuadraticMLP()
opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)


def mse_sum(out, target):
    return (out - torch.nn.functional.one_hot(target, P).to(out.dtype)).pow(2).sum()


points, k = set(), 0
while (p := round(10 ** (k / PER_DECADE))) <= STEPS:
    points.add(p)
    k += 1
rows, train_time = [], 0.0


def record(step):
    train_loss, train_acc = evaluate(model, train_x, train_y, mse_sum)
    test_loss, test_acc = evaluate(model, test_x, test_y, mse_sum)
    rows.append({"step": step, "train_loss": train_loss, "train_acc": train_acc,
                 "test_loss": test_loss, "test_acc": test_acc})


record(0)
start = time.perf_counter()
for step in range(1, STEPS + 1):
    out = model(train_x)
    loss = (out - torch.nn.functional.one_hot(train_y, P).to(out.dtype)).pow(2).sum(-1).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if step in points or step == STEPS:
        train_time += time.perf_counter() - start
        record(step)
        start = time.perf_counter()
write(args.out, rows, STEPS, train_time)
