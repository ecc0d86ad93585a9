"""Exports pathologists can open: QuPath GeoJSON, pyramidal TIFF overlays, per-slide summaries.

* :func:`to_geojson`: one (Multi)Polygon per concept traced from a
  :class:`~captum_nmf.wsi.SlideExplanation`'s assignment map, in level-0 pixel
  coordinates, with QuPath's ``classification`` (name and colour) and holes
  kept; import it in QuPath with *File > Import objects*.
* :func:`write_overlay_tiff`: the coloured clusters, or one concept's
  intensity, as a tiled multi-level TIFF that OpenSlide (and QuPath) open, at
  the slide's level-0 geometry or a stated downsample, written tile by tile.
* :func:`slide_summary`: area share of each concept within tissue, mean
  intensity, and the top-N tiles per concept with PNG crops (prototype galleries).
* :func:`export_explanation`: all of the above into one folder, atomically: the
  export is built in a hidden sibling folder and moved in only when complete.

Every file is written atomically (a full disk leaves the previous file, never a
partial one) and with the mode the umask gives.

Colours are the fixed concept colours of :mod:`captum_nmf.viz`. Needs the
``export`` extra (shapely) for GeoJSON and the ``wsi`` extra for reading slides.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from captum_nmf._core.names import check_concept_names
from captum_nmf._utils.spreadsheet import safe_row
from captum_nmf._utils.validation import check_int, is_positive_number
from captum_nmf.io import atomic_write, sha256_file
from captum_nmf.viz import concept_colors
from captum_nmf.wsi.pyramid import write_tiled_levels

__all__ = [
    "EXPORT_MARKER",
    "export_explanation",
    "slide_summary",
    "to_geojson",
    "write_overlay_tiff",
]

EXPORT_MARKER = ".captum-nmf-export"
_EXPORT_KEY = "captum-nmf/export-folder"

_EXTRA = "the 'export' extra: pip install 'captum-nmf[export]'"


def _names(explanation: Any, names: Sequence[str] | None) -> list[str]:
    """``names`` (checked as concept names), else the recorded ones, else ``concept j``.

    Raises:
        TypeError, ValueError: as :func:`~captum_nmf._core.names.check_concept_names`.
    """
    k = explanation.n_concepts
    if names is None:
        recorded = explanation.config.get("concept_names")
        if isinstance(recorded, list) and len(recorded) == k:
            return [str(n) for n in recorded]
        return [f"concept {j}" for j in range(k)]
    if isinstance(names, Sequence) and not isinstance(names, str) and len(names) != k:
        raise ValueError(f"names must hold {k} names (one per concept), got {len(names)}.")
    # the rules of NMFConceptAttribution.rename: QuPath keys classes by name, so two
    # concepts of one name would become one class
    return check_concept_names(names, k)


def _rgb255(k: int) -> list[list[int]]:
    return [[round(255 * v) for v in c] for c in concept_colors(k)]


def concept_polygons(assignment: NDArray[np.integer], concept: int, cell_size: float) -> Any:
    """The union of the cells assigned to ``concept`` as a shapely geometry (level-0 px).

    Runs of equal cells in each row become rectangles and are merged with
    :func:`shapely.union_all`, so the result is exact: its area is the cell
    count times ``cell_size ** 2`` and holes are kept.

    Returns:
        *shapely geometry*: a Polygon, MultiPolygon or an empty geometry.
    """
    try:
        import shapely
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"GeoJSON export needs {_EXTRA}") from exc
    boxes = []
    mask = np.asarray(assignment) == concept
    for r in np.flatnonzero(mask.any(axis=1)):
        row = np.concatenate([[False], mask[r], [False]])
        edges = np.flatnonzero(np.diff(row.astype(np.int8)))
        for start, stop in zip(edges[::2], edges[1::2], strict=True):
            boxes.append(shapely.box(start, r, stop, r + 1))
    if not boxes:
        return shapely.Polygon()
    merged = shapely.simplify(shapely.union_all(boxes), 0)  # no collinear vertices left
    return shapely.affinity.scale(merged, cell_size, cell_size, origin=(0, 0))


def to_geojson(
    explanation: Any,
    path: str | os.PathLike[str] | None = None,
    *,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    r"""QuPath-ready GeoJSON of the concept clusters, in level-0 pixel coordinates.

    Args:
        explanation (SlideExplanation): the explained slide.
        path (str or PathLike, optional): also write the FeatureCollection here.
                    Default: None
        names (sequence of str, optional): class names per concept.
                    Default: ``"concept 0"``, ``"concept 1"``, ...

    Returns:
        *dict*: a GeoJSON FeatureCollection, one feature per concept present,
        with ``properties.classification`` = ``{"name", "color": [r, g, b]}``,
        ``objectType`` ``"annotation"`` and the concept's ``cells`` and ``area_px``.
        Polygons are clipped to the slide (cells along its right and bottom
        edges reach past it), so ``area_px`` counts slide pixels only.

    Raises:
        ValueError: ``names`` of the wrong length.
        ImportError: shapely (the ``export`` extra) is missing.
    """
    import shapely

    k = explanation.n_concepts
    labels = _names(explanation, names)
    colours = _rgb255(k)
    ox, oy = explanation.origin
    width, height = explanation.dimensions
    slide = shapely.box(0, 0, width, height)  # cells along the edges reach past the slide
    features = []
    for j in range(k):
        geometry = concept_polygons(explanation.assignment, j, explanation.cell_size)
        if geometry.is_empty:
            continue
        geometry = _polygonal(shapely.affinity.translate(geometry, ox, oy).intersection(slide))
        if geometry.is_empty:
            continue
        features.append(
            {
                "type": "Feature",
                "id": str(_feature_id(explanation, j)),
                "geometry": shapely.geometry.mapping(geometry),
                "properties": {
                    "objectType": "annotation",
                    "name": labels[j],
                    "classification": {"name": labels[j], "color": colours[j]},
                    "concept": j,
                    "cells": int((explanation.assignment == j).sum()),
                    "area_px": float(geometry.area),
                },
            }
        )
    # through JSON once: plain lists and floats, exactly what a reader of the file gets
    collection: dict[str, Any] = json.loads(
        json.dumps({"type": "FeatureCollection", "features": features})
    )
    if path is not None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(target) as fh:
            fh.write(json.dumps(collection))
    return collection


def _polygonal(geometry: Any) -> Any:
    """The polygons of ``geometry`` (a clip can leave lines and points where it only touches)."""
    import shapely

    if geometry.geom_type in ("Polygon", "MultiPolygon"):
        return geometry
    parts = [g for g in shapely.get_parts(geometry) if g.geom_type in ("Polygon", "MultiPolygon")]
    return shapely.union_all(parts) if parts else shapely.Polygon()


def _feature_id(explanation: Any, concept: int) -> uuid.UUID:
    """A UUID for a concept's GeoJSON feature, as QuPath writes them; the same on every export.

    Derived (UUID 5) from the slide's fingerprint, the explanation's concepts, the
    assignment map (so two runs of one slide with other tiles or levels differ) and the
    concept index, so re-exporting an explanation gives the same ids and neither two
    slides nor two runs of one slide share one.
    """
    concepts = np.ascontiguousarray(np.asarray(explanation.concepts, np.float32)).tobytes()
    cells = np.asarray(explanation.assignment)
    digest = hashlib.sha256(concepts)
    digest.update(f"{cells.shape}|{explanation.cell_size!r}|".encode())
    digest.update(np.ascontiguousarray(cells, np.int16).tobytes())
    key = f"captum-nmf:{explanation.slide_fingerprint}:{digest.hexdigest()}"
    return uuid.uuid5(uuid.NAMESPACE_URL, f"{key}:{concept}")


def _check_scale(name: str, scale: object) -> None:
    """A weight drawn opaque: None or a positive finite number.

    Raises:
        ValueError: anything else, naming ``name``.
    """
    if scale is not None and not is_positive_number(scale):
        raise ValueError(f"{name} must be a positive number, got {scale!r}.")


def _slide_levels(explanation: Any) -> list[tuple[int, int]] | None:
    """(height, width) of each level of the explained slide, when its file can be read."""
    from captum_nmf.wsi import Slide

    try:
        with Slide(explanation.slide_path) as slide:
            if tuple(slide.dimensions) != tuple(explanation.dimensions):
                return None
            return [(int(h), int(w)) for w, h in slide.level_dimensions]
    except (OSError, ValueError):
        return None


def _overlay_cells(
    explanation: Any, kind: str, concept: int | None, scale: float | None = None
) -> tuple[NDArray[np.uint8], float | None]:
    """RGBA per cell (cluster colours, or one concept's intensity in its colour) and the scale.

    The scale is the weight drawn fully opaque: ``scale``, else the concept's
    maximum over the slide's tissue (None for clusters).
    """
    k = explanation.n_concepts
    hc, wc = explanation.grid_shape
    rgba = np.zeros((hc, wc, 4), np.uint8)
    colours = np.asarray(_rgb255(k), np.uint8)
    if kind == "clusters":
        labels = np.asarray(explanation.assignment)
        inside = labels >= 0
        rgba[inside, :3] = colours[labels[inside]]
        rgba[inside, 3] = 255
        return rgba, None
    if concept is None or not 0 <= concept < k:
        raise ValueError(f"kind='intensity' needs concept in [0, {k}), got {concept!r}.")
    values = np.nan_to_num(np.asarray(explanation.concept_maps[concept], np.float64))
    top = float(values[explanation.tissue_mask].max(initial=0.0)) if scale is None else scale
    level = np.clip(values / top, 0, 1) if top > 0 else np.zeros_like(values)
    level[~explanation.tissue_mask] = 0
    rgba[..., :3] = colours[concept]
    rgba[..., 3] = np.round(255 * level).astype(np.uint8)
    return rgba, top


def _tiles(
    cells: NDArray[np.uint8], px_per_cell: float, shape: tuple[int, int], tile: int
) -> Iterator[NDArray[np.uint8]]:
    """Tiles of the cell image upsampled (nearest) to ``shape``, in TIFF tile order."""
    h, w = shape
    hc, wc = cells.shape[:2]
    for y0 in range(0, h, tile):
        rows = np.minimum(((np.arange(y0, y0 + tile)) / px_per_cell).astype(np.int64), hc - 1)
        for x0 in range(0, w, tile):
            cols = np.minimum(((np.arange(x0, x0 + tile)) / px_per_cell).astype(np.int64), wc - 1)
            yield np.ascontiguousarray(cells[rows][:, cols])


def write_overlay_tiff(
    explanation: Any,
    path: str | os.PathLike[str],
    *,
    kind: Literal["clusters", "intensity"] = "clusters",
    concept: int | None = None,
    downsample: float | None = None,
    tile: int = 256,
    slide_mpp: float | None = None,
    names: Sequence[str] | None = None,
    scale: float | None = None,
) -> Path:
    r"""A pyramidal tiled RGBA TIFF of the clusters or of one concept's intensity.

    By default the file has the slide's own geometry: its level 0 is the
    slide's level 0 and its levels have the slide's level sizes (so the same
    downsamples), so it lies exactly over the slide when opened beside it
    (QuPath, OpenSlide). With ``downsample`` its level 0 is the slide's
    level-0 size divided by it, and every further level halves it (smaller
    files; viewers that scale by microns per pixel still align it). It is
    written tile by tile (never the whole image in memory) with an
    Aperio-style description carrying the mpp, so OpenSlide opens it.

    Args:
        explanation (SlideExplanation): the explained slide.
        path (str or PathLike): output ``.tif``/``.svs``.
        kind (str, optional): ``"clusters"`` (argmax colours, transparent
                    outside tissue) or ``"intensity"`` (``concept``'s weight as
                    opacity of its colour).
                    Default: ``"clusters"``
        concept (int, optional): the concept for ``kind="intensity"``.
                    Default: None
        downsample (float, optional): level-0 slide pixels per overlay pixel
                    (e.g. ``explanation.cell_size`` for one pixel per cell).
                    Default: None (the slide's geometry and levels; when the
                    slide file cannot be read, its level-0 size, halved per level)
        tile (int, optional): TIFF tile side (multiple of 16).
                    Default: 256
        slide_mpp (float, optional): microns per level-0 slide pixel, written
                    (times ``downsample``) into the description; None uses the
                    slide's mpp recorded in the explanation, and writes none when
                    the slide has none (a plain image).
                    Default: None
        names (sequence of str, optional): concept names for the description
                    (TIFF text is ASCII: other characters are written as
                    ``\xf6``-style escapes).
                    Default: None (the names the explanation recorded)
        scale (float, optional): for ``kind="intensity"``, the concept weight
                    drawn fully opaque (weights above it too); pass the same
                    value for several slides to compare them on one scale.
                    The description records the scale used.
                    Default: None (the concept's maximum on this slide's tissue)

    Returns:
        *Path*: the file.

    Raises:
        ValueError: an unknown ``kind``, a bad ``concept``, ``downsample`` or ``tile``.
    """
    if kind not in ("clusters", "intensity"):
        raise ValueError(f"kind must be 'clusters' or 'intensity', got {kind!r}.")
    if tile < 16 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile}.")
    down = 1.0 if downsample is None else float(downsample)
    if not down > 0:
        raise ValueError(f"downsample must be positive, got {downsample!r}.")
    _check_scale("scale", scale)
    cells, top = _overlay_cells(explanation, kind, concept, scale)
    w0, h0 = explanation.dimensions
    base = (max(1, round(h0 / down)), max(1, round(w0 / down)))
    mpp = slide_mpp or explanation.config.get("slide_mpp")  # None: the slide has no scale
    levels = _slide_levels(explanation) if downsample is None else None
    if levels is None:
        levels = [base]
        while min(levels[-1]) >= 2 * tile:
            levels.append((levels[-1][0] // 2, levels[-1][1] // 2))
    labels = [  # TIFF text is 7-bit ASCII: "Tumör" is written "Tum\xf6r"
        n.replace("|", "/").replace("=", "-").encode("ascii", "backslashreplace").decode("ascii")
        for n in _names(explanation, names)
    ]
    shown = (
        f"Concept = {labels[concept]}|Opaque at weight = {top:.6g}"
        if kind == "intensity" and concept is not None
        else "Concepts = " + "; ".join(f"{j}: {n}" for j, n in enumerate(labels))
    )
    description = (
        f"Aperio Image Library v12.0.0\r\n{base[1]}x{base[0]} [0,0 {base[1]}x{base[0]}] "
        f"({tile}x{tile}) RGBA|"
        + ("" if mpp is None else f"MPP = {float(mpp) * down:g}|")  # no made-up scale
        + shown
    )
    sources = [
        (
            _tiles(cells, explanation.cell_size / (down * (base[1] / w)), (h, w), tile),
            (h, w, 4),
        )
        for h, w in levels
    ]
    return write_tiled_levels(
        path,
        sources,
        tile=tile,
        description=description,
        extrasamples=["unassalpha"],
        mpp=None if mpp is None else float(mpp) * down,
    )


_REGION_WINDOW_PX = 512


def _candidate_tiles(
    explanation: Any, maps: NDArray[np.float64], tissue: NDArray[np.bool_]
) -> tuple[NDArray[np.int64], NDArray[np.float64], float]:
    """Level-0 corners, per-concept mean weights (n x K) and level-0 side of candidate tiles.

    Tile mode: the run's own tiles. Region mode (regions of different sizes): windows
    of 512 output px every 256 px whose cells are at least half tissue. Tiles that
    could not be read (``on_tile_error="skip"``), and windows over cells only such
    tiles or regions covered, are no candidates: their crops cannot be read either.
    """
    k = explanation.n_concepts
    if explanation.config.get("mode") != "region":
        every = np.asarray(explanation.tile_locations)
        failed = np.asarray(explanation.failed_tiles, np.int64).reshape(-1, 2)
        lost = {(int(x), int(y)) for x, y in failed}  # a set: no tiles x failed matrix
        read = np.array([(int(x), int(y)) not in lost for x, y in every], bool).reshape(-1)
        tiles = np.flatnonzero(read)  # the tiles' own indices: tile_window takes those
        scores = (
            np.stack([explanation.tile_window(int(i)).reshape(k, -1).mean(1) for i in tiles])
            if len(tiles)
            else np.zeros((0, k))
        )
        return every[tiles], scores, explanation.tile_cells * explanation.cell_size
    t = max(1, round(_REGION_WINDOW_PX / max(int(explanation.config.get("cell_px", 1)), 1)))
    step = max(1, t // 2)
    hc, wc = explanation.grid_shape
    rows = np.arange(0, max(hc - t, 0) + 1, step)
    cols = np.arange(0, max(wc - t, 0) + 1, step)
    integral = np.zeros((k + 1, hc + 1, wc + 1))
    integral[:k, 1:, 1:] = maps.cumsum(1).cumsum(2)
    integral[k, 1:, 1:] = tissue.cumsum(0).cumsum(1)
    unread = np.zeros((hc + 1, wc + 1))  # cells of regions that could not be read (NaN)
    unread[1:, 1:] = np.isnan(np.asarray(explanation.concept_maps)).any(0).cumsum(0).cumsum(1)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    r, c = rr.ravel(), cc.ravel()
    r1, c1 = np.minimum(r + t, hc), np.minimum(c + t, wc)
    sums = integral[:, r1, c1] - integral[:, r, c1] - integral[:, r1, c] + integral[:, r, c]
    lost = unread[r1, c1] - unread[r, c1] - unread[r1, c] + unread[r, c]
    area = (r1 - r) * (c1 - c)
    keep = (sums[k] >= 0.5 * area) & (lost == 0)
    ox, oy = explanation.origin
    locations = (
        np.stack(
            [ox + c[keep] * explanation.cell_size, oy + r[keep] * explanation.cell_size], axis=1
        )
        .round()
        .astype(np.int64)
    )
    return locations, (sums[:k, keep] / area[keep]).T, t * explanation.cell_size


def slide_summary(
    explanation: Any,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    top_n: int = 5,
    crop_size: int = 256,
    names: Sequence[str] | None = None,
    slide: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    r"""Per-concept area share, mean intensity and top tiles of one slide.

    Area share: the share of tissue cells whose argmax is the concept. Mean
    intensity: the concept's mean weight over tissue cells. Top tiles: the
    kept tiles whose window of the concept map has the highest (positive) mean weight,
    skipping tiles that overlap a better-ranked one by more than half a tile
    (region mode: windows of 512 output px every 256 px, at least half tissue).
    With ``out_dir``, writes ``summary.json``, ``summary.csv`` (one row per
    concept), ``top_tiles.csv`` and PNG crops of each whole tile (resized to
    ``crop_size`` px) under ``prototypes/concept_<k>/``. A crop is read at the
    coarsest pyramid level that still gives ``crop_size`` px (not at level 0).
    When the slide is not where the explanation recorded it (a run folder
    copied to another machine), or another file is there now (checked by the
    slide's fingerprint), and no ``slide`` is given, the summary is written
    without crops (``crop`` None) and a warning says so.

    Args:
        explanation (SlideExplanation): the explained slide.
        out_dir (str or PathLike, optional): where to write.
                    Default: None
        top_n (int, optional): tiles per concept.
                    Default: 5
        crop_size (int, optional): side of the PNG crops in pixels.
                    Default: 256
        names (sequence of str, optional): class names per concept.
                    Default: None
        slide (str or PathLike, optional): where the slide is now, for the
                    crops; it must be the explained slide (its fingerprint).
                    Default: None (the path the explanation recorded)

    Returns:
        *dict*: ``{"slide", "tissue_cells", "cell_size_px", "failed_tiles",
        "unexplained_tissue_cells", "concepts": [{name, area_fraction,
        mean_intensity, top_tiles: [{x, y, mean_weight, crop}]}]}``; the
        tissue cells that only unreadable tiles covered are counted in
        ``unexplained_tissue_cells``, not in ``tissue_cells``.

    Raises:
        ValueError: ``top_n`` < 1, ``names`` of the wrong length, or a
                    ``slide`` that is not the explained one.
        SlideNotFoundError: ``slide`` does not exist.
    """
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}.")
    k = explanation.n_concepts
    labels = _names(explanation, names)
    tissue = np.asarray(explanation.tissue_mask)
    n_tissue = int(tissue.sum())
    maps = np.nan_to_num(np.asarray(explanation.concept_maps, np.float64))
    locations, scores, side = _candidate_tiles(explanation, maps, tissue)
    summary: dict[str, Any] = {
        "slide": explanation.slide_path,
        "tissue_cells": n_tissue,
        "cell_size_px": explanation.cell_size,
        # tiles that could not be read (on_tile_error="skip"), and the tissue cells only
        # they covered: not explained, and not among the tissue_cells the shares count
        "failed_tiles": len(explanation.failed_tiles),
        "unexplained_tissue_cells": int(np.asarray(explanation.unexplained_cells).sum()),
        "concepts": [],
    }
    out = None if out_dir is None else Path(out_dir)
    source = None if out is None else _open_slide(explanation, slide)
    try:
        for j in range(k):
            entry: dict[str, Any] = {
                "concept": j,
                "name": labels[j],
                "color": _rgb255(k)[j],
                "area_fraction": float((np.asarray(explanation.assignment)[tissue] == j).sum())
                / max(n_tissue, 1),
                "mean_intensity": float(maps[j][tissue].mean()) if n_tissue else 0.0,
                "top_tiles": [],
            }
            chosen: list[int] = []
            for t in np.argsort(-scores[:, j], kind="stable"):
                if len(chosen) == top_n or not scores[t, j] > 0:  # no concept: no prototype
                    break
                # prototypes that overlap a better one by more than half a tile add nothing
                if any(np.abs(locations[t] - locations[c]).max() < side / 2 for c in chosen):
                    continue
                chosen.append(int(t))
            for rank, t in enumerate(chosen):
                x, y = (int(v) for v in locations[t])
                item: dict[str, Any] = {"x": x, "y": y, "mean_weight": float(scores[t, j])}
                if out is not None:
                    item["crop"] = None
                if out is not None and source is not None:
                    crop_path = out / "prototypes" / f"concept_{j}" / f"rank_{rank}.png"
                    crop_path.parent.mkdir(parents=True, exist_ok=True)
                    level, down = _crop_level(source.level_downsamples, side / crop_size)
                    read = max(1, round(side / down))
                    pixels = source.read_region((x, y), level, (read, read))
                    with atomic_write(crop_path, "wb") as fh:
                        Image.fromarray(pixels).resize(
                            (crop_size, crop_size), Image.Resampling.BOX
                        ).save(fh, format="PNG")
                    item["crop"] = str(crop_path.relative_to(out))
                entry["top_tiles"].append(item)
            summary["concepts"].append(entry)
    finally:
        if source is not None:
            source.close()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_write(out / "summary.json") as fh:
            fh.write(json.dumps(summary, indent=2))
        concepts = io.StringIO()
        writer = csv.writer(concepts)
        writer.writerow(["concept", "name", "area_fraction", "mean_intensity"])
        for e in summary["concepts"]:
            # a name such as "=HYPERLINK(...)" or "-ve stroma" stays text in a spreadsheet
            row = [e["concept"], e["name"], e["area_fraction"], e["mean_intensity"]]
            writer.writerow(safe_row(row))
        tops = io.StringIO()
        writer = csv.writer(tops)
        writer.writerow(["concept", "rank", "x", "y", "mean_weight", "crop"])
        for e in summary["concepts"]:
            for rank, tile in enumerate(e["top_tiles"]):
                writer.writerow(
                    [e["concept"], rank, tile["x"], tile["y"], tile["mean_weight"], tile["crop"]]
                )
        for name, text in (("summary.csv", concepts), ("top_tiles.csv", tops)):
            with atomic_write(out / name, newline="") as fh:
                fh.write(text.getvalue())
    return summary


def _open_slide(explanation: Any, slide: str | os.PathLike[str] | None) -> Any:
    """The explained slide for the crops: ``slide`` (checked), else the recorded path if there.

    Raises:
        ValueError: ``slide`` is another slide than the explained one.
        SlideNotFoundError: ``slide`` does not exist.
    """
    import warnings

    from captum_nmf.exceptions import CaptumNMFWarning, SlideNotFoundError
    from captum_nmf.wsi import Slide

    if slide is None:
        why = None
        try:
            recorded = Slide(explanation.slide_path)
        except SlideNotFoundError:
            why = f"is no longer at {explanation.slide_path}"
        else:
            if recorded.fingerprint() == explanation.slide_fingerprint:
                return recorded
            recorded.close()  # a re-scan under the same name, another machine's file
            why = f"is not the file now at {explanation.slide_path} (its content differs)"
        warnings.warn(
            f"the explained slide {why}: the summary has no prototype crops. Pass slide=... "
            "(--slide on the command line) to add them.",
            CaptumNMFWarning,
            stacklevel=3,
        )
        return None
    opened = Slide(slide)
    if opened.fingerprint() != explanation.slide_fingerprint:
        opened.close()
        raise ValueError(
            f"slide={str(slide)!r} is not the slide this explanation was made from (its "
            f"content differs from {Path(explanation.slide_path).name}'s); pass that slide."
        )
    return opened


def _crop_level(downsamples: Sequence[float], want: float) -> tuple[int, float]:
    """The coarsest level whose downsample is at most ``want`` (level 0 at the least)."""
    level = 0
    for i, down in enumerate(downsamples):
        if down <= want * (1 + 1e-9):
            level = i
    return level, float(downsamples[level])


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / EXPORT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(data, dict) and data.get("key") == _EXPORT_KEY):
        return None
    files = data.get("files")
    data["files"] = [f for f in files if isinstance(f, str)] if isinstance(files, list) else []
    return data


def export_explanation(
    explanation: Any,
    out_dir: str | os.PathLike[str],
    *,
    top_n: int = 5,
    names: Sequence[str] | None = None,
    slide: str | os.PathLike[str] | None = None,
    intensity_scale: float | None = None,
) -> Path:
    r"""Write every export of one slide into ``out_dir``, atomically.

    ``concepts.geojson``, ``clusters.tif``, one ``concept_<k>.tif`` per concept
    and ``summary/`` (:func:`slide_summary`) are built in a hidden sibling
    folder. Only when all are written is the list of files
    (``.captum-nmf-export``) marked ``replacing`` and the files moved into
    ``out_dir``; the list is then rewritten ``complete`` with each file's
    SHA-256. A failure while building (a full disk, an interrupt) leaves the
    previous export as it was; a process killed while moving leaves the list
    saying ``replacing``, and the next export finishes the job. Files of a
    previous export that the new one does not write are removed; anything else
    in ``out_dir`` (e.g. it is a run folder) is kept. One export at a time
    writes a folder (a lock file), and a file of the previous export that was
    changed since (a GeoJSON corrected in QuPath) is never replaced: the
    export is refused, naming it. A link as ``out_dir`` is followed: the
    export is built beside its target.

    Args:
        explanation (SlideExplanation): the explained slide.
        out_dir (str or PathLike): the export folder; created if missing.
        top_n (int, optional): prototype tiles per concept in the summary.
                    Default: 5
        names (sequence of str, optional): class names per concept.
                    Default: None
        slide (str or PathLike, optional): where the slide is now (for the
                    summary's crops; see :func:`slide_summary`).
                    Default: None (the path the explanation recorded)
        intensity_scale (float, optional): the weight drawn opaque in every
                    ``concept_<k>.tif`` (one scale for several slides; see
                    :func:`write_overlay_tiff`).
                    Default: None (each concept's maximum on this slide)

    Returns:
        *Path*: ``out_dir``.

    Raises:
        FileExistsError: ``out_dir`` is a file; or a folder holding files of
                    the export's names that an export did not write, or files
                    of the previous export that were changed since.
        RunLockedError: another export is writing ``out_dir``.
        ValueError: ``top_n`` below 1, names of the wrong number, or an
                    ``out_dir`` that names no folder (``/``).
        OSError: the files could not be written (nothing is changed then).
    """
    from captum_nmf.wsi.store import RunLock

    check_int("top_n", top_n)
    _check_scale("intensity_scale", intensity_scale)
    _names(explanation, names)  # the count of names, before any work
    out = Path(os.path.realpath(Path(out_dir).expanduser()))  # a link: beside its target
    if not out.name:
        raise ValueError(f"out_dir={str(out_dir)!r} names no folder to export into; pass one.")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"export folder {out} exists and is not a directory.")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.export-{uuid.uuid4().hex[:12]}")
    lock: RunLock | None = None
    try:
        lock = RunLock(out, _EXPORT_LOCK, "export")
        _remove_stale(out)  # killed exports' folders (this lock is held: none is running)
        previous = _read_marker(out)
        _check_previous(out, previous, explanation.n_concepts)
        tmp.mkdir()
        to_geojson(explanation, tmp / "concepts.geojson", names=names)
        write_overlay_tiff(explanation, tmp / "clusters.tif", names=names)
        for j in range(explanation.n_concepts):
            write_overlay_tiff(
                explanation,
                tmp / f"concept_{j}.tif",
                kind="intensity",
                concept=j,
                names=names,
                scale=intensity_scale,
            )
        slide_summary(explanation, tmp / "summary", top_n=top_n, names=names, slide=slide)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        if previous is not None:  # a file this export writes, which the last one did not
            _check_foreign(out, files, previous)
        digests = {rel: sha256_file(tmp / rel) for rel in files}
        _move_in(tmp, out, files, digests, [] if previous is None else previous["files"])
    finally:
        _remove_tree(tmp)
        if lock is not None:
            lock.release()
        if created:  # a new folder that got nothing goes again (rmdir takes only an empty one)
            with contextlib.suppress(OSError):
                out.rmdir()
    return out


_EXPORT_LOCK = ".captum-nmf-export.lock"


def _check_previous(out: Path, previous: dict[str, Any] | None, k: int) -> None:
    """Refuse files of our names that no export wrote, or that were changed since ours.

    Raises:
        FileExistsError: naming the files (they are kept).
    """
    if previous is None:
        ours = {"concepts.geojson", "clusters.tif", "summary"} | {
            f"concept_{j}.tif" for j in range(k)
        }
        clash = sorted(p.name for p in out.iterdir() if p.name in ours)
        if clash:
            raise FileExistsError(
                f"export folder {out} already holds {clash}, not written by an export of "
                "captum-nmf; they are kept. Choose another folder."
            )
        return
    recorded = previous.get("sha256")
    if previous.get("status") != "complete" or not isinstance(recorded, dict):
        return  # an interrupted move (or an export of an older version): replaced in full
    edited = []
    for rel, digest in sorted(recorded.items()):
        path = out / rel
        if _inside(rel) and path.is_file() and sha256_file(path) != digest:
            edited.append(rel)
    if edited:
        raise FileExistsError(
            f"export folder {out}: {edited} changed since captum-nmf exported them (edited, "
            "e.g. in QuPath or a spreadsheet?); they are kept. Move them away (or delete "
            "them) and export again, or choose another folder."
        )


def _check_foreign(out: Path, files: list[str], previous: dict[str, Any]) -> None:
    """Refuse files this export would replace that the previous export did not write.

    A second export into a folder may write more files than the first (more
    concepts, more prototypes): a user's file under one of those names is kept.

    Raises:
        FileExistsError: naming the files (nothing is changed).
    """
    listed = {str(rel) for rel in previous.get("files", [])}
    foreign = [rel for rel in files if rel not in listed and (out / rel).exists()]
    if foreign:
        raise FileExistsError(
            f"export folder {out} holds {foreign}, which the previous export of captum-nmf "
            "did not write (yours?) and this one would replace; they are kept. Move them "
            "away and export again, or choose another folder."
        )


def _inside(rel: str) -> bool:
    parts = Path(rel).parts
    return bool(parts) and ".." not in parts and not Path(rel).is_absolute()


def _remove_stale(out: Path) -> None:
    """Remove the hidden build folders of killed exports into ``out`` (best effort)."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.export-[0-9a-f]{{12}}")
    with contextlib.suppress(OSError):
        for entry in out.parent.iterdir():
            if pattern.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
                with contextlib.suppress(OSError):
                    _remove_tree(entry)


def _move_in(
    tmp: Path, out: Path, files: list[str], digests: dict[str, str], old_files: list[str]
) -> None:
    """Move a complete export into ``out`` under a ``replacing`` list, then mark it complete."""
    old = [rel for rel in old_files if _inside(rel)]
    with atomic_write(out / EXPORT_MARKER) as fh:  # every file either export may leave
        fh.write(
            json.dumps(
                {"key": _EXPORT_KEY, "status": "replacing", "files": sorted({*files, *old})},
                indent=2,
            )
        )
    for rel in files:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).replace(out / rel)
    keep = set(files)
    for rel in old:
        if rel not in keep:
            (out / rel).unlink(missing_ok=True)
    for folder in sorted({(out / rel).parent for rel in old}, key=lambda p: -len(p.parts)):
        if folder != out:
            with contextlib.suppress(OSError):  # only empty folders of the old export go
                folder.rmdir()
    record = {"key": _EXPORT_KEY, "status": "complete", "files": files, "sha256": digests}
    with atomic_write(out / EXPORT_MARKER) as fh:
        fh.write(json.dumps(record, indent=2))


def _remove_tree(folder: Path) -> None:
    """Remove the temporary export folder this call created (all of it is ours)."""
    if not folder.exists():
        return
    for path in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)):
        if path.is_dir():
            path.rmdir()
        else:
            path.unlink()
    folder.rmdir()
