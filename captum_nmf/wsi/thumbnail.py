"""Slide thumbnails read in strips, skipping the empty tiles of a sparse TIFF (its layout)."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tifffile
from numpy.typing import NDArray
from PIL import Image
from tqdm.auto import tqdm

from captum_nmf.exceptions import LargeThumbnailWarning, SlideReadError, UnreadableRegionWarning

if TYPE_CHECKING:
    from captum_nmf.wsi.reader import Slide

__all__ = ["Thumbnail", "TileLayout", "read_thumbnail", "tiff_layout"]

_STRIP_PIXELS = 1 << 24  # level pixels read per thumbnail strip
_SKIP_BLOCK = 512  # level pixels per block when a strip that failed is read again piecewise

RGB = NDArray[np.uint8]
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Thumbnail:
    """A slide's thumbnail (from :meth:`Slide.read_thumbnail`).

    Attributes:
        pixels (ndarray): height x width x 3 ``uint8``.
        downsample (tuple[float, float]): (x, y) level-0 pixels per thumbnail pixel.
        unreadable (tuple): level-0 ``(x, y, width, height)`` boxes that could
                    not be read and are background in ``pixels``.
    """

    pixels: RGB
    downsample: tuple[float, float]
    unreadable: tuple[tuple[int, int, int, int], ...] = ()


@dataclass(frozen=True)
class TileLayout:
    """The TIFF tiles of one pyramid level, and which of them hold no data.

    Attributes:
        tile_size (tuple[int, int]): (width, height) of a tile in level pixels.
        empty (ndarray): rows x columns booleans, True for a tile of byte
                    count 0 (background, never decoded).
    """

    tile_size: tuple[int, int]
    empty: NDArray[np.bool_]

    @property
    def data_pixels(self) -> int:
        """Level pixels in tiles that hold data (what reading the whole level decodes)."""
        return int((~self.empty).sum()) * self.tile_size[0] * self.tile_size[1]

    def data_span(self, y0: int, y1: int) -> tuple[int, int] | None:
        """Level-pixel columns ``[x0, x1)`` spanning the tiles with data in rows ``[y0, y1)``.

        Returns:
            *tuple or None*: the span, or None when every tile there is empty.
        """
        th = self.tile_size[1]
        rows = self.empty[y0 // th : (y1 - 1) // th + 1]
        cols = np.flatnonzero(~rows.all(axis=0))
        if cols.size == 0:
            return None
        tw = self.tile_size[0]
        return int(cols[0]) * tw, int(cols[-1] + 1) * tw


def tiff_layout(path: Path, dimensions: tuple[int, int]) -> TileLayout | None:
    """The tile layout of the tiled TIFF page of ``dimensions``, or None."""
    try:
        with tifffile.TiffFile(path) as tif:
            for page in tif.pages:
                if not isinstance(page, tifffile.TiffPage) or not page.is_tiled:
                    continue
                if (page.imagewidth, page.imagelength) != dimensions or page.imagedepth != 1:
                    continue
                across = -(-page.imagewidth // page.tilewidth)
                down = -(-page.imagelength // page.tilelength)
                counts = np.asarray(page.databytecounts, dtype=np.int64)
                if counts.size != across * down:  # planar-separate samples: not handled
                    return None
                return TileLayout(
                    (int(page.tilewidth), int(page.tilelength)), (counts == 0).reshape(down, across)
                )
    except (tifffile.TiffFileError, OSError, ValueError, KeyError, IndexError):
        return None
    return None


@dataclass(frozen=True)
class _Strip:
    """Thumbnail rows ``[t0, t1)``, read from level rows ``[y0, y1)`` (columns ``span``)."""

    t0: int
    t1: int
    y0: int
    y1: int
    span: tuple[int, int] | None  # level columns of the tiles with data; None: all empty


@dataclass(frozen=True)
class _Frame:
    """The thumbnail's size, the level read and level pixels per thumbnail pixel."""

    level: int
    size: tuple[int, int]  # thumbnail (width, height)
    level_size: tuple[int, int]  # level (width, height)
    fx: float
    fy: float


def _strips(frame: _Frame, layout: TileLayout | None) -> list[_Strip]:
    """Horizontal strips of about 16 M level pixels, each shrunk on its own.

    A huge single-level file therefore never has to fit in memory at once.
    """
    (lw, lh), th, fy = frame.level_size, frame.size[1], frame.fy
    rows_per_strip = max(1, int(_STRIP_PIXELS / max(lw, 1) / max(fy, 1.0)))
    plan = []
    for t0 in range(0, th, rows_per_strip):
        t1 = min(th, t0 + rows_per_strip)
        y0, y1 = math.floor(t0 * fy), min(lh, math.ceil(t1 * fy))
        span = (0, lw) if layout is None else layout.data_span(y0, max(y1, y0 + 1))
        plan.append(_Strip(t0, t1, y0, max(y1, y0 + 1), span))
    return plan


def _shrink_strip(
    slide: Slide,
    frame: _Frame,
    strip: _Strip,
    span: tuple[int, int],
    on_tile_error: str,
    failed: list[Box],
) -> tuple[int, RGB, int]:
    """Read the columns ``span`` of a strip and shrink them by area averaging.

    Returns:
        *tuple*: the first thumbnail column, the shrunk pixels and the level
        pixels read.
    """
    tw, lw, fx, fy = frame.size[0], frame.level_size[0], frame.fx, frame.fy
    tx0 = math.floor(span[0] / fx)
    tx1 = min(tw, math.ceil(span[1] / fx - 1e-9))
    rx0, rx1 = math.floor(tx0 * fx), min(lw, math.ceil(tx1 * fx - 1e-9))
    box = (rx0, strip.y0, rx1, strip.y1)
    pixels = _read_level(slide, frame.level, box, on_tile_error, failed)
    right = lw - rx0 if tx1 == tw else tx1 * fx - rx0
    shrunk = Image.fromarray(pixels).resize(
        (tx1 - tx0, strip.t1 - strip.t0),
        Image.Resampling.BOX,
        box=(tx0 * fx - rx0, strip.t0 * fy - strip.y0, right, strip.t1 * fy - strip.y0),
    )
    return tx0, np.asarray(shrunk), pixels.shape[0] * pixels.shape[1]


def read_thumbnail(
    slide: Slide,
    best_level: Callable[[float], int],
    max_size: int,
    *,
    on_tile_error: str,
    progress: bool | None,
    large_pixels: int,
) -> Thumbnail:
    """The body of :meth:`Slide.read_thumbnail` (arguments already checked).

    Args:
        slide (Slide): an open slide.
        best_level (Callable): the slide handle's level for a downsample.
        max_size (int): the longer side of the thumbnail.
        on_tile_error (str): ``"raise"`` or ``"skip"``.
        progress (bool or None): show a progress bar; None: only when large.
        large_pixels (int): decoded pixels above which it warns
                    :class:`~captum_nmf.exceptions.LargeThumbnailWarning`.

    Returns:
        *Thumbnail*: the pixels, their downsample and the unreadable boxes.
    """
    w, h = slide.dimensions
    scale = max(max(w, h) / max_size, 1.0)  # never larger than level 0
    tw, th = max(1, round(w / scale)), max(1, round(h / scale))
    level = int(best_level(max(scale, 1.0)))
    lw, lh = slide.level_dimensions[level]
    layout = slide.tile_layout(level)
    frame = _Frame(level, (tw, th), (lw, lh), lw / tw, lh / th)
    decoded = lw * lh if layout is None else layout.data_pixels
    large = decoded > large_pixels
    thumb = np.empty((th, tw, 3), dtype=np.uint8)
    thumb[...] = np.asarray(slide.background, dtype=np.uint8)
    failed: list[Box] = []
    started, warned = time.monotonic(), not large
    with tqdm(
        total=th,
        unit="row",
        desc=f"thumbnail of {slide.path.name}",
        disable=not (large if progress is None else progress),
    ) as bar:
        for strip in _strips(frame, layout):
            if strip.span is not None:
                tx0, shrunk, done = _shrink_strip(
                    slide, frame, strip, strip.span, on_tile_error, failed
                )
                thumb[strip.t0 : strip.t1, tx0 : tx0 + shrunk.shape[1]] = shrunk
                if not warned:  # estimate the time from the first strip read
                    elapsed = time.monotonic() - started
                    _warn_large(slide.path, decoded, level, done, elapsed)
                    warned = True
            bar.update(strip.t1 - strip.t0)
    if failed:
        _warn_unreadable(slide.path, failed, (w, h))
    return Thumbnail(thumb, (w / tw, h / th), tuple(failed))


def _read_level(
    slide: Slide,
    level: int,
    box: Box,
    on_tile_error: str,
    failed: list[Box],
) -> RGB:
    """Pixels ``[x0, x1) x [y0, y1)`` of ``level``, reading only TIFF tiles with data."""
    x0, y0, x1, y1 = box
    out = np.empty((y1 - y0, x1 - x0, 3), dtype=np.uint8)
    out[...] = np.asarray(slide.background, dtype=np.uint8)
    layout = slide.tile_layout(level)
    runs: list[tuple[int, int, int, int]] = [box]
    if layout is not None:  # per tile row, each run of consecutive tiles with data
        tw, th = layout.tile_size
        runs = []
        for r in range(y0 // th, (y1 - 1) // th + 1):
            full = np.flatnonzero(~layout.empty[r, x0 // tw : (x1 - 1) // tw + 1])
            for cols in np.split(full, np.flatnonzero(np.diff(full) > 1) + 1):
                if cols.size:
                    c0, c1 = (x0 // tw + int(cols[0])) * tw, (x0 // tw + int(cols[-1]) + 1) * tw
                    runs.append((max(c0, x0), max(r * th, y0), min(c1, x1), min((r + 1) * th, y1)))
    for run in runs:
        rx0, ry0, rx1, ry1 = run
        out[ry0 - y0 : ry1 - y0, rx0 - x0 : rx1 - x0] = _read_run(
            slide, level, run, on_tile_error, failed
        )
    return out


def _read_run(
    slide: Slide,
    level: int,
    box: Box,
    on_tile_error: str,
    failed: list[Box],
) -> RGB:
    """One read of ``level``; with "skip", a failed read is retried block by block."""
    x0, y0, x1, y1 = box
    down = slide.level_downsamples[level]
    try:
        return slide.read_region((round(x0 * down), round(y0 * down)), level, (x1 - x0, y1 - y0))
    except SlideReadError:
        if on_tile_error == "raise":
            raise
    out = np.empty((y1 - y0, x1 - x0, 3), dtype=np.uint8)
    out[...] = np.asarray(slide.background, dtype=np.uint8)
    layout = slide.tile_layout(level)
    bw, bh = (_SKIP_BLOCK, _SKIP_BLOCK) if layout is None else layout.tile_size
    for by in range((y0 // bh) * bh, y1, bh):
        for bx in range((x0 // bw) * bw, x1, bw):
            if layout is not None and layout.empty[by // bh, bx // bw]:
                continue  # background without reading
            cx0, cy0, cx1, cy1 = max(bx, x0), max(by, y0), min(bx + bw, x1), min(by + bh, y1)
            loc = (round(cx0 * down), round(cy0 * down))
            try:
                block = slide.read_region(loc, level, (cx1 - cx0, cy1 - cy0))
            except SlideReadError:
                size0 = (round((cx1 - cx0) * down), round((cy1 - cy0) * down))
                failed.append((loc[0], loc[1], size0[0], size0[1]))
                continue
            out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = block
    return out


def _warn_large(path: Path, decoded: int, level: int, done: int, elapsed: float) -> None:
    rate = done / max(elapsed, 1e-6)
    warnings.warn(
        f"{path.name} has no pyramid level near the thumbnail's resolution: its thumbnail "
        f"decodes {decoded:,} pixels of level {level}, about {decoded / rate:,.0f} s at the "
        f"{rate / 1e6:,.1f} M pixels/s of the first strip. Write a pyramid once "
        "(captum_nmf.wsi.write_pyramid, or vips tiffsave --tile --pyramid) to make this instant.",
        LargeThumbnailWarning,
        stacklevel=4,
    )


def _warn_unreadable(
    path: Path, failed: list[tuple[int, int, int, int]], dimensions: tuple[int, int]
) -> None:
    area = sum(w * h for _, _, w, h in failed) / max(dimensions[0] * dimensions[1], 1)
    shown = "; ".join(f"({x}, {y}, {w}, {h})" for x, y, w, h in failed[:10])
    more = f"; and {len(failed) - 10} more" if len(failed) > 10 else ""
    warnings.warn(
        f"{len(failed)} region(s) of {path.name} ({100 * area:.2g} % of the slide) could not be "
        f"read for its thumbnail and are background there (no tissue to tissue detection, "
        "blank in a slide figure; on_tile_error='skip'). "
        f"Level-0 (x, y, width, height): {shown}{more}.",
        UnreadableRegionWarning,
        stacklevel=4,
    )
