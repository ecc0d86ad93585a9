"""How deep a tile's edge changes a layer's features: evidence for ``explain_slide(border=...)``.

A convolutional network sees zero padding past a tile's edge where the slide
goes on, so the features of a tile's outer cells differ from those of the same
place seen with its surroundings. :func:`explain_slide` drops ``border`` cells
on each side of every tile (the paper: 2) and averages the rest; the cells it
keeps still carry whatever change reaches deeper. :func:`border_effect`
measures it for any model and layer: each image's central tile is run alone
and inside a window with ``context`` pixels more on every side; the features
of the same cells are compared, grouped by their depth from the tile's edge
(depth 0 = the outermost ring of cells).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from captum_nmf._core.nmf_concept import NMFConceptAttribution
from captum_nmf._utils.activations import capture, layer_name, model_device
from captum_nmf._utils.validation import check_int

__all__ = ["BorderEffect", "border_effect"]


@dataclass(frozen=True)
class BorderEffect:
    r"""The relative change of a layer's features by cell depth from a tile's edge.

    For depth ``d`` (cells whose distance to the nearest tile edge is ``d``
    cells) the change is the ratio of sums

    .. math::

        \frac{\sum_{\text{cells at depth } d} \lVert f_\text{tile} - f_\text{context} \rVert_2}
             {\sum_{\text{cells at depth } d} \lVert f_\text{context} \rVert_2}

    over all images, with the norms taken over the layer's channels
    (``f_tile``: the tile run alone; ``f_context``: the same cells of the
    tile run inside its context). A ratio of sums is robust where a post-ReLU
    feature vector is close to 0.

    Attributes:
        depths (ndarray): depths 0 .. ``max_depth`` (int64).
        change (ndarray): relative change at each depth (float64; infinite
                    where the context's features of every cell at that depth
                    are 0 but the lone tile's are not; NaN where both are 0).
        per_image (ndarray): N x (max_depth + 1), the same ratio per image.
        cells (ndarray): cells at each depth per image (int64).
        cell (int): cell size in input pixels.
        tile_size (int): tile side in pixels.
        context (int): pixels of context on each side of the tile.
        layer (str): the layer's name in the model, or its class name.
    """

    depths: NDArray[np.int64]
    change: NDArray[np.float64]
    per_image: NDArray[np.float64]
    cells: NDArray[np.int64]
    cell: int
    tile_size: int
    context: int
    layer: str

    def suggest_border(self, tolerance: float = 0.05) -> int:
        """The smallest border leaving every measured deeper cell within ``tolerance``.

        Args:
            tolerance (float, optional): largest relative change accepted in
                        the cells kept (0.05 = 5 %).
                        Default: 0.05

        Returns:
            *int*: a ``border`` for :func:`~captum_nmf.wsi.explain_slide`.

        Raises:
            TypeError: ``tolerance`` is not a number.
            ValueError: ``tolerance`` is not positive, or even the deepest
                        measured cells change more (measure deeper or accept more).
        """
        if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real):
            raise TypeError(
                f"tolerance must be a positive fraction, got {tolerance!r}; pass e.g. 0.05."
            )
        if not float(tolerance) > 0:
            raise ValueError(f"tolerance must be a positive fraction, got {tolerance!r}.")
        # a depth where neither the tile nor its context has any feature (NaN) tells
        # nothing: it neither needs a border nor vouches for one
        above = np.flatnonzero(self.change > float(tolerance))
        if above.size and above[-1] == len(self.change) - 1:
            raise ValueError(
                f"the deepest measured cells (depth {int(self.depths[-1])}) still change by "
                f"{self.change[-1]:.1%} > {float(tolerance):.1%}; measure deeper (larger tiles "
                "and context) or accept a larger tolerance."
            )
        return int(above[-1]) + 1 if above.size else 0

    def to_markdown(self) -> str:
        """A Markdown table: depth, pixels from the edge, change and its range over images.

        Returns:
            *str*: the table (one row per depth), without a trailing newline.
        """
        lines = [
            f"| depth (cells) | px from the tile edge | change of `{self.layer}` | "
            "range over images |",
            "| ---: | ---: | ---: | ---: |",
        ]
        for d, value in zip(self.depths.tolist(), self.change.tolist(), strict=True):
            column = self.per_image[:, d]
            measured = column[~np.isnan(column)]
            low, high = (measured.min(), measured.max()) if measured.size else (0.0, 0.0)
            spread = (
                "-"
                if not measured.size
                else _percent(low)
                if low == high and math.isinf(low)
                else f"{_percent(low)}-{_percent(high)}"
            )
            lines.append(
                f"| {d} | {d * self.cell}-{(d + 1) * self.cell} | {_percent(value)} | {spread} |"
            )
        return "\n".join(lines)


def _percent(value: float) -> str:
    """A change as a percentage; infinite: features where the context has none; NaN: none."""
    if math.isnan(value):
        return "no features"
    if math.isinf(value):
        return "new features (context 0)"
    return f"{value:.1%}"


def _model_and_layer(
    model: NMFConceptAttribution | Callable[..., Any], layer: nn.Module | None
) -> tuple[Callable[..., Any], nn.Module]:
    """The forward function and the layer to measure."""
    if isinstance(model, NMFConceptAttribution):
        if layer is not None:
            raise ValueError(
                "pass layer= only with a forward function; an NMFConceptAttribution brings its "
                "own layer."
            )
        return model.forward_func, model.layer
    if not callable(model):
        raise TypeError(
            f"model must be an NMFConceptAttribution or a callable model, got "
            f"{type(model).__name__}."
        )
    if not isinstance(layer, nn.Module):
        raise TypeError(
            f"layer must be the torch.nn.Module to measure, got {type(layer).__name__}."
        )
    return model, layer


def _check_images(images: object) -> Tensor:
    """``images`` as a non-empty N x ... x H x W tensor."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be an N x 3 x H x W tensor, got {type(images).__name__}.")
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be N x 3 x H x W with N >= 1, got {tuple(images.shape)}.")
    if not images.is_floating_point():  # uint8 0-255 ran, at another scale than the slides'
        raise TypeError(
            f"images must be floating point in [0, 1] (as slide tiles reach the model), got "
            f"{images.dtype}; pass e.g. images.float() / 255."
        )
    return images


def _central_windows(images: Tensor, tile: int, ctx: int) -> Tensor:
    """The central ``tile + 2 * ctx`` pixel square of every image (a view)."""
    window = tile + 2 * ctx
    height, width = (int(v) for v in images.shape[2:])
    if min(height, width) < window:
        raise ValueError(
            f"images of {height} x {width} px are smaller than the tile and its context "
            f"({tile} + 2 x {ctx} = {window} px); pass larger images or a smaller context."
        )
    y0, x0 = (height - window) // 2, (width - window) // 2
    return images[:, :, y0 : y0 + window, x0 : x0 + window]


@dataclass(frozen=True)
class _Probe:
    """How to run the layer on a batch: the model, the layer, its device and ``transform``."""

    forward_func: Callable[..., Any]
    layer: nn.Module
    name: str
    device: torch.device
    transform: Callable[[Tensor], Tensor] | None

    def features(self, batch: Tensor) -> Tensor:
        """The layer's float64 CPU features of ``batch`` (``transform`` applied first)."""
        batch = batch.to(device=self.device, dtype=torch.float32)
        if self.transform is not None:  # per image, as explain_slide applies it to each tile
            batch = torch.stack([self.transform(image) for image in batch])
        with torch.no_grad():
            act: Tensor = capture(self.forward_func, self.layer, batch, name=self.name)
        return act.detach().to("cpu", torch.float64)


@dataclass(frozen=True)
class _Cells:
    """The tile's cells: their size in pixels, the deepest depth reported, each cell's depth."""

    cell: int
    depth: int
    ring: NDArray[np.int64]  # h x w: each cell's depth from the tile's edge
    counts: NDArray[np.int64]  # cells at each depth 0 .. depth


def _cells(
    tile: int,
    ctx: int,
    feature_size: tuple[int, int],
    max_depth: int | None,
    name: str,
    default_context: bool = False,
) -> _Cells:
    """The cell size from the tile's feature map, and the depths to report, checked."""
    h, w = feature_size
    if h == 0 or tile % h or tile % w or tile // h != tile // w:
        raise ValueError(
            f"tile_size={tile} gives a {h} x {w} feature map at {name!r}: not a whole "
            "number of square cells; use a tile size the network divides exactly."
        )
    cell = tile // h
    if ctx % cell:
        which = f" (the default, half of tile_size={tile})" if default_context else ""
        raise ValueError(
            f"context={ctx}{which} is not a whole number of {cell} px cells; pass e.g. "
            f"context={cell * max(1, round(ctx / cell))}."
        )
    deepest = (min(h, w) - 1) // 2
    depth = (
        min(deepest, ctx // cell - 1)
        if max_depth is None
        else check_int("max_depth", max_depth, minimum=0)
    )
    if depth > deepest:
        raise ValueError(
            f"max_depth={depth} is deeper than the middle of a {h} x {w} cell tile "
            f"(depth {deepest})."
        )
    if ctx // cell <= depth:
        raise ValueError(
            f"context={ctx} px is {ctx // cell} cells, not deeper than max_depth={depth}:"
            f" the reference would see the window's own edge. Use context >= "
            f"{(depth + 1) * cell} px or a smaller max_depth."
        )
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    ring = np.minimum(np.minimum(rows, h - 1 - rows), np.minimum(cols, w - 1 - cols))
    counts = np.bincount(ring.ravel(), minlength=depth + 1)[: depth + 1].astype(np.int64)
    return _Cells(cell, depth, ring, counts)


def _reference(whole: Tensor, window: int, cells: _Cells, ctx: int, name: str) -> Tensor:
    """The window's features cropped to the tile's cells (checked to be window / cell)."""
    cell, (h, w) = cells.cell, cells.ring.shape
    if tuple(whole.shape[2:]) != (window // cell, window // cell):
        raise ValueError(
            f"a {window} px window gave a {tuple(whole.shape[2:])} feature map at {name!r}, "
            f"not {window // cell} cells per side; the layer's feature map must be the input "
            "size divided by its cell size (a fully convolutional part)."
        )
    o = ctx // cell
    return whole[:, :, o : o + h, o : o + w]


def _by_depth(maps: NDArray[np.float64], cells: _Cells) -> list[NDArray[np.float64]]:
    """Per image, the sum of an h x w map over the cells at each depth."""
    flat, n = cells.ring.ravel(), cells.depth + 1
    return [
        np.asarray(np.bincount(flat, m.ravel(), minlength=n)[:n], dtype=np.float64) for m in maps
    ]


def _ratios(
    sums: list[NDArray[np.float64]], refs: list[NDArray[np.float64]]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per image and overall, the summed change over the summed reference, at each depth."""
    num, den = np.stack(sums), np.stack(refs)
    with np.errstate(invalid="ignore", divide="ignore"):
        # a reference of 0 where the lone tile is not: an infinite change, never "within
        # tolerance" (NaN compared False and passed); NaN only where both are 0
        per_image = np.where(den > 0, num / den, np.where(num > 0, np.inf, np.nan))
        total, changed = den.sum(axis=0), num.sum(axis=0)
        change = np.where(total > 0, changed / total, np.where(changed > 0, np.inf, np.nan))
    return per_image.astype(np.float64), change.astype(np.float64)


def border_effect(
    model: NMFConceptAttribution | Callable[..., Any],
    images: Tensor,
    *,
    tile_size: int,
    layer: nn.Module | None = None,
    context: int | None = None,
    max_depth: int | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 2,
) -> BorderEffect:
    r"""Measure how deep a tile's edge changes a layer's features.

    From the centre of each image a window of ``tile_size + 2 * context``
    pixels is cut, and the tile in its middle. Both go through the model
    (``transform`` applied to each, as :func:`~captum_nmf.wsi.explain_slide`
    applies it to every tile); the window's features are cropped to the
    tile's cells and compared with the tile's own, cell by cell, grouped by
    depth from the tile's edge (see :class:`BorderEffect`). Use it to choose
    ``border`` with evidence (:meth:`BorderEffect.suggest_border`); use real
    tissue at the resolution the slides are read at.

    Args:
        model (NMFConceptAttribution or Callable): a fitted or unfitted
                    :class:`~captum_nmf.NMFConceptAttribution` (its model and
                    layer are used), or a forward function / ``nn.Module``
                    together with ``layer``.
        images (Tensor): N x 3 x H x W images as the model reads tiles (in
                    [0, 1] before ``transform``), each at least
                    ``tile_size + 2 * context`` pixels on both sides.
        tile_size (int): tile side in pixels, a whole number of the layer's cells.
        layer (torch.nn.Module, optional): the layer, when ``model`` is not an
                    ``NMFConceptAttribution``.
                    Default: None
        context (int, optional): pixels of context on each side, a whole
                    number of cells, deeper than ``max_depth`` cells (else the
                    reference would itself see the window's edge); it should
                    exceed the depth the effect reaches.
                    Default: None (``tile_size // 2``)
        max_depth (int, optional): deepest cell depth reported.
                    Default: None (every depth of the tile, capped below the
                    context's depth in cells)
        transform (Callable, optional): applied to each tile and window
                    (3 x H x W), as :func:`~captum_nmf.wsi.explain_slide` applies
                    it (e.g. the model's normalisation; it must act pixel by pixel).
                    Default: None
        batch_size (int, optional): images per forward pass.
                    Default: 2

    Returns:
        *BorderEffect*: the change at each depth, per image and overall.

    Raises:
        TypeError: ``images`` is not a tensor, ``layer`` not a module, or a
                    size is not an int.
        ValueError: images that are not N x 3 x H x W or too small, a tile or
                    context that is not a whole number of cells, a context not
                    deeper than ``max_depth``, or a layer whose feature map is
                    not the input size divided by its cell size.
        LayerError: the layer did not run or gave no 4-D output.

    Examples::

        >>> import torch
        >>> from torch import nn
        >>> from captum_nmf.wsi import border_effect
        >>> conv = nn.Conv2d(3, 1, 3, padding=1, bias=False)
        >>> _ = nn.init.ones_(conv.weight)
        >>> net = nn.Sequential(nn.AvgPool2d(8), conv, nn.ReLU())
        >>> effect = border_effect(net, torch.ones(1, 3, 128, 128), tile_size=64, layer=net[2])
        >>> [round(v, 3) for v in effect.change.tolist()]
        [0.365, 0.0, 0.0, 0.0]
    """
    forward_func, target = _model_and_layer(model, layer)
    images = _check_images(images)
    tile = check_int("tile_size", tile_size, minimum=1)
    ctx = tile // 2 if context is None else check_int("context", context, minimum=1)
    size = check_int("batch_size", batch_size, minimum=1)
    window = tile + 2 * ctx
    windows = _central_windows(images, tile, ctx)
    name = layer_name(forward_func, target) or type(target).__name__
    probe = _Probe(
        forward_func,
        target,
        name,
        model_device(forward_func, target) or torch.device("cpu"),
        transform,
    )
    batches = [windows[start : start + size] for start in range(0, windows.shape[0], size)]
    first = probe.features(batches[0][:, :, ctx : ctx + tile, ctx : ctx + tile])
    feature_size = (int(first.shape[2]), int(first.shape[3]))
    cells = _cells(tile, ctx, feature_size, max_depth, name, default_context=context is None)
    sums: list[NDArray[np.float64]] = []
    refs: list[NDArray[np.float64]] = []
    for i, big in enumerate(batches):
        alone = first if i == 0 else probe.features(big[:, :, ctx : ctx + tile, ctx : ctx + tile])
        reference = _reference(probe.features(big), window, cells, ctx, name)
        sums += _by_depth(torch.linalg.vector_norm(alone - reference, dim=1).numpy(), cells)
        refs += _by_depth(torch.linalg.vector_norm(reference, dim=1).numpy(), cells)
    per_image, change = _ratios(sums, refs)
    return BorderEffect(
        depths=np.arange(cells.depth + 1, dtype=np.int64),
        change=change,
        per_image=per_image,
        cells=cells.counts,
        cell=cells.cell,
        tile_size=tile,
        context=ctx,
        layer=name,
    )
