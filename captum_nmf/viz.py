"""Figures: concept overlays, per-concept panels, comparisons with CAMs, structure heatmaps.

The paper's Fig. 1 (all concepts overlaid), Fig. 2 (one panel per concept),
Fig. 3 (image / GradCAM / concept intensities / clusters side by side) and
Fig. 4 (structure heatmaps).

Every concept index has one colour everywhere (figures and exports): the
colour-blind-safe Okabe-Ito palette, then Paul Tol's muted scheme beyond 8
concepts (:func:`concept_colors`). Functions build :class:`matplotlib.figure.Figure`
objects directly (never ``pyplot``), so no global matplotlib state changes; each
accepts an ``ax`` (or ``axes``) to draw into and returns the Figure. The pixel
work is in plain functions (:func:`overlay`, :func:`cluster_image`) that return
RGB arrays, usable without matplotlib.

Needs the ``viz`` extra (matplotlib) for the ``plot_*`` functions.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import NDArray

from captum_nmf._utils.validation import check_int

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "PALETTE",
    "cluster_image",
    "concept_colors",
    "concept_labels",
    "overlay",
    "plot_comparison",
    "plot_concepts",
    "plot_overlay",
    "plot_select_k",
    "plot_slide",
    "plot_structure",
]

#: Okabe & Ito (2008), then Paul Tol's "muted" (2021): colour-blind-safe, in this order.
PALETTE = (
    "#E69F00",
    "#56B4E9",
    "#009E73",
    "#F0E442",
    "#0072B2",
    "#D55E00",
    "#CC79A7",
    "#000000",
    "#332288",
    "#88CCEE",
    "#44AA99",
    "#117733",
    "#999933",
    "#DDCC77",
    "#CC6677",
    "#882255",
    "#AA4499",
)
_EXTRA = "the 'viz' extra: pip install 'captum-nmf[viz]'"


def concept_colors(k: int) -> NDArray[np.float64]:
    """The fixed RGB colour (floats in [0, 1]) of concepts ``0 .. k-1``.

    The first 17 are :data:`PALETTE` (colour-blind safe), so a concept keeps
    its colour whatever K is. Beyond them, colours are spread over the hue
    circle by the golden angle at two brightness steps: each is distinct, but
    more than 17 concepts are hard to tell apart by colour alone (the exports
    also carry each concept's name and index).

    Raises:
        TypeError: ``k`` is not an int.
        ValueError: ``k`` < 1.
    """
    k = check_int("k", k)
    fixed = [[int(c[i : i + 2], 16) / 255 for i in (1, 3, 5)] for c in PALETTE[:k]]
    more = [
        list(colorsys.hsv_to_rgb((0.11 + j * 0.618033988749895) % 1.0, 0.7, 0.95 - 0.3 * (j % 2)))
        for j in range(k - len(fixed))
    ]
    return np.asarray(fixed + more, dtype=np.float64)


def _numpy(x: Any) -> Any:
    """A tensor as a CPU numpy array; anything else unchanged."""
    return x.detach().to("cpu").numpy() if isinstance(x, torch.Tensor) else x


def _image(image: Any) -> NDArray[np.float64]:
    """H x W x 3 float in [0, 1] from uint8 or float, HWC or CHW, array or tensor."""
    image = _numpy(image)
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be an ndarray or a Tensor, got {type(image).__name__}.")
    arr = image
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[2] not in (1, 3):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ValueError(f"image must be H x W x 3 (or 3 x H x W), got shape {image.shape}.")
    if arr.dtype == np.uint8:
        out = arr.astype(np.float64) / 255.0
    elif np.issubdtype(arr.dtype, np.floating):
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        if lo < 0 or hi > 1:
            raise ValueError(
                f"image must be float in [0, 1] or uint8, got {arr.dtype} with min {lo:.3g} and "
                f"max {hi:.3g}; undo the normalisation first."
            )
        out = arr.astype(np.float64)
    else:
        raise ValueError(f"image must be float in [0, 1] or uint8, got {arr.dtype}.")
    return np.repeat(out, 3, axis=2) if out.shape[2] == 1 else out


def _maps(maps: Any) -> NDArray[np.float64]:
    arr = np.asarray(_numpy(maps), dtype=np.float64)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"maps must be K x h x w (one image), got shape {arr.shape}.")
    return np.nan_to_num(arr, nan=0.0)


def _resize(maps: NDArray[np.float64], size: tuple[int, int]) -> NDArray[np.float64]:
    """K x h x w -> K x H x W, nearest neighbour (cells stay cells)."""
    h, w = size
    if maps.shape[1:] == (h, w):
        return maps
    rows = np.minimum((np.arange(h) * maps.shape[1] / h).astype(int), maps.shape[1] - 1)
    cols = np.minimum((np.arange(w) * maps.shape[2] / w).astype(int), maps.shape[2] - 1)
    return maps[:, rows][:, :, cols]


def overlay(
    image: Any,
    maps: Any,
    *,
    alpha: float = 0.6,
    vmax: Sequence[float] | NDArray[np.float64] | None = None,
) -> NDArray[np.float64]:
    r"""Blend all K concept intensities onto an image in their fixed colours (Fig. 1).

    Each concept's weights are scaled to [0, 1] by ``vmax`` (default: its own
    maximum). At every pixel the colour is the intensity-weighted mean of the
    concepts' colours and its opacity is ``alpha`` times the largest scaled
    intensity, so absent concepts leave the tissue visible.

    Args:
        image: H x W x 3 (or 3 x H x W) uint8, or float in [0, 1].
        maps: K x h x w concept weights (any h x w; upsampled by nearest neighbour).
        alpha (float, optional): opacity of the strongest concept.
                    Default: 0.6
        vmax (sequence of float, optional): per-concept scale (e.g. over a
                    whole slide or batch, so images compare).
                    Default: None

    Returns:
        *ndarray*: H x W x 3 float in [0, 1].

    Raises:
        ValueError: bad image range, shapes or ``alpha``.
        TypeError: ``image`` is not an array or tensor.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    img = _image(image)
    m = _maps(maps)
    k = m.shape[0]
    scale = m.reshape(k, -1).max(axis=1) if vmax is None else np.asarray(vmax, dtype=np.float64)
    if scale.shape != (k,):
        raise ValueError(f"vmax must hold {k} values, got {scale.shape}.")
    norm = np.clip(m / np.where(scale > 0, scale, 1.0)[:, None, None], 0, 1)
    norm = _resize(norm, img.shape[:2])
    total = norm.sum(axis=0)
    colours = concept_colors(k)
    mixed = np.einsum("khw,kc->hwc", norm, colours) / np.maximum(total, 1e-12)[..., None]
    opacity = alpha * norm.max(axis=0)[..., None]
    blended: NDArray[np.float64] = img * (1 - opacity) + mixed * opacity
    return blended


def cluster_image(assignment: Any, k: int, *, background: float = 1.0) -> NDArray[np.float64]:
    """The argmax concept of every cell in its colour; -1 cells in grey ``background``.

    Returns:
        *ndarray*: h x w x 3 float in [0, 1].
    """
    labels = np.asarray(_numpy(assignment))
    if labels.ndim != 2:
        raise ValueError(f"assignment must be h x w, got shape {labels.shape}.")
    if labels.max(initial=-1) >= k:
        raise ValueError(f"assignment holds concept {labels.max()} but k={k}.")
    colours = np.vstack([concept_colors(k), np.full((1, 3), background)])
    out: NDArray[np.float64] = colours[np.where(labels < 0, k, labels)]
    return out


def _figure(
    ax: Axes | None, n: int = 1, size: tuple[float, float] = (5.0, 5.0)
) -> tuple[Figure, list[Axes]]:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"captum_nmf.viz plots need {_EXTRA}") from exc
    if ax is not None:
        fig = ax.get_figure()
        if fig is None:
            raise ValueError("ax does not belong to a figure.")
        return fig, [ax]  # type: ignore[return-value]
    fig = Figure(figsize=(size[0] * n, size[1]), layout="constrained")
    return fig, list(fig.subplots(1, n, squeeze=False)[0])


def _names(k: int, labels: Sequence[str] | None) -> list[str]:
    """One name per concept: ``labels``, or ``concept j``.

    Raises:
        ValueError: ``labels`` does not hold exactly ``k`` names.
    """
    if labels is None:
        return [f"concept {j}" for j in range(k)]
    if isinstance(labels, str):
        raise TypeError(f"labels must be a sequence of {k} names, got the string {labels!r}.")
    names = [str(n) for n in labels]
    if len(names) != k:
        raise ValueError(
            f"labels holds {len(names)} names for {k} concepts; pass one name per concept "
            "(e.g. concept_labels(attr))."
        )
    return names


def _legend(ax: Axes, k: int, labels: Sequence[str] | None) -> None:
    from matplotlib.patches import Patch

    names = _names(k, labels)
    handles = [Patch(color=c, label=names[j]) for j, c in enumerate(concept_colors(k))]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")


def plot_overlay(
    image: Any,
    maps: Any,
    *,
    ax: Axes | None = None,
    alpha: float = 0.6,
    vmax: Sequence[float] | None = None,
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """All K concept intensities over the image with a legend (the paper's Fig. 1).

    Args:
        image: one H x W x 3 (or 3 x H x W) image, or a batch N x 3 x H x W.
        maps: K x h x w maps, or N x K x h x w for a batch (one panel per
                    tile, on one intensity scale per concept so tiles compare).
        ax (Axes, optional): where to draw a single image.
                    Default: None
        alpha (float, optional): opacity of the strongest concept.
                    Default: 0.6
        vmax (sequence of float, optional): per-concept scale.
                    Default: None (the maximum over the image or batch)
        labels (sequence of str, optional): legend names.
                    Default: None
        title (str, optional): title of a single image.
                    Default: None

    Returns:
        *Figure*: the figure drawn into (a new one unless ``ax`` is given).
    """
    arr = np.asarray(_numpy(maps))
    if arr.ndim == 4 and (arr.shape[0] > 1 or np.ndim(image) == 4):
        if ax is not None:
            raise ValueError("ax takes one image; for a batch of tiles leave ax=None.")
        n, k = arr.shape[:2]
        if len(image) != n:
            raise ValueError(f"image holds {len(image)} tiles for {n} maps.")
        scale = (
            np.nan_to_num(arr).transpose(1, 0, 2, 3).reshape(k, -1).max(axis=1)
            if vmax is None
            else vmax
        )
        fig, panels = _figure(None, n, (3.0, 3.0))
        for i, axis in enumerate(panels):
            axis.imshow(overlay(image[i], arr[i], alpha=alpha, vmax=scale))
            axis.set_title(f"tile {i}")
            axis.set_axis_off()
        _legend(panels[-1], k, labels)
        return fig
    fig, (axis,) = _figure(ax)
    m = _maps(arr)
    axis.imshow(overlay(image, m, alpha=alpha, vmax=vmax))
    axis.set_axis_off()
    if title:
        axis.set_title(title)
    _legend(axis, m.shape[0], labels)
    return fig


def plot_concepts(
    image: Any,
    maps: Any,
    *,
    axes: Sequence[Axes] | None = None,
    alpha: float = 0.7,
    labels: Sequence[str] | None = None,
) -> Figure:
    """One panel per concept: its intensity over the image in its colour (the paper's Fig. 2).

    Returns:
        *Figure*: the figure drawn into.
    """
    m = _maps(maps)
    k = m.shape[0]
    if axes is not None:
        if len(axes) != k:
            raise ValueError(f"axes must hold one Axes per concept ({k}), got {len(axes)}.")
        fig = axes[0].get_figure()
        panels = list(axes)
    else:
        fig, panels = _figure(None, k, (3.0, 3.0))
    names = _names(k, labels)
    colours = concept_colors(k)
    for j, axis in enumerate(panels):
        single = np.zeros_like(m)
        single[j] = m[j]
        axis.imshow(overlay(image, single, alpha=alpha))
        axis.set_title(names[j], color=colours[j])
        axis.set_axis_off()
    return fig  # type: ignore[return-value]


def plot_comparison(
    image: Any,
    cam: Any,
    maps: Any,
    *,
    axes: Sequence[Axes] | None = None,
    cam_name: str = "GradCAM",
    alpha: float = 0.6,
    labels: Sequence[str] | None = None,
) -> Figure:
    """Image, signed CAM, concept intensities and clusters side by side (the paper's Fig. 3).

    The CAM is shown signed (blue < 0 < red, symmetric scale); clusters are the
    argmax concept of every cell (white where all weights are 0).

    Args:
        image (Tensor or ndarray): the tile, 3 x H x W or H x W x 3.
        cam (Tensor or ndarray): the CAM over the tile, h x w.
        maps (Tensor or ndarray): K x h x w concept intensities.
        axes (sequence of Axes, optional): four axes to draw into.
                    Default: None (a new figure)
        cam_name (str, optional): the CAM's name in its panel's title.
                    Default: ``"GradCAM"``
        alpha (float, optional): overlay opacity.
                    Default: 0.6
        labels (sequence of str, optional): concept names for the legend.
                    Default: None (``concept 0``, ...)

    Returns:
        *Figure*: the figure drawn into.

    Raises:
        ValueError: ``cam`` is not h x w, ``axes`` does not hold 4 axes, or
                    ``labels`` has another length than K.
    """
    m = _maps(maps)
    k = m.shape[0]
    c = np.squeeze(np.asarray(_numpy(cam))).astype(np.float64)
    if c.ndim != 2:
        raise ValueError(f"cam must be h x w, got shape {np.shape(cam)}.")
    if axes is not None:
        if len(axes) != 4:
            raise ValueError(f"axes must hold 4 Axes, got {len(axes)}.")
        fig = axes[0].get_figure()
        panels = list(axes)
    else:
        fig, panels = _figure(None, 4, (3.2, 3.2))
    img = _image(image)
    limit = float(np.abs(c).max()) or 1.0
    panels[0].imshow(img)
    panels[0].set_title("image")
    shown = panels[1].imshow(c, cmap="RdBu_r", vmin=-limit, vmax=limit)
    panels[1].set_title(f"{cam_name} (signed)")
    fig.colorbar(shown, ax=panels[1], fraction=0.046)  # type: ignore[union-attr]
    panels[2].imshow(overlay(img, m, alpha=alpha))
    panels[2].set_title("concept intensities")
    winner = np.where(m.max(axis=0) > 0, np.argmax(m, axis=0), -1)
    panels[3].imshow(cluster_image(winner, k), interpolation="nearest")
    panels[3].set_title("clusters")
    for axis in panels:
        axis.set_axis_off()
    _legend(panels[3], k, labels)
    return fig  # type: ignore[return-value]


def plot_structure(
    similarity: Any, correlation: Any, *, axes: Sequence[Axes] | None = None
) -> Figure:
    """Heatmaps of concept-vector cosine similarity and weight correlation (the paper's Fig. 4).

    Args:
        similarity: a :class:`~captum_nmf.compare.ConceptSimilarity` or K x K matrix.
        correlation: a :class:`~captum_nmf.compare.ConceptCorrelation` (its
                    mean) or K x K matrix.
        axes (sequence of Axes, optional): two Axes to draw into.
                    Default: None

    Returns:
        *Figure*: the figure drawn into.
    """
    sim = np.asarray(
        similarity.matrix if hasattr(similarity, "table") else similarity, dtype=np.float64
    )
    cor = np.asarray(
        correlation.mean if hasattr(correlation, "table") else correlation, dtype=np.float64
    )
    if sim.ndim != 2 or sim.shape != cor.shape or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"need two K x K matrices, got {sim.shape} and {cor.shape}.")
    if axes is not None:
        if len(axes) != 2:
            raise ValueError(f"axes must hold 2 Axes, got {len(axes)}.")
        fig = axes[0].get_figure()
        panels = list(axes)
    else:
        fig, panels = _figure(None, 2, (4.2, 4.0))
    k = sim.shape[0]
    for axis, matrix, title in (
        (panels[0], sim, "cosine similarity of concepts"),
        (panels[1], cor, "correlation of weights"),
    ):
        shown = axis.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
        for i in range(k):
            for j in range(k):
                text = "" if np.isnan(matrix[i, j]) else f"{matrix[i, j]:.2f}"
                axis.text(j, i, text, ha="center", va="center", fontsize="x-small")
        axis.set_xticks(range(k))
        axis.set_yticks(range(k))
        for tick, colour in zip(axis.get_xticklabels(), concept_colors(k), strict=False):
            tick.set_color(colour)
        axis.set_title(title)
        fig.colorbar(shown, ax=axis, fraction=0.046)  # type: ignore[union-attr]
    return fig  # type: ignore[return-value]


def plot_slide(
    explanation: Any,
    *,
    ax: Axes | None = None,
    max_size: int = 1024,
    alpha: float = 0.6,
    clusters: bool = False,
    per_concept: bool = False,
    labels: Sequence[str] | None = None,
    on_tile_error: str | None = None,
) -> Figure:
    """A :class:`~captum_nmf.wsi.SlideExplanation` over its slide's thumbnail.

    Args:
        explanation (SlideExplanation): the explained slide (its file must be readable).
        ax (Axes, optional): where to draw.
                    Default: None
        max_size (int, optional): longer side of the thumbnail.
                    Default: 1024
        alpha (float, optional): overlay opacity.
                    Default: 0.6
        clusters (bool, optional): show the argmax clusters instead of intensities.
                    Default: False
        per_concept (bool, optional): one panel per concept (Fig. 2 for a slide).
                    Default: False
        labels (sequence of str, optional): concept names for the legend.
                    Default: None (the names the explanation recorded)
        on_tile_error (str, optional): ``"raise"`` or ``"skip"``: parts of the
                    slide that cannot be read are drawn as background
                    (:meth:`~captum_nmf.wsi.Slide.thumbnail`).
                    Default: None (``"skip"`` for an explanation with unreadable
                    tiles, whose cells are not drawn anyway; else ``"raise"``)

    Returns:
        *Figure*: the figure drawn into.

    Raises:
        SlideReadError: the thumbnail cannot be read and ``on_tile_error="raise"``.
        ValueError: an unknown ``on_tile_error``.
    """
    from captum_nmf.wsi import Slide

    if labels is None:
        recorded = explanation.config.get("concept_names")
        labels = recorded if isinstance(recorded, list) else None

    if on_tile_error is None:  # the run skipped unreadable tiles: so does its figure
        on_tile_error = "skip" if len(explanation.failed_tiles) else "raise"
    with Slide(explanation.slide_path) as slide:
        thumb, (dx, dy) = slide.thumbnail(max_size, on_tile_error=on_tile_error)
    h, w = thumb.shape[:2]
    # the cell grid in thumbnail pixels: cell (i, j) covers x in [j * cs, (j + 1) * cs) / dx
    cs = explanation.cell_size
    oy, ox = explanation.origin[1], explanation.origin[0]
    rows = ((np.arange(h) + 0.5) * dy - oy) / cs  # the cell under each thumbnail pixel's centre
    cols = ((np.arange(w) + 0.5) * dx - ox) / cs
    rows = np.clip(rows.astype(int), 0, explanation.grid_shape[0] - 1)
    cols = np.clip(cols.astype(int), 0, explanation.grid_shape[1] - 1)
    maps = np.nan_to_num(explanation.concept_maps)[:, rows][:, :, cols]
    k = maps.shape[0]
    image = thumb.astype(np.float64) / 255
    masked = maps * np.asarray(explanation.tissue_mask)[rows][:, cols][None]
    if per_concept:
        if ax is not None:
            raise ValueError("per_concept=True draws one panel per concept; leave ax=None.")
        return plot_concepts(image, masked, alpha=alpha, labels=labels)
    fig, (axis,) = _figure(ax, 1, (6.0, 6.0 * h / max(w, 1)))
    if clusters:
        assigned = np.asarray(explanation.assignment)[rows][:, cols]
        colours = cluster_image(assigned, k)
        opacity = np.where(assigned >= 0, alpha, 0.0)[..., None]
        axis.imshow(image * (1 - opacity) + colours * opacity)
    else:
        axis.imshow(overlay(image, masked, alpha=alpha))
    axis.set_axis_off()
    axis.set_title(Path(explanation.slide_path).name)
    _legend(axis, k, labels)
    return fig


def concept_labels(attr: Any, *, unstable: str = " (unstable)") -> list[str]:
    """Legend labels of ``attr``'s concepts: their names, unstable ones marked.

    A concept is marked when the stability record stored with the concepts
    (``ConceptStability.attach``) finds it unstable.

    Args:
        attr (NMFConceptAttribution): fitted or loaded concepts.
        unstable (str, optional): appended to the names of unstable concepts.
                    Default: ``" (unstable)"``

    Returns:
        *list[str]*: one label per concept, for ``labels=`` of the plots.
    """
    from captum_nmf.compare.stability import ConceptStability

    names = list(attr.concept_names)
    stability = ConceptStability.of(attr)
    if stability is not None and len(stability.stable) == len(names):
        for j in np.flatnonzero(~stability.stable):
            names[int(j)] += unstable
    return names


def plot_select_k(result: Any, *, figsize: tuple[float, float] = (6.0, 6.0)) -> Figure:
    r"""Held-out error and concept stability against K, from ``select_k``'s result.

    Top: the held-out relative error (training error dashed) with the
    recommended K marked. Bottom: the share of stable concepts per K as bars,
    and every concept's minimum matched cosine as a dot, unstable ones as a
    red cross, with the stability threshold as a line.

    Args:
        result (KSelection): the result of ``select_k``.
        figsize (tuple[float, float], optional): figure size in inches.
                    Default: ``(6.0, 6.0)``

    Returns:
        *Figure*: a matplotlib figure (not attached to pyplot).

    Raises:
        ImportError: matplotlib (the ``viz`` extra) is missing.
    """
    try:
        from matplotlib.figure import Figure as _Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"captum_nmf.viz plots need {_EXTRA}") from exc
    data = result.figure_data()
    ks = np.asarray(data["ks"])
    fig = _Figure(figsize=figsize, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(ks, data["heldout_error"], "o-", color="#0072B2", label="held-out error")
    top.plot(ks, data["train_error"], "--", color="#0072B2", alpha=0.6, label="training error")
    if data["recommended"] is not None:
        for ax in (top, bottom):
            ax.axvline(data["recommended"], color="#009E73", linestyle=":", label=None)
        top.annotate(
            f"recommended K = {data['recommended']}",
            (data["recommended"], float(np.max(data["heldout_error"]))),
            color="#009E73",
            fontsize="small",
        )
    top.set_ylabel("relative error")
    top.legend(fontsize="small")
    bottom.bar(ks, data["share_stable"], color="#999999", alpha=0.5, label="share stable")
    for k, cosines, unstable in zip(ks, data["min_cosine"], data["unstable"], strict=True):
        cos, bad = np.asarray(cosines), np.asarray(unstable, bool)
        bottom.scatter(np.full(int((~bad).sum()), k), cos[~bad], s=12, color="#0072B2")
        bottom.scatter(np.full(int(bad.sum()), k), cos[bad], s=20, color="#D55E00", marker="x")
    bottom.axhline(data["stable_cosine"], color="#D55E00", linewidth=0.8)
    bottom.set_ylim(0, 1.05)
    bottom.set_xlabel("K (number of concepts)")
    bottom.set_ylabel("min matched cosine / share stable")
    bottom.set_xticks(ks)
    return fig
