"""The Fourier view of modular addition (Nanda et al. 2023), as plain tensor functions.

A network that has grokked x + y mod p computes, for a few key frequencies w_k = 2 pi k / p,

    logit(a, b, c) = sum_k alpha_k cos(w_k (a + b - c))       (+ a constant)

so its logits over all p^2 inputs x p classes, written in the Fourier basis over (a, b, c),
are concentrated on the directions cos/sin(w_k (a + s b - c)) (s = +1 for x + y, -1 for x - y).
Those directions depend on (a, b, c) only through n = (a + s b - c) mod p, which makes every
quantity here cheap: the projection of the logits onto *all* functions of n is the mean of the
logits over each of the p "diagonals" n (p^2 entries each), and the key-frequency part of the
logits is that diagonal profile, low-passed to the key frequencies.

    diagonal_profile(logits, s)  D[n]: mean logit over the entries with a + s b - c = n
    logit_spectrum(logits, s)    per frequency k = 1..p//2, the squared norm (over all p^3
                                 entries) of the logits' components along cos/sin(w_k n)
    key_component(logits, s, K)  those components for k in K, as a (p, p, p) tensor
    frequency_norms(embedding)   per frequency, the norm of a (p, d) embedding's components
    gini(x)                      the Gini coefficient (0: spread evenly, -> 1: one holds all)

Only addition and subtraction have this algorithm: other operations (x * y, x / y, x^2 + y^2,
...) are not sums in Z_p, so their logits need another basis (multiplication is addition of
discrete logarithms) and `OPERATION_SIGNS` names the two that apply.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

# dataset.operation -> s in n = a + s b - c
OPERATION_SIGNS = {"add": 1, "sub": -1}


@functools.lru_cache(maxsize=8)
def fourier_basis(p: int) -> tuple[Tensor, list[int]]:
    """(rows, p) orthonormal real Fourier basis of Z_p and each row's frequency (0 = const).
    For even p, sin(pi x) vanishes and is left out. Cached (a probe asks at every
    evaluation): callers must not modify the tensor in place."""
    x = torch.arange(p, dtype=torch.float64)
    rows, freqs = [torch.ones(p, dtype=torch.float64)], [0]
    for k in range(1, p // 2 + 1):
        for f in (torch.cos, torch.sin):
            v = f(2 * math.pi * k * x / p)
            if v.norm() > 1e-6:
                rows.append(v)
                freqs.append(k)
    basis = torch.stack(rows)
    return basis / basis.norm(dim=1, keepdim=True), freqs


def _by_frequency(coeff: Tensor, freqs: list[int], p: int) -> Tensor:
    """Sum squared basis coefficients (rows, ...) per frequency k = 1..p//2."""
    power = coeff.pow(2).reshape(len(freqs), -1).sum(1)
    by_freq = torch.zeros(p // 2 + 1, dtype=torch.float64)
    by_freq.index_add_(0, torch.tensor(freqs), power)
    return by_freq[1:]


def frequency_norms(embedding: Tensor) -> Tensor:
    """(p//2,) norm of a (p, d) embedding's component at each frequency k = 1..p//2."""
    p = embedding.shape[0]
    basis, freqs = fourier_basis(p)
    return _by_frequency(basis @ embedding.detach().double().cpu(), freqs, p).sqrt()


def key_frequencies(norms: Tensor, energy: float = 0.9) -> list[int]:
    """The fewest frequencies (1-based) holding `energy` of the total squared norm."""
    power = norms.double().pow(2)
    order = power.argsort(descending=True)
    cum = power[order].cumsum(0) / power.sum().clamp_min(1e-30)
    count = int((cum < energy).sum()) + 1
    return sorted((order[:count] + 1).tolist())


def gini(x: Tensor) -> float:
    """Gini coefficient of non-negative values: 0 when all are equal, (n-1)/n when one holds
    everything (Nanda et al.'s measure of how sparse the embedding's frequencies are)."""
    x = x.detach().double().flatten().sort().values
    n, total = len(x), float(x.sum())
    if n == 0 or total <= 0:
        return 0.0
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    return float(((2 * ranks - n - 1) * x).sum() / (n * total))


def diagonal_index(p: int, sign: int, device=None) -> Tensor:
    """(p, p, p) int64: n = (a + sign * b - c) mod p for each (a, b, c)."""
    return _diagonal_index(p, sign, str(torch.device(device or "cpu")))


@functools.lru_cache(maxsize=4)
def _diagonal_index(p: int, sign: int, device: str) -> Tensor:
    # Cached: p^3 modular sums cost ~50 ms at p = 97, at every evaluation otherwise.
    r = torch.arange(p, device=device)
    return (r[:, None, None] + sign * r[None, :, None] - r[None, None, :]) % p


def diagonal_profile(logits: Tensor, sign: int) -> Tensor:
    """(p,) float64: D[n], the mean of (p, p, p) logits over the entries with a + s b - c = n."""
    return diagonal_profile_of(logits.detach().double(), sign)


def diagonal_profile_of(wide: Tensor, sign: int) -> Tensor:
    """diagonal_profile of logits already in float64 (a caller that needs them so anyway)."""
    p = wide.shape[0]
    index = diagonal_index(p, sign, wide.device).flatten()
    sums = torch.zeros(p, dtype=torch.float64, device=wide.device)
    sums.index_add_(0, index, wide.flatten())
    return sums / p ** 2


def spectrum_of(profile: Tensor, p: int) -> Tensor:
    """logit_spectrum from the diagonal profile (p,) on the CPU."""
    basis, freqs = fourier_basis(p)
    # Each n holds p^2 entries, so a unit-norm direction over n has norm p over (a, b, c).
    return _by_frequency(basis @ profile, freqs, p) * p ** 2


def logit_spectrum(logits: Tensor, sign: int) -> Tensor:
    """(p//2,) float64: for k = 1..p//2, the squared norm over all p^3 entries of the logits'
    components along cos(w_k n) and sin(w_k n), n = a + s b - c."""
    return spectrum_of(diagonal_profile(logits, sign).cpu(), logits.shape[0])


def key_profile(profile: Tensor, keys: list[int]) -> Tensor:
    """(p,) float64 over n: the diagonal profile low-passed to the frequencies in `keys` (no
    constant): the key part of the logits is this at n = a + s b - c."""
    p = profile.shape[0]
    basis, freqs = fourier_basis(p)
    wanted = set(keys)
    keep = torch.tensor([f in wanted for f in freqs])
    return basis[keep].T @ (basis[keep] @ profile)


def key_component(logits: Tensor, sign: int, keys: list[int]) -> Tensor:
    """(p, p, p): the part of the logits along cos/sin(w_k (a + s b - c)) for k in `keys`
    (no constant). logits - this is the excluded view; mean + this the restricted one."""
    p = logits.shape[0]
    low_passed = key_profile(diagonal_profile(logits, sign).cpu(), keys)
    return low_passed.to(logits.device, logits.dtype)[diagonal_index(p, sign, logits.device)]
