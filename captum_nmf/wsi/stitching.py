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

At the slide's own boundary, and next to a tile that was left out (too little
tissue), a tile's border cells are covered by no other tile's interior:
dropping them there leaves tissue without a value. With ``coverage``
(:func:`cell_coverage` over every tile of the run) each cell averages the
tiles that see it best instead: the tiles whose interior covers it (the
paper's rule, kept bit for bit wherever some interior reaches); where none
does, the tiles in whose border it lies on one side only (so the other axis is
still a tile interior: at the slide's top edge, the tiles directly below);
where only tiles' corners reach it (the slide's corners), those corners.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from captum_nmf._utils.validation import check_int

__all__ = ["FeatureStitcher", "StitchedBand", "cell_coverage"]

NO_TILE = 3  # cell_coverage of a cell that no tile reaches


def _pair(name: str, value: object) -> tuple[int, int]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a pair of ints (rows, cols), got {value!r}.")
    return check_int(f"{name}[0]", value[0], minimum=1), check_int(
        f"{name}[1]", value[1], minimum=1
    )


def _union(
    org: NDArray[np.int64], rows: tuple[int, int], cols: tuple[int, int], shape: tuple[int, int]
) -> NDArray[np.bool_]:
    """Cells inside ``[r + rows[0], r + rows[1]) x [c + cols[0], c + cols[1])`` of any origin."""
    hc, wc = shape
    out = np.zeros(shape, dtype=bool)
    for r0 in np.unique(org[:, 0]).tolist():  # one 1-D cumulative sum per distinct tile row
        lo, hi = max(r0 + rows[0], 0), min(r0 + rows[1], hc)
        if lo >= hi:
            continue
        c0 = org[org[:, 0] == r0, 1]
        steps = np.zeros(wc + 1, dtype=np.int64)
        np.add.at(steps, np.clip(c0 + cols[0], 0, wc), 1)
        np.add.at(steps, np.clip(c0 + cols[1], 0, wc), -1)
        out[lo:hi] |= np.cumsum(steps[:wc]) > 0
    return out


def cell_coverage(
    origins: NDArray[np.integer],
    tile_cells: tuple[int, int],
    border: int,
    grid_shape: tuple[int, int],
) -> NDArray[np.uint8]:
    """How well the best tile sees each cell: on how few sides it lies in that tile's border.

    A tile at cell origin ``(r, c)`` with ``h x w`` cells has the interior
    ``[r + border, r + h - border) x [c + border, c + w - border)``. A cell in
    the tile lies in its border on 0 sides (interior), 1 side (the tile's
    edge bands beside the interior) or 2 sides (the tile's corners). The
    result is the smallest of these over all tiles, or 3 where no tile
    reaches. Pass every tile of the run, failed ones too: the result must not
    depend on which reads failed, so a resumed run computes the same one.
    :class:`FeatureStitcher` averages, in each cell, only the tiles that
    reach this level. The cost is a few 1-D cumulative sums per distinct tile
    row and one byte per cell.

    Args:
        origins (ndarray): N x 2 integer ``(row, col)`` cell origins of the tiles.
        tile_cells (tuple[int, int]): ``(h, w)`` feature-map cells per tile.
        border (int): cells dropped on each side of a tile.
        grid_shape (tuple[int, int]): ``(Hc, Wc)`` cells of the slide.

    Returns:
        *ndarray*: Hc x Wc ``uint8`` in {0, 1, 2, 3}; ``== 0`` is the cells
        some tile's interior covers.

    Raises:
        TypeError: ``origins`` is not integer, or a size is not an int.
        ValueError: ``origins`` is not N x 2, a size is not positive, or
                    ``border`` leaves no interior.

    Examples::

        >>> import numpy as np
        >>> from captum_nmf.wsi.stitching import cell_coverage
        >>> print(cell_coverage(np.array([[0, 0], [0, 2]]), (4, 4), 1, (5, 6)))
        [[2 1 1 1 1 2]
         [1 0 0 0 0 1]
         [1 0 0 0 0 1]
         [2 1 1 1 1 2]
         [3 3 3 3 3 3]]
    """
    org = np.asarray(origins)
    if org.size and not np.issubdtype(org.dtype, np.integer):
        raise TypeError(f"origins must hold integer cell positions, got dtype {org.dtype}.")
    if org.ndim != 2 or org.shape[1] != 2:
        raise ValueError(f"origins must be N x 2 (row, col) cells, got shape {org.shape}.")
    h, w = _pair("tile_cells", tile_cells)
    shape = _pair("grid_shape", grid_shape)
    b = check_int("border", border, minimum=0)
    if h <= 2 * b or w <= 2 * b:
        raise ValueError(
            f"border={b} leaves no interior in a tile of {h} x {w} cells; use a smaller border."
        )
    org = org.astype(np.int64, copy=False)
    inner_r, inner_c, all_r, all_c = (b, h - b), (b, w - b), (0, h), (0, w)
    level = np.full(shape, NO_TILE, dtype=np.uint8)
    level[_union(org, all_r, all_c, shape)] = 2
    level[_union(org, inner_r, all_c, shape) | _union(org, all_r, inner_c, shape)] = 1
    level[_union(org, inner_r, inner_c, shape)] = 0
    return level


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
        coverage (ndarray, optional): Hc x Wc ``uint8`` from
                    :func:`cell_coverage` over every tile of the run (same
                    tile size and border). A tile then contributes to a cell
                    when the cell lies in its border on exactly
                    ``coverage[cell]`` sides: cells some interior covers (0)
                    keep the border drop bit for bit; the slide's edges and
                    tissue edges next to a left-out tile (1 or 2) get the
                    tiles that see them best instead of no value. Rows are
                    handed out up to ``border`` rows later (a later tile's
                    top border may still land on them). Kept by reference: do
                    not modify it during the run.
                    Default: None (every tile's border dropped everywhere)

    Raises:
        TypeError: ``n_channels`` is not an int, or ``coverage`` is not a
                    ``uint8`` array.
        ValueError: a non-positive grid or channel count, a negative border,
                    or ``coverage`` of another shape than ``grid_shape`` or
                    with values above 3.

    Examples::

        >>> import numpy as np
        >>> from captum_nmf.wsi import FeatureStitcher
        >>> st = FeatureStitcher((4, 6), n_channels=1, border=0)
        >>> st.add(np.ones((2, 4, 4, 1), np.float32), np.array([[0, 0], [0, 2]]))
        >>> [band.counts.tolist() for band in st.finish()][0]
        [1, 1, 2, 2, 1, 1]
    """

    def __init__(
        self,
        grid_shape: tuple[int, int],
        n_channels: int,
        *,
        border: int = 2,
        coverage: NDArray[np.uint8] | None = None,
    ) -> None:
        hc, wc = (int(v) for v in grid_shape)
        if hc < 1 or wc < 1:
            raise ValueError(f"grid_shape must be two positive ints, got {grid_shape!r}.")
        check_int("n_channels", n_channels, minimum=1)
        check_int("border", border, minimum=0)
        if coverage is not None:
            if not isinstance(coverage, np.ndarray) or coverage.dtype != np.uint8:
                kind = (
                    coverage.dtype if isinstance(coverage, np.ndarray) else type(coverage).__name__
                )
                raise TypeError(
                    f"coverage must be the uint8 array of cell_coverage(...), got {kind}."
                )
            if coverage.shape != (hc, wc):
                raise ValueError(
                    f"coverage has shape {coverage.shape} but the grid is {(hc, wc)}; compute it "
                    "with cell_coverage(origins, tile_cells, border, grid_shape)."
                )
            if coverage.size and int(coverage.max()) > NO_TILE:
                raise ValueError(
                    f"coverage holds {int(coverage.max())}; cell_coverage gives 0 to 3 (sides "
                    "of the best tile's border a cell lies in, 3 = no tile)."
                )
        self.grid_shape: tuple[int, int] = (hc, wc)
        self.n_channels: int = int(n_channels)
        self.border: int = int(border)
        self.coverage: NDArray[np.uint8] | None = coverage
        # rows holding a cell only tiles' borders reach: a later tile's top border may land there
        self._open: NDArray[np.bool_] | None = (
            None if coverage is None else ((coverage != 0) & (coverage != NO_TILE)).any(axis=1)
        )
        self._sums: dict[int, NDArray[np.float32]] = {}
        self._counts: dict[int, NDArray[np.int32]] = {}
        self._last_origin: int = -(1 << 62)  # origin row of the latest tile added
        self._final_below: int = 0  # rows below this were handed out

    @property
    def active_rows(self) -> int:
        """Rows currently held in memory."""
        return len(self._sums)

    def footprint(
        self, origin: tuple[int, int], tile_cells: tuple[int, int]
    ) -> tuple[slice, slice, NDArray[np.bool_]]:
        """The cells a tile at ``origin`` contributes to.

        Its interior; with ``coverage`` also the border cells it sees as well
        as any tile does (those whose ``coverage`` equals the number of sides
        on which they lie in this tile's border). Clipped to the grid. The
        runner uses it to tell which cells only failed tiles would have reached.

        Args:
            origin (tuple[int, int]): ``(row, col)`` cell of the tile's corner.
            tile_cells (tuple[int, int]): ``(h, w)`` cells of its feature map.

        Returns:
            *tuple[slice, slice, ndarray]*: row and column slices of the grid
            window the tile overlaps, and the bool mask of the cells it
            contributes to within that window (``grid[rows, cols][mask]``).
        """
        hc, wc = self.grid_shape
        r0, c0 = (int(v) for v in origin)
        h, w = (int(v) for v in tile_cells)
        b = self.border
        if self.coverage is None:  # the interior only
            rows = slice(min(max(r0 + b, 0), hc), min(max(r0 + h - b, 0), hc))
            cols = slice(min(max(c0 + b, 0), wc), min(max(c0 + w - b, 0), wc))
            return rows, cols, np.ones((rows.stop - rows.start, cols.stop - cols.start), bool)
        rows = slice(min(max(r0, 0), hc), min(max(r0 + h, 0), hc))
        cols = slice(min(max(c0, 0), wc), min(max(c0 + w, 0), wc))
        ri = np.arange(rows.start, rows.stop) - r0
        ci = np.arange(cols.start, cols.stop) - c0
        sides = ((ri < b) | (ri >= h - b)).astype(np.uint8)[:, None] + (
            (ci < b) | (ci >= w - b)
        ).astype(np.uint8)[None, :]
        return rows, cols, sides == self.coverage[rows, cols]

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
        for i in range(n):
            r0, c0 = int(org[i, 0]), int(org[i, 1])
            rows, cols, keep = self.footprint((r0, c0), (h, w))
            some: list[bool] = np.asarray(keep.any(axis=1), dtype=bool).tolist()
            every: list[bool] = np.asarray(keep.all(axis=1), dtype=bool).tolist()
            for j, r in enumerate(range(rows.start, rows.stop)):
                if not some[j]:
                    continue
                line = keep[j]
                if r < self._final_below:
                    raise ValueError(f"cell row {r} was already finished; tiles out of order.")
                sums, counts = self._row(r)
                if every[j]:  # a contiguous run of cells: the plain border-drop path
                    sums[cols] += feats[i, r - r0, cols.start - c0 : cols.stop - c0]
                    counts[cols] += 1
                else:
                    at = np.flatnonzero(line) + cols.start
                    sums[at] += feats[i, r - r0, at - c0]
                    counts[at] += 1
        if n:
            self._last_origin = int(org[-1, 0])

    def _row(self, r: int) -> tuple[NDArray[np.float32], NDArray[np.int32]]:
        sums = self._sums.get(r)
        if sums is None:
            wc = self.grid_shape[1]
            sums = self._sums[r] = np.zeros((wc, self.n_channels), dtype=np.float32)
            self._counts[r] = np.zeros(wc, dtype=np.int32)
        return sums, self._counts[r]

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

        A later tile starts at or below the latest tile's origin row ``r``, so
        its interior begins at ``r + border`` or lower. With ``coverage`` its
        top border rows may also land on rows from ``r`` on that hold a cell
        only tiles' borders reach (``coverage`` 1 or 2); the first such row
        stops the hand-out.

        Returns:
            *list[StitchedBand]*: finished rows that received any tile, top to bottom.
        """
        below = self._last_origin + self.border
        if self._open is not None:
            start = max(self._last_origin, 0)
            hold = np.flatnonzero(self._open[start : max(below, start)])
            if hold.size:
                below = start + int(hold[0])
        return self._pop(below)

    def finish(self) -> list[StitchedBand]:
        """Hand out every remaining row (after the last tile).

        Returns:
            *list[StitchedBand]*: the remaining rows with data, top to bottom.
        """
        return self._pop(self.grid_shape[0])

    # ------------------------------------------------------------- resumption
    def state(self) -> dict[str, NDArray[np.generic]]:
        """The pending rows and position, to resume stitching exactly (see :meth:`from_state`).

        Only the columns that hold data are stored. ``coverage`` is not (it
        follows from the run's tiles); ``position`` records whether it was
        given and how many cells hold each level, so :meth:`from_state` can
        check the one it is given.

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
        levels = (
            [0] * (NO_TILE + 1)
            if self.coverage is None
            else np.bincount(self.coverage.ravel(), minlength=NO_TILE + 1).tolist()
        )
        return {
            "rows": np.asarray(rows, dtype=np.int64),
            "cols": cols,
            "sums": sums,
            "counts": np.ascontiguousarray(counts[:, cols]),
            "position": np.asarray(
                [
                    self._last_origin,
                    self._final_below,
                    self.border,
                    *self.grid_shape,
                    int(self.coverage is not None),
                    *levels,
                ],
                dtype=np.int64,
            ),
        }

    @classmethod
    def from_state(
        cls,
        state: dict[str, NDArray[np.generic]],
        n_channels: int,
        *,
        coverage: NDArray[np.uint8] | None = None,
    ) -> FeatureStitcher:
        """Rebuild a stitcher from :meth:`state`; it continues bit for bit.

        Args:
            state (dict[str, ndarray]): what :meth:`state` returned.
            n_channels (int): C, channels of the feature maps.
            coverage (ndarray, optional): the ``coverage`` the saved stitcher
                        had (recompute it with :func:`cell_coverage`).
                        Default: None

        Returns:
            *FeatureStitcher*: the restored stitcher.

        Raises:
            ValueError: ``coverage`` is given to a state saved without it (or
                        not given to one saved with it), or differs from the
                        saved one in how many cells hold each level.
        """
        position = [int(v) for v in np.asarray(state["position"]).reshape(-1)]
        last, final_below, border, hc, wc = position[:5]
        kept = bool(position[5]) if len(position) > 5 else False
        if kept != (coverage is not None):
            raise ValueError(
                "coverage must be given exactly when the saved stitcher had it; this state was "
                f"saved {'with' if kept else 'without'} coverage (cell_coverage)."
            )
        st = cls((hc, wc), n_channels, border=border, coverage=coverage)
        if st.coverage is not None:
            levels = np.bincount(st.coverage.ravel(), minlength=NO_TILE + 1).tolist()
            if levels != position[6:]:
                raise ValueError(
                    f"coverage has {levels} cells at levels 0-3, the saved stitcher had "
                    f"{position[6:]}; recompute it from the same tiles, tile size and border."
                )
        st._last_origin, st._final_below = last, final_below
        cols = np.asarray(state["cols"], dtype=np.int64)
        for i, r in enumerate(np.asarray(state["rows"]).tolist()):
            sums = np.zeros((wc, n_channels), dtype=np.float32)
            counts = np.zeros(wc, dtype=np.int32)
            sums[cols] = state["sums"][i]
            counts[cols] = state["counts"][i]
            st._sums[int(r)], st._counts[int(r)] = sums, counts
        return st
