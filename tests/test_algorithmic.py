"""Algorithmic tasks (modular arithmetic, permutation groups, sparse parity), the token models
and the hinge loss: tables against independent computations, splits, streams, shapes, and two
short real learning runs (a quadratic MLP groks modular addition; an MLP learns sparse parity).
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from dgrun.data import DATASETS, pipeline
from dgrun.data.algorithmic import (MODULAR_OPERATIONS, PERMUTATION_OPERATIONS, modular_table,
                                    permutation_table)
from dgrun.errors import UserError
from dgrun.losses import LOSSES
from dgrun.models import count_params, create

torch.set_num_threads(1)


def inv(y: int, p: int) -> int:
    return pow(y, p - 2, p)


# Each operation written out with Python ints; y = None marks a pair the operation leaves out.
EXPECTED = {
    "add": lambda x, y, p: (x + y) % p,
    "sub": lambda x, y, p: (x - y) % p,
    "mul": lambda x, y, p: (x * y) % p,
    "div": lambda x, y, p: None if y == 0 else (x * inv(y, p)) % p,
    "mix1": lambda x, y, p: (x * inv(y, p)) % p if y % 2 == 1 else (x - y) % p,
    "quad1": lambda x, y, p: (x ** 2 + y ** 2) % p,
    "quad2": lambda x, y, p: (x ** 2 + x * y + y ** 2) % p,
    "quad3": lambda x, y, p: (x ** 2 + x * y + y ** 2 + x) % p,
    "cube1": lambda x, y, p: (x ** 3 + x * y) % p,
    "cube2": lambda x, y, p: (x ** 3 + x * y ** 2 + y) % p,
}


def test_every_modular_operation_is_checked():
    assert set(EXPECTED) == set(MODULAR_OPERATIONS)


@pytest.mark.parametrize("operation", sorted(EXPECTED))
@pytest.mark.parametrize("p", [23, 97])
def test_modular_table_matches_python_ints(operation, p):
    x, y, label = modular_table(p, operation)
    expected = {(a, b): EXPECTED[operation](a, b, p) for a in range(p) for b in range(p)}
    expected = {k: v for k, v in expected.items() if v is not None}
    got = dict(zip(zip(x.tolist(), y.tolist()), label.tolist()))
    assert len(got) == len(x) == len(expected)
    assert got == expected


@pytest.mark.parametrize("operation", sorted(EXPECTED))
def test_modular_dataset_rows_are_the_whole_table(operation):
    p = 31
    b = DATASETS.build("modular", p=p, operation=operation, train_fraction=0.4, split_seed=1)
    assert (b.meta.modality, b.meta.input_shape) == ("tokens", (3,))
    assert (b.meta.num_classes, b.meta.vocab_size) == (p, p + 1)
    rows = {}
    for split in (b.train, b.test):
        assert split.x.dtype == torch.int64 and split.y.dtype == torch.int64
        assert torch.all(split.x[:, 2] == p)  # the "=" token
        for (a, c, _), label in zip(split.x.tolist(), split.y.tolist()):
            assert (a, c) not in rows  # train and test are disjoint, no pair twice
            rows[(a, c)] = label
    expected = {(a, c): EXPECTED[operation](a, c, p) for a in range(p) for c in range(p)}
    assert rows == {k: v for k, v in expected.items() if v is not None}


def test_modular_split_size_determinism_and_seed():
    b = DATASETS.build("modular", p=97, train_fraction=0.3, split_seed=0)
    assert len(b.train) == round(97 * 97 * 0.3) and len(b.train) + len(b.test) == 97 * 97
    again = DATASETS.build("modular", p=97, train_fraction=0.3, split_seed=0)
    assert torch.equal(b.train.x, again.train.x) and torch.equal(b.test.y, again.test.y)
    other = DATASETS.build("modular", p=97, train_fraction=0.3, split_seed=1)
    assert not torch.equal(b.train.x, other.train.x)
    div = DATASETS.build("modular", p=97, operation="div", train_fraction=0.5)
    assert len(div.train) + len(div.test) == 97 * 96


@pytest.mark.parametrize("options, message", [
    ({"p": 96, "operation": "div"}, "not prime"),
    ({"p": 91, "operation": "mix1"}, "not prime"),
    ({"train_fraction": 0.0}, "train_fraction"),
    ({"train_fraction": 1.0}, "train_fraction"),
    ({"train_fraction": 1.5}, "train_fraction"),
    ({"operation": "pow"}, "not a modular operation"),
    ({"p": 1}, "dataset.p"),
])
def test_modular_refuses_bad_options(options, message):
    with pytest.raises(UserError, match=message) as info:
        DATASETS.build("modular", **options)
    if "operation" in message:
        assert all(name in info.value.fix for name in MODULAR_OPERATIONS)


def test_modular_without_division_takes_any_modulus():
    b = DATASETS.build("modular", p=96, operation="mul")
    assert len(b.train) + len(b.test) == 96 * 96


# --- permutations, with tuples and itertools -------------------------------------------------

def compose(a: tuple, b: tuple) -> tuple:
    return tuple(a[b[i]] for i in range(len(a)))


def inverse(a: tuple) -> tuple:
    out = [0] * len(a)
    for i, v in enumerate(a):
        out[v] = i
    return tuple(out)


PERM_EXPECTED = {
    "compose": lambda a, b: compose(a, b),
    "conjugate": lambda a, b: compose(compose(a, b), inverse(a)),
    "aba": lambda a, b: compose(compose(a, b), a),
}


def test_every_permutation_operation_is_checked():
    assert set(PERM_EXPECTED) == set(PERMUTATION_OPERATIONS)


@pytest.mark.parametrize("operation", sorted(PERM_EXPECTED))
@pytest.mark.parametrize("n", [3, 4])
def test_permutation_table_matches_tuples(operation, n):
    elements = list(itertools.permutations(range(n)))
    table, x, y, label = permutation_table(n, operation)
    assert [tuple(row) for row in table.tolist()] == elements
    for a, b, c in zip(x.tolist(), y.tolist(), label.tolist()):
        assert elements[c] == PERM_EXPECTED[operation](elements[a], elements[b])
    assert len(x) == len(elements) ** 2


def test_s5_dataset():
    b = DATASETS.build("permutation", n=5, operation="conjugate", train_fraction=0.3)
    assert (b.meta.num_classes, b.meta.vocab_size, b.meta.input_shape) == (120, 121, (3,))
    assert len(b.train) == round(14400 * 0.3) and len(b.train) + len(b.test) == 14400
    assert torch.all(b.train.x[:, 2] == 120)
    codes = lambda s: set((s.x[:, 0] * 120 + s.x[:, 1]).tolist())  # noqa: E731
    assert not codes(b.train) & codes(b.test)
    with pytest.raises(UserError, match="dataset.n"):
        DATASETS.build("permutation", n=7)
    with pytest.raises(UserError, match="compose"):
        DATASETS.build("permutation", operation="multiply")


# --- label noise ------------------------------------------------------------------------------

def test_label_noise_changes_only_labels_of_token_data():
    clean = pipeline.load("modular", {"p": 97}, seed=0)
    noisy = pipeline.load("modular", {"p": 97}, seed=0, corruption_name="partial_labels",
                          prob=0.5)
    assert torch.equal(noisy.train.x, clean.train.x)
    changed = noisy.train.y != clean.train.y
    assert torch.equal(noisy.train.corrupted, changed)
    assert abs(changed.float().mean().item() - 0.5 * 96 / 97) < 0.04
    assert noisy.train.y.max().item() < 97


def test_random_labels_on_sparse_parity():
    options = {"n": 20, "k": 3, "train_size": 2000, "test_size": 2000}
    clean = pipeline.load("sparse_parity", options, seed=0)
    noisy = pipeline.load("sparse_parity", options, seed=0, corruption_name="random_labels")
    assert torch.equal(noisy.train.x, clean.train.x)
    agree = (noisy.train.y == clean.train.y).float().mean().item()
    assert abs(agree - 0.5) < 0.05 and noisy.train.corrupted.any()


# --- sparse parity ----------------------------------------------------------------------------

def parity_labels(x: torch.Tensor, support: list[int]) -> torch.Tensor:
    """Class 1 where the product of the chosen coordinates is -1."""
    return ((1 - x[:, support].prod(dim=1)) / 2).long()


def test_sparse_parity_labels_are_the_product_of_the_chosen_coordinates():
    b = DATASETS.build("sparse_parity", n=50, k=3, train_size=3000, test_size=500, seed=4)
    support = b.meta.extra["support"]
    assert len(support) == 3 == len(set(support)) and support == sorted(support)
    assert all(0 <= i < 50 for i in support)
    for split in (b.train, b.test):
        assert split.x.dtype == torch.float32 and set(split.x.unique().tolist()) == {-1.0, 1.0}
        assert torch.equal(split.y, parity_labels(split.x, support))
    assert len(b.train) == 3000 and len(b.test) == 500 and b.train.stream is None
    assert abs(b.train.y.float().mean().item() - 0.5) < 0.04
    again = DATASETS.build("sparse_parity", n=50, k=3, train_size=3000, test_size=500, seed=4)
    assert torch.equal(again.train.x, b.train.x) and again.meta.extra["support"] == support
    supports = {tuple(DATASETS.build("sparse_parity", seed=s).meta.extra["support"])
                for s in range(5)}
    assert len(supports) > 1


def test_sparse_parity_stream_is_deterministic_per_step():
    b = DATASETS.build("sparse_parity", n=30, k=4, train_size=None, test_size=300, seed=1)
    support = b.meta.extra["support"]
    assert b.train.stream is not None and len(b.train) == 300
    assert torch.equal(b.train.y, parity_labels(b.train.x, support))
    x5, y5 = b.train.stream(5, 64, "cpu")
    assert x5.shape == (64, 30) and torch.equal(y5, parity_labels(x5, support))
    # A rebuilt bundle (a resumed run) draws the very same batch for the same step.
    rebuilt = DATASETS.build("sparse_parity", n=30, k=4, train_size=None, test_size=300, seed=1)
    x5b, y5b = rebuilt.train.stream(5, 64, torch.device("cpu"))
    assert torch.equal(x5, x5b) and torch.equal(y5, y5b)
    x6, _ = b.train.stream(6, 64, "cpu")
    assert not torch.equal(x5, x6)
    assert torch.equal(b.train.to("cpu").stream(5, 64, "cpu")[0], x5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_sparse_parity_stream_on_the_gpu():
    b = DATASETS.build("sparse_parity", n=30, k=3, seed=0)
    x, y = b.train.stream(3, 128, "cuda")
    assert x.is_cuda and y.is_cuda
    assert torch.equal(y, parity_labels(x, b.meta.extra["support"]))
    assert torch.equal(x, b.train.stream(3, 128, "cuda")[0])


def test_sparse_parity_refuses_bad_options():
    for options, key in [({"k": 0}, "dataset.k"), ({"n": 3, "k": 5}, "dataset.k"),
                         ({"train_size": 0}, "dataset.train_size"), ({"n": 0}, "dataset.n"),
                         ({"test_size": 0}, "dataset.test_size")]:
        with pytest.raises(UserError, match=key):
            DATASETS.build("sparse_parity", **options)


# --- models -----------------------------------------------------------------------------------

def token_batch(vocab=98, batch=6, length=3, seed=0):
    return torch.randint(vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n_layers", [1, 2])
def test_transformer_shapes_and_causal_attention(n_layers):
    torch.manual_seed(0)
    model = create("transformer", (3,), 97, "tokens", vocab_size=98, n_layers=n_layers,
                   d_model=32, n_heads=4, d_mlp=64, layernorm=True)
    x = token_batch()
    assert model(x).shape == (6, 97)
    maps = model.attention_maps(x)
    assert maps.shape == (n_layers, 6, 4, 3, 3)
    assert torch.allclose(maps.sum(dim=-1), torch.ones(n_layers, 6, 4, 3))
    assert torch.all(maps.triu(diagonal=1) == 0)  # no position looks ahead
    assert torch.all(maps[..., 0, 0] == 1)
    # The prediction comes from the last position, which sees every token.
    y = x.clone()
    y[:, 0] = (y[:, 0] + 1) % 98
    assert not torch.allclose(model(x), model(y))
    assert isinstance(model.token_embedding, torch.nn.Embedding)
    assert model.token_embedding.weight.shape == (98, 32)
    # The last block runs its MLP on the last position only; the logits are those of the
    # full computation.
    assert torch.allclose(model(x), model._run(x, last_only=False)[0], atol=1e-6)


@pytest.mark.parametrize("layernorm", [False, True])
@pytest.mark.parametrize("n_layers, d, heads, d_mlp", [(1, 128, 4, 512), (2, 48, 3, 80)])
def test_transformer_parameter_count(layernorm, n_layers, d, heads, d_mlp):
    vocab, length, classes = 114, 3, 113
    model = create("transformer", (length,), classes, "tokens", vocab_size=vocab,
                   n_layers=n_layers, d_model=d, n_heads=heads, d_mlp=d_mlp, layernorm=layernorm)
    per_layer = 4 * d * d + (d * d_mlp + d_mlp) + (d_mlp * d + d) + (4 * d if layernorm else 0)
    expected = vocab * d + length * d + n_layers * per_layer + (2 * d if layernorm else 0) \
        + d * classes
    assert count_params(model) == expected
    has_ln = any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    assert has_ln == layernorm


def test_transformer_presets():
    nanda = create("transformer_nanda", (3,), 113, "tokens", vocab_size=114)
    assert count_params(nanda) == 114 * 128 + 3 * 128 + 4 * 128 ** 2 + 2 * 128 * 512 + 512 \
        + 128 + 128 * 113
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in nanda.modules())
    power = create("transformer_power", (3,), 97, "tokens", vocab_size=98)
    assert len(power.blocks) == 2 and power.attention_maps(token_batch()).shape[:3] == (2, 6, 4)
    with pytest.raises(UserError, match="divisible"):
        create("transformer", (3,), 97, "tokens", vocab_size=98, d_model=30, n_heads=4)
    with pytest.raises(UserError, match="cannot take"):
        create("transformer", (50,), 2, "vector")


def test_quadratic_mlp_is_bias_free_and_quadratic():
    torch.manual_seed(0)
    p, width = 97, 64
    model = create("quadratic_mlp", (3,), p, "tokens", vocab_size=p + 1, width=width)
    assert not [n for n, _ in model.named_parameters() if "bias" in n]
    assert count_params(model) == 2 * (p + 1) * width + width * p
    x = token_batch(vocab=p)
    v = torch.cat([F.one_hot(x[:, 0], p + 1), F.one_hot(x[:, 1], p + 1)], dim=1).float()
    out = model.forward_onehot(v)
    assert torch.allclose(model(x), out, atol=1e-6)
    assert torch.allclose(model.forward_onehot(2 * v), 4 * out, rtol=1e-5, atol=1e-7)
    assert torch.allclose(model.forward_onehot(-v), out, rtol=1e-5, atol=1e-7)
    # The "=" token is not read: a changed last position leaves the output alone.
    y = x.clone()
    y[:, 2] = p
    assert torch.equal(model(x), model(y))
    every = create("quadratic_mlp", (3,), p, "tokens", vocab_size=p + 1, width=8, operands=None)
    assert count_params(every) == 3 * (p + 1) * 8 + 8 * p
    with pytest.raises(UserError, match="operands"):
        create("quadratic_mlp", (3,), p, "tokens", vocab_size=p + 1, operands=4)


def test_mlp_embed_reads_the_operands():
    torch.manual_seed(0)
    model = create("mlp_embed", (3,), 97, "tokens", vocab_size=98, d_embed=16, width=32,
                   depth=2)
    assert count_params(model) == 98 * 16 + (32 * 32 + 32) + (32 * 32 + 32) + (32 * 97 + 97)
    x = token_batch()
    y = x.clone()
    y[:, 2] = (y[:, 2] + 1) % 98
    assert model(x).shape == (6, 97) and torch.equal(model(x), model(y))
    y[:, 1] = (y[:, 1] + 1) % 98
    assert not torch.allclose(model(x), model(y))


# --- hinge loss -------------------------------------------------------------------------------

def test_hinge_loss_known_values():
    train, eval_sum = LOSSES.build("hinge")
    out = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 0.5], [1.0, 0.0]])
    y = torch.tensor([0, 0, 0, 1])
    # Binary hinge max(0, 1 - s (out1 - out0)) with s = -1 for class 0: 1, 0, 1.5, 2.
    assert torch.isclose(eval_sum(out, y), torch.tensor(4.5))
    assert torch.isclose(train(out, y), torch.tensor(4.5 / 4))
    three = torch.tensor([[1.0, 0.0, 0.5]])
    assert torch.isclose(train(three, torch.tensor([0])), torch.tensor(0.5))
    with pytest.raises(UserError, match="label_smoothing"):
        LOSSES.build("hinge", label_smoothing=0.1)


# --- learning runs ----------------------------------------------------------------------------

@torch.no_grad()
def accuracy(model, split) -> float:
    return (model(split.x).argmax(dim=-1) == split.y).float().mean().item()


def test_quadratic_mlp_groks_modular_addition():
    """Gromov's recipe (width 256, fraction 0.25, AdamW lr 1e-2, MSE, full batch): measured to
    memorize by step ~20 and reach 99% test accuracy at steps 190-240 over eight seeds."""
    bundle = DATASETS.build("modular", p=97, operation="add", train_fraction=0.25)
    torch.manual_seed(0)
    model = create("quadratic_mlp", (3,), 97, "tokens", vocab_size=98, width=256)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0,
                                  betas=(0.9, 0.98))
    loss_fn, _ = LOSSES.build("mse")
    train, test = bundle.train, bundle.test
    seen = {}
    for step in range(1, 401):
        loss = loss_fn(model(train.x), train.y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 40:
            seen["early"] = accuracy(model, train), accuracy(model, test)
        if step % 20 == 0 and accuracy(model, test) >= 0.9:
            break
    train_early, test_early = seen["early"]
    assert train_early >= 0.99 and test_early < 0.3  # memorized, not yet generalized
    assert accuracy(model, test) >= 0.9 and step > 100


def test_mlp_learns_sparse_parity_after_a_plateau():
    """Barak et al.'s (50, 3) parity, width-1000 ReLU MLP, SGD lr 0.1, batch 32, hinge loss, fresh
    samples: chance for over a thousand steps, then a jump (measured at steps 1,600-1,900)."""
    bundle = DATASETS.build("sparse_parity", n=50, k=3, train_size=None, test_size=1000, seed=0)
    torch.manual_seed(0)
    model = create("mlp", (50,), 2, "vector", width=1000, depth=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn, _ = LOSSES.build("hinge")
    plateau = []
    for step in range(1, 4001):
        x, y = bundle.train.stream(step, 32, "cpu")
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            acc = accuracy(model, bundle.test)
            if step <= 1000:
                plateau.append(acc)
            elif acc >= 0.95:
                break
    assert max(plateau) < 0.6
    assert accuracy(model, bundle.test) >= 0.95 and accuracy(model, bundle.train) >= 0.95
    assert math.isfinite(loss.item())


def test_label_noise_on_streamed_parity_is_refused_in_one_line():
    from dgrun.data import pipeline
    from dgrun.errors import UserError

    with pytest.raises(UserError, match="needs a fixed training set.*dataset.train_size=N"):
        pipeline.load("sparse_parity", {"train_size": None}, seed=0,
                      corruption_name="partial_labels", prob=0.2)
    fixed = pipeline.load("sparse_parity", {"train_size": 500}, seed=0,
                          corruption_name="partial_labels", prob=0.5)
    assert 0.15 < fixed.train.corrupted.float().mean() < 0.35  # p (1 - 1/K) with K = 2
