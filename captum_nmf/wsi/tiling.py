"""Overlapping tile grids over slides, and a picklable ``Dataset`` of their tissue tiles."""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from captum_nmf._utils.validation import check_int, is_positive_number
from captum_nmf.exceptions import EmptyTileGridWarning, SlideReadError
from captum_nmf.wsi.reader import Resolution, Slide
from captum_nmf.wsi.tissue import TissueMask, detect_tissue, greyscale_hint

__all__ = [
    "EdgePolicy",
    "PersistentTileLoader",
    "SlideTiles",
    "TileErrorPolicy",
    "TileGrid",
    "TileRequests",
    "check_tiling_options",
    "tile_grid",
]

EdgePolicy = Literal["pad", "drop"]
TileErrorPolicy = Literal["raise", "skip"]
TissueOption = TissueMask | Literal["otsu"] | None


@dataclass(frozen=True)
class TileGrid:
    """The kept tiles of one slide, in raster order (row by row, left to right).

    Positions are in *output pixels* (the slide resampled to ``resolution``):
    tile ``(row, col)`` covers output pixels ``[row * stride, row * stride +
    tile_size)`` vertically and likewise horizontally, which is level-0 pixel
    ``round(col * stride * scale)``, ``round(row * stride * scale)``.

    Attributes:
        path (str): the slide file.
        dimensions (tuple[int, int]): level-0 (width, height).
        resolution (Resolution): level read and resampling.
        tile_size (int): tile side in output pixels.
        stride (int): step between tiles in output pixels.
        edge (str): ``"pad"`` (tiles reaching past the slide are padded with
                    background, so every part of the slide is covered) or
                    ``"drop"`` (only tiles fully inside the slide).
        min_tissue (float): tiles with a smaller tissue fraction were dropped.
        n_rows (int): rows of the full grid, before the tissue filter.
        n_cols (int): columns of the full grid.
        rows (ndarray): grid row of every kept tile (int64).
        cols (ndarray): grid column of every kept tile (int64).
        tissue (ndarray): tissue fraction of every kept tile (over its part
                    inside the slide).
        tissue_mask (TissueMask or None): the mask used, if any.
        margin (int): output pixels by which every tile starts before its grid
                    position (region mode: tiles of ``stride + 2 * margin`` px
                    whose interior ``[col * stride, (col + 1) * stride)`` tiles
                    the slide); 0 for ordinary tiles.
    """

    path: str
    dimensions: tuple[int, int]
    resolution: Resolution
    tile_size: int
    stride: int
    edge: EdgePolicy
    min_tissue: float
    n_rows: int
    n_cols: int
    rows: NDArray[np.int64]
    cols: NDArray[np.int64]
    tissue: NDArray[np.float64]
    tissue_mask: TissueMask | None
    margin: int = 0

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    @property
    def extent(self) -> tuple[float, float]:
        """(width, height) of the slide in output pixels."""
        s = self.resolution.scale
        return self.dimensions[0] / s, self.dimensions[1] / s

    @property
    def locations(self) -> NDArray[np.int64]:
        """Level-0 (x, y) of every kept tile's top-left corner (n x 2)."""
        scale = self.resolution.scale
        xy = np.stack([self.cols * self.stride, self.rows * self.stride], axis=1) - self.margin
        out: NDArray[np.int64] = np.rint(xy * scale).astype(np.int64)
        return out

    def location(self, index: int) -> tuple[int, int]:
        """Level-0 (x, y) of kept tile ``index``'s top-left corner."""
        scale = self.resolution.scale
        x = (int(self.cols[index]) * self.stride - self.margin) * scale
        y = (int(self.rows[index]) * self.stride - self.margin) * scale
        return int(np.rint(x)), int(np.rint(y))

    @property
    def tile_size_level0(self) -> float:
        """Tile side in level-0 pixels."""
        return self.tile_size * self.resolution.scale

    @property
    def tissue_share(self) -> float | None:
        """Share of the slide that the tissue mask marks as tissue (None without a mask)."""
        return None if self.tissue_mask is None else self.tissue_mask.tissue_share


def _axis_count(extent: float, tile: int, stride: int, edge: EdgePolicy) -> int:
    if edge == "pad":
        return max(math.ceil((extent - tile) / stride - 1e-9), 0) + 1
    return math.floor((extent - tile) / stride + 1e-9) + 1 if extent >= tile - 1e-9 else 0


def tile_grid(
    slide: Slide,
    *,
    tile_size: int = 512,
    stride: int = 256,
    level: int | None = None,
    mpp: float | None = None,
    edge: EdgePolicy = "pad",
    tissue_mask: TissueOption = "otsu",
    min_tissue: float = 0.25,
    margin: int = 0,
    on_tile_error: TileErrorPolicy = "raise",
) -> TileGrid:
    r"""The overlapping tiles of a slide that contain enough tissue.

    Args:
        slide (Slide): an open slide.
        tile_size (int, optional): tile side in output pixels.
                    Default: 512
        stride (int, optional): step between tiles in output pixels (the
                    paper: half a tile).
                    Default: 256
        level (int, optional): pyramid level to read (see :meth:`Slide.resolve`).
                    Default: None (level 0 unless ``mpp`` is given)
        mpp (float, optional): target microns per pixel instead of ``level``.
                    Default: None
        edge (str, optional): ``"pad"`` covers the whole slide, padding
                    tiles that reach past it with background; ``"drop"``
                    keeps only tiles fully inside (a slide smaller than a
                    tile then has none).
                    Default: ``"pad"``
        tissue_mask (TissueMask, "otsu" or None, optional): the tissue mask
                    (it must cover this slide); ``"otsu"`` runs
                    :func:`detect_tissue`; None treats the whole slide as
                    tissue.
                    Default: ``"otsu"``
        min_tissue (float, optional): smallest tissue fraction of a kept tile.
                    Default: 0.25
        margin (int, optional): start every tile ``margin`` px before its
                    grid position (large regions with context on every side,
                    whose interiors of ``stride`` px cover the slide once;
                    needs ``tile_size == stride + 2 * margin`` and
                    ``edge="pad"``).
                    Default: 0
        on_tile_error (str, optional): what :func:`detect_tissue` does with
                    parts of the thumbnail it cannot read: ``"raise"``, or
                    ``"skip"`` (they count as no tissue, with an
                    :class:`~captum_nmf.exceptions.UnreadableRegionWarning`).
                    Default: ``"raise"``

    Returns:
        *TileGrid*: the kept tiles. An empty grid also warns
        :class:`~captum_nmf.exceptions.EmptyTileGridWarning`, naming the
        slide's tissue share.

    Raises:
        TypeError: ``tile_size``, ``stride`` or ``level`` is not an int, or
                    ``tissue_mask`` is not a TissueMask, "otsu" or None.
        ValueError: a non-positive size, an unknown ``edge`` or
                    ``on_tile_error``, ``min_tissue`` outside [0, 1], a level
                    / mpp the slide does not have, or a ``tissue_mask`` that
                    does not cover the slide.
        SlideReadError: the thumbnail cannot be read and ``on_tile_error="raise"``.
    """
    check_tiling_options(  # the level is checked against the slide's (its message lists them)
        tile_size=tile_size,
        stride=stride,
        mpp=mpp if level is None else None,
        edge=edge,
        tissue_mask=tissue_mask,
        min_tissue=min_tissue,
    )
    tile, step = int(tile_size), int(stride)
    _check_policy(on_tile_error, None)
    resolution = slide.resolve(level=level, mpp=mpp)
    if isinstance(tissue_mask, str):
        mask: TissueMask | None = detect_tissue(slide, on_tile_error=on_tile_error)
    elif isinstance(tissue_mask, TissueMask):
        tissue_mask.check_dimensions(slide.dimensions, slide.path.name)
        mask = tissue_mask
    else:
        mask = None
    check_int("margin", margin, minimum=0)
    if margin and (tile != step + 2 * margin or edge != "pad"):
        raise ValueError(
            f"margin={margin} needs tile_size == stride + 2 * margin ({step + 2 * margin}) and "
            f"edge='pad', got tile_size={tile}, edge={edge!r}."
        )
    scale = resolution.scale
    width, height = slide.dimensions
    if margin:  # the regions' interiors tile the slide exactly once
        n_cols = max(1, math.ceil(width / scale / step - 1e-9))
        n_rows = max(1, math.ceil(height / scale / step - 1e-9))
    else:
        n_cols = _axis_count(width / scale, tile, step, edge)
        n_rows = _axis_count(height / scale, tile, step, edge)
    rr, cc = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    rows, cols = rr.ravel().astype(np.int64), cc.ravel().astype(np.int64)
    if mask is None:
        tissue = np.ones(rows.shape[0])
    else:
        side = tile * scale
        boxes = np.stack(
            [
                (cols * step - margin) * scale,
                (rows * step - margin) * scale,
                np.full(rows.shape, side),
                np.full(rows.shape, side),
            ],
            axis=1,
        )
        tissue = mask.fractions(boxes)
    keep = (tissue >= float(min_tissue)) & (tissue > 0)  # never a tile of pure background
    grid = TileGrid(
        path=str(slide.path.resolve()),  # explanations and exports work from any directory
        dimensions=(width, height),
        resolution=resolution,
        tile_size=tile,
        stride=step,
        edge=edge,
        min_tissue=float(min_tissue),
        n_rows=n_rows,
        n_cols=n_cols,
        rows=rows[keep],
        cols=cols[keep],
        tissue=tissue[keep],
        tissue_mask=mask,
        margin=margin,
    )
    if len(grid) == 0:
        share = "" if mask is None else f"; {100 * mask.tissue_share:.3g} % of the slide is tissue"
        warnings.warn(
            f"No tile of {slide.path.name} has tissue fraction >= {min_tissue} ({n_rows * n_cols} "
            f"candidate tiles of {tile} px at level {resolution.level}, edge={edge!r}{share})."
            + greyscale_hint(mask),
            EmptyTileGridWarning,
            stacklevel=2,
        )
    return grid


def check_tiling_options(
    *,
    tile_size: Any = 512,
    stride: Any = 256,
    level: Any = None,
    mpp: Any = None,
    edge: Any = "pad",
    tissue_mask: Any = "otsu",
    min_tissue: Any = 0.25,
) -> None:
    """The checks of :func:`tile_grid` that need no slide (a cohort makes them before any work).

    Raises:
        TypeError: a non-int ``tile_size``, ``stride`` or ``level``, or a
                    ``tissue_mask`` that is not a TissueMask, ``"otsu"`` or None.
        ValueError: sizes below 1, a negative ``level``, both ``level`` and
                    ``mpp``, an ``mpp`` that is not a positive number, a bad
                    ``edge``, ``min_tissue`` outside [0, 1], or another string
                    as ``tissue_mask``.
    """
    check_int("tile_size", tile_size)
    check_int("stride", stride)
    if level is not None:
        check_int("level", level, minimum=0)
        if mpp is not None:
            raise ValueError(f"pass level= or mpp=, not both (got level={level}, mpp={mpp}).")
    if mpp is not None and not is_positive_number(mpp):
        raise ValueError(f"mpp must be a positive number, got {mpp!r}.")
    if edge not in ("pad", "drop"):
        raise ValueError(f"edge must be 'pad' or 'drop', got {edge!r}.")
    if (
        isinstance(min_tissue, bool)
        or not isinstance(min_tissue, numbers.Real)
        or not 0.0 <= float(min_tissue) <= 1.0
    ):
        raise ValueError(f"min_tissue must be a fraction in [0, 1], got {min_tissue!r}.")
    if isinstance(tissue_mask, str):
        if tissue_mask != "otsu":
            raise ValueError(
                f"tissue_mask must be a TissueMask, 'otsu' or None, got {tissue_mask!r}."
            )
    elif tissue_mask is not None and not isinstance(tissue_mask, TissueMask):
        raise TypeError(
            "tissue_mask must be a TissueMask, 'otsu' or None, got "
            f"{type(tissue_mask).__name__}; wrap an array with TissueMask.from_array(...)."
        )


def _check_policy(on_tile_error: str, transform: object) -> None:
    if on_tile_error not in ("raise", "skip"):
        raise ValueError(f"on_tile_error must be 'raise' or 'skip', got {on_tile_error!r}.")
    if transform is not None and not callable(transform):
        raise TypeError("transform must be callable or None.")


def _to_tensor(pixels: NDArray[np.uint8]) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float().div_(255.0)


def load_item(
    read: Callable[[], NDArray[np.uint8]],
    index: int,
    on_tile_error: str,
    transform: Callable[[Tensor], Tensor] | None,
) -> tuple[Tensor | None, int]:
    """``(image in [0, 1] after transform, index)``, or ``(None, index)`` for a skipped read.

    Raises:
        SlideReadError: the read failed twice and ``on_tile_error="raise"``.
    """
    try:
        pixels = read()
    except SlideReadError:
        if on_tile_error == "raise":
            raise
        return None, int(index)
    image = _to_tensor(pixels)
    if transform is not None:
        image = transform(image)
    return image, int(index)


class SlideHandles:
    """This process's open slide handles, at most ``limit``, the least recently used closed first.

    Pickles empty, and a forked copy drops the parent's handles at its first
    use, so every ``DataLoader`` worker opens its own.

    Args:
        limit (int): handles kept open.
        slide_mpp (float, optional): microns per level-0 pixel, as for :class:`Slide`.
    """

    def __init__(self, limit: int, slide_mpp: float | None) -> None:
        self.limit = limit
        self.slide_mpp = slide_mpp
        self._open: OrderedDict[str, Slide] = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {"limit": self.limit, "slide_mpp": self.slide_mpp}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["limit"], state["slide_mpp"])  # type: ignore[misc]

    def __len__(self) -> int:
        """Handles open in this process."""
        return len(self._open) if os.getpid() == self._pid else 0

    def __iter__(self) -> Iterator[str]:
        """Paths with an open handle in this process, least recently used first."""
        return iter(list(self._open) if os.getpid() == self._pid else [])

    def get(self, path: str) -> Slide:
        """An open handle of ``path`` (opened, or reopened after a close, when needed)."""
        if os.getpid() != self._pid:  # a forked worker must not use the parent's handles
            self._open = OrderedDict()
            self._pid = os.getpid()
        slide = self._open.get(path)
        if slide is None or slide.closed:
            slide = self._open[path] = Slide(path, fallback_mpp=self.slide_mpp)
            while len(self._open) > self.limit:  # bounded file handles per process
                self._open.popitem(last=False)[1].close()
        self._open.move_to_end(path)
        return slide

    def close(self) -> None:
        """Close every handle (a later ``get`` opens a new one)."""
        for slide in self._open.values():
            slide.close()
        self._open = OrderedDict()


class SlideTiles(Dataset[tuple[Tensor | None, int]]):
    r"""The tissue tiles of one or many slides as a picklable map-style ``Dataset``.

    Item ``i`` is ``(image, i)``: ``image`` is the tile as a 3 x T x T float
    tensor in [0, 1] (after ``transform``, if given). Tiles are ordered slide
    by slide, each slide in raster order. No slide handle is opened until an
    item is read, and each process (each ``DataLoader`` worker) opens its
    own, so ``DataLoader(tiles, num_workers=...)`` is safe; a pickled copy
    carries only paths and the tile tables. Pass it directly to
    :meth:`NMFConceptAttribution.fit <captum_nmf.NMFConceptAttribution.fit>`
    or wrap it with :meth:`loader`.

    A read that fails is retried once on a reopened handle; if it fails
    again, ``on_tile_error="raise"`` raises
    :class:`~captum_nmf.exceptions.SlideReadError` and ``"skip"`` returns
    ``(None, i)``, which :meth:`collate_fn` moves into the batch's list of
    failed tiles (so a default-collate ``DataLoader`` needs
    ``collate_fn=tiles.collate_fn`` with ``"skip"``).

    Args:
        paths (str, PathLike or sequence of them): slide files.
        tile_size (int, optional): tile side in output pixels.
                    Default: 512
        stride (int, optional): step between tiles in output pixels.
                    Default: 256
        level (int, optional): pyramid level; see :func:`tile_grid`.
                    Default: None
        mpp (float, optional): target microns per pixel instead of ``level``.
                    Default: None
        edge (str, optional): ``"pad"`` or ``"drop"``; see :func:`tile_grid`.
                    Default: ``"pad"``
        min_tissue (float, optional): smallest tissue fraction of a tile.
                    Default: 0.25
        tissue_mask (TissueMask, "otsu" or None, optional): see :func:`tile_grid`
                    (a TissueMask only with one slide).
                    Default: ``"otsu"``
        transform (Callable, optional): applied to each 3 x T x T tile tensor
                    in [0, 1] (e.g. the model's normalisation). Must be
                    picklable for ``num_workers > 0``.
                    Default: None
        on_tile_error (str, optional): ``"raise"`` or ``"skip"``, for tile
                    reads and for tissue detection (see :func:`tile_grid`).
                    Default: ``"raise"``
        slide_mpp (float, optional): microns per level-0 pixel for slides
                    without that metadata (plain images).
                    Default: None
        max_open_slides (int, optional): slide handles each process keeps open
                    (least recently used ones are closed beyond that).
                    Default: 8

    Attributes:
        grids (list[TileGrid]): one per slide.

    Raises:
        SlideNotFoundError: a path does not exist.
        UnsupportedSlideError: a file cannot be opened.
        ValueError: bad tiling arguments (see :func:`tile_grid`), an unknown
                    ``on_tile_error``, or no paths.
    """

    def __init__(
        self,
        paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        tile_size: int = 512,
        stride: int = 256,
        level: int | None = None,
        mpp: float | None = None,
        edge: EdgePolicy = "pad",
        min_tissue: float = 0.25,
        tissue_mask: TissueOption = "otsu",
        transform: Callable[[Tensor], Tensor] | None = None,
        on_tile_error: TileErrorPolicy = "raise",
        slide_mpp: float | None = None,
        max_open_slides: int = 8,
    ) -> None:
        _check_policy(on_tile_error, transform)
        items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not items:
            raise ValueError("paths is empty; pass at least one slide file.")
        if isinstance(tissue_mask, TissueMask) and len(items) > 1:
            raise ValueError("one TissueMask cannot serve several slides; pass 'otsu' or None.")
        grids = []
        for item in items:
            with Slide(item, fallback_mpp=slide_mpp) as slide:
                grids.append(
                    tile_grid(
                        slide,
                        tile_size=tile_size,
                        stride=stride,
                        level=level,
                        mpp=mpp,
                        edge=edge,
                        tissue_mask=tissue_mask,
                        min_tissue=min_tissue,
                        on_tile_error=on_tile_error,
                    )
                )
        self._setup(grids, transform, on_tile_error, slide_mpp, max_open_slides)

    @classmethod
    def from_grids(
        cls,
        grids: Sequence[TileGrid],
        *,
        transform: Callable[[Tensor], Tensor] | None = None,
        on_tile_error: TileErrorPolicy = "raise",
        slide_mpp: float | None = None,
        max_open_slides: int = 8,
    ) -> SlideTiles:
        """Tiles of already computed grids (e.g. with a hand-made tissue mask).

        Returns:
            *SlideTiles*: the dataset.

        Raises:
            ValueError: an unknown ``on_tile_error`` or no grids.
        """
        if not grids:
            raise ValueError("grids is empty; pass at least one TileGrid.")
        tiles = cls.__new__(cls)
        tiles._setup(list(grids), transform, on_tile_error, slide_mpp, max_open_slides)
        return tiles

    def _setup(
        self,
        grids: list[TileGrid],
        transform: Callable[[Tensor], Tensor] | None,
        on_tile_error: TileErrorPolicy,
        slide_mpp: float | None,
        max_open_slides: int,
    ) -> None:
        _check_policy(on_tile_error, transform)
        self.max_open_slides = check_int("max_open_slides", max_open_slides)
        self.grids = grids
        self.transform = transform
        self.on_tile_error: TileErrorPolicy = on_tile_error
        self.slide_mpp = slide_mpp
        sizes = [len(g) for g in grids]
        self._slide_of = np.repeat(np.arange(len(grids)), sizes)
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._handles = SlideHandles(self.max_open_slides, slide_mpp)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(slide index, tile index within that slide's grid) of item ``index``."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"tile index {index} out of range for {len(self)} tiles.")
        index = index % len(self)
        s = int(self._slide_of[index])
        return s, index - int(self._offsets[s])

    def _slide(self, s: int) -> Slide:
        return self._handles.get(self.grids[s].path)

    def read(self, index: int) -> NDArray[np.uint8]:
        """The raw ``uint8`` pixels (T x T x 3) of item ``index``.

        Raises:
            SlideReadError: the read failed twice (see :meth:`Slide.read_region`).
        """
        s, t = self.locate(index)
        grid = self.grids[s]
        return self._slide(s).read_tile(grid.location(t), grid.resolution, grid.tile_size)

    def __getitem__(self, index: int) -> tuple[Tensor | None, int]:
        return load_item(lambda: self.read(index), index, self.on_tile_error, self.transform)

    @staticmethod
    def collate_fn(items: Sequence[tuple[Tensor | None, int]]) -> tuple[Tensor, Tensor, Tensor]:
        """Batch items into ``(images, indices, failed_indices)``, leaving out skipped tiles.

        Returns:
            *tuple*: N x 3 x T x T images, their N item indices, and the item
            indices of tiles that could not be read (``int64`` tensors).
        """
        good = [(img, i) for img, i in items if img is not None]
        failed = torch.tensor([i for img, i in items if img is None], dtype=torch.int64)
        if not good:
            return torch.empty(0), torch.empty(0, dtype=torch.int64), failed
        images = torch.stack([img for img, _ in good])
        return images, torch.tensor([i for _, i in good], dtype=torch.int64), failed

    def loader(
        self, batch_size: int = 16, num_workers: int = 0, **kwargs: Any
    ) -> DataLoader[tuple[Tensor | None, int]]:
        """A ``DataLoader`` in tile order with :meth:`collate_fn` (extra kwargs passed on).

        Returns:
            *DataLoader*: yields ``(images, indices, failed_indices)``.
        """
        return DataLoader(
            self,
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=self.collate_fn,
            **kwargs,
        )

    def close(self) -> None:
        """Close the handles this process opened (a later read opens a new one)."""
        self._handles.close()

    def __repr__(self) -> str:
        return f"SlideTiles({len(self.grids)} slide(s), {len(self)} tiles)"


TileRequest = tuple[str, tuple[int, int], Resolution, int, int]


class TileRequests(Dataset[tuple[Tensor | None, int]]):
    """Tiles named by the request itself: one set of ``DataLoader`` workers serves any slide.

    An item is requested as ``(path, level-0 location, resolution, tile size,
    index)`` (what :class:`SlideTiles` reads for a grid's tile ``index``) and
    comes back as ``(image, index)`` exactly as from :class:`SlideTiles`: the
    same read, retry, ``on_tile_error`` and ``transform``. Each process opens
    its own slide handles, at most ``max_open_slides`` at a time.

    Args:
        transform (Callable, optional): per-tile transform, as for :class:`SlideTiles`.
                    Default: None
        on_tile_error (str, optional): ``"raise"`` or ``"skip"``. Default: ``"raise"``
        slide_mpp (float, optional): microns per level-0 pixel, as for :class:`Slide`.
                    Default: None
        max_open_slides (int, optional): slide handles kept open per process.
                    Default: 2
    """

    def __init__(
        self,
        *,
        transform: Callable[[Tensor], Tensor] | None = None,
        on_tile_error: TileErrorPolicy = "raise",
        slide_mpp: float | None = None,
        max_open_slides: int = 2,
    ) -> None:
        self.transform = transform
        self.on_tile_error = on_tile_error
        self.slide_mpp = slide_mpp
        self.max_open_slides = check_int("max_open_slides", max_open_slides)
        self._handles = SlideHandles(self.max_open_slides, slide_mpp)

    @staticmethod
    def requests(grid: TileGrid, indices: Sequence[int]) -> list[TileRequest]:
        """The requests of ``grid``'s tiles ``indices``."""
        return [
            (grid.path, grid.location(i), grid.resolution, grid.tile_size, int(i)) for i in indices
        ]

    def __getitem__(self, request: TileRequest) -> tuple[Tensor | None, int]:
        path, location, resolution, size, index = request
        return load_item(
            lambda: self._handles.get(path).read_tile(location, resolution, size),
            index,
            self.on_tile_error,
            self.transform,
        )

    collate_fn = staticmethod(SlideTiles.collate_fn)


class _Batches:
    """A batch sampler whose batches are replaced for each slide (the workers stay)."""

    def __init__(self) -> None:
        self.batches: list[list[TileRequest]] = []

    def __iter__(self) -> Any:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class PersistentTileLoader:
    """``DataLoader`` worker processes started once and fed each slide's tile requests in turn.

    Args:
        num_workers (int): worker processes.
        requests (TileRequests): the dataset (transform, error policy, mpp).
        pin_memory (bool, optional): pin the batches (for a CUDA model).
                    Default: False
    """

    def __init__(
        self, num_workers: int, requests: TileRequests, *, pin_memory: bool = False
    ) -> None:
        self._sampler = _Batches()
        self.loader: DataLoader[Any] = DataLoader(
            requests,
            batch_sampler=self._sampler,
            num_workers=check_int("num_workers", num_workers),
            collate_fn=requests.collate_fn,
            pin_memory=pin_memory,
            persistent_workers=True,
        )
        self.slides = 0

    def batches(self, grid: TileGrid, batches: Sequence[Sequence[int]]) -> Any:
        """An iterator over ``(images, indices, failed)`` of ``grid``'s tiles, batch by batch."""
        self._sampler.batches = [TileRequests.requests(grid, b) for b in batches]
        self.slides += 1
        return iter(self.loader)

    def close(self) -> None:
        """Stop the worker processes."""
        iterator = getattr(self.loader, "_iterator", None)
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self.loader._iterator = None
