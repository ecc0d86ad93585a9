"""Tiny fixed-weight networks whose features are known functions of local pixel content."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PoolNet(nn.Module):
    """Average-pool "network": 8 x 8 px cells, then a 3 x 3 convolution with non-negative weights.

    ``relu`` outputs 4 channels per 8 px cell that depend only on the cell and
    its 8 neighbours, so away from a tile's outer cell a tile's features equal
    the features of the whole image at the same place (the conv's zero
    padding only reaches the outermost ring of cells). ``forward`` returns
    two scores per image (mean of channels 0-1 and 2-3).
    """

    cell = 8

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(self.cell)
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.conv.weight.copy_(torch.rand(4, 3, 3, 3, generator=gen))
        self.relu = nn.ReLU()

    def features(self, x: Tensor) -> Tensor:
        return self.relu(self.conv(self.pool(x)))

    def forward(self, x: Tensor) -> Tensor:
        f = self.features(x).mean(dim=(2, 3))
        return torch.stack([f[:, :2].mean(1), f[:, 2:].mean(1)], dim=1)


def halve(x: Tensor) -> Tensor:
    """A module-level (picklable, nameable) tile transform."""
    return x * 0.5
