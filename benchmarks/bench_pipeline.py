"""The slide pipeline around the model: reading once, conversion, stitching, solving.

Slide (rewritten into ``bench_out/pipeline/``, never into the repository): the real Aperio
region ``tests/data/cmu_small_region.svs`` (2220 x 2967 px, 0.499 um/px) read whole at level 0
and written as a 3 x 3 mosaic (6660 x 8901 px) with ``write_pyramid`` (256 px zlib tiles).
Tiles: 512 px every 256 px at level 0 with the default tissue mask, batch 16. Everything below
runs in one process, side by side, median of ``--repeats`` rounds (order rotated each round):

(a) ready tiles/s: ``SlideTiles(...).loader(num_workers=0)`` (today's per-tile reads, float
    tiles) against ``TileBatches`` (the block reader: each slide pixel decoded once, uint8
    batches converted with ``to_model_input``). Both give the same tiles (checked). Target >= 3x.
    Also printed: decoded pixels per slide pixel of the tiles' union for both.
(b) ``explain_slide`` with a near-zero-cost model (average-pool to the 32 px cell grid, a 1x1
    convolution to 1,280 channels on the cells in channels-last, see ``PoolConv``; ReLU; K = 6
    concepts fitted beforehand; ``--nchw-model``: the convolution on NCHW cells; ``--pool2d``:
    the pooling by ``avg_pool2d``, 3x slower on the CPU) against the block
    reader alone: the pipeline around the model (conversion, capture, stitching, NNLS, maps)
    should cost no more than reading. Target >= 0.8. Also timed: the model's forward alone on
    the batches read and converted beforehand (what the model itself costs on these cores),
    and each call's process CPU time (all threads): explain's less the reader's and the
    forward's is what the pipeline around the model costs in CPU, beside the reading's;
    explain's CPU over the cores gives the shortest time it could take, and so the
    highest ratio these cores allow.
    Timed twice: with the tissue mask
    computed once and given to both (so neither pays the tissue detection, which is planning,
    not reading nor the pipeline around the model), and with the detection in both calls.
(c) ``explain_slide`` with EfficientNet-Lite0 ``head_relu`` (ImageNet weights) against its
    forward-only (the tiles preloaded, ``model.features`` in batches): target >= 0.95. On the
    slide itself (2220 x 2967, 50 tiles) unless ``--lite-mosaic``.

``--small``: a quick check (one round, 256 px tiles, the slide itself).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captum_nmf import NMFConceptAttribution  # noqa: E402
from captum_nmf.wsi import Slide, SlideTiles, explain_slide, tile_grid, write_pyramid  # noqa: E402
from captum_nmf.wsi.blocks import TileBatches, to_model_input  # noqa: E402

CMU = ROOT / "tests" / "data" / "cmu_small_region.svs"


class PoolConv(nn.Module):
    """Near-zero-cost model: 32 px average pool, 1x1 conv to 1,280 channels, ReLU, mean head.

    The convolution runs on the pooled cells in channels-last (``nchw=False``). On
    the same cells in NCHW, torch 2.14's CPU convolution (oneDNN) page-faults about
    40 MB per batch of 16 (10,272 faults, 11 of its 12 ms), which made this model
    cost 0.80 of the reading time on 2 cores, not near zero; in channels-last the
    same convolution takes 0.2 ms and gives the same features (checked in (b)).
    ``nchw=True`` is that earlier model (``--nchw-model``).

    The average over each 32 x 32 cell is taken as a sum over its rows, then over
    its columns, divided by 1,024 (``pool2d=False``): torch 2.14's CPU
    ``avg_pool2d`` with a 32 px kernel takes 16.8 ms per batch of 16 on one thread,
    the two sums 5.7 ms, for the same averages to within 1e-6 (checked in (b)).
    ``pool2d=True`` is the earlier model (``--pool2d``).
    """

    def __init__(self, nchw: bool = False, pool2d: bool = False) -> None:
        super().__init__()
        self.nchw = nchw
        self.pool2d = pool2d
        self.pool = nn.AvgPool2d(32)
        self.conv = nn.Conv2d(3, 1280, 1)
        self.relu = nn.ReLU()
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # signed weights and biases: ReLU gives features of full rank
            self.conv.weight.copy_(torch.randn(1280, 3, 1, 1, generator=gen))
            self.conv.bias.copy_(0.5 * torch.randn(1280, generator=gen))

    def cells(self, x: Tensor) -> Tensor:
        """The mean of each 32 x 32 cell: N x 3 x H/32 x W/32."""
        if self.pool2d:
            return self.pool(x)
        n, c, h, w = x.shape
        rows = x.reshape(n, c, h // 32, 32, w).sum(3)  # each cell's rows summed
        return rows.reshape(n, c, h // 32, w // 32, 32).sum(4) / 1024

    def forward(self, x: Tensor) -> Tensor:
        cells = self.cells(x)
        if not self.nchw:
            cells = cells.contiguous(memory_format=torch.channels_last)
        return self.relu(self.conv(cells)).mean(dim=(2, 3))[:, :2]


def _slide(out: Path, mosaic: int) -> Path:
    """The CMU region (``mosaic`` = 1) or a mosaic of it, written once into ``out``."""
    cached = out / ("cmu.svs" if mosaic == 1 else f"cmu_mosaic_{mosaic}x{mosaic}.svs")
    if cached.is_file():
        return cached
    with Slide(CMU) as s:
        pixels = s.read_region((0, 0), 0, s.dimensions)
    mpp = 0.499
    if mosaic == 1:
        return write_pyramid(pixels, out / "cmu.svs", mpp=mpp)
    tiled = np.concatenate([np.concatenate([pixels] * mosaic, axis=1)] * mosaic, axis=0)
    return write_pyramid(tiled, out / f"cmu_mosaic_{mosaic}x{mosaic}.svs", mpp=mpp)


CPU: dict[str, float] = {}  # median process CPU seconds (all threads) of the last _rounds


def _cpu() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def _timed(fn) -> tuple[float, float]:
    """Wall and process CPU seconds (every thread: readers, torch's pool) of one call."""
    c0, t0 = _cpu(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, _cpu() - c0


def _rounds(methods: dict, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in methods}
    cpu: dict[str, list[float]] = {k: [] for k in methods}
    names = list(methods)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            wall, used = _timed(methods[name])
            times[name].append(wall)
            cpu[name].append(used)
    CPU.clear()
    CPU.update({k: statistics.median(v) for k, v in cpu.items()})
    return {k: statistics.median(v) for k, v in times.items()}


def _union(grid) -> float:
    """Level-0 pixels of the slide that at least one tile covers."""
    step = grid.stride
    k = grid.tile_size // step
    covered = np.zeros((grid.n_rows + k, grid.n_cols + k), bool)
    for r, c in zip(grid.rows, grid.cols, strict=True):
        covered[r : r + k, c : c + k] = True
    w, h = grid.dimensions
    ys = (
        np.minimum((np.arange(covered.shape[0]) + 1) * step, h) - np.arange(covered.shape[0]) * step
    )
    xs = (
        np.minimum((np.arange(covered.shape[1]) + 1) * step, w) - np.arange(covered.shape[1]) * step
    )
    return float((covered * np.clip(ys, 0, None)[:, None] * np.clip(xs, 0, None)[None]).sum())


def part_a(path: Path, tile: int, stride: int, batch: int, repeats: int) -> None:
    with Slide(path) as s:
        grid = tile_grid(s, tile_size=tile, stride=stride)
    n = len(grid)
    batches = [list(range(i, min(i + batch, n))) for i in range(0, n, batch)]

    def per_tile() -> None:
        tiles = SlideTiles.from_grids([grid])
        for _ in tiles.loader(batch_size=batch, num_workers=0):
            pass
        tiles.close()

    stats = {}

    def blocks(threads: int = 1, convert: bool = True) -> None:
        source = TileBatches(grid, threads=threads, convert=convert)
        for b in batches:
            source.batch(b)
        stats["pixels"] = source.reader.pixels_read
        source.close()

    # the same tiles, checked once
    source, tiles = TileBatches(grid), SlideTiles.from_grids([grid])
    for i in (0, n // 2, n - 1):
        a = to_model_input(source.batch([i])[0], torch.device("cpu"))[0]
        assert torch.equal(a, tiles[i][0]), i
    source.close()
    tiles.close()
    methods = {
        "per-tile": per_tile,
        "float": blocks,
        "uint8": lambda: blocks(convert=False),
        "uint8-2": lambda: blocks(threads=2, convert=False),
    }
    t = _rounds(methods, repeats)
    w, h = grid.dimensions
    decoded = stats["pixels"] / _union(grid)
    print(f"\n(a) reading {n} tiles of {tile} px every {stride} px, {w} x {h} px slide")
    print("| reader | ready as | tiles/s | decoded px per covered slide px |")
    print("| --- | --- | --- | --- |")
    per = n * tile * tile / _union(grid)
    print(f"| per tile (`SlideTiles`) | float | {n / t['per-tile']:.1f} | {per:.2f} |")
    print(f"| blocks (`TileBatches`), CPU model | float | {n / t['float']:.1f} | {decoded:.2f} |")
    print(f"| blocks, device model | uint8 | {n / t['uint8']:.1f} | {decoded:.2f} |")
    print(f"| blocks, 2 decoding threads | uint8 | {n / t['uint8-2']:.1f} | {decoded:.2f} |")
    for key, what in (("float", "float (CPU model)"), ("uint8", "uint8 (device model)")):
        print(f"ratio blocks / per tile, {what}: **{t['per-tile'] / t[key]:.2f}x** (target >= 3)")


def part_b(
    path: Path, tile: int, stride: int, batch: int, repeats: int, nchw: bool, pool2d: bool
) -> None:
    model = PoolConv(nchw=nchw, pool2d=pool2d).eval()
    attr = NMFConceptAttribution(model, model.relu, 6, random_state=0)
    attr.fit(SlideTiles(path, tile_size=tile, stride=stride), batch_size=batch, progress=False)
    with Slide(path) as s:
        grid = tile_grid(s, tile_size=tile, stride=stride)
    mask = grid.tissue_mask  # the tissue detection, done once for the runs that reuse it
    n = len(grid)
    batches = [list(range(i, min(i + batch, n))) for i in range(0, n, batch)]

    def reader(detect: bool = False) -> None:
        g = grid
        if detect:  # from the path: the tissue detection and the grid, then the reading
            with Slide(path) as s:
                g = tile_grid(s, tile_size=tile, stride=stride)
        source = TileBatches(g)
        for b in batches:
            source.batch(b)
        source.close()

    source = TileBatches(grid, convert=True)  # float batches, as a CPU model gets them
    preloaded = [source.batch(b)[0].clone() for b in batches]
    source.close()
    with torch.no_grad():  # the two poolings: the same cells
        cells = model.cells(preloaded[0])
        pooled = model.pool(preloaded[0])
    assert torch.allclose(cells, pooled, rtol=1e-5, atol=1e-6), float((cells - pooled).abs().max())
    with torch.no_grad():  # the convolution on NCHW and on channels-last cells: same features
        a = model.conv(cells.contiguous(memory_format=torch.channels_last))
        b = model.conv(cells)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), float((a - b).abs().max())

    def forward() -> None:  # the model alone, on the tiles already read and converted
        with torch.no_grad():
            for x in preloaded:
                model(x)

    def explain(detect: bool = False) -> None:
        explain_slide(
            attr,
            path,
            tile_size=tile,
            stride=stride,
            batch_size=batch,
            tissue_mask="otsu" if detect else mask,
            progress=False,
        )

    t = _rounds(
        {
            "reader": reader,
            "explain": explain,
            "reader+detect": lambda: reader(True),
            "explain+detect": lambda: explain(True),
            "forward": forward,
        },
        repeats,
    )
    preloaded.clear()  # 1.4 GB of float batches
    layout = "NCHW (the earlier model, --nchw-model)" if nchw else "channels-last"
    pooling = "avg_pool2d (the earlier model, --pool2d)" if pool2d else "row and column sums"
    print(
        f"\n(b) near-zero-cost model (pool by {pooling}, 1x1 conv to 1280 on {layout} cells, "
        f"ReLU), {n} tiles"
    )
    print("| path | tiles/s, tissue mask given | tiles/s, tissue detected in the call |")
    print("| --- | --- | --- |")
    print(f"| block reader alone | {n / t['reader']:.1f} | {n / t['reader+detect']:.1f} |")
    print(f"| `explain_slide` | {n / t['explain']:.1f} | {n / t['explain+detect']:.1f} |")
    ratio, with_detect = t["reader"] / t["explain"], t["reader+detect"] / t["explain+detect"]
    print(
        f"| the model alone (forward of the batches, read and converted beforehand) | "
        f"{n / t['forward']:.1f} | |"
    )
    print(
        f"ratio explain / reader: **{ratio:.2f}** with the mask given to both, "
        f"{with_detect:.2f} with detection in both (target >= 0.8)"
    )
    print(
        f"the model's own forward takes {t['forward'] / t['reader']:.2f} of the reading time "
        "on the same cores"
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    floor = CPU["explain"] / (cores or 1)  # every core busy all the time
    print(
        f"explain needs {CPU['explain']:.2f} s of CPU: on {cores} cores it could take no less "
        f"than {floor:.2f} s, so the ratio could not pass {t['reader'] / floor:.2f} "
        f"(took {t['explain']:.2f} s)"
    )
    around = CPU["explain"] - CPU["reader"] - CPU["forward"]
    print(
        f"CPU seconds (all threads), mask given: reader {CPU['reader']:.2f}, explain "
        f"{CPU['explain']:.2f}, the model's forward alone {CPU['forward']:.2f}; the pipeline "
        f"around the model (explain - reading - forward) {around:.2f} = "
        f"{around / CPU['reader']:.2f} of the reading's CPU"
    )


def part_c(path: Path, tile: int, stride: int, batch: int, repeats: int) -> None:
    from captum_nmf.zoo import efficientnet_lite0, normalize

    model = efficientnet_lite0()
    attr = NMFConceptAttribution(model, model.head_relu, 6, random_state=0)
    tiles = SlideTiles(path, tile_size=tile, stride=stride, transform=normalize)
    attr.fit(tiles, batch_size=batch, max_locations_per_batch=4096, progress=False)
    preloaded = torch.stack([tiles[i][0] for i in range(len(tiles))])
    n = len(tiles)

    def forward() -> None:
        with torch.no_grad():
            for i in range(0, n, batch):
                model.features(preloaded[i : i + batch])

    def explain() -> None:
        explain_slide(
            attr,
            path,
            tile_size=tile,
            stride=stride,
            batch_size=batch,
            batch_transform=normalize,
            progress=False,
        )

    with torch.no_grad():
        attr.features(preloaded[:batch], return_output=True)  # warm-up
    t = _rounds({"forward": forward, "explain": explain}, repeats)
    print(f"\n(c) EfficientNet-Lite0 head_relu, {n} tiles, batch {batch}")
    print("| path | tiles/s |")
    print("| --- | --- |")
    print(f"| forward only (tiles preloaded) | {n / t['forward']:.2f} |")
    print(f"| `explain_slide` | {n / t['explain']:.2f} |")
    print(f"ratio explain / forward: **{t['forward'] / t['explain']:.2f}** (target >= 0.95)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lite-mosaic", action="store_true")
    parser.add_argument("--parts", default="abc")
    parser.add_argument(
        "--nchw-model", action="store_true", help="(b) with the earlier model (see PoolConv)"
    )
    parser.add_argument(
        "--pool2d", action="store_true", help="(b) pooling by avg_pool2d (see PoolConv)"
    )
    args = parser.parse_args()
    out = ROOT / "bench_out" / "pipeline"
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    print(f"# bench_pipeline on {machine}")
    print(f"torch threads {torch.get_num_threads()}, {'small' if args.small else 'full'} run")
    tile, stride = (256, 128) if args.small else (512, 256)
    repeats = 1 if args.small else args.repeats
    slide = _slide(out, 1 if args.small else 3)
    if "a" in args.parts:
        part_a(slide, tile, stride, 16, repeats)
    if "b" in args.parts:
        part_b(slide, tile, stride, 16, repeats, args.nchw_model, args.pool2d)
    if "c" in args.parts:
        lite = slide if (args.small or args.lite_mosaic) else _slide(out, 1)
        part_c(lite, tile, stride, 8, repeats)


if __name__ == "__main__":
    main()
