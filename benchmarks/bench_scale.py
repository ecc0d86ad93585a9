"""Scale: fast region mode, forward options, cohorts on Ray, distributed fitting (one run).

Everything below is measured side by side in one process run, on the real Aperio slide
``tests/data/cmu_small_region.svs`` (level 0 = 0.499 um/px) with EfficientNet-Lite0 and its
ImageNet weights, layer ``head_relu`` (post-ReLU6, 1280 channels, 32 px cells), inputs
normalised with ``zoo.normalize``, K = 6 concepts. Slides are written with ``write_pyramid``
into ``bench_out/scale/`` (never committed).

Parts (``--parts`` picks some; ``--small`` shrinks every part for a quick check):

* ``regions``: ``explain_slide`` tile mode (512 px tiles every 256 px, ``min_tissue=0.25``,
  border 2, batch 8) against region mode (tissue-planned regions from roots of 1024 and 2048
  px plus 64 px of context, one per forward), on the slide written as a 2 x 2 mosaic (4440 x
  5934 px). Agreement on tissue cells both cover: share with the same argmax concept and
  the mean over concepts of the Pearson correlation of intensities. Target >= 2.5x.
* ``device``: tile mode on the slide itself (2220 x 2967 px) in float32 against
  ``channels_last`` inputs and bfloat16 autocast (CPU here; the same call runs on a GPU when
  the model is there): speed and agreement with float32.
* ``cohort``: ``explain_cohort`` on 4 slides (the slide and its mirror images, tile mode)
  with the local engine and with Ray using 1 and 2 actors (each actor gets an equal share of
  the CPUs as torch threads): slides/min and tiles/s, and the largest difference of the maps
  from the local engine's.
* ``fit``: ``NMFConceptAttribution.fit`` streaming over the cohort's tissue tiles (batch 8,
  4096 locations per batch) in one process, on 2 Ray actors, and under ``torchrun`` with 2
  ranks (gloo; each rank fits its DistributedSampler shard): time and objective
  ``||V - W H||_F^2`` with exact W on the same held-out rows (every 7th tile).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _activations import machine_header

from captum_nmf import NMFConceptAttribution, zoo
from captum_nmf.wsi import (
    SlideExplanation,
    SlideTiles,
    explain_cohort,
    explain_slide,
    write_pyramid,
)
from captum_nmf.wsi.reader import Slide

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench_out" / "scale"
CMU = ROOT / "tests" / "data" / "cmu_small_region.svs"


def agreement(a: SlideExplanation, b: SlideExplanation) -> tuple[float, float, int]:
    both = a.tissue_mask & b.tissue_mask
    same = float((a.assignment[both] == b.assignment[both]).mean())
    corrs = [
        float(np.corrcoef(a.concept_maps[k][both], b.concept_maps[k][both])[0, 1])
        for k in range(a.concept_maps.shape[0])
    ]
    return same, float(np.nanmean(corrs)), int(both.sum())


def pixels_through(ex: SlideExplanation) -> float:
    """Megapixels read and sent through the network."""
    if ex.config.get("mode") == "region":
        m, cell = 2 * int(ex.config["region_margin"]), int(ex.config["cell_px"])
        return sum((h * cell + m) * (w * cell + m) for _, _, h, w in ex.config["regions"]) / 1e6
    side = int(ex.config["tile_size"])
    return len(ex.tile_locations) * side * side / 1e6


def timed(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def slides(small: bool) -> tuple[Path, list[Path]]:
    """The mosaic (or the slide) for the region part, and 4 cohort slides."""
    OUT.mkdir(parents=True, exist_ok=True)
    with Slide(CMU) as slide:
        pixels = slide.read_region((0, 0), 0, slide.dimensions)
        mpp = float(slide.mpp or 0.5)
    if small:
        pixels = pixels[: pixels.shape[0] // 2, : pixels.shape[1] // 2]
    mosaic = pixels if small else np.concatenate([np.concatenate([pixels, pixels], 1)] * 2, 0)
    big = write_pyramid(mosaic, OUT / "mosaic.svs", mpp=mpp)
    views = [pixels, pixels[:, ::-1], pixels[::-1], pixels[::-1, ::-1]]
    cohort = [
        write_pyramid(np.ascontiguousarray(v), OUT / f"cohort_{i}.svs", mpp=mpp)
        for i, v in enumerate(views)
    ]
    print(
        f"# region/device slide {mosaic.shape[1]} x {mosaic.shape[0]} px; cohort 4 x "
        f"{pixels.shape[1]} x {pixels.shape[0]} px (cmu_small_region.svs and mirror images)"
    )
    return big, cohort


def table(header: list[str], rows: list[list[str]]) -> None:
    print("\n| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def part_regions(attr: NMFConceptAttribution, path: Path) -> None:
    common = {"transform": zoo.normalize, "progress": False}
    runs, times = {}, {}
    base = "tile 512/256"
    runs[base], times[base] = timed(
        explain_slide, attr, path, tile_size=512, stride=256, batch_size=8, **common
    )
    for size in (1024, 2048):
        name = f"region {size}+2x64"
        runs[name], times[name] = timed(
            explain_slide, attr, path, mode="region", region_size=size, region_margin=64, **common
        )
    rows = []
    for name, ex in runs.items():
        same, corr, n = agreement(runs[base], ex) if name != base else (1.0, 1.0, 0)
        rows.append(
            [
                name,
                str(len(ex.tile_locations)),
                f"{pixels_through(ex):.1f} M",
                f"{times[name]:.1f}",
                f"{times[base] / times[name]:.2f}",
                "-" if name == base else f"{same:.3f}",
                "-" if name == base else f"{corr:.3f}",
                "-" if name == base else str(n),
            ]
        )
    table(
        [
            "mode",
            "forward units",
            "pixels through the net",
            "time (s)",
            "speed-up",
            "same argmax",
            "mean corr.",
            "cells compared",
        ],
        rows,
    )


def part_device(attr: NMFConceptAttribution, path: Path) -> None:
    common = {
        "transform": zoo.normalize,
        "progress": False,
        "tile_size": 512,
        "stride": 256,
        "batch_size": 8,
    }
    variants = {
        "float32": {},
        "channels_last": {"channels_last": True},
        "bfloat16 autocast": {"autocast": torch.bfloat16},
        "bfloat16 + channels_last": {"autocast": torch.bfloat16, "channels_last": True},
    }
    runs, times = {}, {}
    for name, extra in variants.items():
        runs[name], times[name] = timed(explain_slide, attr, path, **common, **extra)
    rows = []
    for name, ex in runs.items():
        same, corr, _ = agreement(runs["float32"], ex)
        diff = float(np.nanmax(np.abs(ex.concept_maps - runs["float32"].concept_maps)))
        rows.append(
            [
                name,
                f"{times[name]:.1f}",
                f"{times['float32'] / times[name]:.2f}",
                f"{same:.3f}",
                f"{corr:.4f}",
                f"{diff:.2e}",
            ]
        )
    table(["forward", "time (s)", "speed-up", "same argmax", "mean corr.", "max abs diff"], rows)


def part_cohort(attr: NMFConceptAttribution, paths: list[Path]) -> None:
    common = {"transform": zoo.normalize, "tile_size": 512, "stride": 256, "batch_size": 8}
    results = {}
    for name, extra in {
        "local": {},
        "ray, 1 actor": {"engine": "ray", "workers": 1},
        "ray, 2 actors": {"engine": "ray", "workers": 2},
    }.items():
        out = OUT / "cohort" / name.replace(", ", "_").replace(" ", "")
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        result = explain_cohort(attr, paths, out, progress=False, **common, **extra)
        results[name] = (result, time.perf_counter() - t, out)
    ref_out = results["local"][2]
    rows = []
    for name, (result, wall, out) in results.items():
        tiles = sum(r.n_tiles for r in result.records)
        diff = max(
            float(
                np.nanmax(
                    np.abs(
                        SlideExplanation.load(out / p.stem).concept_maps
                        - SlideExplanation.load(ref_out / p.stem).concept_maps
                    )
                )
            )
            for p in paths
        )
        rows.append(
            [
                name,
                f"{result.counts()['done']}/{len(paths)}",
                str(tiles),
                f"{wall:.1f}",
                f"{len(paths) / wall * 60:.2f}",
                f"{tiles / wall:.2f}",
                f"{results['local'][1] / wall:.2f}",
                f"{diff:.1e}",
            ]
        )
    table(
        [
            "engine",
            "slides done",
            "tiles",
            "wall (s, incl. start-up)",
            "slides/min",
            "tiles/s",
            "vs local",
            "max diff vs local",
        ],
        rows,
    )


def _objective(attr: NMFConceptAttribution, rows: torch.Tensor) -> float:
    w = attr.nmf_.transform(rows)
    return float(((rows - w @ attr.concepts_) ** 2).sum())


def part_fit(paths: list[Path], small: bool) -> None:
    tiles = SlideTiles(paths, tile_size=512, stride=256, transform=zoo.normalize)
    model = zoo.efficientnet_lite0()
    held = [tiles[i][0] for i in range(0, len(tiles), 7)]
    with torch.no_grad():
        feats = model.features(torch.stack(held))  # type: ignore[operator]
    rows = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).contiguous()
    fit_args = {"batch_size": 8, "max_locations_per_batch": 4096, "progress": False}
    runs = {}
    attr = NMFConceptAttribution(model, model.head_relu, 6, random_state=0)
    _, runs["1 process (stream)"] = timed(attr.fit, tiles, **fit_args)
    objectives = {"1 process (stream)": _objective(attr, rows)}
    ray_attr = NMFConceptAttribution(model, model.head_relu, 6, random_state=0)
    _, runs["ray, 2 actors"] = timed(ray_attr.fit, tiles, engine="ray", workers=2, **fit_args)
    objectives["ray, 2 actors"] = _objective(ray_attr, rows)
    out = OUT / "torchrun_concepts.safetensors"
    out.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(Path(__file__).with_name("_dist_fit.py")),
        str(out),
        *map(str, paths),
    ]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    runs["torchrun, 2 ranks (gloo)"] = time.perf_counter() - t
    loaded = NMFConceptAttribution.load(out, model, model.head_relu)
    objectives["torchrun, 2 ranks (gloo)"] = _objective(loaded, rows)
    base = objectives["1 process (stream)"]
    table(
        ["fit", "time (s, incl. start-up)", "objective on held-out rows", "vs 1 process"],
        [
            [name, f"{runs[name]:.1f}", f"{objectives[name]:.4e}", f"{objectives[name] / base:.4f}"]
            for name in runs
        ],
    )
    print(f"# {len(tiles)} tiles streamed, {rows.shape[0]} held-out rows from {len(held)} tiles")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a quick check on less data")
    parser.add_argument(
        "--parts", nargs="+", default=["regions", "device", "cohort", "fit"], help="parts to run"
    )
    args = parser.parse_args()
    machine_header("bench_scale", torch.device("cpu"))
    big, cohort = slides(args.small)
    model = zoo.efficientnet_lite0()
    attr = NMFConceptAttribution(model, model.head_relu, 6, random_state=0)
    tiles = SlideTiles(cohort, tile_size=512, stride=256, transform=zoo.normalize)
    attr.fit(tiles, batch_size=8, max_locations_per_batch=4096, progress=False)  # untimed
    if "regions" in args.parts:
        print("\n## fast region mode vs tile mode")
        part_regions(attr, big)
    if "device" in args.parts:
        print("\n## forward options (tile mode)")
        part_device(attr, cohort[0])
    if "cohort" in args.parts:
        print("\n## cohort engines")
        part_cohort(attr, cohort)
    if "fit" in args.parts:
        print("\n## distributed fitting")
        part_fit(cohort, args.small)


if __name__ == "__main__":
    main()
