"""Small AlexNet of Zhang et al. 2017 (their CIFAR10 variant of Krizhevsky et al. 2012).

Two 5x5x64 conv layers, each with ReLU, 3x3 stride-2 max pooling and local response
normalization, then fully connected layers 384 -> 192 -> classes. On 28x28x3 input with 10
classes it has exactly 1,387,786 parameters (Table 1 of the paper).
"""
from __future__ import annotations

import torch
from torch import nn

from dgrun.models import MODELS


def _lrn() -> nn.Module:
    # The TensorFlow CIFAR10 tutorial settings (depth radius 4 -> window 9) that the paper used.
    return nn.LocalResponseNorm(size=9, alpha=0.001, beta=0.75, k=1.0)


class AlexNet(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, dropout: float = 0.0):
        super().__init__()
        channels = input_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(channels, 64, 5, padding=2), nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1), _lrn(),
            nn.Conv2d(64, 64, 5, padding=2), nn.ReLU(),
            _lrn(), nn.MaxPool2d(3, stride=2, padding=1),
        )
        # Size the first fc layer from a dry run so any input resolution works.
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *input_shape)).numel()
        layers: list[nn.Module] = [nn.Flatten()]
        for d_in, d_out in ((flat, 384), (384, 192)):
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(192, num_classes))
        self.classifier = nn.Sequential(*layers)

    def forward(self, x):
        return self.classifier(self.features(x))


@MODELS.register("alexnet", modalities=("image",))
def alexnet(input_shape, num_classes, dropout: float = 0.0):
    return AlexNet(tuple(input_shape), num_classes, dropout=float(dropout))
