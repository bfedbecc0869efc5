"""Algorithmic tasks of the grokking and phase-transition literature, generated offline.

modular        Power et al. 2022's binary operations mod p. Row = tokens [x, y, "="] with "=" the
               token p (vocab p + 1), label (x op y) mod p (p classes). Every valid pair (x, y)
               appears once; a seeded permutation puts `train_fraction` of them in train.
permutation    The symmetric group S_n (Power et al.'s S5): element tokens in lexicographic order
               of the permutations, "=" the token n!; label the index of x.y, x.y.x^-1 or x.y.x.
sparse_parity  Barak et al. 2022: x uniform in {-1,+1}^n, label 1 when the product of k hidden
               coordinates (chosen from the seed) is -1, else 0. Either a fixed training set or
               fresh samples every step (`Split.stream`).

Everything is built with batched tensor ops in well under a second and is a pure function of
the options, so a run's data never needs to be stored.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from dgrun.data import DATASETS
from dgrun.data.bundle import Bundle, Meta, Split
from dgrun.errors import UserError
from dgrun.seeding import SeedStream, derive_seed

# Tables are built whole (p^2 or (n!)^2 rows): these bounds keep them to a few hundred MB.
MAX_MODULUS = 3000
MAX_PERMUTATION_N = 6


# ---------------------------------------------------------------------------------------------
# modular arithmetic
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModularOperation:
    formula: str
    # (x, y, p, inverse) -> (x op y) mod p for int64 tensors of pairs; `inverse[v]` is v^-1 mod p
    # (0 for v = 0), valid only when the modulus is prime.
    table: Callable[[Tensor, Tensor, int, Tensor], Tensor]
    divides: bool = False          # needs y^-1: p must be prime
    nonzero_y: bool = False        # pairs with y = 0 are left out (x/y)


# Power et al.'s operations; names are those of openai/grok's dataset files where it has them.
MODULAR_OPERATIONS: dict[str, ModularOperation] = {
    "add": ModularOperation("x + y", lambda x, y, p, inv: (x + y) % p),
    "sub": ModularOperation("x - y", lambda x, y, p, inv: (x - y) % p),
    "mul": ModularOperation("x * y", lambda x, y, p, inv: (x * y) % p),
    "div": ModularOperation("x / y (y != 0)", lambda x, y, p, inv: (x * inv[y]) % p,
                            divides=True, nonzero_y=True),
    "mix1": ModularOperation("x / y if y is odd, else x - y",
                             lambda x, y, p, inv: torch.where(y % 2 == 1, (x * inv[y]) % p,
                                                              (x - y) % p),
                             divides=True),
    "quad1": ModularOperation("x^2 + y^2", lambda x, y, p, inv: (x * x + y * y) % p),
    "quad2": ModularOperation("x^2 + xy + y^2",
                              lambda x, y, p, inv: (x * x + x * y + y * y) % p),
    "quad3": ModularOperation("x^2 + xy + y^2 + x",
                              lambda x, y, p, inv: (x * x + x * y + y * y + x) % p),
    "cube1": ModularOperation("x^3 + xy",
                              lambda x, y, p, inv: ((x * x % p) * x + x * y) % p),
    "cube2": ModularOperation("x^3 + xy^2 + y",
                              lambda x, y, p, inv: ((x * x % p) * x + x * (y * y % p) + y) % p),
}


def is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def modular_inverses(p: int) -> Tensor:
    """v^-1 mod p for v in 0..p-1 (0 -> 0), read off the multiplication table: for prime p each
    nonzero row holds exactly one 1."""
    v = torch.arange(p, dtype=torch.int64)
    ones = (v[:, None] * v[None, :]) % p == 1
    return ones.long().argmax(dim=1)


def modular_table(p: int, operation: str) -> tuple[Tensor, Tensor, Tensor]:
    """All valid pairs of `operation` mod p, row-major in (x, y): returns x, y, (x op y) mod p."""
    op = _modular_operation(p, operation)
    x, y = torch.cartesian_prod(torch.arange(p), torch.arange(p)).unbind(dim=1)
    if op.nonzero_y:
        keep = y != 0
        x, y = x[keep], y[keep]
    inverse = modular_inverses(p) if op.divides else torch.zeros(p, dtype=torch.int64)
    return x, y, op.table(x, y, p, inverse)


def _modular_operation(p: int, operation: str) -> ModularOperation:
    if operation not in MODULAR_OPERATIONS:
        raise UserError(f"dataset.operation={operation!r} is not a modular operation",
                        "choose one of: " + ", ".join(f"{k} ({v.formula})"
                                                      for k, v in MODULAR_OPERATIONS.items()))
    if not isinstance(p, int) or not 2 <= p <= MAX_MODULUS:
        raise UserError(f"dataset.p={p!r} must be an integer in [2, {MAX_MODULUS}]",
                        "use e.g. dataset.p=97 (Power et al.) or 113 (Nanda et al.)")
    op = MODULAR_OPERATIONS[operation]
    if op.divides and not is_prime(p):
        raise UserError(f"dataset.operation={operation} divides, which needs a prime modulus; "
                        f"p={p} is not prime", "use a prime p, e.g. dataset.p=97")
    return op


@DATASETS.register("modular", modality="tokens")
def modular(*, p: int = 97, operation: str = "add", train_fraction: float = 0.3,
            split_seed: int = 0) -> Bundle:
    """Power et al.'s binary operation tables mod p, split at random into train and test."""
    op = _modular_operation(p, operation)
    x, y, label = modular_table(p, operation)
    tokens = torch.stack([x, y, torch.full_like(x, p)], dim=1)
    meta = Meta("modular", "tokens", (3,), p, vocab_size=p + 1,
                extra={"p": p, "operation": operation, "formula": op.formula,
                       "equals_token": p})
    return _split_table(tokens, label, train_fraction, split_seed, meta)


def _split_table(tokens: Tensor, label: Tensor, train_fraction: float, split_seed: int,
                 meta: Meta) -> Bundle:
    if not 0.0 < train_fraction < 1.0:
        raise UserError(f"dataset.train_fraction={train_fraction} must be in (0, 1)",
                        "use e.g. dataset.train_fraction=0.3")
    n = len(label)
    n_train = round(n * train_fraction)
    if not 0 < n_train < n:
        raise UserError(f"dataset.train_fraction={train_fraction} of {n} equations leaves an "
                        "empty train or test split", "use a fraction further from 0 and 1")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    train, test = order[:n_train], order[n_train:]
    return Bundle(Split(tokens[train], label[train]), Split(tokens[test], label[test]), meta)


# ---------------------------------------------------------------------------------------------
# permutation groups
# ---------------------------------------------------------------------------------------------

def _compose(a: Tensor, b: Tensor) -> Tensor:
    """(a o b)[i] = a[b[i]]: apply b first, then a (rows of permutations)."""
    return torch.gather(a, 1, b)


def _inverse(a: Tensor) -> Tensor:
    return a.argsort(dim=1)


# x.y := x o y. The variants are Power et al.'s s5conj and s5aba.
PERMUTATION_OPERATIONS: dict[str, tuple[str, Callable[[Tensor, Tensor], Tensor]]] = {
    "compose": ("x.y", lambda x, y: _compose(x, y)),
    "conjugate": ("x.y.x^-1", lambda x, y: _compose(_compose(x, y), _inverse(x))),
    "aba": ("x.y.x", lambda x, y: _compose(_compose(x, y), x)),
}


def permutation_table(n: int, operation: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Elements of S_n (lexicographic rows) and, for all pairs (x, y) of element indices in
    row-major order, x, y and the index of the result."""
    if not isinstance(n, int) or not 2 <= n <= MAX_PERMUTATION_N:
        raise UserError(f"dataset.n={n!r} must be an integer in [2, {MAX_PERMUTATION_N}]",
                        "use e.g. dataset.n=5 (S5, 120 elements)")
    if operation not in PERMUTATION_OPERATIONS:
        raise UserError(f"dataset.operation={operation!r} is not a permutation operation",
                        "choose one of: " + ", ".join(f"{k} ({v[0]})"
                                                      for k, v in PERMUTATION_OPERATIONS.items()))
    elements = torch.tensor(list(itertools.permutations(range(n))), dtype=torch.int64)
    x, y = torch.cartesian_prod(torch.arange(len(elements)), torch.arange(len(elements))).unbind(1)
    result = PERMUTATION_OPERATIONS[operation][1](elements[x], elements[y])
    # Lexicographic order of permutations is the numeric order of their base-n codes.
    weights = n ** torch.arange(n - 1, -1, -1)
    codes = elements @ weights
    label = torch.searchsorted(codes, result @ weights)
    return elements, x, y, label


@DATASETS.register("permutation", modality="tokens")
def permutation(*, n: int = 5, operation: str = "compose", train_fraction: float = 0.3,
                split_seed: int = 0) -> Bundle:
    """Power et al.'s S_n tasks (S5 by default: 120 elements, 14,400 equations)."""
    elements, x, y, label = permutation_table(n, operation)
    m = len(elements)
    tokens = torch.stack([x, y, torch.full_like(x, m)], dim=1)
    meta = Meta("permutation", "tokens", (3,), m, vocab_size=m + 1,
                extra={"n": n, "operation": operation,
                       "formula": PERMUTATION_OPERATIONS[operation][0], "equals_token": m})
    return _split_table(tokens, label, train_fraction, split_seed, meta)


# ---------------------------------------------------------------------------------------------
# sparse parity
# ---------------------------------------------------------------------------------------------

def parity_support(n: int, k: int, seed: int) -> Tensor:
    """The k hidden coordinates, sorted; drawn from the seed alone."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "support"))
    return torch.randperm(n, generator=gen)[:k].sort().values


def parity_sample(count: int, n: int, support: Tensor, gen: torch.Generator,
                  device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """`count` uniform points of {-1,+1}^n (float32) and their parity labels (0/1 int64).
    `support` must be on `device`."""
    x = torch.randint(0, 2, (count, n), generator=gen, device=device, dtype=torch.float32)
    x = x.mul_(2).sub_(1)
    y = (x[:, support] < 0).sum(dim=1).remainder_(2)
    return x, y


class ParityStream:
    """Fresh training batches, deterministic in (seed, step) on each device.

    One generator per device is kept and reseeded every step, so a resumed run draws the very
    batches an uninterrupted one would, and batches are made where they are used. The device of
    the last call is remembered as given: the loop asks for the same one every step, and
    resolving it again (torch.device, a dict lookup, .to) cost ~30 us a batch.
    """

    def __init__(self, n: int, support: Tensor, seed: int):
        self.n, self.support, self.seed = n, support, seed
        self._seed = SeedStream(seed, "stream")
        self._per_device: dict[torch.device, tuple[torch.Generator, Tensor]] = {}
        self._last: tuple[object, torch.Generator, Tensor] | None = None

    def __call__(self, step: int, batch_size: int, device: torch.device | str
                 ) -> tuple[Tensor, Tensor]:
        if self._last is None or self._last[0] is not device:
            resolved = torch.device(device)
            if resolved not in self._per_device:
                self._per_device[resolved] = (torch.Generator(device=resolved),
                                              self.support.to(resolved))
            self._last = (device, *self._per_device[resolved])
        _, gen, support = self._last
        gen.manual_seed(self._seed(step))
        return parity_sample(batch_size, self.n, support, gen, support.device)


@DATASETS.register("sparse_parity", modality="vector")
def sparse_parity(*, n: int = 50, k: int = 3, train_size: Optional[int] = None,
                  test_size: int = 1000, seed: int = 0) -> Bundle:
    """Barak et al.'s (n, k)-sparse parity.

    train_size: an int fixes a training set of that many points; null trains on fresh samples
    every step (`Split.stream`), and the train split then holds `test_size` fixed points from
    the same distribution, used only to measure train accuracy. Points are drawn independently,
    so for small n the train and test sets can share points.
    """
    if not isinstance(n, int) or n < 1:
        raise UserError(f"dataset.n={n!r} must be a positive integer", "use e.g. dataset.n=50")
    if not isinstance(k, int) or not 1 <= k <= n:
        raise UserError(f"dataset.k={k!r} must be an integer in [1, n={n}]",
                        "use e.g. dataset.k=3")
    if train_size is not None and (not isinstance(train_size, int) or train_size < 1):
        raise UserError(f"dataset.train_size={train_size!r} must be a positive integer or null",
                        "use null for fresh samples every step, or e.g. dataset.train_size=5000")
    if not isinstance(test_size, int) or test_size < 1:
        raise UserError(f"dataset.test_size={test_size!r} must be a positive integer",
                        "use e.g. dataset.test_size=1000")
    support = parity_support(n, k, seed)
    draw = lambda name, count: parity_sample(  # noqa: E731
        count, n, support, torch.Generator().manual_seed(derive_seed(seed, name)))
    test = Split(*draw("test", test_size))
    if train_size is None:
        train = Split(*draw("train_sample", test_size), stream=ParityStream(n, support, seed))
    else:
        train = Split(*draw("train", train_size))
    meta = Meta("sparse_parity", "vector", (n,), 2, class_names=("even", "odd"),
                extra={"n": n, "k": k, "support": support.tolist(),
                       "fresh_samples": train_size is None})
    return Bundle(train, test, meta)
