"""Tissue-aware regions for the fast mode of ``explain_slide``.

The fast mode runs the network's fully convolutional part once per region
instead of on 4x-overlapping tiles. A fixed grid of large regions carries much
background at the tissue's edges, so the regions are planned on the grid of
feature-map cells: each root region (``region_size`` px) becomes one region
shrunk to the bounding box of its tissue cells, or is split into quarters
(recursively, down to an eighth of ``region_size``) when that sends fewer
pixels, context margins included, through the network. The regions never
overlap and together cover every tissue cell once; each is read with
``margin`` px of context on every side, which the network sees and the maps
drop.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray
from torch import Tensor
from torch.utils.data import Dataset

from captum_nmf.wsi.reader import Resolution
from captum_nmf.wsi.tiling import SlideHandles, SlideTiles, load_item
from captum_nmf.wsi.tissue import TissueMask

__all__ = ["RegionTiles", "plan_regions", "tissue_cells"]

_TISSUE = 0.5


def tissue_cells(
    mask: TissueMask | None, shape: tuple[int, int], cell_level0: float
) -> NDArray[np.bool_]:
    """Hc x Wc: cells at least half tissue by ``mask`` (all cells without a mask).

    The same rule as :attr:`SlideExplanation.tissue_cells`, so region mode
    explains exactly the cells an explanation counts and assigns as tissue.
    """
    hc, wc = shape
    if mask is None:
        return np.ones(shape, dtype=bool)
    out = np.zeros(shape, dtype=bool)
    cols = np.arange(wc) * cell_level0
    side = np.full(wc, cell_level0)
    for r in range(hc):  # row by row: no slide-sized temporaries
        boxes = np.stack([cols, np.full(wc, r * cell_level0), side, side], axis=1)
        out[r] = mask.fractions(boxes) >= _TISSUE
    return out


def plan_regions(
    tissue: NDArray[np.bool_],
    root_cells: int,
    margin_cells: int = 0,
    min_cells: int | None = None,
) -> NDArray[np.int64]:
    """Non-overlapping boxes of cells that cover every True cell of ``tissue`` once.

    Roots of ``root_cells`` x ``root_cells`` cells in raster order. Each root
    (and, recursively, each quarter down to sides of ``min_cells``) becomes
    either one region, shrunk to the bounding box of its tissue, or its
    quarters' plans, whichever sends fewer pixels through the network:
    a region of h x w cells costs ``(h + 2 m) * (w + 2 m)`` with ``m =
    margin_cells``.

    Args:
        tissue (ndarray): Hc x Wc bool.
        root_cells (int): side of a root region in cells.
        margin_cells (int, optional): context read on each side of a region.
                    Default: 0
        min_cells (int, optional): smallest quarter side considered.
                    Default: None (``root_cells // 8``, at least 1)

    Returns:
        *ndarray*: n x 4 int64 ``(row, col, height, width)`` in cells.

    Raises:
        ValueError: ``root_cells < 1``, ``margin_cells < 0`` or ``tissue`` is not 2-D.
    """
    t = np.asarray(tissue, dtype=bool)
    if t.ndim != 2:
        raise ValueError(f"tissue must be a 2-D bool array, got shape {t.shape}.")
    if root_cells < 1:
        raise ValueError(f"root_cells must be >= 1, got {root_cells}.")
    if margin_cells < 0:
        raise ValueError(f"margin_cells must be >= 0, got {margin_cells}.")
    smallest = max(1, root_cells // 8 if min_cells is None else min_cells)
    m = margin_cells

    def best(r: int, c: int, h: int, w: int) -> tuple[int, list[tuple[int, int, int, int]]]:
        part = t[r : r + h, c : c + w]
        if not part.any():
            return 0, []
        rows = np.flatnonzero(part.any(axis=1))
        cols = np.flatnonzero(part.any(axis=0))
        bh, bw = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        own = (bh + 2 * m) * (bw + 2 * m), [(r + int(rows[0]), c + int(cols[0]), bh, bw)]
        hh, hw = h // 2, w // 2
        if min(hh, hw) < smallest:
            return own
        cost, leaves = 0, []
        for r0, h0 in ((r, hh), (r + hh, h - hh)):  # four disjoint rectangles, odd sides too
            for c0, w0 in ((c, hw), (c + hw, w - hw)):
                sub = best(r0, c0, h0, w0)
                cost += sub[0]
                leaves += sub[1]
        return (cost, leaves) if cost < own[0] else own

    plan: list[tuple[int, int, int, int]] = []
    for r in range(0, t.shape[0], root_cells):
        for c in range(0, t.shape[1], root_cells):
            plan += best(r, c, root_cells, root_cells)[1]
    return np.asarray(plan, dtype=np.int64).reshape(-1, 4)


class RegionTiles(Dataset[tuple[Tensor | None, int]]):
    """The planned regions of one slide, read with their context margin (picklable).

    Item ``i`` is ``(image, i)`` with image 3 x (h + 2m) x (w + 2m) in [0, 1]
    (after ``transform``), or ``(None, i)`` when the read failed twice and
    ``on_tile_error="skip"``.
    """

    def __init__(
        self,
        path: str,
        resolution: Resolution,
        boxes: NDArray[np.int64],
        cell: int,
        margin: int,
        *,
        transform: Any = None,
        slide_mpp: float | None = None,
        on_tile_error: str = "raise",
    ) -> None:
        self.path = path
        self.resolution = resolution
        self.boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
        self.cell = cell
        self.margin = margin
        self.transform = transform
        self.slide_mpp = slide_mpp
        self.on_tile_error = on_tile_error
        self._handles = SlideHandles(1, slide_mpp)  # this process's one handle, fork-safe

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def location(self, index: int) -> tuple[int, int]:
        """Level-0 (x, y) of region ``index``'s corner, context margin included."""
        r, c = (int(v) for v in self.boxes[index, :2])
        scale = self.resolution.scale
        return (
            round((c * self.cell - self.margin) * scale),
            round((r * self.cell - self.margin) * scale),
        )

    def size(self, index: int) -> tuple[int, int]:
        """(width, height) in output pixels, context margin included."""
        h, w = (int(v) for v in self.boxes[index, 2:])
        return w * self.cell + 2 * self.margin, h * self.cell + 2 * self.margin

    def __getitem__(self, index: int) -> tuple[Tensor | None, int]:
        slide = self._handles.get(self.path)
        return load_item(
            lambda: slide.read_tile(self.location(index), self.resolution, self.size(index)),
            index,
            self.on_tile_error,
            self.transform,
        )

    # one region per batch (regions differ in size): (images, indices, failed)
    collate_fn = staticmethod(SlideTiles.collate_fn)

    def close(self) -> None:
        """Close the slide handle of this process."""
        self._handles.close()
