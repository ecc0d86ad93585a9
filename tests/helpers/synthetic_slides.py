"""Slides written by the tests from real images, and corrupted copies of real slides.

Nothing here downloads anything and nothing generated is committed: every file
is written under pytest's ``tmp_path``. The real inputs are
``tests/data/cmu_small_region.svs`` (a real Aperio SVS) and the H&E JPEGs
packaged in ``captum_nmf/data`` (see ``tests/data/SOURCES.md``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageDraw

from captum_nmf.data import path as data_path
from captum_nmf.wsi import Slide, write_pyramid

DATA = Path(__file__).resolve().parents[1] / "data"
CMU = DATA / "cmu_small_region.svs"
CMU_MPP = 0.499


def he_image(name: str = "hgsc_nest.jpg") -> np.ndarray:
    """A packaged real 1500 x 1500 H&E image as H x W x 3 uint8."""
    return np.array(Image.open(data_path(name)).convert("RGB"))


def cmu_pixels() -> np.ndarray:
    """Level 0 of the real CMU-1 small-region SVS (2967 x 2220 x 3 uint8)."""
    with Slide(CMU) as slide:
        return slide.read_region((0, 0), 0, slide.dimensions)


def cmu_pyramid(path: Path, levels: int | None = None) -> Path:
    """The real CMU SVS rewritten as a multi-level pyramid (4 levels, downsample 2)."""
    return write_pyramid(cmu_pixels(), path, mpp=CMU_MPP, levels=levels)


def tissue_on_white(
    path: Path, size: tuple[int, int], box: tuple[int, int, int, int], *, mpp: float = 0.5
) -> Path:
    """A white slide of ``size`` (w, h) with real H&E pasted into ``box`` (x, y, w, h)."""
    canvas = np.full((size[1], size[0], 3), 255, dtype=np.uint8)
    x, y, w, h = box
    canvas[y : y + h, x : x + w] = he_image()[:h, :w]
    return write_pyramid(canvas, path, mpp=mpp)


def blank_slide(path: Path, size: tuple[int, int] = (1024, 768)) -> Path:
    """An all-white slide (no tissue)."""
    return write_pyramid(np.full((size[1], size[0], 3), 255, np.uint8), path, mpp=0.5)


def flip_tile_markers(src: Path, dst: Path, tile_indices: list[int]) -> list[tuple[int, int]]:
    """Copy an Aperio JPEG SVS, breaking level-0 JPEG tiles the way ``unreadable.svs`` is made.

    The JPEG Start-of-Scan marker ``FF DA`` of each listed tile becomes
    ``FF DB``: the slide still opens, but reading pixels of those tiles fails.

    Returns:
        the level-0 (x, y) of each broken tile's corner.
    """
    data = bytearray(src.read_bytes())
    corners = []
    with tifffile.TiffFile(src) as tif:
        page = tif.pages[0]
        tiles_across = -(-page.imagewidth // page.tilewidth)
        for index in tile_indices:
            offset, count = page.dataoffsets[index], page.databytecounts[index]
            sos = data.find(b"\xff\xda", offset, offset + count)
            if sos < 0:
                raise RuntimeError(f"no SOS marker in tile {index} of {src}")
            data[sos + 1] = 0xDB
            corners.append(
                ((index % tiles_across) * page.tilewidth, (index // tiles_across) * page.tilelength)
            )
    dst.write_bytes(bytes(data))
    return corners


def flip_tile_marker(src: Path, dst: Path, tile_index: int) -> tuple[int, int]:
    """:func:`flip_tile_markers` for one tile."""
    return flip_tile_markers(src, dst, [tile_index])[0]


def truncated_copy(src: Path, dst: Path, fraction: float = 0.6) -> Path:
    """The first ``fraction`` of a file's bytes."""
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def zero_tile_data(src: Path, dst: Path, tile_indices: list[int]) -> list[tuple[int, int]]:
    """Copy a tiled TIFF/SVS with the bytes of the listed level-0 tiles set to zero.

    The slide opens, but decoding those tiles fails (their JPEG or zlib data is
    gone), as with a scan whose storage lost blocks.

    Returns:
        the level-0 (x, y) of each zeroed tile's corner.
    """
    data = bytearray(src.read_bytes())
    corners = []
    with tifffile.TiffFile(src) as tif:
        page = tif.pages[0]
        tiles_across = -(-page.imagewidth // page.tilewidth)
        for index in tile_indices:
            offset, count = page.dataoffsets[index], page.databytecounts[index]
            data[offset : offset + count] = bytes(count)
            corners.append(
                ((index % tiles_across) * page.tilewidth, (index // tiles_across) * page.tilelength)
            )
    dst.write_bytes(bytes(data))
    return corners


def sparse_tiff(
    path: Path,
    size: tuple[int, int],
    *,
    tile: int = 512,
    tiles: dict[tuple[int, int], np.ndarray] | None = None,
) -> Path:
    """A one-level tiled TIFF of ``size`` (w, h) whose tiles hold no data (byte count 0).

    Only the tiles in ``tiles`` ((row, column) -> tile x tile x 3 ``uint8``) are
    written (zlib); every other tile is empty, which OpenSlide reads as
    transparent, i.e. background. A 100,000 x 100,000 file is about 300 KB.
    """
    tiles = tiles or {}
    across, down = -(-size[0] // tile), -(-size[1] // tile)
    blank = np.full((tile, tile, 3), 255, np.uint8)
    if tiles:  # tifffile needs arrays (None for empty tiles), the first one an array

        def chunks() -> Iterator[np.ndarray | None]:
            for r in range(down):
                for c in range(across):
                    yield tiles.get((r, c), blank if (r, c) == (0, 0) else None)

        if (0, 0) not in tiles:
            raise ValueError("give tile (0, 0) when any tile has data (tifffile needs it first)")
        data: Iterator[np.ndarray | None] | Iterator[bytes] = chunks()
    else:  # all empty: zero-length byte strings
        data = (b"" for _ in range(across * down))
    tifffile.imwrite(
        path,
        data,
        shape=(size[1], size[0], 3),
        dtype=np.uint8,
        tile=(tile, tile),
        photometric="rgb",
        compression="zlib",
        metadata=None,
    )
    return path


PEN_INK = {"blue": (30, 60, 170), "green": (40, 140, 70), "black": (25, 25, 30)}


def paint_pen_strokes(
    image: np.ndarray,
    strokes: list[tuple[str, tuple[int, int, int, int]]],
    *,
    width: int = 100,
    opacity: float = 0.9,
) -> tuple[np.ndarray, np.ndarray]:
    """Marker strokes over an image: lines ``(x0, y0, x1, y1)`` in ``PEN_INK`` colours.

    Ink covers ``opacity`` of the light (the tissue shows through the rest).

    Returns:
        the painted H x W x 3 ``uint8`` image and the H x W boolean stroke mask.
    """
    out = image.astype(np.float64)
    union = np.zeros(image.shape[:2], bool)
    for name, (x0, y0, x1, y1) in strokes:
        canvas = Image.new("L", (image.shape[1], image.shape[0]), 0)
        ImageDraw.Draw(canvas).line((x0, y0, x1, y1), fill=255, width=width)
        stroke = np.asarray(canvas) > 0
        out[stroke] = (1 - opacity) * out[stroke] + opacity * np.asarray(PEN_INK[name], float)
        union |= stroke
    return np.rint(out).astype(np.uint8), union
