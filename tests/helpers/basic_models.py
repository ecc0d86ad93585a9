"""Tiny models with hand-set weights whose activations are known exactly (Captum style)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

# Three planted concept vectors over C = 5 channels (non-negative, linearly independent).
PLANTED_CONCEPTS = torch.tensor(
    [
        [1.0, 0.0, 0.0, 2.0, 0.0],
        [0.0, 3.0, 0.0, 0.0, 1.0],
        [0.0, 0.0, 2.0, 1.0, 1.0],
    ]
)


class PlantedConceptNet(nn.Module):
    """Input: N x K x h x w non-negative concept maps M. ``relu`` outputs exactly M . H.

    ``conv`` is a 1 x 1 convolution whose weight is ``H^T`` (no bias), so the
    post-ReLU activation at every location is the row vector ``m H``: an exact
    non-negative rank-K product with known factors.
    """

    def __init__(self, concepts: Tensor = PLANTED_CONCEPTS) -> None:
        super().__init__()
        k, c = concepts.shape
        self.conv = nn.Conv2d(k, c, kernel_size=1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(concepts.T.reshape(c, k, 1, 1))
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.5)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.arange(2 * c, dtype=torch.float32).reshape(2, c) / 10)
            self.fc.bias.zero_()
        self.unused = nn.ReLU()  # part of the model, never called in forward

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.dropout(self.relu(self.conv(x)))), 1))


class SignedNet(nn.Module):
    """A convolution without ReLU: its output has negative values."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(
                torch.tensor([1.0, -1.0, 0.5, 0.5, -2.0, 1.0]).reshape(3, 2, 1, 1)
            )
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.conv(x)).sum(dim=(1, 2, 3))


class NonFiniteNet(nn.Module):
    """Produces NaN (or Inf) at location (0, 0) of every map of item 1."""

    def __init__(self, value: float = float("nan")) -> None:
        super().__init__()
        self.value = value
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        y = x.clone()
        if y.shape[0] > 1:
            y[1, :, 0, 0] = self.value
        return self.relu(y).sum()


class LinearNet(nn.Module):
    """A layer whose output is N x C (not N x C x H x W)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.fc(x.flatten(1)[:, :4]))


class TupleLayer(nn.Module):
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, x


class TupleNet(nn.Module):
    """A layer that returns a tuple of two tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.pair = TupleLayer()

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.pair(x)
        return (a + b).sum()


class TokenNet(nn.Module):
    """A ViT-like layer: N x (h*w) x C tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.flatten(2).transpose(1, 2)  # N x hw x C
        return self.relu(tokens).sum()


class FailingNet(nn.Module):
    """Raises inside forward after the hooked layer ran."""

    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        self.relu(x)
        raise RuntimeError("boom in forward")


def planted_maps(n: int, h: int, w: int, k: int = 3, *, seed: int = 0) -> Tensor:
    """Sparse non-negative concept maps: each location has one dominant concept and
    most have no other, so the factorisation is unique (a separable NMF problem)."""
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(n, k, h, w, generator=g) * 0.2
    maps *= torch.rand(n, k, h, w, generator=g) < 0.3
    winner = torch.randint(0, k, (n, h, w), generator=g)
    maps.scatter_add_(1, winner.unsqueeze(1), 1.0 + torch.rand(n, 1, h, w, generator=g))
    return maps


def hooks_left(model: nn.Module) -> int:
    """Number of forward / pre-forward / backward hooks on any module of ``model``."""
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def training_flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}
