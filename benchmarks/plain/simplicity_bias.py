"""`dgrun phenomenon=simplicity_bias` as a plain PyTorch script: coloured 8x8 digits (label:
digit >= 5; strokes painted red or green, the colour agreeing with the label in exactly 90% of
each training class and in half of each test class; seeded 55/20/25 train/val/test cut, the
val split unused here), standardized per channel with the training split's statistics, a ReLU
MLP 2x512, SGD lr 0.01 momentum 0.9, batch 128, cross-entropy, 3000 steps, evaluated at
dgrun's log-spaced steps (20 a decade) with the accuracy of every (label, colour) group and
the worst group's. Same seeds as dgrun's seed=0, so the same numbers. dgrun's `dfr` probe (a
logistic-regression last layer refitted on the val split every 10th evaluation) is not here:
`dgrun phenomenon=simplicity_bias ~probes.dfr` is this script's work.

    python benchmarks/plain/simplicity_bias.py --out /tmp/plain-simplicity_bias
"""
import time

import torch

from _shared import arguments, derive_seed, sklearn_digits, standardizer, write

args = arguments(__doc__)
STEPS, BATCH, PER_DECADE, RHO = 3000, 128, 20, 0.9
COLORS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0)}  # colour a=0 agrees with y=0
gray, digit = sklearn_digits()


def generator(*names):
    return torch.Generator().manual_seed(derive_seed("colored_digits", 0, *names))


order = torch.randperm(len(digit), generator=generator("split"))
n_test, n_val = int(round(len(digit) * 0.25)), int(round(len(digit) * 0.2))
rows = {"train": order[n_test + n_val:], "test": order[:n_test]}


def colour(part, agree):
    """(pixels (N, 3, 8, 8), label, group = 2 * label + colour) of one split: in each class
    exactly round(agree * n) rows, chosen at random, get the agreeing colour, the rest the other."""
    y = (digit[rows[part]] >= 5).long()
    gen, attr = generator(part, "color"), torch.empty_like(y)
    for c in y.unique().tolist():
        members = (y == c).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=gen)]
        n_agree = int(round(agree * len(members)))
        attr[members[:n_agree]] = c
        if len(members) > n_agree:
            torch.randint(1, (), generator=gen)  # which other colour starts: the only one
            attr[members[n_agree:]] = 1 - c
    rgb = torch.tensor(list(COLORS.values()))[attr]
    return gray[rows[part]] * rgb[:, :, None, None], y, 2 * y + attr


train_x, train_y, train_group = colour("train", RHO)
test_x, test_y, test_group = colour("test", 0.5)
GROUPS = [f"y_{label}_color_{name}" for label in (0, 1) for name in COLORS]

prepare = standardizer(train_x)  # the blue channel, never painted, is only centred

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 512), torch.nn.ReLU(),
                            torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
ce_sum = lambda out, t: torch.nn.functional.cross_entropy(out, t, reduction="sum")  # noqa
n = len(train_y)
steps_per_epoch = -(-n // BATCH)

points, k = set(), 0
while (p := round(10 ** (k / PER_DECADE))) <= STEPS:
    points.add(p)
    k += 1
history, train_time = [], 0.0


@torch.no_grad()
def measure(x, y, group, split):
    """Loss, accuracy, and the accuracy of each group and of the worst one (dgrun's `groups`
    probe columns), from one forward pass in eval mode (989 or 449 rows: one of the 4096-row
    chunks dgrun evaluates in)."""
    model.eval()
    out = model(prepare(x))
    model.train()
    correct = out.argmax(dim=1) == y
    acc = {name: float(correct[group == g].float().mean()) for g, name in enumerate(GROUPS)}
    return {f"{split}_loss": float(ce_sum(out, y)) / len(y),
            f"{split}_acc": int(correct.sum()) / len(y),
            f"{split}_worst_group_acc": min(acc.values()),
            **{f"{split}_acc_{name}": a for name, a in acc.items()}}


def record(step):
    history.append({"step": step, **measure(train_x, train_y, train_group, "train"),
                    **measure(test_x, test_y, test_group, "test")})


record(0)
start = time.perf_counter()
for step in range(1, STEPS + 1):
    epoch, position = divmod(step - 1, steps_per_epoch)
    if position == 0:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(
            derive_seed(0, "order", epoch)))
    idx = perm[position * BATCH:(position + 1) * BATCH]
    loss = torch.nn.functional.cross_entropy(model(prepare(train_x[idx])), train_y[idx])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if step in points or step == STEPS:
        train_time += time.perf_counter() - start
        record(step)
        start = time.perf_counter()
write(args.out, history, STEPS, train_time)
