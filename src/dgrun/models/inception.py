"""Small Inception of Zhang et al. 2017 (their Fig. 3, after Szegedy et al. 2016).

Conv module = conv -> BN -> ReLU; Inception(c1, c3) concatenates a 1x1 and a 3x3 conv module;
Downsample(c3) concatenates a stride-2 3x3 conv module with a stride-2 3x3 max pool. On 28x28x3
input with 10 classes it has exactly 1,649,402 parameters (Table 1), with or without BN: the
paper's BN learns only a shift (TensorFlow's default batch_norm, scale off, eps 1e-3), which
replaces the conv bias one for one.
"""
from __future__ import annotations

import torch
from torch import nn

from dgrun.models import MODELS


class Shift(nn.Module):
    """Learned per-channel offset: the beta of a scale-free batch norm."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return x + self.bias.view(1, -1, 1, 1)


def conv_module(c_in: int, c_out: int, kernel: int, stride: int = 1, bn: bool = True) -> nn.Module:
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=not bn)
    if not bn:
        return nn.Sequential(conv, nn.ReLU())
    # affine=False + Shift, not a standard BN: a learned scale would add parameters the paper lacks.
    return nn.Sequential(conv, nn.BatchNorm2d(c_out, eps=1e-3, affine=False), Shift(c_out),
                         nn.ReLU())


class InceptionBlock(nn.Module):
    def __init__(self, c_in: int, c1: int, c3: int, bn: bool):
        super().__init__()
        self.b1 = conv_module(c_in, c1, 1, bn=bn)
        self.b3 = conv_module(c_in, c3, 3, bn=bn)
        self.out_channels = c1 + c3

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x)], dim=1)


class Downsample(nn.Module):
    def __init__(self, c_in: int, c3: int, bn: bool):
        super().__init__()
        self.conv = conv_module(c_in, c3, 3, stride=2, bn=bn)
        # Padding 1 on both branches gives ceil(H/2) for odd and even H alike, so they concat.
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.out_channels = c3 + c_in

    def forward(self, x):
        return torch.cat([self.conv(x), self.pool(x)], dim=1)


class Inception(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, bn: bool = True):
        super().__init__()
        layers: list[nn.Module] = [conv_module(in_channels, 96, 3, bn=bn)]
        c = 96
        plan = [("inc", 32, 32), ("inc", 32, 48), ("down", 80),
                ("inc", 112, 48), ("inc", 96, 64), ("inc", 80, 80), ("inc", 48, 96),
                ("down", 96), ("inc", 176, 160), ("inc", 176, 160)]
        for kind, *widths in plan:
            make = InceptionBlock if kind == "inc" else Downsample
            block = make(c, *widths, bn=bn)
            layers.append(block)
            c = block.out_channels
        self.features = nn.Sequential(*layers)
        # Adaptive pooling is the paper's 7x7 mean pool at 28x28 and still works at other sizes.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@MODELS.register("inception", modalities=("image",))
def inception(input_shape, num_classes, bn: bool = True):
    return Inception(input_shape[0], num_classes, bn=bool(bn))
