"""Distributed-fit helpers: a tiny fixed model and data, and a ``torchrun`` entry point.

Run as ``python -m torch.distributed.run --nproc_per_node 2 --standalone
tests/helpers/dist_fit_script.py OUT_DIR``: every rank fits
``NMFConceptAttribution`` on its ``DistributedSampler`` shard (gloo backend)
and saves its concepts to ``OUT_DIR/rank<r>.pt``. The tests import
:func:`tiny_net` and :func:`images` to fit the same problem in one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

N_IMAGES = 64
BATCH = 4
K = 4


class TinyNet(nn.Module):
    """Two seeded convolutions with ReLUs, pooled to two logits; counts its forward calls."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(12, 16, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.head = nn.Linear(16, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        f = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.head(f.mean(dim=(2, 3)))


def tiny_net() -> TinyNet:
    return TinyNet()


def images(n: int = N_IMAGES, size: int = 12) -> torch.Tensor:
    """``n`` seeded images with smooth structure (a few blobs each), 3 x size x size."""
    g = torch.Generator().manual_seed(1)
    low = torch.rand(n, 3, 3, 3, generator=g) ** 2
    x = nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return x + 0.05 * torch.rand(n, 3, size, size, generator=g)


def main(out: Path) -> None:
    import torch.distributed as dist
    from torch.utils.data.distributed import DistributedSampler

    from captum_nmf import NMFConceptAttribution

    dist.init_process_group("gloo")
    try:
        torch.set_num_threads(1)
        dataset = TensorDataset(images())
        sampler = DistributedSampler(dataset, shuffle=False)
        loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler)
        net = tiny_net()
        attr = NMFConceptAttribution(net, net.relu2, n_concepts=K, random_state=0)
        attr.fit(loader, progress=False)
        torch.save(
            {
                "concepts": attr.concepts_,
                "n_samples_seen": attr.n_samples_seen_,
                "calls": net.calls,
                "world": dist.get_world_size(),
            },
            out / f"rank{dist.get_rank()}.pt",
        )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
