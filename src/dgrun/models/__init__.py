"""Model registry. Every builder takes the data's shape as plain arguments:

    builder(input_shape: tuple[int, ...], num_classes: int, **options) -> nn.Module

and registers the modalities it accepts, so a mismatched model/dataset pair fails before
training with a message instead of a shape error mid-forward.
"""
from __future__ import annotations

from torch import nn

from dgrun.errors import UserError
from dgrun.registry import Registry

MODELS = Registry("model")


def check_takes(name: str, modality: str, source: str = "") -> None:
    """Fail with the models that can take `modality` data if `name` cannot."""
    if modality not in MODELS.tags(name).get("modalities", ("image", "vector")):
        takers = [n for n in MODELS.names()
                  if modality in MODELS.tags(n).get("modalities", ("image", "vector"))]
        raise UserError(f"model '{name}' cannot take {modality} data{source}",
                        f"pick one of: {', '.join(takers) or 'none registered'}")


def create(name: str, input_shape: tuple[int, ...], num_classes: int, modality: str,
           vocab_size: int | None = None, **options) -> nn.Module:
    check_takes(name, modality)
    if modality == "tokens":
        options["vocab_size"] = vocab_size
    return MODELS.build(name, tuple(input_shape), num_classes, **options)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Importing the modules registers their builders.
from dgrun.models import mlp  # noqa: E402,F401
from dgrun.models import alexnet, inception, resnet, wrn  # noqa: E402,F401
from dgrun.models import token_mlp, transformer  # noqa: E402,F401
