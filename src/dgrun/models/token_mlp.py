"""MLPs over token sequences: the grokking models that are not transformers.

mlp_embed      learned token embeddings of the operand positions, concatenated -> ReLU MLP
               (the "embedding MLP" of the grokking literature, e.g. Liu et al. 2022).
quadratic_mlp  Gromov 2023: concatenated one-hot operands -> one hidden layer, activation x^2,
               no biases, trained with MSE on one-hot targets (`trainer.loss=mse`).

Both read only the first `operands` positions: the "=" that closes an equation is the same token
in every row, and to a bias-free quadratic network a constant input is a hidden bias that breaks
its homogeneity. `operands: null` reads every position.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from dgrun.errors import UserError
from dgrun.models import MODELS


def _positions(name: str, input_shape, vocab_size, operands: Optional[int]) -> int:
    if vocab_size is None or len(input_shape) != 1:
        raise UserError(f"model '{name}' needs token sequences with a vocabulary, got input "
                        f"shape {tuple(input_shape)}", "pick a tokens dataset, e.g. "
                        "dataset=modular")
    length = input_shape[0]
    if operands is None:
        return length
    if not 1 <= operands <= length:
        raise UserError(f"model.operands={operands} must be in [1, {length}] for sequences of "
                        f"{length} tokens", "use model.operands=2 for x op y =, or null for all")
    return operands


class EmbeddingMLP(nn.Module):
    """tokens (B, T) -> concat of the first `positions` embeddings -> depth x (Linear, ReLU)
    -> Linear to the classes. `token_embedding` is shared by the positions."""

    def __init__(self, vocab_size: int, positions: int, num_classes: int, d_embed: int = 128,
                 width: int = 512, depth: int = 1, init_scale: float = 1.0):
        super().__init__()
        self.positions = positions
        self.token_embedding = nn.Embedding(vocab_size, d_embed)
        layers: list[nn.Module] = []
        d = positions * d_embed
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        layers.append(nn.Linear(d, num_classes))
        self.mlp = nn.Sequential(*layers)
        if init_scale != 1.0:
            # Omnigrok (Liu et al. 2023): a larger initial weight norm delays generalization
            # until weight decay has brought the norm down.
            with torch.no_grad():
                for p in self.parameters():
                    p.mul_(init_scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.token_embedding(x[:, :self.positions]).flatten(1))


class QuadraticMLP(nn.Module):
    """Gromov 2023's network: f(v) = W_out^T (W_in^T v)^2 with W_in (D, N), W_out (N, C).

    v is the concatenation of one-hot tokens (D = positions x vocab_size) and N the width. No
    biases, so f(a v) = a^2 f(v). Weights start N(0, s^2) with s = 0.5 / (2N)^(1/3), the
    initialization of Gromov's group's code (d-doshi/Grokking, `fcn`). It matters: measured at
    p = 97, fraction 0.3, AdamW lr 1e-2, this memorizes by step ~20 and groks by ~300, while the
    mean-field form (N(0, 1) weights, 1/sqrt(D) and 1/N factors) needs ~170 and ~1050 steps.
    """

    def __init__(self, vocab_size: int, positions: int, num_classes: int, width: int = 500):
        super().__init__()
        self.vocab_size, self.positions = vocab_size, positions
        std = 0.5 / (2 * width) ** (1 / 3)
        self.w_in = nn.Parameter(torch.randn(positions * vocab_size, width) * std)
        self.w_out = nn.Parameter(torch.randn(width, num_classes) * std)

    def forward_onehot(self, v: Tensor) -> Tensor:
        """The network on its real-valued input v (B, D): the concatenated one-hot vectors."""
        return (v @ self.w_in).square() @ self.w_out

    def penultimate(self, x: Tensor) -> Tensor:
        """(B, width) hidden activations, the input of the output weights: the features that
        `dgrun analyze features` reads (the model holds raw parameters, no nn.Linear head)."""
        # v @ w_in for a one-hot v is a sum of rows of w_in: gather them instead of building v.
        offsets = torch.arange(self.positions, device=x.device) * self.vocab_size
        return self.w_in[x[:, :self.positions] + offsets].sum(dim=1).square()

    def forward(self, x: Tensor) -> Tensor:
        return self.penultimate(x) @ self.w_out


@MODELS.register("mlp_embed", modalities=("tokens",))
def mlp_embed(input_shape, num_classes, *, vocab_size=None, d_embed: int = 128,
              width: int = 512, depth: int = 1, operands: Optional[int] = 2,
              init_scale: float = 1.0):
    positions = _positions("mlp_embed", input_shape, vocab_size, operands)
    if d_embed < 1 or depth < 0:
        raise UserError("model.d_embed must be positive and model.depth non-negative",
                        "e.g. model.d_embed=128 model.depth=1")
    if not init_scale > 0:
        raise UserError(f"model.init_scale={init_scale} must be positive", "e.g. 1.0 or 3.0")
    return EmbeddingMLP(vocab_size, positions, num_classes, d_embed=d_embed, width=width,
                        depth=depth, init_scale=float(init_scale))


@MODELS.register("quadratic_mlp", modalities=("tokens",))
def quadratic_mlp(input_shape, num_classes, *, vocab_size=None, width: int = 500,
                  operands: Optional[int] = 2):
    positions = _positions("quadratic_mlp", input_shape, vocab_size, operands)
    return QuadraticMLP(vocab_size, positions, num_classes, width=width)
