"""Per-example gradients, projected: the features TRAK, TracIn and gradient similarity share.

For each example z = (x, y) we take the gradient of a model output f(z; theta) with respect to
the parameters, computed for a whole batch at once with torch.func (vmap over grad of a
functional call), and project it to k dimensions with a seeded Gaussian matrix. With it comes
q(z) = -dL/df, the "out-to-loss" factor, so that the loss gradient is -q(z) grad f(z):

    margin      f = logit_y - logsumexp_{c != y} logit_c = log(p / (1 - p)),  q = 1 - p
                (classification with cross-entropy, TRAK's choice: L = log(1 + e^-f) exactly)
    regression  f = the model's scalar output, L = (f - y)^2 / 2,  q = y - f
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from dgrun.analysis.base import batched, model_device
from dgrun.errors import UserError
from dgrun.registry import Registry


@dataclass(frozen=True)
class ModelOutput:
    value: Callable[[Tensor, Tensor], Tensor]  # (logits, y) -> f, one per row
    q: Callable[[Tensor, Tensor], Tensor]      # (logits, y) -> -dL/df, one per row
    loss: Callable[[Tensor, Tensor], Tensor]   # (f, y) -> L, one per row (influence's Hessian)


OUTPUTS = Registry("model output")


def _margin(logits: Tensor, y: Tensor) -> Tensor:
    # A mask rather than scatter/one_hot: both sides stay traceable under vmap.
    is_label = torch.arange(logits.shape[-1], device=logits.device) == y[:, None]
    correct = logits.masked_fill(~is_label, 0.0).sum(-1)
    others = logits.masked_fill(is_label, float("-inf")).logsumexp(-1)
    return correct - others


def _margin_q(logits: Tensor, y: Tensor) -> Tensor:
    return 1.0 - logits.float().softmax(-1).gather(-1, y[:, None]).squeeze(-1)


def _scalar(logits: Tensor, y: Tensor) -> Tensor:
    return logits.reshape(len(logits), -1)[:, 0]


def _scalar_q(logits: Tensor, y: Tensor) -> Tensor:
    return y.to(logits.dtype) - _scalar(logits, y)


OUTPUTS.register("margin")(ModelOutput(_margin, _margin_q,
                                        lambda f, y: torch.nn.functional.softplus(-f)))
OUTPUTS.register("regression")(ModelOutput(_scalar, _scalar_q,
                                            lambda f, y: 0.5 * (f - y.to(f.dtype)).square()))


def selected_parameters(model: nn.Module, patterns: Optional[Sequence[str]]) -> list[str]:
    """Names of the trainable parameters matching any glob in `patterns` (all when None)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if patterns is None:
        return names
    chosen = [n for n in names if any(fnmatch(n, pat) for pat in patterns)]
    if not chosen:
        raise UserError(f"no model parameter matches {list(patterns)}",
                        f"use globs over the parameter names, e.g. {names[-1]!r}")
    return chosen


class Projector:
    """A seeded Gaussian random projection of flattened gradients, R^D -> R^k, entries
    N(0, 1/k) so inner products are preserved in expectation (Johnson-Lindenstrauss).

    The matrix is drawn per parameter tensor from (seed, model_id, tensor name), so train and
    test gradients of one checkpoint meet the same matrix, and each checkpoint of an ensemble
    gets its own (as in TRAK). It is drawn in row chunks of at most `chunk_floats` numbers,
    always the same way, so a large layer never needs its whole block at once; the chunks are
    kept when all of them fit in `cache_bytes`, and redrawn for every batch otherwise
    (identical, slower). `dim=None` is the identity: exact gradients, D columns.
    """

    def __init__(self, numels: dict[str, int], dim: Optional[int], *, seed: int = 0,
                 model_id: int = 0, cache_bytes: int = 1 << 30, chunk_floats: int = 1 << 25):
        if dim is not None and dim < 1:
            raise UserError(f"projection dimension must be positive, got {dim}",
                            "pass proj_dim >= 1, e.g. 512 (or None for exact gradients)")
        self.numels, self.dim = numels, dim
        self.seed, self.model_id = seed, model_id
        self.cache = dim is not None and sum(numels.values()) * dim * 4 <= cache_bytes
        self.rows = max(1, chunk_floats // dim) if dim else 0
        self._chunks: dict[str, list[tuple[int, int, Tensor]]] = {}

    def chunks(self, name: str, device: torch.device) -> Iterator[tuple[int, int, Tensor]]:
        """(first row, end row, matrix rows) of the block for parameter `name`."""
        if name in self._chunks:
            yield from self._chunks[name]
            return
        digest = hashlib.sha256(f"{self.seed}/{self.model_id}/{name}".encode()).digest()
        g = torch.Generator(device=device).manual_seed(int.from_bytes(digest[:7], "little"))
        kept = []
        for start in range(0, self.numels[name], self.rows):
            end = min(self.numels[name], start + self.rows)
            m = torch.randn(end - start, self.dim, generator=g, device=device)
            m /= self.dim ** 0.5
            kept.append((start, end, m))
            yield start, end, m
        if self.cache:
            self._chunks[name] = kept

    def __call__(self, grads: dict[str, Tensor]) -> Tensor:
        flat = {n: g.reshape(len(g), -1).float() for n, g in grads.items()}
        if self.dim is None:
            return torch.cat([flat[n] for n in self.numels], dim=1)
        out = None
        for n in self.numels:
            for start, end, m in self.chunks(n, flat[n].device):
                part = flat[n][:, start:end] @ m
                out = part if out is None else out + part
        return out


def projected_gradients(model: nn.Module, x: Tensor, y: Tensor, *, output: ModelOutput,
                        projector: Projector, names: Sequence[str],
                        prepare: Callable[[Tensor], Tensor] = lambda t: t,
                        batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """(phi, q): phi (N, k) the projected per-example gradients of f over the parameters
    `names`, q (N,) the out-to-loss factors; the model is used as it is, in eval mode."""
    model.eval()
    device = model_device(model)
    trainable = dict(model.named_parameters())
    fixed = {n: p.detach() for n, p in trainable.items() if n not in names}
    fixed.update(dict(model.named_buffers()))

    def f(params: dict, xi: Tensor, yi: Tensor) -> Tensor:
        logits = functional_call(model, {**params, **fixed}, (xi.unsqueeze(0),))
        return output.value(logits, yi.unsqueeze(0)).sum()

    per_example = vmap(grad(f), in_dims=(None, 0, 0))
    params = {n: trainable[n].detach() for n in names}
    phis, qs = [], []
    for s in batched(len(x), batch_size):
        xb, yb = prepare(x[s].to(device)), y[s].to(device)
        phis.append(projector(per_example(params, xb, yb)))
        with torch.no_grad():
            qs.append(output.q(model(xb), yb).float())
    return torch.cat(phis), torch.cat(qs)
