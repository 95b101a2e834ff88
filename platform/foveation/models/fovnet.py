"""The foveation net F (docs/method.md#foveation-net)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FoveationNet(nn.Module):
    """Conv(3->W) BN ReLU6, Conv(W->W) BN ReLU6, Conv(W->D) BN, softmax over D; W = 8D by default.

    The convs are *valid* (no padding): on a 7x7 x_r neighbourhood it returns the 1x1 weights
    of the centre, and on the whole x_r zero-padded by 3 (``patches.pad_xr``) it returns the
    weights of every location, and the two agree exactly. (Padded convs would not: a layer's
    zero padding is not what the previous layer outputs beyond the image.)
    """

    def __init__(self, depth: int, width: int | None = None) -> None:
        super().__init__()
        width = width or 8 * depth
        self.depth = depth
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU6(inplace=True),
            nn.Conv2d(width, width, 3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU6(inplace=True),
            nn.Conv2d(width, depth, 3, bias=False),
            nn.BatchNorm2d(depth),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.constant_(m.bias, 1e-4)

    def forward(self, xr: Tensor) -> Tensor:
        """Softmax weights [B, D, h - 6, w - 6] of a (padded) x_r [B, 3, h, w]."""
        return torch.softmax(self.body(xr), dim=1)
