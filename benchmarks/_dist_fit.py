"""Run by ``torchrun --nproc_per_node 2`` from bench_scale.py: fit concepts on a rank's shard.

Usage: ``_dist_fit.py OUT.safetensors SLIDE [SLIDE ...]``; every rank streams its
``DistributedSampler`` shard of the slides' tissue tiles through EfficientNet-Lite0 and the
statistics are all-reduced each step (``NMFConceptAttribution.fit`` does this automatically
inside a process group); rank 0 saves the concepts.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from captum_nmf import NMFConceptAttribution, zoo
from captum_nmf.wsi import SlideTiles


def main() -> None:
    out, *paths = sys.argv[1:]
    dist.init_process_group("gloo")
    torch.set_num_threads(max(1, (torch.get_num_threads() or 1) // dist.get_world_size()))
    tiles = SlideTiles(paths, tile_size=512, stride=256, transform=zoo.normalize)
    sampler = DistributedSampler(tiles, shuffle=False)
    loader = DataLoader(tiles, batch_size=8, sampler=sampler, collate_fn=tiles.collate_fn)
    model = zoo.efficientnet_lite0()
    attr = NMFConceptAttribution(model, model.head_relu, 6, random_state=0)
    attr.fit(loader, max_locations_per_batch=4096, progress=False)
    if dist.get_rank() == 0:
        attr.save(out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
