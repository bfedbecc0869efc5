"""Fully connected nets of Zhang et al. 2017: MLP 1x512 and 3x512 (ReLU, biases).

On 28x28x3 input they have exactly 1,209,866 and 1,735,178 parameters (Table 1).
"""
from __future__ import annotations

import math

from torch import nn

from dgrun.models import MODELS


class MLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int, width: int = 512, depth: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        d = in_features
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = width
        layers.append(nn.Linear(d, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


@MODELS.register("mlp", modalities=("image", "vector"))
def mlp(input_shape, num_classes, width: int = 512, depth: int = 1, dropout: float = 0.0):
    return MLP(math.prod(input_shape), num_classes, width=int(width), depth=int(depth),
               dropout=float(dropout))


@MODELS.register("mlp1", modalities=("image", "vector"))
def mlp1(input_shape, num_classes, width: int = 512, dropout: float = 0.0):
    return mlp(input_shape, num_classes, width=width, depth=1, dropout=dropout)


@MODELS.register("mlp3", modalities=("image", "vector"))
def mlp3(input_shape, num_classes, width: int = 512, dropout: float = 0.0):
    return mlp(input_shape, num_classes, width=width, depth=3, dropout=dropout)
