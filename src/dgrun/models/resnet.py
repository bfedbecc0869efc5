"""CIFAR ResNet-18 (He et al. 2016, in the common CIFAR form of Kuang Liu's pytorch-cifar).

A 3x3 stem conv (no max pool), four stages of two post-activation basic blocks with widths
w, 2w, 4w, 8w and strides 1, 2, 2, 2, global average pooling and a linear layer. With the default
base width 64 and 10 classes it has exactly 11,173,962 parameters at any input size.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dgrun.models import MODELS


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        o = F.relu(self.bn1(self.conv1(x)))
        o = self.bn2(self.conv2(o))
        return F.relu(o + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 64):
        super().__init__()
        # No stem max pool: at 32x32 (and 8x8 digits) the input is already small.
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        blocks: list[nn.Module] = []
        c = width
        for mult, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
            w = width * mult
            blocks += [BasicBlock(c, w, stride), BasicBlock(w, w, 1)]
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        o = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(o, 1), 1))


@MODELS.register("resnet18", modalities=("image",))
def resnet18(input_shape, num_classes, width: int = 64):
    return ResNet18(input_shape[0], num_classes, width=int(width))
