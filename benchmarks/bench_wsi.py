"""Whole-slide runs: ``explain_slide`` throughput against the bare forward pass, and peak RSS.

Slides (rewritten on every run into ``bench_out/wsi/``, never into the repository): the real
Aperio slide ``tests/data/cmu_small_region.svs`` (2220 x 2967 px, 0.499 um/px, one level) is
read whole at level 0 with ``Slide.read_region`` and written with ``write_pyramid(image, path,
mpp=<the slide's mpp>)`` (defaults: 256 px zlib TIFF tiles, each level half the previous one
until the short side is below 512 px: 2220 x 2967, 1110 x 1483, 555 x 741, 277 x 370) as
``cmu_pyramid.svs``. A 2 x 2 mosaic of the same level-0 image (4440 x 5934 px, 4x the area) is
written the same way as ``cmu_mosaic_2x2.svs``.

Part A, throughput. Two configurations; for each, everything below runs in the same process,
on ``cmu_pyramid.svs``, on the same tiles and with the same batch size B:

(1) the paper's geometry: torchvision VGG16 with random weights (``vgg16(weights=None)`` after
    ``torch.manual_seed(0)``), layer ``features[29]`` (the last post-ReLU, 512 x 32 x 32 per
    tile), 512 px tiles, stride 256, pyramid level 1 (~1 um/px, i.e. 10x), B = 4;
(2) EfficientNet-Lite0 with ImageNet weights (``captum_nmf.zoo.efficientnet_lite0``), layer
    ``head_relu`` (post-ReLU6, 1280 x 16 x 16 per tile), 512 px tiles, stride 256, level 0
    (0.5 um/px), B = 8: ~5x more tiles and a cheaper forward per tile, so reading, stitching
    and NNLS weigh more.

Tiles: the ones ``SlideTiles`` and ``explain_slide`` keep with their defaults (Otsu tissue mask,
``min_tissue=0.25``, ``edge="pad"``), RGB in [0, 1] normalised by ``zoo.normalize`` (passed as
``transform`` to both). Concepts: ``NMFConceptAttribution(model, layer, 6, random_state=0)``
fitted once beforehand, not timed, with ``attr.fit(SlideTiles(...), batch_size=B,
max_locations_per_batch=4096, progress=False)`` on those same tiles.

Timed, wall clock (``sync`` on CUDA), torch threads left at default:

* forward-only: all tiles are first read through the same ``SlideTiles`` (same transform) into
  one N x 3 x T x T tensor on the device (not timed); then the model *up to the layer* runs
  over consecutive batches of B under ``torch.no_grad()``: ``vgg.features[:30]`` for VGG16
  (that slice ends with ``features[29]``) and ``model.features(x)`` for Lite0 (the wrapper's
  method, which returns ``head_relu``'s output and stops there). No hook, no classifier head.
* ``explain_slide(attr, slide, tile_size, stride, level, batch_size=B, num_workers=w,
  transform=zoo.normalize, progress=False)`` for w = 0 and w = 1, in memory (no ``out_dir``):
  tissue detection, tile grid, reading and decoding, the model forward, capture of the layer,
  stitching and the NNLS solve per finished row of cells. Note that ``explain_slide`` runs the
  *whole* model (it keeps each tile's output), so its time also includes the classifier head
  (VGG16's three linear layers, Lite0's pool + linear): a small cost that the ratio charges to
  ``explain_slide``.

Warm-up: one batch through ``attr.features(x, return_output=True)`` (the full model with the
layer captured, same shapes as both timed paths). Then ``--repeats`` (VGG16) or
``--lite-repeats`` (Lite0) rounds; in each round the three methods run one after the other,
the order rotated every round; the median per method is reported. Columns: tiles/s = tiles /
wall time, and ratio = explain_slide tiles/s / forward-only tiles/s (target >= 0.85).

Part B, peak RSS. For each slide (``cmu_pyramid.svs`` and the 4x-area mosaic) a fresh Python
process (this script with ``--rss-child``) loads Lite0, binds the concepts that part A (2) saved
(``attr.save`` -> ``NMFConceptAttribution.load(path, model, model.head_relu)``), and runs
``explain_slide`` at level 0, 512 / 256, B = 8, ``num_workers=0`` (so the RSS is one process),
in memory. Reported (MiB): ``VmRSS`` after the model and concepts are loaded (baseline),
``ru_maxrss`` (``getrusage(RUSAGE_SELF)``, KiB on Linux) just before ``explain_slide`` (the peak
of loading) and after it (the process's peak), and the peak RSS of ``explain_slide`` alone:
``VmHWM`` after resetting it (writing ``5`` to ``/proc/self/clear_refs``) just before the call
("n/a" where the kernel does not allow it). Then the ratios large / small of the peak and of the
increment peak - baseline (target: nearly flat, ratio close to 1 although the slide has 4x the
tiles).

Defaults: ``--repeats 1`` (VGG16: 16 tiles at ~1.8 s each on 2 CPU cores, ~30 s per pass)
and ``--lite-repeats 3`` (Lite0: 50 tiles at ~0.33 s each, ~17 s per pass); with part B
(50 and 210 tiles) the default run takes about 7 minutes on 2 CPU cores. The timings are
sensitive to anything else running on the machine: keep it otherwise idle.

``--small`` (a quick check of the script, ~1 minute): Lite0 only, 256 px tiles, stride 128,
level 1, 1 round; part B with the same geometry.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torchvision  # type: ignore[import-untyped]
from _activations import (
    OUT,
    ROOT,
    base_parser,
    machine_header,
    print_table,
    resolve_device,
    sync,
)
from torch import Tensor, nn

from captum_nmf import NMFConceptAttribution, zoo
from captum_nmf.wsi import Slide, SlideTiles, explain_slide, write_pyramid

K = 6
MAX_LOCATIONS = 4096
CMU = ROOT / "tests" / "data" / "cmu_small_region.svs"
WSI_OUT = OUT / "wsi"
SMALL_SLIDE = WSI_OUT / "cmu_pyramid.svs"
LARGE_SLIDE = WSI_OUT / "cmu_mosaic_2x2.svs"
CONCEPTS = WSI_OUT / "lite0_head_relu_k6.safetensors"
METHODS = ("forward-only", "explain w=0", "explain w=1")


@dataclass
class Config:
    """One model / layer / tiling to time."""

    label: str
    model: nn.Module
    layer: nn.Module
    trunk: Callable[[Tensor], Tensor]  # the model up to the layer
    level: int
    tile: int
    stride: int
    batch: int
    repeats: int


# ----------------------------------------------------------------------------- slides
def write_slides() -> tuple[float, tuple[int, int], tuple[int, int]]:
    """Write the CMU pyramid and its 2 x 2 mosaic; return the mpp and both level-0 sizes."""
    with Slide(CMU) as slide:
        width, height = slide.dimensions
        image = slide.read_region((0, 0), 0, (width, height))
        mpp = slide.mpp
    if mpp is None:
        raise RuntimeError(f"{CMU} has no mpp metadata")
    write_pyramid(image, SMALL_SLIDE, mpp=mpp)
    mosaic = np.tile(image, (2, 2, 1))
    write_pyramid(mosaic, LARGE_SLIDE, mpp=mpp)
    return mpp, (width, height), (mosaic.shape[1], mosaic.shape[0])


def level_text(path: Path, level: int) -> str:
    with Slide(path) as slide:
        w, h = slide.level_dimensions[level]
        mpps = slide.level_mpps()
    um = f", {mpps[level]:.3f} um/px" if mpps is not None else ""
    return f"level {level} ({w} x {h} px{um})"


# ------------------------------------------------------------------------- throughput
def preload(tiles: SlideTiles, device: torch.device) -> Tensor:
    """Every tile of ``tiles`` (after its transform) stacked into one tensor on ``device``."""
    images = []
    for i in range(len(tiles)):
        image, _ = tiles[i]
        if image is None:
            raise RuntimeError(f"tile {i} could not be read")
        images.append(image)
    return torch.stack(images).to(device)


def forward_only(trunk: Callable[[Tensor], Tensor], x: Tensor, batch: int) -> None:
    with torch.no_grad():
        for start in range(0, x.shape[0], batch):
            trunk(x[start : start + batch])


def bench_config(cfg: Config, device: torch.device) -> tuple[list[str], NMFConceptAttribution]:
    """Fit the concepts, then time forward-only and explain_slide; return a row and ``attr``."""
    tiles = SlideTiles(
        SMALL_SLIDE,
        tile_size=cfg.tile,
        stride=cfg.stride,
        level=cfg.level,
        transform=zoo.normalize,
    )
    n = len(tiles)
    print(f"# {cfg.label}: {n} tiles of {cfg.tile} px, stride {cfg.stride}, batch {cfg.batch}")
    attr = NMFConceptAttribution(cfg.model, cfg.layer, K, random_state=0)
    t = time.perf_counter()
    # fit() streams a map-style Dataset (documented), though its annotation says Iterable
    attr.fit(
        cast(Iterable[Any], tiles),
        batch_size=cfg.batch,
        max_locations_per_batch=MAX_LOCATIONS,
        progress=False,
    )
    sync(device)
    print(f"#   concepts fitted (untimed) in {time.perf_counter() - t:.1f} s")
    x = preload(tiles, device)
    tiles.close()
    features = attr.features(x[: cfg.batch], return_output=True)  # warm-up
    act = features[0] if isinstance(features, tuple) else features
    act_shape = " x ".join(str(v) for v in act.shape[1:])
    del features, act

    def run_explain(workers: int) -> int:
        result = explain_slide(
            attr,
            SMALL_SLIDE,
            tile_size=cfg.tile,
            stride=cfg.stride,
            level=cfg.level,
            batch_size=cfg.batch,
            num_workers=workers,
            transform=zoo.normalize,
            progress=False,
        )
        return int(result.tile_locations.shape[0])

    calls: dict[str, Callable[[], Any]] = {
        "forward-only": lambda: forward_only(cfg.trunk, x, cfg.batch),
        "explain w=0": lambda: run_explain(0),
        "explain w=1": lambda: run_explain(1),
    }
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    for r in range(cfg.repeats):
        for name in METHODS[r % 3 :] + METHODS[: r % 3]:
            sync(device)
            t = time.perf_counter()
            out = calls[name]()
            sync(device)
            times[name].append(time.perf_counter() - t)
            if name != "forward-only" and out != n:
                raise RuntimeError(f"explain_slide used {out} tiles, SlideTiles has {n}")
    med = {name: statistics.median(ts) for name, ts in times.items()}
    rate = {name: n / s for name, s in med.items()}
    row = [
        cfg.label,
        level_text(SMALL_SLIDE, cfg.level),
        f"{cfg.tile}/{cfg.stride}",
        str(n),
        act_shape,
        str(cfg.batch),
        f"{rate['forward-only']:.3f}",
        f"{rate['explain w=0']:.3f}",
        f"{rate['explain w=1']:.3f}",
        f"{rate['explain w=0'] / rate['forward-only']:.3f}",
        f"{rate['explain w=1'] / rate['forward-only']:.3f}",
    ]
    return row, attr


# --------------------------------------------------------------------------- peak RSS
def vm_status(key: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (None when absent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name == key:
            return int(rest.split()[0])
    return None


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def rss_child(args: argparse.Namespace) -> None:
    """Run one explain_slide in this (fresh) process and print its memory as one JSON line."""
    device = resolve_device(args.device)
    model = zoo.efficientnet_lite0().to(device).eval()
    attr = NMFConceptAttribution.load(args.concepts, model, model.head_relu)
    base = vm_status("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm_ok = reset_peak_rss()
    t = time.perf_counter()
    result = explain_slide(
        attr,
        args.rss_child,
        tile_size=args.tile,
        stride=args.stride,
        level=args.level,
        batch_size=args.batch,
        num_workers=0,
        transform=zoo.normalize,
        progress=False,
    )
    sync(device)
    seconds = time.perf_counter() - t
    record = {
        "tiles": int(result.tile_locations.shape[0]),
        "maps": list(result.concept_maps.shape),
        "seconds": seconds,
        "base_kib": base,
        "maxrss_before_kib": maxrss_before,
        "maxrss_after_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "hwm_explain_kib": vm_status("VmHWM") if hwm_ok else None,
    }
    print(json.dumps(record))


def run_child(slide: Path, level: int, tile: int, stride: int, batch: int, device: str) -> Any:
    cmd = [
        sys.executable,
        __file__,
        "--rss-child",
        str(slide),
        "--concepts",
        str(CONCEPTS),
        "--level",
        str(level),
        "--tile",
        str(tile),
        "--stride",
        str(stride),
        "--batch",
        str(batch),
        "--device",
        device,
    ]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout + done.stderr, file=sys.stderr)
        raise RuntimeError(f"--rss-child {slide.name} failed with exit code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(kib: float | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.0f}"


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.3f}"


# ------------------------------------------------------------------------------- main
def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="VGG16 rounds (default 1)")
    parser.add_argument("--lite-repeats", type=int, default=3, help="Lite0 rounds (default 3)")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--concepts", default=str(CONCEPTS), help=argparse.SUPPRESS)
    parser.add_argument("--level", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--tile", type=int, default=512, help=argparse.SUPPRESS)
    parser.add_argument("--stride", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child is not None:
        rss_child(args)
        return
    device = resolve_device(args.device)
    lite_level, lite_tile, lite_stride, lite_batch = (
        (1, 256, 128, 8) if args.small else (0, 512, 256, 8)
    )
    lite_repeats = 1 if args.small else args.lite_repeats
    machine_header(
        f"bench_wsi: explain_slide vs forward-only, and peak RSS; K = {K}"
        + (" (--small)" if args.small else ""),
        device,
    )
    WSI_OUT.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    mpp, small_dims, large_dims = write_slides()
    print(
        f"# slides written in {time.perf_counter() - t:.1f} s from {CMU.name} ({mpp} um/px): "
        f"{SMALL_SLIDE.name} {small_dims[0]} x {small_dims[1]}, "
        f"{LARGE_SLIDE.name} {large_dims[0]} x {large_dims[1]} (level 0)"
    )

    # ---- part A
    rows: list[list[str]] = []
    if not args.small:
        torch.manual_seed(0)
        vgg = torchvision.models.vgg16(weights=None).to(device).eval()
        vgg_cfg = Config(
            "VGG16 (random) features[29]",
            vgg,
            vgg.features[29],
            vgg.features[:30],
            level=1,
            tile=512,
            stride=256,
            batch=4,
            repeats=args.repeats,
        )
        rows.append(bench_config(vgg_cfg, device)[0])
        del vgg, vgg_cfg
    eff = zoo.efficientnet_lite0().to(device).eval()
    lite_cfg = Config(
        "EfficientNet-Lite0 head_relu",
        eff,
        eff.head_relu,
        eff.features,
        level=lite_level,
        tile=lite_tile,
        stride=lite_stride,
        batch=lite_batch,
        repeats=lite_repeats,
    )
    row, attr = bench_config(lite_cfg, device)
    rows.append(row)
    attr.save(CONCEPTS)
    del eff, lite_cfg, attr
    print()
    print("# part A: throughput on the same tiles, batch and run (median of rounds)")
    print_table(
        [
            "model / layer",
            "slide level",
            "tile/stride",
            "tiles",
            "activation",
            "batch",
            "fwd-only tiles/s",
            "explain w=0 tiles/s",
            "explain w=1 tiles/s",
            "ratio w=0",
            "ratio w=1",
        ],
        rows,
    )
    print("# ratio = explain_slide tiles/s / forward-only tiles/s; target >= 0.85")

    # ---- part B
    print()
    records = []
    for slide in (SMALL_SLIDE, LARGE_SLIDE):
        records.append(
            run_child(slide, lite_level, lite_tile, lite_stride, lite_batch, args.device)
        )
    small, large = records
    rss_rows = []
    for slide, dims, rec in ((SMALL_SLIDE, small_dims, small), (LARGE_SLIDE, large_dims, large)):
        hwm = rec["hwm_explain_kib"]
        rss_rows.append(
            [
                slide.name,
                f"{dims[0]} x {dims[1]}",
                str(rec["tiles"]),
                " x ".join(str(v) for v in rec["maps"]),
                f"{rec['seconds']:.1f}",
                mib(rec["base_kib"]),
                mib(rec["maxrss_before_kib"]),
                mib(rec["maxrss_after_kib"]),
                mib(rec["maxrss_after_kib"] - rec["base_kib"]),
                mib(hwm),
                mib(None if hwm is None else hwm - rec["base_kib"]),
            ]
        )
    print(
        f"# part B: peak RSS of explain_slide in a fresh process, Lite0 head_relu, level "
        f"{lite_level}, {lite_tile}/{lite_stride}, batch {lite_batch}, num_workers=0 (MiB)"
    )
    print_table(
        [
            "slide",
            "level-0 size",
            "tiles",
            "maps",
            "explain (s)",
            "RSS after load",
            "maxrss before",
            "maxrss after",
            "maxrss - base",
            "explain peak (VmHWM)",
            "VmHWM - base",
        ],
        rss_rows,
    )

    def increment(rec: Any, key: str) -> float | None:
        peak = rec[key]
        return None if peak is None else float(peak - rec["base_kib"])

    print(
        f"# large / small (4x area, {large['tiles'] / small['tiles']:.2f}x tiles): "
        f"maxrss {ratio(large['maxrss_after_kib'], small['maxrss_after_kib'])}, "
        f"maxrss - base "
        f"{ratio(increment(large, 'maxrss_after_kib'), increment(small, 'maxrss_after_kib'))}, "
        f"VmHWM {ratio(large['hwm_explain_kib'], small['hwm_explain_kib'])}, "
        f"VmHWM - base "
        f"{ratio(increment(large, 'hwm_explain_kib'), increment(small, 'hwm_explain_kib'))}; "
        "target: nearly flat (~1)"
    )


if __name__ == "__main__":
    main()
