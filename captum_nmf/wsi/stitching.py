"""Averaging overlapping tiles' feature maps on the slide's cell grid, band by band.

The slide is divided into *cells*, one per feature-map location: a tile of
``T`` pixels whose layer output is ``h x h`` has cells of ``T / h`` pixels,
and a tile whose corner is at output pixel ``(y, x)`` starts at cell
``(y / cell, x / cell)``. Every tile's feature map, minus a ``border`` of
cells on each side (those see the tile's zero padding), is added to the cells
it covers; each cell's feature vector is the mean of all the vectors that
landed on it, as in "Explaining digital pathology models via clustering
activations". Tiles arrive in raster order, so a cell row is final as soon as
the next tile starts below it: :meth:`FeatureStitcher.pop_final` hands out
finished rows and forgets them. Memory holds only the rows that tiles of the
current tile row can still touch (about one tile height of cells times the
slide width times C), never the slide area times C.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["FeatureStitcher", "StitchedBand"]


@dataclass(frozen=True)
class StitchedBand:
    """One finished row of cells.

    Attributes:
        row (int): cell row on the slide grid.
        features (ndarray): Wc x C float32 mean feature vectors (0 where no tile landed).
        counts (ndarray): Wc ``int32`` number of tiles averaged in each cell.
    """

    row: int
    features: NDArray[np.float32]
    counts: NDArray[np.int32]


class FeatureStitcher:
    r"""Average overlapping tiles' feature maps into slide cells, in raster order.

    Args:
        grid_shape (tuple[int, int]): (Hc, Wc), cell rows and columns of the slide.
        n_channels (int): C, channels of the feature maps.
        border (int, optional): cells dropped on each side of every tile's
                    feature map (the paper: 2).
                    Default: 2

    Raises:
        ValueError: a non-positive grid or channel count, or a negative border.

    Examples::

        >>> import numpy as np
        >>> from captum_nmf.wsi import FeatureStitcher
        >>> st = FeatureStitcher((4, 6), n_channels=1, border=0)
        >>> st.add(np.ones((2, 4, 4, 1), np.float32), np.array([[0, 0], [0, 2]]))
        >>> [band.counts.tolist() for band in st.finish()][0]
        [1, 1, 2, 2, 1, 1]
    """

    def __init__(self, grid_shape: tuple[int, int], n_channels: int, *, border: int = 2) -> None:
        hc, wc = (int(v) for v in grid_shape)
        if hc < 1 or wc < 1:
            raise ValueError(f"grid_shape must be two positive ints, got {grid_shape!r}.")
        if isinstance(n_channels, bool) or not isinstance(n_channels, numbers.Integral):
            raise TypeError(f"n_channels must be an int, got {n_channels!r}.")
        if n_channels < 1:
            raise ValueError(f"n_channels must be >= 1, got {n_channels}.")
        if isinstance(border, bool) or not isinstance(border, numbers.Integral) or border < 0:
            raise ValueError(f"border must be an int >= 0 (cells), got {border!r}.")
        self.grid_shape: tuple[int, int] = (hc, wc)
        self.n_channels: int = int(n_channels)
        self.border: int = int(border)
        self._sums: dict[int, NDArray[np.float32]] = {}
        self._counts: dict[int, NDArray[np.int32]] = {}
        self._last_origin: int = -(1 << 62)  # origin row of the latest tile added
        self._final_below: int = 0  # rows below this were handed out

    @property
    def active_rows(self) -> int:
        """Rows currently held in memory."""
        return len(self._sums)

    def add(self, features: NDArray[np.floating], origins: NDArray[np.integer]) -> None:
        """Add tiles' feature maps (channels last) at their cell origins.

        Args:
            features (ndarray): N x h x w x C feature maps.
            origins (ndarray): N x 2 ``(row, col)`` cell of each tile's
                        top-left feature-map location; rows must not decrease
                        (raster order), within and across calls.

        Raises:
            ValueError: shapes disagree, C differs, the border leaves nothing,
                        or tiles arrive out of raster order.
        """
        feats = np.asarray(features)
        org = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
        if feats.ndim != 4 or feats.shape[0] != org.shape[0]:
            raise ValueError(
                f"features must be N x h x w x C with one origin per tile, got features "
                f"{feats.shape} and {org.shape[0]} origins."
            )
        n, h, w, c = feats.shape
        if c != self.n_channels:
            raise ValueError(f"features have {c} channels, the stitcher {self.n_channels}.")
        b = self.border
        if h <= 2 * b or w <= 2 * b:
            raise ValueError(
                f"border={b} drops every cell of a {h} x {w} feature map; use larger tiles or "
                "a smaller border."
            )
        if n and (np.any(np.diff(org[:, 0]) < 0) or org[0, 0] < self._last_origin):
            raise ValueError(
                "tiles must arrive in raster order (non-decreasing rows); got origin rows "
                f"{org[:, 0].tolist()[:8]} after row {self._last_origin}."
            )
        hc, wc = self.grid_shape
        for i in range(n):
            r0, c0 = int(org[i, 0]), int(org[i, 1])
            col_lo, col_hi = max(c0 + b, 0), min(c0 + w - b, wc)
            if col_lo >= col_hi:
                continue
            for r in range(max(r0 + b, 0), min(r0 + h - b, hc)):
                if r < self._final_below:
                    raise ValueError(f"cell row {r} was already finished; tiles out of order.")
                sums = self._sums.get(r)
                if sums is None:
                    sums = self._sums[r] = np.zeros((wc, c), dtype=np.float32)
                    self._counts[r] = np.zeros(wc, dtype=np.int32)
                sums[col_lo:col_hi] += feats[i, r - r0, col_lo - c0 : col_hi - c0]
                self._counts[r][col_lo:col_hi] += 1
        if n:
            self._last_origin = int(org[-1, 0])

    def _pop(self, below: int) -> list[StitchedBand]:
        bands = []
        for r in sorted(k for k in self._sums if k < below):
            sums, counts = self._sums.pop(r), self._counts.pop(r)
            mean = sums / np.maximum(counts, 1)[:, None].astype(np.float32)
            bands.append(StitchedBand(r, mean.astype(np.float32, copy=False), counts))
        self._final_below = max(self._final_below, below)
        return bands

    def pop_final(self) -> list[StitchedBand]:
        """Hand out (and forget) the rows no later tile can touch.

        Returns:
            *list[StitchedBand]*: finished rows that received any tile, top to bottom.
        """
        return self._pop(self._last_origin + self.border)

    def finish(self) -> list[StitchedBand]:
        """Hand out every remaining row (after the last tile).

        Returns:
            *list[StitchedBand]*: the remaining rows with data, top to bottom.
        """
        return self._pop(self.grid_shape[0])

    # ------------------------------------------------------------- resumption
    def state(self) -> dict[str, NDArray[np.generic]]:
        """The pending rows and position, to resume stitching exactly (see :meth:`from_state`).

        Only the columns that hold data are stored.

        Returns:
            *dict[str, ndarray]*: ``rows``, ``cols``, ``sums``, ``counts`` and ``position``.
        """
        rows = sorted(self._sums)
        c = self.n_channels
        counts = (
            np.stack([self._counts[r] for r in rows])
            if rows
            else np.zeros((0, self.grid_shape[1]), np.int32)
        )
        cols = np.flatnonzero(counts.any(axis=0)).astype(np.int64)
        sums = (
            np.stack([self._sums[r][cols] for r in rows])
            if rows
            else np.zeros((0, 0, c), np.float32)
        )
        return {
            "rows": np.asarray(rows, dtype=np.int64),
            "cols": cols,
            "sums": sums,
            "counts": np.ascontiguousarray(counts[:, cols]),
            "position": np.asarray(
                [self._last_origin, self._final_below, self.border, *self.grid_shape],
                dtype=np.int64,
            ),
        }

    @classmethod
    def from_state(cls, state: dict[str, NDArray[np.generic]], n_channels: int) -> FeatureStitcher:
        """Rebuild a stitcher from :meth:`state`; it continues bit for bit.

        Returns:
            *FeatureStitcher*: the restored stitcher.
        """
        last, final_below, border, hc, wc = (int(v) for v in state["position"])
        st = cls((hc, wc), n_channels, border=border)
        st._last_origin, st._final_below = last, final_below
        cols = np.asarray(state["cols"], dtype=np.int64)
        for i, r in enumerate(np.asarray(state["rows"]).tolist()):
            sums = np.zeros((wc, n_channels), dtype=np.float32)
            counts = np.zeros(wc, dtype=np.int32)
            sums[cols] = state["sums"][i]
            counts[cols] = state["counts"][i]
            st._sums[int(r)], st._counts[int(r)] = sums, counts
        return st
