"""``explain_slide``: concept maps of a whole slide, streamed, bounded in memory, resumable.

The run is planned first (:mod:`.plan`: tiles, cells, tissue, regions, chunks,
and every check that can fail before work), then claims its folder
(:mod:`captum_nmf.wsi.store`), then the executor (:mod:`.execute`) reads the
tiles, runs the model, and an assembler (:mod:`.assemble`) turns the layer's
activations into the K-channel maps, chunk by chunk. With ``out_dir`` each
chunk is written atomically and recorded (with its SHA-256) in the manifest
before the next starts, so an interrupted run continues with ``resume=True``
and gives the same bits as an uninterrupted one.
"""

from __future__ import annotations

import copy
import numbers
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from captum_nmf._core.nmf_concept import NMFConceptAttribution
from captum_nmf.exceptions import NoTissueError, RunStateError, UnreadableRegionWarning
from captum_nmf.wsi.explanation import EXPLANATION_FILE, SlideExplanation
from captum_nmf.wsi.run.assemble import Assembler, assembler_for
from captum_nmf.wsi.run.config import (
    DERIVED,
    UNHASHED,
    RunOptions,
    check_run_options,
    config_hash,
    mask_digest,
    model_device,
    run_config,
)
from captum_nmf.wsi.run.execute import process
from captum_nmf.wsi.run.plan import Plan, check_output_location, make_plan
from captum_nmf.wsi.store import RunStore
from captum_nmf.wsi.tiling import EdgePolicy, TileErrorPolicy, TissueOption

__all__ = ["explain_slide"]


def explain_slide(
    attr: NMFConceptAttribution,
    path: str | os.PathLike[str],
    *,
    tile_size: int = 512,
    stride: int = 256,
    level: int | None = None,
    mpp: float | None = None,
    border: int = 2,
    mode: Literal["tile", "region"] = "tile",
    region_size: int = 1024,
    region_margin: int = 64,
    edge: EdgePolicy = "pad",
    min_tissue: float = 0.25,
    tissue_mask: TissueOption = "otsu",
    transform: Callable[[Tensor], Tensor] | None = None,
    batch_transform: Callable[[Tensor], Tensor] | None = None,
    slide_mpp: float | None = None,
    batch_size: int = 16,
    num_workers: int = 0,
    on_tile_error: TileErrorPolicy = "raise",
    out_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    chunk_tiles: int = 1024,
    autocast: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = True,
) -> SlideExplanation:
    r"""Concept maps of a whole slide from overlapping tiles, as in the paper.

    The slide's tissue tiles (``tile_size`` px, every ``stride`` px, at
    ``level`` or ``mpp``) go through the model in raster order. Each tile's
    layer activations, minus ``border`` cells on every side, are averaged
    over all tiles covering the same cell; the concept weights of each cell
    are then solved with the fitted concepts (exact NNLS). Memory is bounded
    by the band of cells the current tile row can touch, not by the slide.

    Args:
        attr (NMFConceptAttribution): fitted (or loaded) concepts; the model
                    runs on the device of its parameters.
        path (str or PathLike): the slide (any OpenSlide format, or a plain image).
        tile_size (int, optional): tile side in output pixels.
                    Default: 512
        stride (int, optional): step between tiles; a multiple of the cell size.
                    Default: 256
        level (int, optional): pyramid level to read (the paper: level 1 = 10x).
                    Default: None (level 0 unless ``mpp`` is given)
        mpp (float, optional): target microns per pixel instead of ``level``.
                    Default: None
        border (int, optional): feature-map cells dropped on each tile side
                    where another tile covers them (at the slide's edges, and
                    beside tiles left out, the tile nearest its centre gives
                    the value). Overlapping tiles must leave interiors that
                    meet (``stride <= tile_size - 2 * border * cell``); tiles
                    that do not overlap (``stride = tile_size``) keep their
                    borders, which no other tile covers. Unused in region mode
                    (a region run resumes with any).
                    Default: 2
        mode (str, optional): ``"tile"`` (the paper's overlapping tiles, the
                    default the analyses assume) or ``"region"``: the fast mode
                    that runs the network's fully convolutional part once per
                    region, with ``region_margin`` px of context on every side
                    (margins dropped, no overlap averaging). Regions are planned
                    on the tissue (:func:`~captum_nmf.wsi.regions.plan_regions`):
                    roots of ``region_size`` px shrunk to their tissue, or split
                    into quarters when that reads fewer pixels; they cover every
                    cell that is at least half tissue exactly once (every cell
                    with ``tissue_mask=None``). ``tile_size``, ``stride``,
                    ``border``, ``min_tissue`` and ``batch_size`` are then unused
                    (one region per forward), a chunk holds ``chunk_tiles // 16``
                    regions, ``tile_locations`` are the regions' corners (margin
                    included) and :meth:`SlideExplanation.tile_window` is not
                    available. See the README for its speed and agreement with
                    tile mode. Memory of the forward grows with the region area.
                    Default: ``"tile"``
        region_size (int, optional): side of a root region in output pixels
                    (multiple of the cell size). 1024 was faster than 2048 on
                    CPU (very large inputs cost more per pixel there); on a
                    GPU larger regions may pay.
                    Default: 1024
        region_margin (int, optional): context on each side, in output pixels
                    (multiple of the cell size).
                    Default: 64
        edge (str, optional): ``"pad"`` or ``"drop"`` tiles reaching past the
                    slide (see :func:`~captum_nmf.wsi.tile_grid`).
                    Default: ``"pad"``
        min_tissue (float, optional): smallest tissue fraction of a tile.
                    Default: 0.25
        tissue_mask (TissueMask, "otsu" or None, optional): the tissue mask;
                    None uses every tile.
                    Default: ``"otsu"``
        transform (Callable, optional): applied to each 3 x T x T tile in [0, 1]
                    on the CPU, where it is read (e.g. the model's
                    normalisation); picklable for workers.
                    Default: None
        batch_transform (Callable, optional): applied to each N x 3 x T x T
                    batch in [0, 1] on the model's device, after ``transform``
                    (e.g. the normalisation, so that tiles cross to a GPU as
                    ``uint8`` and are converted there).
                    Default: None
        slide_mpp (float, optional): microns per level-0 pixel for slides
                    without that metadata.
                    Default: None
        batch_size (int, optional): tiles per forward pass.
                    Default: 16
        num_workers (int, optional): DataLoader worker processes reading tiles
                    while the model runs; 0 reads them in a background thread
                    of this process, one batch ahead (OpenSlide and PIL release
                    the GIL; for a model on the CPU another thread converts
                    them to float, also one batch ahead), which is as fast on
                    a saturated CPU and keeps a GPU fed without extra processes.
                    Threads and (in tile mode) worker processes of an active
                    :class:`~captum_nmf.wsi.ReadingThreads` (``explain_cohort``
                    starts one) are reused instead of started for this call.
                    Default: 0
        on_tile_error (str, optional): after a failed read and a failed retry
                    on a reopened handle, ``"raise"`` or ``"skip"`` (the tile is
                    recorded in ``failed_tiles`` and its cells become NaN when no
                    other tile covers them).
                    Default: ``"raise"``
        out_dir (str or PathLike, optional): write chunks, a manifest and the
                    final explanation here.
                    Default: None (keep everything in memory)
        resume (bool, optional): continue the run in ``out_dir``.
                    Default: False
        overwrite (bool, optional): replace ``out_dir``'s content, but only
                    after the new run completes.
                    Default: False
        chunk_tiles (int, optional): tiles per chunk (rounded up to whole tile
                    rows); each chunk boundary also writes the stitcher's pending
                    rows (up to a tile height of cells x slide width x K).
                    Default: 1024
        autocast (torch.dtype, optional): run the forward under
                    ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16``;
                    activations are projected, stitched and solved in float32). Part of
                    the run's configuration; see the README for its speed and
                    agreement with float32.
                    Default: None (float32)
        channels_last (bool, optional): give the model channels-last batches
                    (convert the model with ``model.to(memory_format=
                    torch.channels_last)`` yourself for the full effect).
                    Default: False
        progress (bool, optional): show a tqdm progress bar.
                    Default: True

    Returns:
        *SlideExplanation*: the maps, assignment, counts, tiles and their outputs.

    Raises:
        NotFittedError: ``attr`` is not fitted.
        SlideNotFoundError: ``path`` does not exist.
        UnsupportedSlideError: the file cannot be opened.
        NoTissueError: no tile has enough tissue (nothing is written).
        SlideReadError: a tile could not be read twice, with ``on_tile_error="raise"``.
        FileExistsError: ``out_dir`` holds files and neither ``resume`` nor ``overwrite``.
        RunStateError: ``resume`` with a different configuration or slide.
        ValueError: bad tiling arguments, a level or mpp the slide does not
                    have, tile and stride that do not fit the layer's cells
                    (or overlap too little for ``border``), or a
                    ``LOKY_MAX_CPU_COUNT`` that is not a whole number.
        TypeError: a non-int size, level or count.
    """
    attr.check_fitted("explain_slide")
    # the run's own view of the concepts: a refit of attr in another thread meanwhile (a
    # notebook, a server) neither stops the run nor mixes two sets of concepts in its maps
    attr = copy.copy(attr)
    check_run_options(
        attr,
        border=border,
        mode=mode,
        region_size=region_size,
        region_margin=region_margin,
        tile_size=tile_size,
        stride=stride,
        batch_size=batch_size,
        num_workers=num_workers,
        chunk_tiles=chunk_tiles,
        on_tile_error=on_tile_error,
        autocast=autocast,
        channels_last=channels_last,
    )
    if out_dir is None and (resume or overwrite):
        raise ValueError("resume=True and overwrite=True need out_dir=...; pass the run directory.")
    options = RunOptions(  # checked counts as Python ints: a NumPy int is not JSON (the hash)
        border=_plain(border),
        mode=mode,
        region_size=_plain(region_size),
        region_margin=_plain(region_margin),
        edge="pad" if mode == "region" else edge,
        min_tissue=0.0 if mode == "region" else min_tissue,
        transform=transform,
        batch_transform=batch_transform,
        slide_mpp=slide_mpp,
        batch_size=_plain(batch_size),
        num_workers=_plain(num_workers),
        on_tile_error=on_tile_error,
        chunk_tiles=_plain(chunk_tiles),
        autocast=autocast,
        channels_last=channels_last,
    )
    plan = make_plan(
        attr,
        path,
        options,
        tile_size=tile_size,
        stride=stride,
        level=level,
        mpp=mpp,
        tissue_mask=tissue_mask,
    )
    regions = None if plan.regions is None else plan.regions.tolist()
    config = run_config(attr, options, plan.grid, plan.slide_mpp, regions)
    if out_dir is None:
        return _run(attr, plan, options, config, None, None, progress)
    return _stored_run(
        attr, path, plan, options, config, Path(out_dir), resume, overwrite, progress
    )


def _stored_run(
    attr: NMFConceptAttribution,
    path: str | os.PathLike[str],
    plan: Plan,
    options: RunOptions,
    config: dict[str, Any],
    target: Path,
    resume: bool,
    overwrite: bool,
    progress: bool,
) -> SlideExplanation:
    """The run in its folder ``target``: started, resumed, or loaded when complete.

    Raises:
        FileExistsError, RunStateError, OSError: as :func:`explain_slide`.
    """
    check_output_location(target, plan.first_chunk_bytes(attr))
    store, manifest = RunStore.open(target, resume=resume, overwrite=overwrite)
    try:
        # a call that computes hashes the weights it computes with (the cache misses edits
        # through .data); one of a complete run only loads it, as a restarted cohort does
        computes = manifest is None or manifest.get("status") != "complete"
        recorded = (manifest or {}).get("config") or {}
        config = _as_recorded(config, recorded, computes=computes)
        # a run from before the tissue mask was recorded: its hash lacks the mask
        legacy = "tissue_mask" not in (recorded or {"tissue_mask": None})
        hashed = {k: v for k, v in config.items() if k != "tissue_mask"} if legacy else config
        hashed = _without_added_keys(hashed, recorded)
        run_hash = config_hash(attr, hashed, plan.grid, cached=not computes)
        # each call that computes chunks is a part: what a resume may change is recorded
        part = {"batch_size": config["batch_size"], "device": str(model_device(attr))}
        if manifest is None:
            store.start(
                {
                    "config_hash": run_hash,
                    "config": config,
                    "slide": str(Path(path)),
                    "slide_fingerprint": plan.fingerprint,
                    "chunks": [list(c) for c in plan.chunks],
                    "done": 0,
                    "cell": None,
                    "n_outputs": None,
                    "status": "running",
                    "parts": [{"from_chunk": 0, **part}],
                }
            )
            manifest = store.manifest
        else:
            _check_resumable(store, manifest, run_hash, plan.fingerprint, config)
            if legacy:
                _check_legacy_mask(store, manifest, config)
            if manifest.get("status") != "complete":
                done = int(manifest["done"])  # a part that computed nothing is replaced
                parts = [p for p in manifest.get("parts", []) if p.get("from_chunk") != done]
                manifest["parts"] = [*parts, {"from_chunk": done, **part}]
                store.write_manifest()
        config = {**config, "parts": manifest.get("parts", [])}
        if manifest.get("status") == "complete":
            result = SlideExplanation.load(store.verify(EXPLANATION_FILE))
        else:
            result = _run(attr, plan, options, config, store, manifest, progress)
            result.save(store.work_dir)
            store.complete()
    except BaseException:
        store.fail()
        raise
    store.close()
    return result


def _as_recorded(
    config: dict[str, Any], recorded: dict[str, Any], *, computes: bool
) -> dict[str, Any]:
    """``config`` with what a recorded run may differ in without being another run.

    A region run's ``border`` (unused there: any one resumes; runs before 2026-12-08
    recorded the one passed), and a finished run's ``chunk_tiles`` (how it was cut into
    chunks: the same maps).
    """
    if config["mode"] == "region" and recorded.get("mode") == "region":
        config = {**config, "border": recorded.get("border")}
    if not computes and "chunk_tiles" in recorded:
        config = {**config, "chunk_tiles": recorded["chunk_tiles"]}
    return config


def _run(
    attr: NMFConceptAttribution,
    plan: Plan,
    options: RunOptions,
    config: dict[str, Any],
    store: RunStore | None,
    manifest: dict[str, Any] | None,
    progress: bool,
) -> SlideExplanation:
    """Restore the finished chunks (if any), process the rest, build the explanation."""
    assembler = assembler_for(attr, plan, store, options.border)
    done = 0 if manifest is None else int(manifest["done"])
    if done and manifest is not None:
        assembler.restore(manifest)
    process(assembler, options, done, progress=progress)
    return _explanation(assembler, config)


def _added_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """The keys recorded since 2026-12-07, with the values every run before them had."""
    return {
        "bound_layer": config.get("layer"),
        "attribute_to_layer_input": False,
        "forward_func": "the model",
        "reshape_transform": None,
    }


def _without_added_keys(config: dict[str, Any], recorded: dict[str, Any]) -> dict[str, Any]:
    """``config`` to hash for a run recorded before the keys of :func:`_added_defaults`.

    Such a run's hash lacks them: they are left out when this call has the value
    every run had then (the model itself, the concepts' own layer, its output, no
    reshape), so the run resumes or loads; otherwise they stay, the hashes differ
    and the refusal names them ("not recorded (an older captum-nmf)").
    """
    if not recorded:
        return config
    added = {k: v for k, v in _added_defaults(config).items() if k not in recorded}
    if added and all(config.get(k) == v for k, v in added.items()):
        return {k: v for k, v in config.items() if k not in added}
    return config


def _check_resumable(
    store: RunStore,
    manifest: dict[str, Any],
    run_hash: str,
    fingerprint: str,
    config: dict[str, Any],
) -> None:
    if manifest.get("config_hash") != run_hash:
        recorded = manifest.get("config") or {}
        changed = [
            f"{key}: recorded {_short(recorded[key])}, now {_short(config.get(key))}"
            if key in recorded
            else f"{key}: not recorded (an older captum-nmf), now {_short(config.get(key))}"
            for key in sorted(set(recorded) | set(config))
            if key not in UNHASHED
            and (key not in recorded or recorded[key] != config.get(key))
            and (key in recorded or key not in DERIVED)  # not what changes an older run's hash
        ]
        what = "; ".join(changed) or "the model's weights, the concepts or the tile positions"
        described = ("transform", "batch_transform", "forward_func", "reshape_transform")
        more = (
            " A transform is compared by its code, arguments and attributes: a class whose "
            "attributes also count calls or cache results can state what decides its result in "
            "a class attribute __captum_nmf_description__."
            if any(f"{key}: " in what for key in described)
            else ""
        )
        raise _different(store, what, more)
    if manifest.get("slide_fingerprint") != fingerprint:
        raise RunStateError(
            f"out_dir {store.work_dir} was produced from another slide (fingerprint "
            f"{manifest.get('slide_fingerprint')}, this one {fingerprint})."
        )


def _check_legacy_mask(store: RunStore, manifest: dict[str, Any], config: dict[str, Any]) -> None:
    """A run of an older captum-nmf (no mask in its configuration): its saved mask must match.

    A complete run is compared by the tissue mask saved in its explanation; an
    unfinished one cannot be (its chunks do not keep the mask).

    Raises:
        RunStateError: another mask, or an unfinished run of an older version.
    """
    if manifest.get("status") != "complete":
        raise RunStateError(
            f"out_dir {store.work_dir} holds an unfinished run of an older captum-nmf, whose "
            "configuration does not record the tissue mask, so resuming it could mix two "
            "masks; pass overwrite=True to run it again."
        )
    recorded = mask_digest(SlideExplanation.load(store.verify(EXPLANATION_FILE)).tissue)
    if recorded != config["tissue_mask"]:
        now = config["tissue_mask"]
        raise _different(store, f"tissue_mask: recorded {_short(recorded)}, now {_short(now)}")


def _different(store: RunStore, what: str, more: str = "") -> RunStateError:
    """The refusal of a run folder made with another configuration, naming ``what`` differs."""
    return RunStateError(
        f"out_dir {store.work_dir} was produced with a different configuration ({what}); "
        f"pass resume=False with another directory, or overwrite=True.{more}"
    )


def _short(value: object, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _explanation(assembler: Assembler, config: dict[str, Any]) -> SlideExplanation:
    """The explanation of a finished run: maps, argmax within tissue, tiles and their outputs."""
    plan, grid = assembler.plan, assembler.plan.grid
    if len(set(assembler.failed)) == assembler.n_units:
        raise NoTissueError(
            f"No tile of {Path(grid.path).name} could be read ({len(assembler.failed)} of "
            f"{assembler.n_units} failed); nothing to explain."
        )
    try:  # the last rows' solve, on the model's device
        assembler.finish()
    except torch.OutOfMemoryError as exc:
        raise torch.OutOfMemoryError(
            f"the device ran out of memory solving the slide's last rows ({exc}); every chunk "
            "is kept: run again with resume=True once the device has more free memory."
        ) from exc
    maps, counts, tissue = assembler.maps, assembler.counts, plan.tissue
    assignment = np.full(counts.shape, -1, dtype=np.int16)
    for r in np.flatnonzero(counts.any(axis=1)):  # row by row: no slide-sized temporaries
        row = np.nan_to_num(maps[:, r, :], nan=0.0)
        best = np.argmax(row, axis=0)
        top = np.take_along_axis(row, best[None], axis=0)[0]
        assignment[r] = np.where((top > 0) & tissue[r], best, -1)
    failed = np.asarray(sorted(set(assembler.failed)), dtype=np.int64)
    locations = grid.locations
    if plan.regions is not None:  # each region's corner, context margin included
        corners = plan.regions[:, [1, 0]] * plan.cell - grid.margin
        locations = np.round(corners * grid.resolution.scale).astype(np.int64)
    border = getattr(assembler, "border", config["border"])
    if len(failed):  # the cells only these tiles covered are NaN, outside the tissue counted
        lost = int((tissue & np.isnan(maps).any(axis=0)).sum())
        warnings.warn(
            f"{Path(grid.path).name}: {len(failed)} of {assembler.n_units} "
            f"{'regions' if plan.regions is not None else 'tiles'} could not be read and were "
            f"skipped (on_tile_error='skip'); {lost} tissue cells that only they covered are "
            "not explained (NaN in concept_maps, left out of the tissue that area shares "
            "count). Their level-0 corners are in failed_tiles.",
            UnreadableRegionWarning,
            stacklevel=4,  # explain_slide's caller
        )
    return SlideExplanation(
        concept_maps=maps,
        assignment=assignment,
        counts=counts,
        tissue_cells=tissue,
        cell_size=float(plan.cell * grid.resolution.scale),
        origin=(0.0, 0.0),
        tile_locations=locations,
        tile_outputs=assembler.outputs,
        failed_tiles=locations[failed].reshape(-1, 2),
        concepts=assembler.attr.concepts_.detach().to("cpu", torch.float32).numpy().copy(),
        slide_path=grid.path,
        slide_fingerprint=plan.fingerprint,
        dimensions=grid.dimensions,
        # the names are not part of the run's hash: renaming concepts keeps a run resumable
        config={
            **config,
            "cell_px": plan.cell,
            "border": border,
            "concept_names": assembler.attr.concept_names,
        },
        tissue=grid.tissue_mask,
    )


def _plain(value: Any) -> Any:
    """A NumPy (or other) integer as a Python int; anything else as it is."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value
