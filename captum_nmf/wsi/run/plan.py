"""The plan of a slide run: tile grid, cell grid, tissue cells, regions and chunks, checked."""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import warnings
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from captum_nmf._core.nmf_concept import NMFConceptAttribution, check_concept_values
from captum_nmf.exceptions import CaptumNMFWarning, EmptyTileGridWarning, NoTissueError
from captum_nmf.wsi.reader import Slide
from captum_nmf.wsi.regions import plan_regions, tissue_cells
from captum_nmf.wsi.run.config import RunOptions, model_device
from captum_nmf.wsi.tiling import TileGrid, TissueOption, tile_grid
from captum_nmf.wsi.tissue import greyscale_hint

__all__ = ["Plan", "check_output_location", "make_plan"]


@dataclass(frozen=True)
class Plan:
    """Where a run reads and writes: everything known before the first tile is read.

    Attributes:
        grid (TileGrid): the tiles (region mode: the regions' tile lattice).
        fingerprint (str): the slide's content hash.
        slide_mpp (float or None): microns per level-0 pixel.
        cell (int): cell side in output pixels (one feature-map location).
        shape (tuple[int, int]): (Hc, Wc) cells of the slide.
        tissue (ndarray): Hc x Wc, cells at least half tissue.
        regions (ndarray or None): region mode: n x 4 ``(row, col, h, w)`` cell boxes.
        chunks (list[tuple[int, int]]): consecutive ranges of tiles (or regions).
    """

    grid: TileGrid
    fingerprint: str
    slide_mpp: float | None
    cell: int
    shape: tuple[int, int]
    tissue: NDArray[np.bool_]
    regions: NDArray[np.int64] | None
    chunks: list[tuple[int, int]]

    def first_chunk_bytes(self, attr: NMFConceptAttribution) -> int:
        """Bytes the first chunk and its carry may take (maps, counts, pending rows), x2.

        The pending rows hold K channels (the averaged products ``x H^T``), not C.
        """
        hc, wc = self.shape
        k = int(attr.concepts_.shape[0])
        start, end = self.chunks[0] if self.chunks else (0, 0)
        if self.regions is not None:
            cells = int((self.regions[start:end, 2] * self.regions[start:end, 3]).sum())
            return 2 * 4 * (k + 1) * cells + (1 << 20)
        grid = self.grid
        tile_cells = max(1, grid.tile_size // self.cell)
        n_rows = int(grid.rows[end - 1] - grid.rows[start]) + 1 if end > start else 1
        rows = min(hc, n_rows * max(1, grid.stride // self.cell) + tile_cells)
        return 2 * 4 * wc * (rows * (k + 1) + tile_cells * k) + (1 << 20)


def make_plan(
    attr: NMFConceptAttribution,
    path: str | os.PathLike[str],
    options: RunOptions,
    *,
    tile_size: int,
    stride: int,
    level: int | None,
    mpp: float | None,
    tissue_mask: TissueOption,
) -> Plan:
    """Open the slide, find its tissue and tiles, probe the layer, plan regions and chunks.

    Nothing is written. Every check that can fail before the run starts is made
    here: the concepts' values, a slide without tissue (or smaller than a tile
    or a cell), the layer's channels and cell size.

    Returns:
        *Plan*: the run's plan.

    Raises:
        NoTissueError: no tile or cell with enough tissue, or a slide smaller
                    than one cell (or one tile with ``edge="drop"``).
        ConceptModelFormatError: concepts with NaN, negative or huge entries.
        ConceptModelMismatchError: the layer's channels differ from the concepts'.
        ValueError: tile size, stride or region sizes that do not fit the cells.
        torch.OutOfMemoryError: the device cannot hold the forward of one image.
    """
    region = options.mode == "region"
    with Slide(path, fallback_mpp=options.slide_mpp) as slide:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EmptyTileGridWarning)
            grid = tile_grid(
                slide,
                tile_size=options.region_size + 2 * options.region_margin if region else tile_size,
                stride=options.region_size if region else stride,
                level=level,
                mpp=mpp,
                edge="pad" if region else options.edge,  # type: ignore[arg-type]
                tissue_mask=tissue_mask,
                min_tissue=0.0 if region else options.min_tissue,
                margin=options.region_margin if region else 0,
                on_tile_error=options.on_tile_error,
            )
        name = slide.path.name
        _check_tiles(grid, name, options)
        check_concept_values(attr.concepts_)
        cell, shape = _probe(attr, grid, options)
        share = _share(grid)
        if min(grid.extent) < cell:
            raise NoTissueError(
                f"{name} is {grid.extent[0]:.0f} x {grid.extent[1]:.0f} px at level "
                f"{grid.resolution.level}, smaller than one {cell} px feature-map cell of the "
                "layer; there is nothing to explain. Check the file, or read a finer level."
            )
        cells = tissue_cells(grid.tissue_mask, shape, cell * grid.resolution.scale)
        if not cells.any():
            raise NoTissueError(
                f"No cell of {name} is at least half tissue{share} at level "
                f"{grid.resolution.level} ({cell} px cells); nothing to explain. Pass "
                "tissue_mask=None to explain every cell, or check the file."
            )
        regions = _regions(cells, cell, options) if region else None
        if regions is not None:
            per = max(1, options.chunk_tiles // 16)  # a 2048 px region is ~16 tiles of 512 px
            chunks = [(s, min(s + per, len(regions))) for s in range(0, len(regions), per)]
        else:
            chunks = _chunks(grid, options.chunk_tiles)
        return Plan(grid, slide.fingerprint(), slide.mpp, cell, shape, cells, regions, chunks)


def _share(grid: TileGrid) -> str:
    mask = grid.tissue_mask
    return "" if mask is None else f" (tissue share {mask.tissue_share:.2%})"


def _check_tiles(grid: TileGrid, name: str, options: RunOptions) -> None:
    if grid.n_rows * grid.n_cols == 0:
        raise NoTissueError(
            f"{name} is smaller than one tile ({grid.tile_size} px at level "
            f"{grid.resolution.level}, extent {grid.extent[0]:.0f} x {grid.extent[1]:.0f} "
            "px) and edge='drop' keeps whole tiles only; pass edge='pad' or a smaller "
            "tile_size."
        )
    if len(grid) == 0:
        raise NoTissueError(
            f"No tissue found in {name}{_share(grid)} at level {grid.resolution.level}: "
            f"0 of {grid.n_rows * grid.n_cols} tiles of {grid.tile_size} px have tissue "
            f"fraction >= {grid.min_tissue} (edge={grid.edge!r}). Lower min_tissue, pass "
            "tissue_mask=None, or check the file." + greyscale_hint(grid.tissue_mask)
        )


def _regions(cells: NDArray[np.bool_], cell: int, options: RunOptions) -> NDArray[np.int64]:
    for name, value in (
        ("region_size", options.region_size),
        ("region_margin", options.region_margin),
    ):
        if value % cell:
            raise ValueError(
                f"{name}={value} is not a multiple of the cell size {cell} px; use e.g. "
                f"{name}={cell * max(1, round(value / cell))}."
            )
    return plan_regions(cells, options.region_size // cell, options.region_margin // cell)


_PROBE = 512


def _probe(
    attr: NMFConceptAttribution, grid: TileGrid, options: RunOptions
) -> tuple[int, tuple[int, int]]:
    """The layer's cell size and the slide's cell grid, from one forward of a white tile.

    The tile goes through ``transform`` and the forward options exactly as the
    slide's tiles will, so a layer whose channels do not match the concepts,
    or tiles the network does not divide into whole cells, fail here, before
    any file is written.

    Raises:
        ConceptModelMismatchError: the layer's channel count differs from the concepts'.
        ValueError: tile size or stride that do not fit the layer's cells.
        torch.OutOfMemoryError: the device cannot hold one image's forward; the
                    message says what to change (nothing is written yet).
    """
    mode = options.mode
    side = grid.tile_size if mode == "tile" else _PROBE
    act = _probe_forward(attr, side, options)
    c, h, w = (int(v) for v in act.shape[1:])
    attr.check_channels(c)
    if h == 0 or w == 0 or side % h or side % w or side // h != side // w:
        if mode == "tile":
            raise ValueError(
                f"tile_size={side} is not a whole number of the layer's {h} x {w} feature-map "
                "cells; choose a tile size the network divides exactly (e.g. a multiple of its "
                "total stride)."
            )
        raise ValueError(
            f"region mode needs a layer whose cells are a fixed number of input pixels; a "
            f"{side} px image gives a {h} x {w} feature map. Use mode='tile'."
        )
    cell = side // h
    if mode == "tile":
        _check_scaling(attr, side, (h, w), options)
        if h <= 2 * options.border:
            raise ValueError(
                f"border={options.border} leaves no interior in a tile of {h} x {h} cells "
                f"(tile_size={side}, {cell} px cells); pass border <= {(h - 1) // 2} or a "
                "larger tile_size."
            )
    if mode == "tile" and grid.stride % cell:
        raise ValueError(
            f"stride={grid.stride} is not a multiple of the cell size {cell} px "
            f"(tile_size {grid.tile_size} / {h} cells); use e.g. "
            f"stride={cell * max(1, round(grid.stride / cell))}."
        )
    interior = side - 2 * options.border * cell
    if mode == "tile" and interior < grid.stride < side:
        # overlapping tiles whose interiors do not meet: the cells between them could only be
        # given the border rings the run was asked to drop, across the whole slide. (Tiles
        # that do not overlap keep their borders: no other tile covers those cells.)
        raise ValueError(
            f"stride={grid.stride} leaves gaps between the tiles' interiors: tile_size={side} "
            f"less border={options.border} cells of {cell} px on each side is {interior} px. "
            f"Pass stride <= {interior}, a larger tile_size (>= "
            f"{grid.stride + 2 * options.border * cell}), or a smaller border."
        )
    ext_w, ext_h = grid.extent
    shape = (max(1, math.ceil(ext_h / cell - 1e-9)), max(1, math.ceil(ext_w / cell - 1e-9)))
    return cell, shape


def _probe_forward(attr: NMFConceptAttribution, side: int, options: RunOptions) -> Tensor:
    """The layer's 1 x C x h x w features of one white ``side`` px image, as the run makes them.

    Raises:
        torch.OutOfMemoryError: the device cannot hold one image's forward
                    (nothing is written yet; the message says what to change).
        ValueError: the forward failed (a tile smaller than the network needs,
                    a fixed-size head in region mode), naming the option to change.
    """
    mode = options.mode
    image = torch.ones(3, side, side)
    try:  # the transform, the copy to the device and the batch transform run there too
        if options.transform is not None:
            image = options.transform(image)
        batch = image.unsqueeze(0).to(model_device(attr))
        if options.batch_transform is not None:
            batch = options.batch_transform(batch)
        act = attr.features(batch, **options.forward)
    except torch.OutOfMemoryError as exc:  # one image: a smaller batch would not help
        where = model_device(attr)
        smaller = "a smaller tile_size, " if mode == "tile" else ""
        raise torch.OutOfMemoryError(
            f"{where.type} ran out of memory on the plan's forward of one {side} px image "
            f"({exc}); nothing was written. A smaller batch_size cannot help (this was one "
            f"image): free memory on {where} (other processes, cached tensors), use "
            f"{smaller}a smaller model, or run the model on the CPU (--device cpu on the "
            "command line)."
        ) from exc
    except RuntimeError as exc:  # torch's shape errors: say which option led there
        if mode == "tile":
            raise ValueError(
                f"the forward of one {side} px tile failed ({exc}); nothing was written. A "
                "tile_size smaller than the network needs fails so: pass a larger tile_size "
                "(e.g. a multiple of the network's total stride, 224 or 512)."
            ) from exc
        raise ValueError(
            f"mode='region' runs the model on {side} px and larger images, and its forward "
            f"failed ({exc}); nothing was written. A model whose head needs one input size "
            "cannot run on regions: use mode='tile'."
        ) from exc
    act = act[0] if isinstance(act, tuple) else act
    if act.ndim != 4:
        raise ValueError(f"the layer gave a {tuple(act.shape)} output, not 1 x C x h x w.")
    return act


def _check_scaling(
    attr: NMFConceptAttribution, side: int, cells: tuple[int, int], options: RunOptions
) -> None:
    """Refuse a tile size at which the network rounds its feature map (a wrong cell size).

    ``side / h`` is the cell only when the layer's map grows with the image: a
    network that floors or ceils (VGG's pooling at 528 px, ResNet's padding at
    496 px) gives whole cells at one size all the same, and the maps would be
    placed up to a cell off. A second forward of a white image of twice the
    size, without the transforms (they may resize to a fixed size), must give
    twice the cells, or the same (a layer after an adaptive pool: uniform cells
    at any size). Skipped when the device cannot hold it, or the model's head
    takes one input size only. Checked once per process for the same layer,
    forward function, reshape, options, transforms and tile size. A ``transform`` that changes the
    tile's size is warned about instead (:class:`CaptumNMFWarning`): a resize
    keeps the maps in place, a crop does not, and the two cannot be told apart
    by their sizes.
    """
    h, w = cells
    known = _SCALING_CHECKED.setdefault(attr.layer, [])
    key = (side, h, w, options.autocast, options.channels_last, attr.attribute_to_layer_input_)
    # the functions by weak reference: a strong one would keep the layer (the weak key) alive,
    # and an id could be a new function's after the old one is gone
    now = (attr.forward_func, attr.reshape_transform, options.transform, options.batch_transform)
    if any(k == key and all(s(o) for s, o in zip(same, now, strict=True)) for k, same in known):
        return  # a cohort checks its geometry once, not per slide
    seen = (key, tuple(_Same(o) for o in now))
    if options.transform is not None:
        shown = options.transform(torch.ones(3, side, side))
        if isinstance(shown, Tensor) and tuple(shown.shape[-2:]) != (side, side):
            known.append(seen)  # the network sees the transform's size only
            warnings.warn(
                f"transform turns a {side} px tile into a {tuple(shown.shape[-2:])} image: "
                f"each of the layer's {h} x {w} cells is taken as {side // h} px of the slide. "
                "That holds for a resize; a crop (e.g. CenterCrop) places the maps off their "
                "tissue. Use a transform that keeps the whole tile.",
                CaptumNMFWarning,
                stacklevel=4,
            )
            return
    plain = replace(options, transform=None, batch_transform=None)
    try:
        double = _probe_forward(attr, 2 * side, plain)
    except (torch.OutOfMemoryError, ValueError):  # no room, or a head that needs one size
        double = None
    if double is not None and tuple(double.shape[2:]) not in ((2 * h, 2 * w), (h, w)):
        raise ValueError(
            f"tile_size={side} gives {h} x {w} cells of {side // h} px, but an image of twice "
            f"the size gives {tuple(double.shape[2:])} cells, not {(2 * h, 2 * w)}: the "
            f"network rounds its feature map at this size, so its cells are not {side // h} px "
            "and the maps would be misplaced. Pass a tile_size that is a multiple of its total "
            "stride (e.g. 512 for VGG16 or ResNet)."
        )
    known.append(seen)


class _Same:
    """Whether an object is one seen before: by weak reference where it can be (None as is)."""

    def __init__(self, obj: Any) -> None:
        self.strong: Any = obj  # None, or an object without weak references: held
        self.ref: Any = None
        if obj is not None:
            with contextlib.suppress(TypeError):
                self.ref = weakref.ref(obj)
                self.strong = None

    def __call__(self, obj: Any) -> bool:
        if self.ref is None:
            return obj is self.strong
        return obj is not None and self.ref() is obj


# (geometry, model, transforms) already found to scale, per layer, for this process
_SCALING_CHECKED: weakref.WeakKeyDictionary[nn.Module, list[tuple[Any, Any]]] = (
    weakref.WeakKeyDictionary()
)


def _chunks(grid: TileGrid, chunk_tiles: int) -> list[tuple[int, int]]:
    """Consecutive whole tile rows, each chunk holding at least ``chunk_tiles`` tiles."""
    bounds = []
    start = 0
    n = len(grid)
    while start < n:
        end = min(start + chunk_tiles, n)
        while end < n and grid.rows[end] == grid.rows[end - 1]:
            end += 1
        bounds.append((start, end))
        start = end
    return bounds


def check_output_location(target: Path, need: int) -> None:
    """Refuse an output location we cannot write, or without room for the first chunk.

    Raises:
        FileExistsError: ``target`` is a file.
        PermissionError: the nearest existing folder is not writable.
        OSError: ``ENOSPC``, less free space than ``need`` bytes.
    """
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"out_dir {target} exists and is not a directory.")
    anchor = target.resolve()
    while not anchor.exists():
        anchor = anchor.parent
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise PermissionError(f"out_dir {target}: {anchor} is not writable; choose another place.")
    free = shutil.disk_usage(anchor).free
    if free < need:
        raise OSError(
            errno.ENOSPC,
            f"out_dir {target}: {free / 2**20:.1f} MiB free on its disk, but the first chunk of "
            f"the run needs about {need / 2**20:.1f} MiB; free some space or choose another place",
        )
