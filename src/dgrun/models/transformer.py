"""A small decoder-only transformer for token tasks (grokking on modular arithmetic).

Tokens -> token embedding + learned positional embedding -> n_layers blocks of causal
multi-head attention and a ReLU MLP, each added to the residual stream (pre-LayerNorm when
`layernorm` is on) -> the last position's residual -> an unembedding to the classes.

Presets: Nanda et al. 2023 (`transformer_nanda`: 1 layer, d_model 128, 4 heads, d_mlp 512, no
LayerNorm) and Power et al. 2022 (`transformer_power`: 2 layers, width 128, 4 heads, d_mlp 512).
openai/grok's own model differs in details kept uniform here: post-LayerNorm, sinusoidal
positions, no biases, PyTorch's default initialization.

Attention is computed explicitly (the sequences are a few tokens long), so the patterns the
model uses are the ones `attention_maps` returns. Weights follow Nanda et al.'s initialization:
N(0, 1/d_model) for every matrix, N(0, 1/num_classes) for the unembedding, zero biases.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dgrun.errors import UserError
from dgrun.models import MODELS


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, max_len: int):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.register_buffer("causal", torch.ones(max_len, max_len).tril().bool(),
                             persistent=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns the attention output (B, T, d_model) and the pattern (B, heads, T, T)."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.d_head)
        pattern = scores.masked_fill(~self.causal[:t, :t], float("-inf")).softmax(dim=-1)
        mixed = (pattern @ v).transpose(1, 2).reshape(b, t, d)
        return self.out(mixed), pattern


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_mlp: int, layernorm: bool, max_len: int):
        super().__init__()
        norm = (lambda: nn.LayerNorm(d_model)) if layernorm else nn.Identity
        self.ln_attn, self.ln_mlp = norm(), norm()
        self.attn = CausalSelfAttention(d_model, n_heads, max_len)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_mlp), nn.ReLU(), nn.Linear(d_mlp, d_model))

    def forward(self, x: Tensor, last_only: bool = False) -> tuple[Tensor, Tensor]:
        """last_only: return the residual stream of the last position only (B, 1, d_model)."""
        attended, pattern = self.attn(self.ln_attn(x))
        x = x + attended
        if last_only:
            x = x[:, -1:]
        return x + self.mlp(self.ln_mlp(x)), pattern


class Transformer(nn.Module):
    """Decoder-only transformer over (B, T) int64 tokens, predicting from the last position.

    `token_embedding` (nn.Embedding, vocab_size x d_model) is public for analyses such as the
    Fourier view of a modular-arithmetic embedding.
    """

    def __init__(self, vocab_size: int, max_len: int, num_classes: int, n_layers: int = 1,
                 d_model: int = 128, n_heads: int = 4, d_mlp: int = 512, layernorm: bool = False):
        super().__init__()
        self.max_len = max_len
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.pos_embedding = nn.Parameter(torch.empty(max_len, d_model))
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_mlp, layernorm, max_len)
                                    for _ in range(n_layers))
        self.ln_final = nn.LayerNorm(d_model) if layernorm else nn.Identity()
        self.unembed = nn.Linear(d_model, num_classes, bias=False)
        self._init_weights(d_model, num_classes)

    def _init_weights(self, d_model: int, num_classes: int) -> None:
        for name, p in self.named_parameters():
            if name.startswith("unembed"):
                nn.init.normal_(p, std=1 / math.sqrt(num_classes))
            elif "ln_" in name:
                continue  # LayerNorm keeps its identity init
            elif p.dim() >= 2:
                nn.init.normal_(p, std=1 / math.sqrt(d_model))
            else:
                nn.init.zeros_(p)

    def _run(self, x: Tensor, last_only: bool = True) -> tuple[Tensor, list[Tensor]]:
        t = x.shape[1]
        if t > self.max_len:
            raise ValueError(f"sequences of {t} tokens, but the model was built for {self.max_len}")
        h = self.token_embedding(x) + self.pos_embedding[:t]
        patterns = []
        for i, block in enumerate(self.blocks):
            # Only the last position is read out, so the last block's MLP (most of the compute)
            # runs on that position alone: same logits, ~1.4x faster for Nanda's model on a CPU.
            h, pattern = block(h, last_only=last_only and i == len(self.blocks) - 1)
            patterns.append(pattern)
        return self.unembed(self.ln_final(h[:, -1])), patterns

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x)[0]

    def attention_maps(self, x: Tensor) -> Tensor:
        """Attention patterns (layers, batch, heads, T, T); each row sums to 1 over the
        positions it may attend to (itself and earlier ones)."""
        return torch.stack(self._run(x)[1])


def _check_tokens(name: str, input_shape, vocab_size) -> None:
    if vocab_size is None or len(input_shape) != 1:
        raise UserError(f"model '{name}' needs token sequences with a vocabulary, got input "
                        f"shape {tuple(input_shape)}", "pick a tokens dataset, e.g. "
                        "dataset=modular")


@MODELS.register("transformer", modalities=("tokens",))
def transformer(input_shape, num_classes, *, vocab_size=None, n_layers: int = 1,
                d_model: int = 128, n_heads: int = 4, d_mlp: int = 512, layernorm: bool = False):
    _check_tokens("transformer", input_shape, vocab_size)
    if n_layers < 1 or d_model < 1 or d_mlp < 1 or n_heads < 1:
        raise UserError("model.n_layers, d_model, n_heads and d_mlp must be positive",
                        "e.g. model.n_layers=1 model.d_model=128 model.n_heads=4 model.d_mlp=512")
    if d_model % n_heads:
        raise UserError(f"model.d_model={d_model} is not divisible by model.n_heads={n_heads}",
                        "pick n_heads dividing d_model, e.g. d_model=128 n_heads=4")
    return Transformer(vocab_size, input_shape[0], num_classes, n_layers=n_layers,
                       d_model=d_model, n_heads=n_heads, d_mlp=d_mlp, layernorm=layernorm)


@MODELS.register("transformer_nanda", modalities=("tokens",))
def transformer_nanda(input_shape, num_classes, *, vocab_size=None):
    """Nanda et al. 2023: 1 layer, d_model 128, 4 heads, d_mlp 512, no LayerNorm."""
    return transformer(input_shape, num_classes, vocab_size=vocab_size, n_layers=1, d_model=128,
                       n_heads=4, d_mlp=512, layernorm=False)


@MODELS.register("transformer_power", modalities=("tokens",))
def transformer_power(input_shape, num_classes, *, vocab_size=None):
    """Power et al. 2022: 2 layers, width 128, 4 heads (d_mlp 4 x 128), LayerNorm."""
    return transformer(input_shape, num_classes, vocab_size=vocab_size, n_layers=2, d_model=128,
                       n_heads=4, d_mlp=512, layernorm=True)
