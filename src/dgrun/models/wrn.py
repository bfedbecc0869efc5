"""Wide residual network of Zagoruyko & Komodakis 2016 (pre-activation basic blocks).

WRN-d-k: a 3x3 conv to 16 channels, three groups of (d-4)/6 BN-ReLU-conv blocks with widths
16k, 32k, 64k and strides 1, 2, 2, a final BN-ReLU, global average pooling and a linear layer.
The default WRN-16-3 stands in for the ~1.5M-parameter nets of Zhang et al. 2017: on 32x32x3 (or
28x28x3) input with 10 classes it has exactly 1,549,530 parameters (WRN-10-4: 1,198,810;
WRN-16-4: 2,748,890).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dgrun.errors import UserError
from dgrun.models import MODELS


class WideBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        # A projection shortcut takes the pre-activated input, as in the reference implementation.
        skip = x if self.shortcut is None else self.shortcut(o)
        o = self.conv1(o)
        o = F.relu(self.bn2(o))
        if self.dropout > 0:
            o = F.dropout(o, p=self.dropout, training=self.training)
        return self.conv2(o) + skip


class WideResNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, depth: int = 16, width: int = 3,
                 dropout: float = 0.0):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.conv = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        c = 16
        for w, stride in zip(widths, (1, 2, 2)):
            for i in range(n):
                blocks.append(WideBlock(c, w, stride if i == 0 else 1, dropout))
                c = w
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        o = F.relu(self.bn(self.blocks(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(o, 1), 1))


@MODELS.register("wrn", modalities=("image",))
def wrn(input_shape, num_classes, depth: int = 16, width: int = 3, dropout: float = 0.0):
    depth = int(depth)
    if depth < 10 or (depth - 4) % 6 != 0:
        raise UserError(f"wrn depth must be 6n+4 (10, 16, 22, 28...), got {depth}",
                        "set model.depth to one of those")
    return WideResNet(input_shape[0], num_classes, depth=depth, width=int(width),
                      dropout=float(dropout))
