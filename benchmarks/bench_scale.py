"""Scale: the fast region mode of ``explain_slide`` against the paper's tile mode (one run).

(The cohort / Ray and distributed-fit parts of this benchmark are not written yet.)

Slide: the real Aperio slide ``tests/data/cmu_small_region.svs`` read whole and written as a
2 x 2 mosaic (4440 x 5934 px, level 0 = 0.499 um/px; ``--small``: the slide itself,
2220 x 2967) with ``write_pyramid`` into ``bench_out/scale/``. Model: EfficientNet-Lite0 with
its ImageNet weights, layer ``head_relu`` (post-ReLU6, 1280 channels, 32 px cells), inputs
normalised with ``zoo.normalize``; K = 6 concepts fitted once (untimed) on the tile-mode
tiles. Timed, wall clock, same process, level 0, Otsu tissue mask:

* tile mode: 512 px tiles every 256 px, ``min_tissue=0.25``, border 2 cells, batch 8;
* region mode: regions of ``R`` px (R = 1024 and 2048) plus 64 px of context per side
  (2 cells), regions with any tissue, batch 1.

Agreement, on the cells that both modes cover and that are tissue: the share with the same
argmax concept, and the Pearson correlation of each concept's intensities (mean over
concepts). Target: region mode >= 2.5x faster on CPU; tile mode stays the default because
the paper's analyses assume it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from _activations import machine_header

from captum_nmf import NMFConceptAttribution, zoo
from captum_nmf.wsi import Slide, SlideTiles, explain_slide, write_pyramid

ROOT = Path(__file__).resolve().parents[1]


def agreement(a: object, b: object) -> tuple[float, float, int]:
    both = a.tissue_mask & b.tissue_mask  # type: ignore[attr-defined]
    same = float((a.assignment[both] == b.assignment[both]).mean())  # type: ignore[attr-defined]
    corrs = [
        float(np.corrcoef(a.concept_maps[k][both], b.concept_maps[k][both])[0, 1])  # type: ignore[attr-defined]
        for k in range(a.concept_maps.shape[0])  # type: ignore[attr-defined]
    ]
    return same, float(np.nanmean(corrs)), int(both.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()
    machine_header("bench_scale: region mode vs tile mode", torch.device("cpu"))
    out = ROOT / "bench_out" / "scale"
    out.mkdir(parents=True, exist_ok=True)
    with Slide(ROOT / "tests" / "data" / "cmu_small_region.svs") as slide:
        pixels = slide.read_region((0, 0), 0, slide.dimensions)
        mpp = float(slide.mpp or 0.5)
    if not args.small:
        pixels = np.concatenate([np.concatenate([pixels, pixels], 1)] * 2, 0)
    path = write_pyramid(pixels, out / "slide.svs", mpp=mpp)
    print(f"# slide {pixels.shape[1]} x {pixels.shape[0]} px from cmu_small_region.svs")
    model = zoo.efficientnet_lite0()
    attr = NMFConceptAttribution(model, model.head_relu, 6, random_state=0)
    tiles = SlideTiles(path, tile_size=512, stride=256, transform=zoo.normalize)
    attr.fit(tiles, batch_size=8, max_locations_per_batch=4096, progress=False)
    common = {"transform": zoo.normalize, "progress": False}
    runs = {}
    t = time.perf_counter()
    runs["tile 512/256"] = explain_slide(
        attr, path, tile_size=512, stride=256, batch_size=8, **common
    )
    times = {"tile 512/256": time.perf_counter() - t}
    for size in (1024, 2048):
        name = f"region {size}+2x64"
        t = time.perf_counter()
        runs[name] = explain_slide(
            attr, path, mode="region", region_size=size, region_margin=64, batch_size=1, **common
        )
        times[name] = time.perf_counter() - t
    base = "tile 512/256"
    print(
        "\n| mode | forward units | pixels through the net | time (s) | speed-up | same argmax "
        "| mean corr. | cells compared |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, ex in runs.items():
        side = int(ex.config["tile_size"])
        px = len(ex.tile_locations) * side * side / 1e6
        if name == base:
            units = len(ex.tile_locations)
            print(f"| {name} | {units} | {px:.1f} M | {times[name]:.1f} | 1.00 | - | - | - |")
            continue
        same, corr, n = agreement(runs[base], ex)
        print(
            f"| {name} | {len(ex.tile_locations)} | {px:.1f} M | {times[name]:.1f} | "
            f"{times[base] / times[name]:.2f} | {same:.3f} | {corr:.3f} | {n} |"
        )


if __name__ == "__main__":
    main()
