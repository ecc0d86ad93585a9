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
import torch
from numpy.typing import NDArray
from torch import Tensor

from captum_nmf._utils.transfer import upload
from captum_nmf._utils.validation import check_device, check_int

__all__ = ["FeatureStitcher", "StitchedBand", "StitchedRows", "cell_coverage"]

NO_TILE = 3  # cell_coverage of a cell that no tile reaches
_BAND = 8  # cell rows per allocated band of running sums


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
        features (ndarray or Tensor): Wc x C float32 mean feature vectors (0
                    where no tile landed); a tensor on the stitcher's
                    ``device`` when it has one.
        counts (ndarray): Wc ``int32`` number of tiles averaged in each cell.
    """

    row: int
    features: NDArray[np.float32] | Tensor
    counts: NDArray[np.int32]


@dataclass(frozen=True)
class StitchedRows:
    """Finished rows of cells at once (what :class:`StitchedBand` holds, for several rows).

    Attributes:
        rows (ndarray): n ``int64`` cell rows, increasing.
        features (Tensor): n x Wc x C float32 means on the stitcher's device.
        counts (ndarray): n x Wc ``int32`` tiles averaged in each cell.
    """

    rows: NDArray[np.int64]
    features: Tensor
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
        device (torch.device or str, optional): where the running sums live and
                    the averaging happens, e.g. the model's device, so that
                    activations never leave it: :meth:`add` then takes
                    tensors (N x h x w x C, any device; a channels-first
                    batch's ``permute(0, 2, 3, 1)`` view is fine) and the
                    bands' ``features`` are tensors on ``device``.
                    Default: None (NumPy in and out; computed on the CPU)

    Raises:
        TypeError: ``n_channels`` is not an int, or ``coverage`` is not a
                    ``uint8`` array.
        ValueError: a non-positive grid or channel count, a negative border,
                    ``coverage`` of another shape than ``grid_shape`` or
                    with values above 3, or a ``device`` this machine lacks.

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
        device: torch.device | str | None = None,
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
        self.device: torch.device | None = (
            None if device is None else check_device("device", device)
        )
        # rows holding a cell only tiles' borders reach: a later tile's top border may land there
        self._open: NDArray[np.bool_] | None = (
            None if coverage is None else ((coverage != 0) & (coverage != NO_TILE)).any(axis=1)
        )
        # The running sums of the rows still open, in bands of _BAND consecutive rows (C x Wc
        # each: a channels-first activation's row of cells is then a contiguous run on both
        # sides of the addition), allocated where a tile lands and freed once handed out, so
        # memory is the bands of rows the current tiles touch, never a gap without tissue.
        self._sums: dict[int, Tensor] = {}
        self._counts: dict[int, NDArray[np.int32]] = {}  # on the host
        self._masks: dict[tuple[tuple[int, ...], bytes], Tensor] = {}  # edge masks, on device
        self._padded: tuple[tuple[int, int], NDArray[np.uint8]] | None = None  # see _kept
        self._last_origin: int = -(1 << 62)  # origin row of the latest tile added
        self._final_below: int = 0  # rows below this were handed out

    @property
    def _compute_device(self) -> torch.device:
        return torch.device("cpu") if self.device is None else self.device

    @property
    def active_rows(self) -> int:
        """Rows currently holding data."""
        return len(self._live_rows())

    @property
    def allocated_rows(self) -> int:
        """Rows of running sums in memory (bands of 8 rows where tiles landed), each Wc x C."""
        return _BAND * len(self._sums)

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
        window = self._keep_windows(np.array([[r0, c0]], dtype=np.int64), h, w)[0]
        return (
            rows,
            cols,
            window[rows.start - r0 : rows.stop - r0, cols.start - c0 : cols.stop - c0],
        )

    def add(self, features: NDArray[np.floating] | Tensor, origins: NDArray[np.integer]) -> None:
        """Add tiles' feature maps (channels last) at their cell origins.

        Each tile is added as one rectangle of cells (its kept cells; the others
        add 0), tile after tile, so the sums are those of a cell-by-cell loop bit
        for bit.

        Args:
            features (ndarray or Tensor): N x h x w x C feature maps (a tensor
                        is moved to the stitcher's device if it is elsewhere).
            origins (ndarray): N x 2 ``(row, col)`` cell of each tile's
                        top-left feature-map location; rows must not decrease
                        (raster order), within and across calls.

        Raises:
            ValueError: shapes disagree, C differs, the border leaves nothing,
                        or tiles arrive out of raster order.
        """
        feats = torch.as_tensor(features).detach()  # sums of values: no autograd graph
        org = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
        if feats.ndim != 4 or feats.shape[0] != org.shape[0]:
            raise ValueError(
                f"features must be N x h x w x C with one origin per tile, got features "
                f"{tuple(feats.shape)} and {org.shape[0]} origins."
            )
        n, h, w, c = (int(v) for v in feats.shape)
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
        if not feats.is_floating_point():
            feats = feats.float()
        maps = feats.to(self._compute_device).permute(0, 3, 1, 2)  # N x C x h x w (a view)
        for i, (top, bottom, left, right, keep) in enumerate(self._kept(org, h, w)):
            if top >= bottom:
                continue
            if top < self._final_below:
                raise ValueError(f"cell row {top} was already finished; tiles out of order.")
            r0, c0 = int(org[i, 0]), int(org[i, 1])
            # only the rows and columns with a kept cell (at an edge the kept cells are
            # mostly still a rectangle: no mask needed then)
            part = maps[i, :, top - r0 : bottom - r0, left - c0 : right - c0].permute(1, 0, 2)
            mask = None if keep is None else self._mask(keep)  # rows x 1 x cols
            for band, local, at in self._bands_of(top, bottom):
                sums, band_counts = self._band_of(band)
                if keep is None or mask is None:
                    sums[local, :, left:right] += part[at]
                    band_counts[local, left:right] += 1
                else:  # a masked-out cell adds 0 (whatever its value): the cell loop's sums
                    sums[local, :, left:right] += torch.where(mask[at], part[at], 0.0)
                    band_counts[local, left:right] += keep[at]
        if n:
            self._last_origin = int(org[-1, 0])

    def _kept(
        self, org: NDArray[np.int64], h: int, w: int
    ) -> list[tuple[int, int, int, int, NDArray[np.bool_] | None]]:
        """Per tile: the box of grid cells holding its kept cells, and their mask.

        The box is rows ``top:bottom`` and cols ``left:right`` of
        :meth:`footprint`'s cells, trimmed to the kept ones; the mask is None
        when every cell of the box is kept. Computed for the whole batch at
        once (the per-tile :meth:`footprint`, vectorised): an empty box
        (``top >= bottom``) means nothing is kept.
        """
        hc, wc = self.grid_shape
        b = self.border
        r0, c0 = org[:, 0], org[:, 1]
        if self.coverage is None:  # the interior, clipped to the grid: always a rectangle
            top, bottom = np.clip(r0 + b, 0, hc), np.clip(r0 + h - b, 0, hc)
            left, right = np.clip(c0 + b, 0, wc), np.clip(c0 + w - b, 0, wc)
            empty = (top >= bottom) | (left >= right)
            bottom = np.where(empty, top, bottom)
            boxes = zip(top.tolist(), bottom.tolist(), left.tolist(), right.tolist(), strict=True)
            return [(t, bo, le, ri, None) for t, bo, le, ri in boxes]
        keep = self._keep_windows(org, h, w)
        rows, cols = np.any(keep, axis=2), np.any(keep, axis=1)
        live = np.any(rows, axis=1)
        first, last = rows.argmax(axis=1), h - rows[:, ::-1].argmax(axis=1)
        lo, hi = cols.argmax(axis=1), w - cols[:, ::-1].argmax(axis=1)
        full = keep.sum(axis=(1, 2)) == (last - first) * (hi - lo)
        out: list[tuple[int, int, int, int, NDArray[np.bool_] | None]] = []
        for i, (f, la, le, rt) in enumerate(
            zip(first.tolist(), last.tolist(), lo.tolist(), hi.tolist(), strict=True)
        ):
            top, left = int(r0[i]) + f, int(c0[i]) + le
            if not live[i]:
                out.append((top, top, left, left, None))
                continue
            mask = None if full[i] else keep[i, f:la, le:rt]
            out.append((top, int(r0[i]) + la, left, int(c0[i]) + rt, mask))
        return out

    def _keep_windows(self, org: NDArray[np.int64], h: int, w: int) -> NDArray[np.bool_]:
        """N x h x w: which cells of each tile's whole window it contributes (with ``coverage``).

        A cell is kept when it lies in the tile's border on exactly ``coverage``
        sides; cells outside the grid never are.
        """
        b = self.border
        ri, ci = np.arange(h), np.arange(w)
        sides = ((ri < b) | (ri >= h - b)).astype(np.uint8)[:, None] + (
            (ci < b) | (ci >= w - b)
        ).astype(np.uint8)[None, :]
        padded = self._padded_coverage(h, w)  # NO_TILE + 1 outside the grid: never kept
        ys = np.clip(org[:, :1] + h + ri, 0, padded.shape[0] - 1)  # far outside: the frame
        xs = np.clip(org[:, 1:] + w + ci, 0, padded.shape[1] - 1)
        keep: NDArray[np.bool_] = padded[ys[:, :, None], xs[:, None, :]] == sides
        return keep

    def _padded_coverage(self, h: int, w: int) -> NDArray[np.uint8]:
        """``coverage`` inside a frame of ``h`` rows and ``w`` cols of NO_TILE + 1, cached."""
        if self._padded is not None and self._padded[0] == (h, w):
            return self._padded[1]
        hc, wc = self.grid_shape
        padded = np.full((hc + 2 * h, wc + 2 * w), NO_TILE + 1, dtype=np.uint8)
        padded[h : h + hc, w : w + wc] = np.asarray(self.coverage)
        self._padded = ((h, w), padded)
        return padded

    def _mask(self, keep: NDArray[np.bool_]) -> Tensor:
        """``keep`` as rows x 1 x cols on the compute device.

        Edge tiles repeat a few patterns, each uploaded once.
        """
        key = (keep.shape, keep.tobytes())
        mask = self._masks.get(key)
        if mask is None:
            if len(self._masks) >= 256:  # bounded: oddly shaped edges would not repeat
                self._masks.clear()
            mask = self._masks[key] = upload(
                torch.from_numpy(keep.copy()), self._compute_device
            ).unsqueeze(1)
        return mask

    # ------------------------------------------------------------ bands of rows
    def _bands_of(self, start: int, stop: int) -> list[tuple[int, slice, slice]]:
        """Bands of cell rows ``start:stop``: (band, rows within it, rows within start:stop)."""
        out = []
        for band in range(start // _BAND, (stop - 1) // _BAND + 1):
            lo, hi = max(start, band * _BAND), min(stop, (band + 1) * _BAND)
            out.append(
                (band, slice(lo - band * _BAND, hi - band * _BAND), slice(lo - start, hi - start))
            )
        return out

    def _band_of(self, band: int) -> tuple[Tensor, NDArray[np.int32]]:
        sums = self._sums.get(band)
        if sums is None:
            wc = self.grid_shape[1]
            shape = (_BAND, self.n_channels, wc)
            sums = self._sums[band] = torch.zeros(shape, device=self._compute_device)
            self._counts[band] = np.zeros((_BAND, wc), dtype=np.int32)
        return sums, self._counts[band]

    def _live_rows(self) -> list[int]:
        """Cell rows not handed out yet that hold data, increasing."""
        rows: list[int] = []
        for band in sorted(self._counts):
            held = np.flatnonzero(self._counts[band].any(axis=1)) + band * _BAND
            rows.extend(int(r) for r in held if r >= self._final_below)
        return rows

    def _parts(
        self, rows: list[int], freed_below: int = 0
    ) -> list[tuple[Tensor, NDArray[np.int32]]]:
        """Per band of ``rows`` (increasing, all held): its sums (rows x C x Wc) and counts.

        A band all of whose rows are asked and which is freed below
        ``freed_below`` is handed out itself (the caller may change it);
        otherwise the rows are copied.
        """
        parts = []
        for band in sorted({r // _BAND for r in rows}):
            local = [r - band * _BAND for r in rows if r // _BAND == band]
            sums = self._sums[band]
            if len(local) < _BAND or (band + 1) * _BAND > freed_below:
                if local == list(range(local[0], local[-1] + 1)):  # a run of rows: no indices
                    sums = sums[local[0] : local[-1] + 1].clone()
                else:
                    index = upload(torch.tensor(local, dtype=torch.long), sums.device)
                    sums = sums.index_select(0, index)
            parts.append((sums, self._counts[band][local]))
        return parts

    def _gather(self, rows: list[int]) -> tuple[Tensor, NDArray[np.int32]]:
        """Sums (n x C x Wc) and counts (n x Wc) of ``rows`` (increasing, all held), copied."""
        sums, counts = zip(*self._parts(rows), strict=True)
        return torch.cat(sums), np.concatenate(counts)

    def _take(self, below: int) -> StitchedRows:
        """Hand out the rows above ``below`` that hold data, as means; forget them."""
        rows = [r for r in self._live_rows() if r < below]
        wc, c = self.grid_shape[1], self.n_channels
        device = self._compute_device
        final = max(self._final_below, below)
        if rows:
            parts, held = [], []
            for sums, count in self._parts(rows, freed_below=final):  # a whole band: in place
                divisor = torch.from_numpy(np.maximum(count, 1).astype(np.float32))
                parts.append(sums.div_(upload(divisor, sums.device).unsqueeze(1)))
                held.append(count)
            means = parts[0] if len(parts) == 1 else torch.cat(parts)
            counts = np.concatenate(held)
        else:
            counts = np.zeros((0, wc), dtype=np.int32)
            means = torch.zeros((0, c, wc), dtype=torch.float32, device=device)
        self._final_below = final
        for band in [b for b in self._sums if (b + 1) * _BAND <= self._final_below]:
            del self._sums[band], self._counts[band]  # every row of it is handed out
        for r in rows:  # a row handed out from a band still open starts again from zero
            if r // _BAND in self._sums:
                self._sums[r // _BAND][r % _BAND] = 0.0
                self._counts[r // _BAND][r % _BAND] = 0
        return StitchedRows(np.asarray(rows, dtype=np.int64), means.permute(0, 2, 1), counts)

    def _bands(self, taken: StitchedRows) -> list[StitchedBand]:
        feats: NDArray[np.float32] | Tensor = (
            np.ascontiguousarray(taken.features.cpu().numpy())
            if self.device is None
            else taken.features
        )
        return [StitchedBand(int(r), feats[i], taken.counts[i]) for i, r in enumerate(taken.rows)]

    def _final_row(self) -> int:
        below = self._last_origin + self.border
        if self._open is not None:
            start = max(self._last_origin, 0)
            hold = np.flatnonzero(self._open[start : max(below, start)])
            if hold.size:
                below = start + int(hold[0])
        return below

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
        return self._bands(self._take(self._final_row()))

    def pop_final_rows(self) -> StitchedRows:
        """:meth:`pop_final` as one block of rows on the stitcher's device.

        Returns:
            *StitchedRows*: the finished rows, their means (n x Wc x C) and counts.
        """
        return self._take(self._final_row())

    def finish(self) -> list[StitchedBand]:
        """Hand out every remaining row (after the last tile).

        Returns:
            *list[StitchedBand]*: the remaining rows with data, top to bottom.
        """
        return self._bands(self._take(self.grid_shape[0]))

    def finish_rows(self) -> StitchedRows:
        """:meth:`finish` as one block of rows on the stitcher's device.

        Returns:
            *StitchedRows*: the remaining rows, their means (n x Wc x C) and counts.
        """
        return self._take(self.grid_shape[0])

    # ------------------------------------------------------------- resumption
    def state(self) -> dict[str, NDArray[np.generic]]:
        """The pending rows and position, to resume stitching exactly (see :meth:`from_state`).

        Only the columns that hold data are stored. ``coverage`` is not (it
        follows from the run's tiles); ``position`` records whether it was
        given and how many cells hold each level, so :meth:`from_state` can
        check the one it is given. All arrays are NumPy (copied from the device).

        Returns:
            *dict[str, ndarray]*: ``rows``, ``cols``, ``sums``, ``counts`` and ``position``.
        """
        rows = self._live_rows()
        c = self.n_channels
        if rows:
            held, counts = self._gather(rows)
            cols = np.flatnonzero(counts.any(axis=0)).astype(np.int64)
            picked = held[:, :, torch.from_numpy(cols).to(held.device)]
            sums = picked.permute(0, 2, 1).cpu().numpy()  # rows x cols x C
        else:
            counts = np.zeros((0, self.grid_shape[1]), np.int32)
            cols = np.zeros(0, dtype=np.int64)
            sums = np.zeros((0, 0, c), np.float32)
        levels = (
            [0] * (NO_TILE + 1)
            if self.coverage is None
            else np.bincount(self.coverage.ravel(), minlength=NO_TILE + 1).tolist()
        )
        return {
            "rows": np.asarray(rows, dtype=np.int64),
            "cols": cols,
            "sums": np.ascontiguousarray(sums),
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
        device: torch.device | str | None = None,
    ) -> FeatureStitcher:
        """Rebuild a stitcher from :meth:`state`; it continues bit for bit.

        Args:
            state (dict[str, ndarray]): what :meth:`state` returned.
            n_channels (int): C, channels of the feature maps.
            coverage (ndarray, optional): the ``coverage`` the saved stitcher
                        had (recompute it with :func:`cell_coverage`).
                        Default: None
            device (torch.device or str, optional): as in the constructor.
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
        st = cls((hc, wc), n_channels, border=border, coverage=coverage, device=device)
        if st.coverage is not None:
            levels = np.bincount(st.coverage.ravel(), minlength=NO_TILE + 1).tolist()
            if levels != position[6:]:
                raise ValueError(
                    f"coverage has {levels} cells at levels 0-3, the saved stitcher had "
                    f"{position[6:]}; recompute it from the same tiles, tile size and border."
                )
        st._last_origin, st._final_below = last, final_below
        rows = [int(r) for r in np.asarray(state["rows"]).tolist()]
        cols = np.asarray(state["cols"], dtype=np.int64)
        sums = torch.as_tensor(np.asarray(state["sums"], dtype=np.float32))
        counts = np.asarray(state["counts"], dtype=np.int32)
        for i, r in enumerate(rows):
            band_sums, band_counts = st._band_of(r // _BAND)
            local = r % _BAND
            where = torch.from_numpy(cols).to(band_sums.device)
            band_sums[local, :, where] = sums[i].T.to(band_sums.device)
            band_counts[local, cols] = counts[i]
        return st
