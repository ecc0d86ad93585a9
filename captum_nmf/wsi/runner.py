"""``explain_slide``: concept maps of a whole slide, streamed, bounded in memory, resumable.

The run reads the slide's tissue tiles in raster order through a
``DataLoader`` (workers overlap reading with the forward pass), runs the model
once per batch (keeping the layer's activations and the model's output),
stitches the activations into cells (:class:`FeatureStitcher`) and, as soon
as a row of cells is final, solves its concept weights with the fitted
concepts and drops its C-dimensional features. Only the K-channel maps of the
slide are kept.

With ``out_dir`` the work is done in chunks of whole tile rows. After each
chunk its finished rows, per-tile outputs and the stitcher's pending rows are
written with atomic replaces, and then ``manifest.json`` records the chunk as
done, together with hashes of the configuration and of the slide. A run
interrupted at any point and continued with ``resume=True`` skips the done
chunks and gives the same bits as an uninterrupted run (the batches, the
summation order and the per-row solves are the same).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import warnings
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from captum_nmf._core.nmf_concept import NMFConceptAttribution, check_concept_values
from captum_nmf._utils.activations import check_device_options, models_of
from captum_nmf._version import __version__
from captum_nmf.exceptions import (
    ConceptModelMismatchError,
    EmptyTileGridWarning,
    NotFittedError,
    NoTissueError,
    RunStateError,
)
from captum_nmf.io import load_tensors, save_tensors
from captum_nmf.wsi.blocks import TileBatches, to_model_input
from captum_nmf.wsi.explanation import EXPLANATION_FILE, SlideExplanation
from captum_nmf.wsi.reader import Slide
from captum_nmf.wsi.regions import RegionTiles, plan_regions, tissue_cells
from captum_nmf.wsi.stitching import FeatureStitcher, StitchedBand, cell_coverage
from captum_nmf.wsi.store import CHUNK_DIR, MANIFEST_FILE, RunStore
from captum_nmf.wsi.tiling import (
    EdgePolicy,
    SlideTiles,
    TileErrorPolicy,
    TileGrid,
    TissueOption,
    tile_grid,
)

__all__ = ["MANIFEST_FILE", "check_output_location", "check_run_options", "explain_slide"]
_CHUNK_FORMAT = "captum-nmf/slide-chunk"


def _int_arg(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return value


def model_fingerprint(attr: NMFConceptAttribution) -> str:
    """SHA-256 of the model's parameters and buffers, the layer and the concepts.

    Returns:
        *str*: hex digest.
    """
    digest = hashlib.sha256()
    for root in models_of(attr.forward_func, attr.layer):
        for name, tensor in root.state_dict().items():
            t = tensor.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes())
    digest.update(f"layer={attr.layer_name_}|".encode())
    concepts = attr.concepts_.detach().to("cpu", torch.float32).contiguous()
    digest.update(concepts.numpy().tobytes())
    return digest.hexdigest()


def _model_device(attr: NMFConceptAttribution) -> torch.device:
    for root in models_of(attr.forward_func, attr.layer):
        for param in root.parameters():
            return param.device
        for buffer in root.buffers():
            return buffer.device
    return torch.device("cpu")


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


class _Run:
    """The state of one slide run: output arrays, stitcher, chunk files."""

    def __init__(
        self,
        attr: NMFConceptAttribution,
        grid: TileGrid,
        border: int,
        store: RunStore | None,
    ) -> None:
        self.attr = attr
        self.grid = grid
        self.border = border
        self.store = store
        self.k = int(attr.concepts_.shape[0])
        self.stitcher: FeatureStitcher | None = None
        self.cell = 0
        self.maps: NDArray[np.float32] | None = None
        self.counts: NDArray[np.int32] | None = None
        self.outputs: NDArray[np.float32] | None = None
        self.n_outputs = -1  # unknown until the first batch; 0 = model output not kept
        self.failed: list[int] = []
        self.chunk_rows: list[int] = []
        self.regions: NDArray[np.int64] | None = None  # region mode: n x 4 cell boxes
        self.forward_options: dict[str, Any] = {}

    def setup_regions(self, cell: int, shape: tuple[int, int], regions: NDArray[np.int64]) -> None:
        """Region mode: the output arrays, known before the first forward."""
        self.cell = cell
        self.border = self.grid.margin // cell
        self.regions = regions
        self.maps = np.zeros((self.k, *shape), dtype=np.float32)
        self.counts = np.zeros(shape, dtype=np.int32)

    def _region_outputs(self, n_outputs: int) -> None:
        if self.n_outputs < 0 and self.regions is not None:
            self.n_outputs = n_outputs
            if n_outputs:
                self.outputs = np.full((len(self.regions), n_outputs), np.nan, dtype=np.float32)

    def add_region(
        self, act: Tensor, output: Any, idx: NDArray[np.int64], failed: NDArray[np.int64]
    ) -> None:
        """Region mode: solve the interior cells of one region (or mark a failed one NaN)."""
        maps, counts = self.maps, self.counts
        if maps is None or counts is None or self.regions is None:
            raise RuntimeError("internal error: region run used before setup_regions")
        for f in failed:
            r0, c0, h, w = (int(v) for v in self.regions[f])
            maps[:, r0 : r0 + h, c0 : c0 + w] = np.nan
            self.failed.append(int(f))
        if act.shape[0] == 0:
            return
        n, c = act.shape[:2]
        if c != self.attr.n_channels_in_:
            raise ConceptModelMismatchError(
                f"The concepts expect {self.attr.n_channels_in_} channels but the layer "
                f"produced {c}; use concepts fitted on this layer."
            )
        keep = isinstance(output, Tensor) and output.ndim >= 1 and output.shape[0] == n
        self._region_outputs(int(output[:1].numel()) if keep else 0)
        if self.n_outputs and self.outputs is not None:
            self.outputs[idx] = output.detach().reshape(n, -1).float().cpu().numpy()
        b = self.border
        for j, i in enumerate(idx):
            r0, c0, h, w = (int(v) for v in self.regions[i])
            inner = act[j, :, b : act.shape[2] - b, b : act.shape[3] - b]
            if tuple(inner.shape[1:]) != (h, w):
                raise ValueError(
                    f"A region of {h + 2 * b} x {w + 2 * b} cells gave a {act.shape[2]} x "
                    f"{act.shape[3]} feature map; region mode needs a network whose feature "
                    "map is the input size divided by its total stride (use mode='tile')."
                )
            rows = inner.detach().permute(1, 2, 0).reshape(-1, c).float().cpu().numpy()
            weights = np.asarray(self.attr.nmf_.transform(np.ascontiguousarray(rows)))
            maps[:, r0 : r0 + h, c0 : c0 + w] = weights.T.reshape(self.k, h, w)
            counts[r0 : r0 + h, c0 : c0 + w] = 1

    # ----------------------------------------------------------------- geometry
    def setup(self, h: int, w: int, n_outputs: int) -> None:  # tile mode (regions: setup_regions)
        g = self.grid
        if g.tile_size % h or g.tile_size % w or g.tile_size // h != g.tile_size // w:
            raise ValueError(
                f"tile_size={g.tile_size} is not a whole number of the layer's {h} x {w} "
                "feature-map cells; choose a tile size the network divides exactly (e.g. a "
                "multiple of its total stride)."
            )
        self.cell = g.tile_size // h
        if g.stride % self.cell:
            raise ValueError(
                f"stride={g.stride} is not a multiple of the cell size {self.cell} px "
                f"(tile_size {g.tile_size} / {h} cells); use e.g. "
                f"stride={self.cell * max(1, round(g.stride / self.cell))}."
            )
        ext_w, ext_h = g.extent
        hc = max(1, int(np.ceil(ext_h / self.cell - 1e-9)))
        wc = max(1, int(np.ceil(ext_w / self.cell - 1e-9)))
        self.maps = np.zeros((self.k, hc, wc), dtype=np.float32)
        self.counts = np.zeros((hc, wc), dtype=np.int32)
        self.n_outputs = n_outputs
        if n_outputs:
            self.outputs = np.full((len(g), n_outputs), np.nan, dtype=np.float32)
        if self.stitcher is None:
            self.stitcher = FeatureStitcher(
                (hc, wc),
                int(self.attr.n_channels_in_),
                border=self.border,
                coverage=self.coverage(h, w, (hc, wc)),
            )

    def coverage(self, h: int, w: int, shape: tuple[int, int]) -> NDArray[np.uint8]:
        """How well the best tile sees each cell, over every tile of the plan.

        Failed tiles count too, so the coverage (and a resumed run's) does not
        depend on which reads failed.
        """
        every = self.origins(np.arange(len(self.grid), dtype=np.int64))
        return cell_coverage(every, (h, w), self.border, shape)

    def ready(self) -> tuple[NDArray[np.float32], NDArray[np.int32], FeatureStitcher]:
        """The output arrays and the stitcher, once the first batch has set them up."""
        if self.maps is None or self.counts is None or self.stitcher is None:
            raise RuntimeError("internal error: the slide run was used before its first batch")
        return self.maps, self.counts, self.stitcher

    def origins(self, idx: NDArray[np.int64]) -> NDArray[np.int64]:
        step = self.grid.stride // self.cell
        return np.stack([self.grid.rows[idx] * step, self.grid.cols[idx] * step], axis=1)

    # -------------------------------------------------------------------- solve
    def solve(self, bands: list[StitchedBand]) -> None:
        """Solve the concept weights of finished rows, all in one call (a band, not a row)."""
        maps, counts, _ = self.ready()
        rows = [(band, band.counts > 0) for band in bands]
        for band, _have in rows:
            counts[band.row] = band.counts
            self.chunk_rows.append(band.row)
        parts = [band.features[have] for band, have in rows if have.any()]
        if not parts:
            return
        weights = np.asarray(self.attr.nmf_.transform(np.ascontiguousarray(np.concatenate(parts))))
        at = 0
        for band, have in rows:
            n = int(have.sum())
            if n:
                maps[:, band.row, have] = weights[at : at + n].T.astype(np.float32)
                at += n

    def add_batch(
        self, act: Tensor, output: Any, idx: NDArray[np.int64], failed: NDArray[np.int64]
    ) -> None:
        self.failed.extend(int(i) for i in failed)
        if act.shape[0] == 0:
            return
        n, c, h, w = act.shape
        if c != self.attr.n_channels_in_:
            raise ConceptModelMismatchError(
                f"The concepts expect {self.attr.n_channels_in_} channels but the layer "
                f"produced {c}; use concepts fitted on this layer."
            )
        if self.maps is None:
            keep = isinstance(output, Tensor) and output.ndim >= 1 and output.shape[0] == n
            self.setup(h, w, int(output[:1].numel()) if keep else 0)
        if self.n_outputs and self.outputs is not None:
            self.outputs[idx] = output.detach().reshape(n, -1).float().cpu().numpy()
        feats = act.detach().permute(0, 2, 3, 1).float().cpu().numpy()
        stitcher = self.ready()[2]
        stitcher.add(feats, self.origins(idx))
        self.solve(stitcher.pop_final())

    # ------------------------------------------------------------------- chunks
    def chunk_name(self, i: int, kind: str) -> str:
        """A chunk file's path relative to the run folder."""
        return f"{CHUNK_DIR}/{kind}_{i:05d}.safetensors"

    def chunk_path(self, i: int, kind: str) -> Path:
        if self.store is None:
            raise RuntimeError("internal error: chunk files need an out_dir")
        return self.store.work_dir / self.chunk_name(i, kind)

    def load_chunk(self, i: int, kind: str) -> dict[str, Tensor]:
        """A finished chunk file, its SHA-256 checked against the manifest.

        Raises:
            RunStateError: the file is missing, changed or unreadable.
        """
        if self.store is None:
            raise RuntimeError("internal error: chunk files need an out_dir")
        path = self.store.verify(self.chunk_name(i, kind))
        try:
            tensors, _ = load_tensors(path, format_name=_CHUNK_FORMAT)
        except ValueError as exc:
            raise RunStateError(
                f"{path} is unreadable ({exc}); pass overwrite=True to start the run over."
            ) from exc
        return tensors

    def commit_chunk(self, i: int, chunks: list[tuple[int, int]]) -> None:
        """Write chunk ``i``, record it (with its digest) in the manifest, drop the old carry."""
        self.write_chunk(i, chunks[i])
        if self.store is None:
            return
        names = [self.chunk_name(i, kind) for kind in ("chunk", "carry")]
        self.store.record(*(n for n in names if (self.store.work_dir / n).is_file()))
        self.store.manifest.update(
            done=i + 1,
            cell=self.cell or None,
            n_outputs=self.n_outputs if self.n_outputs >= 0 else None,
        )
        self.store.write_manifest()
        if i:
            self.store.forget(self.chunk_name(i - 1, "carry"))
            self.store.write_manifest()

    def write_chunk(self, i: int, bounds: tuple[int, int]) -> None:
        """Persist chunk ``i``: its finished rows, tile outputs and failures, and the carry."""
        if self.store is None:
            self.chunk_rows = []
            return
        if self.regions is not None:
            self._write_region_chunk(i, bounds)
            return
        start, end = bounds
        tensors: dict[str, Any] = {
            "failed": np.asarray([f for f in self.failed if start <= f < end], dtype=np.int64)
        }
        if self.maps is not None and self.counts is not None:  # some tile was read by now
            rows = np.asarray(self.chunk_rows, dtype=np.int64)
            tensors["rows"] = rows
            if rows.size:
                tensors["maps"] = np.ascontiguousarray(self.maps[:, rows, :])
                tensors["counts"] = np.ascontiguousarray(self.counts[rows])
        if self.outputs is not None:
            tensors["outputs"] = np.ascontiguousarray(self.outputs[start:end])
        _save(self.chunk_path(i, "chunk"), tensors, {"chunk": str(i)}, _CHUNK_FORMAT)
        if self.stitcher is not None:
            _save(
                self.chunk_path(i, "carry"),
                dict(self.stitcher.state()),
                {"chunk": str(i)},
                _CHUNK_FORMAT,
            )
        self.chunk_rows = []

    def _write_region_chunk(self, i: int, bounds: tuple[int, int]) -> None:
        """Region mode: the solved blocks of chunk ``i``'s regions, outputs and failures."""
        start, end = bounds
        maps, boxes = self.maps, self.regions
        if maps is None or boxes is None:
            raise RuntimeError("internal error: region run used before setup_regions")
        failed = {f for f in self.failed if start <= f < end}
        blocks = [
            maps[:, r0 : r0 + h, c0 : c0 + w].reshape(self.k, -1)
            for j, (r0, c0, h, w) in enumerate(boxes[start:end].tolist())
            if start + j not in failed
        ]
        tensors: dict[str, Any] = {
            "failed": np.asarray(sorted(failed), dtype=np.int64),
            "maps": np.concatenate([np.zeros((self.k, 0), np.float32), *blocks], axis=1),
        }
        if self.outputs is not None:
            tensors["outputs"] = np.ascontiguousarray(self.outputs[start:end])
        _save(self.chunk_path(i, "chunk"), tensors, {"chunk": str(i)}, _CHUNK_FORMAT)

    def _restore_regions(self, done: int, chunks: list[tuple[int, int]], n_outputs: int) -> None:
        maps, counts, boxes = self.maps, self.counts, self.regions
        if maps is None or counts is None or boxes is None:
            raise RuntimeError("internal error: region run used before setup_regions")
        if n_outputs >= 0:
            self._region_outputs(n_outputs)
        for i in range(done):
            tensors = self.load_chunk(i, "chunk")
            failed = {int(f) for f in tensors["failed"].numpy()}
            self.failed.extend(sorted(failed))
            flat, at = tensors["maps"].numpy(), 0
            start, end = chunks[i]
            for j, (r0, c0, h, w) in enumerate(boxes[start:end].tolist()):
                if start + j in failed:
                    maps[:, r0 : r0 + h, c0 : c0 + w] = np.nan
                    continue
                maps[:, r0 : r0 + h, c0 : c0 + w] = flat[:, at : at + h * w].reshape(-1, h, w)
                counts[r0 : r0 + h, c0 : c0 + w] = 1
                at += h * w
            if self.outputs is not None and "outputs" in tensors:
                self.outputs[start:end] = tensors["outputs"].numpy()

    def restore(self, manifest: dict[str, Any], chunks: list[tuple[int, int]]) -> None:
        """Load the finished chunks of an interrupted run and the stitcher's carry."""
        done = int(manifest["done"])
        if self.regions is not None:
            n_out = manifest.get("n_outputs")  # None: no region of a finished chunk was read
            self._restore_regions(done, chunks, -1 if n_out is None else int(n_out))
            return
        if manifest.get("cell") is not None and done:
            self.cell = int(manifest["cell"])
            carry = self.load_chunk(done - 1, "carry")
            state = {k: v.numpy() for k, v in carry.items()}
            h = self.grid.tile_size // self.cell
            hc, wc = (int(v) for v in state["position"][3:5])
            self.stitcher = FeatureStitcher.from_state(
                state, int(self.attr.n_channels_in_), coverage=self.coverage(h, h, (hc, wc))
            )
            self.setup(h, h, int(manifest["n_outputs"]))
        for i in range(done):
            tensors = self.load_chunk(i, "chunk")
            self.failed.extend(int(f) for f in tensors["failed"].numpy())
            if "maps" in tensors and self.maps is not None and self.counts is not None:
                rows = tensors["rows"].numpy()
                self.maps[:, rows, :] = tensors["maps"].numpy()
                self.counts[rows] = tensors["counts"].numpy()
            if self.outputs is not None and "outputs" in tensors:
                start, end = chunks[i]
                self.outputs[start:end] = tensors["outputs"].numpy()


def _save(path: Path, arrays: dict[str, Any], meta: dict[str, str], fmt: str) -> None:
    save_tensors(
        path,
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()},
        meta,
        format_name=fmt,
    )


def check_run_options(
    attr: NMFConceptAttribution,
    *,
    border: int,
    mode: str,
    region_size: int,
    region_margin: int,
    batch_size: int,
    num_workers: int,
    chunk_tiles: int,
    on_tile_error: str,
    autocast: torch.dtype | None,
    channels_last: bool,
) -> None:
    """Check the run options of :func:`explain_slide` that do not need the slide.

    Raises:
        TypeError: a non-int count, or a bad ``autocast``/``channels_last``.
        ValueError: a value out of range or an unknown ``mode``/``on_tile_error``.
    """
    _int_arg("border", border, 0)
    if mode not in ("tile", "region"):
        raise ValueError(f"mode must be 'tile' or 'region', got {mode!r}.")
    if mode == "region":
        _int_arg("region_size", region_size, 1)
        _int_arg("region_margin", region_margin, 1)
    _int_arg("batch_size", batch_size, 1)
    _int_arg("num_workers", num_workers, 0)
    check_device_options(autocast, channels_last, device_type=_model_device(attr).type)
    _int_arg("chunk_tiles", chunk_tiles, 1)
    if on_tile_error not in ("raise", "skip"):
        raise ValueError(f"on_tile_error must be 'raise' or 'skip', got {on_tile_error!r}.")


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
        border (int, optional): feature-map cells dropped on each tile side.
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
                    the GIL), which is as fast on a saturated CPU and keeps a
                    GPU fed without extra processes.
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
                    rows (up to a tile height of cells x slide width x C).
                    Default: 1024
        autocast (torch.dtype, optional): run the forward under
                    ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16``;
                    activations are stitched and solved in float32). Part of
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
                    have, or tile and stride that do not fit the layer's cells.
        TypeError: a non-int size, level or count.
    """
    if not hasattr(attr, "concepts_"):
        raise NotFittedError(
            "This NMFConceptAttribution instance is not fitted yet. Call 'fit' or "
            "'NMFConceptAttribution.load' before 'explain_slide'."
        )
    check_run_options(
        attr,
        border=border,
        mode=mode,
        region_size=region_size,
        region_margin=region_margin,
        batch_size=batch_size,
        num_workers=num_workers,
        chunk_tiles=chunk_tiles,
        on_tile_error=on_tile_error,
        autocast=autocast,
        channels_last=channels_last,
    )
    if mode == "region":
        tile_size, stride = region_size + 2 * region_margin, region_size
        min_tissue, edge = 0.0, "pad"
    if out_dir is None and (resume or overwrite):
        raise ValueError("resume=True and overwrite=True need out_dir=...; pass the run directory.")
    with Slide(path, mpp=slide_mpp) as slide:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EmptyTileGridWarning)
            grid = tile_grid(
                slide,
                tile_size=tile_size,
                stride=stride,
                level=level,
                mpp=mpp,
                edge=edge,
                tissue_mask=tissue_mask,
                min_tissue=min_tissue,
                margin=region_margin if mode == "region" else 0,
                on_tile_error=on_tile_error,
            )
        fingerprint = slide.fingerprint()
        slide_level0_mpp = slide.mpp
        if grid.n_rows * grid.n_cols == 0:
            raise NoTissueError(
                f"{slide.path.name} is smaller than one tile ({grid.tile_size} px at level "
                f"{grid.resolution.level}, extent {grid.extent[0]:.0f} x {grid.extent[1]:.0f} "
                "px) and edge='drop' keeps whole tiles only; pass edge='pad' or a smaller "
                "tile_size."
            )
        mask = grid.tissue_mask
        share = "" if mask is None else f" (tissue share {mask.tissue_share:.2%})"
        if len(grid) == 0:
            raise NoTissueError(
                f"No tissue found in {slide.path.name}{share} at level {grid.resolution.level}: "
                f"0 of {grid.n_rows * grid.n_cols} tiles of {grid.tile_size} px have tissue "
                f"fraction >= {min_tissue} (edge={edge!r}). Lower min_tissue, pass "
                "tissue_mask=None, or check the file."
            )
        check_concept_values(attr.concepts_)
        cell, shape = _probe(attr, grid, mode, transform, batch_transform, autocast, channels_last)
        if min(grid.extent) < cell:
            raise NoTissueError(
                f"{slide.path.name} is {grid.extent[0]:.0f} x {grid.extent[1]:.0f} px at level "
                f"{grid.resolution.level}, smaller than one {cell} px feature-map cell of the "
                "layer; there is nothing to explain. Check the file, or read a finer level."
            )
        cells = tissue_cells(grid.tissue_mask, shape, cell * grid.resolution.scale)
        if not cells.any():
            raise NoTissueError(
                f"No cell of {slide.path.name} is at least half tissue{share} at level "
                f"{grid.resolution.level} ({cell} px cells); nothing to explain. Pass "
                "tissue_mask=None to explain every cell, or check the file."
            )
        regions: NDArray[np.int64] | None = None
        if mode == "region":
            for name, value in (("region_size", region_size), ("region_margin", region_margin)):
                if value % cell:
                    raise ValueError(
                        f"{name}={value} is not a multiple of the cell size {cell} px; use e.g. "
                        f"{name}={cell * max(1, round(value / cell))}."
                    )
            regions = plan_regions(cells, region_size // cell, region_margin // cell)
    config = {
        "library_version": __version__,
        "layer": attr.layer_name_,
        "n_concepts": int(attr.concepts_.shape[0]),
        "negative": attr.negative,
        "tile_size": grid.tile_size,
        "stride": grid.stride,
        "level": grid.resolution.level,
        "mpp": grid.resolution.mpp,
        "slide_mpp": slide_level0_mpp,
        "resample": grid.resolution.resample,
        "border": border,
        "edges": "best-tile",  # border cells no interior covers: the tiles that see them best
        "mode": mode,
        "region_margin": region_margin if mode == "region" else 0,
        "edge": edge,
        "min_tissue": float(min_tissue),
        "n_tiles": len(grid),
        "batch_size": batch_size,
        "chunk_tiles": chunk_tiles,
        "transform": _describe(transform),
        "batch_transform": _describe(batch_transform),
        "on_tile_error": on_tile_error,
        "autocast": None if autocast is None else str(autocast),
        "channels_last": bool(channels_last),
    }
    if regions is not None:
        config["regions"] = regions.tolist()  # (row, col, height, width) in cells
        config["batch_size"] = None  # one region per forward
        config["n_tiles"] = len(regions)
        per = max(1, chunk_tiles // 16)  # a 2048 px region is about 16 tiles of 512 px
        chunks = [(s, min(s + per, len(regions))) for s in range(0, len(regions), per)]
    else:
        chunks = _chunks(grid, chunk_tiles)
    store: RunStore | None = None
    manifest: dict[str, Any] | None = None
    if out_dir is not None:
        target = Path(out_dir)
        need = _first_chunk_bytes(attr, grid, chunks, cell, shape, regions)
        check_output_location(target, need)
        store, manifest = RunStore.open(target, resume=resume, overwrite=overwrite)
    try:
        if store is not None:
            run_hash = _config_hash(attr, config, grid)
            if manifest is None:
                store.start(
                    {
                        "config_hash": run_hash,
                        "config": config,
                        "slide": str(Path(path)),
                        "slide_fingerprint": fingerprint,
                        "chunks": [list(c) for c in chunks],
                        "done": 0,
                        "cell": None,
                        "n_outputs": None,
                        "status": "running",
                    }
                )
                manifest = store.manifest
            else:
                _check_resumable(store, manifest, run_hash, fingerprint)
        if store is not None and manifest is not None and manifest.get("status") == "complete":
            result = SlideExplanation.load(store.verify(EXPLANATION_FILE))
        else:
            run = _Run(attr, grid, border, store)
            run.forward_options = {"autocast": autocast, "channels_last": channels_last}
            if regions is not None:
                run.setup_regions(cell, shape, regions)
            done = 0 if manifest is None else int(manifest["done"])
            if done:
                run.restore(manifest or {}, chunks)
            _process(
                run,
                chunks,
                done,
                transform,
                batch_transform,
                slide_mpp,
                on_tile_error,
                batch_size,
                num_workers,
                progress,
            )
            result = _finish(run, grid, config, fingerprint, cells)
            if store is not None:
                result.save(store.work_dir)
                store.complete()
    except BaseException:
        if store is not None:
            store.fail()
        raise
    if store is not None:
        store.close()
    return result


def _check_resumable(
    store: RunStore, manifest: dict[str, Any], run_hash: str, fingerprint: str
) -> None:
    if manifest.get("config_hash") != run_hash:
        raise RunStateError(
            f"out_dir {store.work_dir} was produced with a different configuration (model, "
            "layer, concepts, tiling or library version); pass resume=False with another "
            "directory, or overwrite=True."
        )
    if manifest.get("slide_fingerprint") != fingerprint:
        raise RunStateError(
            f"out_dir {store.work_dir} was produced from another slide (fingerprint "
            f"{manifest.get('slide_fingerprint')}, this one {fingerprint})."
        )


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


def _first_chunk_bytes(
    attr: NMFConceptAttribution,
    grid: TileGrid,
    chunks: list[tuple[int, int]],
    cell: int,
    shape: tuple[int, int],
    regions: NDArray[np.int64] | None,
) -> int:
    """Bytes the first chunk and its carry may take (maps, counts, pending features), x2."""
    hc, wc = shape
    k, c = int(attr.concepts_.shape[0]), int(attr.n_channels_in_)
    start, end = chunks[0] if chunks else (0, 0)
    if regions is not None:
        cells = int((regions[start:end, 2] * regions[start:end, 3]).sum())
        return 2 * 4 * (k + 1) * cells + (1 << 20)
    tile_cells = max(1, grid.tile_size // cell)
    n_rows = int(grid.rows[end - 1] - grid.rows[start]) + 1 if end > start else 1
    rows = min(hc, n_rows * max(1, grid.stride // cell) + tile_cells)
    return 2 * 4 * wc * (rows * (k + 1) + tile_cells * c) + (1 << 20)


_PROBE = 512


def _probe(
    attr: NMFConceptAttribution,
    grid: TileGrid,
    mode: str,
    transform: Callable[[Tensor], Tensor] | None,
    batch_transform: Callable[[Tensor], Tensor] | None,
    autocast: torch.dtype | None,
    channels_last: bool,
) -> tuple[int, tuple[int, int]]:
    """The layer's cell size and the slide's cell grid, from one forward of a white tile.

    The tile goes through ``transform`` and the forward options exactly as the
    slide's tiles will, so a layer whose channels do not match the concepts,
    or tiles the network does not divide into whole cells, fail here, before
    any file is written.

    Raises:
        ConceptModelMismatchError: the layer's channel count differs from the concepts'.
        ValueError: tile size or stride that do not fit the layer's cells.
    """
    side = grid.tile_size if mode == "tile" else _PROBE
    image = torch.ones(3, side, side)
    if transform is not None:
        image = transform(image)
    batch = image.unsqueeze(0).to(_model_device(attr))
    if batch_transform is not None:
        batch = batch_transform(batch)
    act = attr.features(batch, autocast=autocast, channels_last=channels_last)
    act = act[0] if isinstance(act, tuple) else act
    if act.ndim != 4:
        raise ValueError(f"the layer gave a {tuple(act.shape)} output, not 1 x C x h x w.")
    c, h, w = (int(v) for v in act.shape[1:])
    if c != attr.n_channels_in_:
        raise ConceptModelMismatchError(
            f"The concepts expect {attr.n_channels_in_} channels but layer "
            f"{attr._layer_name or attr.layer_name_!r} produces {c}; load concepts fitted on "
            "this layer."
        )
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
    if mode == "tile" and grid.stride % cell:
        raise ValueError(
            f"stride={grid.stride} is not a multiple of the cell size {cell} px "
            f"(tile_size {grid.tile_size} / {h} cells); use e.g. "
            f"stride={cell * max(1, round(grid.stride / cell))}."
        )
    ext_w, ext_h = grid.extent
    shape = (max(1, math.ceil(ext_h / cell - 1e-9)), max(1, math.ceil(ext_w / cell - 1e-9)))
    return cell, shape


def _describe(transform: Callable[[Tensor], Tensor] | None) -> str | None:
    """A description of ``transform`` that is the same in every process (no memory address)."""
    if transform is None:
        return None
    kind = transform if hasattr(transform, "__qualname__") else type(transform)
    name = f"{getattr(kind, '__module__', '?')}.{getattr(kind, '__qualname__', '?')}"
    text = repr(transform)
    return name if " at 0x" in text else f"{name}: {text}"


def _config_hash(attr: NMFConceptAttribution, config: dict[str, Any], grid: TileGrid) -> str:
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    digest.update(model_fingerprint(attr).encode())
    digest.update(grid.rows.tobytes() + grid.cols.tobytes())
    return digest.hexdigest()


def _process(
    run: _Run,
    chunks: list[tuple[int, int]],
    done: int,
    transform: Callable[[Tensor], Tensor] | None,
    batch_transform: Callable[[Tensor], Tensor] | None,
    slide_mpp: float | None,
    on_tile_error: TileErrorPolicy,
    batch_size: int,
    num_workers: int,
    progress: bool,
) -> None:
    todo = chunks[done:]
    if not todo:
        return
    batches = [
        list(range(s, min(s + batch_size, end)))
        for start, end in todo
        for s in range(start, end, batch_size)
    ]
    chunk_end = {end: i + done for i, (_, end) in enumerate(todo)}
    device = _model_device(run.attr)
    tiles: SlideTiles | RegionTiles | TileBatches
    if run.regions is not None:  # regions differ in size: one per forward
        batches = [[i] for start, end in todo for i in range(start, end)]
        tiles = RegionTiles(
            run.grid.path,
            run.grid.resolution,
            run.regions,
            run.cell,
            run.grid.margin,
            transform=transform,
            slide_mpp=slide_mpp,
            on_tile_error=on_tile_error,
        )
    elif num_workers == 0:  # one reading thread, every slide pixel decoded once
        tiles = TileBatches(
            run.grid,
            transform=transform,
            on_tile_error=on_tile_error,
            slide_mpp=slide_mpp,
            pin_memory=device.type == "cuda",
        )
    else:
        tiles = SlideTiles.from_grids(
            [run.grid], transform=transform, on_tile_error=on_tile_error, slide_mpp=slide_mpp
        )
    if isinstance(tiles, TileBatches):
        reads: Iterable[Any] = (tiles.batch(b) for b in batches)
    else:
        reads = DataLoader(
            tiles,
            batch_sampler=batches,
            num_workers=num_workers,
            collate_fn=tiles.collate_fn,
            pin_memory=device.type == "cuda",
        )
    bar = tqdm(
        total=sum(e - s for s, e in todo),
        disable=not progress,
        desc=f"explain {Path(run.grid.path).name}",
        unit="tile",
    )
    batches_in = reads if num_workers else _prefetched(reads)
    try:
        for images, idx, failed in batches_in:
            ids = idx.numpy()
            if ids.size:
                act, output = run.attr.features(
                    to_model_input(images, device, batch_transform),
                    return_output=True,
                    **run.forward_options,
                )
            else:
                act, output = torch.empty(0, 0, 0, 0), None
            if run.regions is not None:
                run.add_region(act, output, ids, failed.numpy())
            else:
                run.add_batch(act, output, ids, failed.numpy())
            bar.update(len(ids) + len(failed))
            last = int(max(ids.max(initial=-1), failed.numpy().max(initial=-1))) + 1
            if last in chunk_end:
                run.commit_chunk(chunk_end[last], chunks)
    finally:
        if isinstance(batches_in, Generator):  # stop the reader thread before closing its slide
            batches_in.close()
        bar.close()
        tiles.close()


_END = object()


def _prefetched(iterable: Iterable[Any]) -> Generator[Any, None, None]:
    """Yield ``iterable``'s items, reading the next one in a background thread meanwhile.

    With ``num_workers=0`` this overlaps tile reading (OpenSlide's C decoder and
    PIL release the GIL) with the forward pass without a worker process.
    Exceptions (also ``KeyboardInterrupt``) reach the caller at the item that raised.
    """
    iterator = iter(iterable)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="captum-nmf-read") as pool:
        pending = pool.submit(next, iterator, _END)
        while True:
            item = pending.result()
            if item is _END:
                return
            pending = pool.submit(next, iterator, _END)
            yield item


def _finish(
    run: _Run,
    grid: TileGrid,
    config: dict[str, Any],
    fingerprint: str,
    tissue_cells: NDArray[np.bool_],
) -> SlideExplanation:
    """The explanation of a finished run; ``tissue_cells``: cells at least half tissue."""
    n_units = len(grid) if run.regions is None else len(run.regions)
    if run.maps is None or run.counts is None or len(set(run.failed)) == n_units:
        raise NoTissueError(
            f"No tile of {Path(grid.path).name} could be read ({len(run.failed)} of {n_units} "
            "failed); nothing to explain."
        )
    if run.stitcher is not None:
        run.solve(run.stitcher.finish())
    maps, counts = run.maps, run.counts
    if run.failed and run.stitcher is not None:  # cells only failed tiles reached: no data, not 0
        lost = np.zeros(counts.shape, dtype=bool)
        h = grid.tile_size // run.cell
        for r0, c0 in run.origins(np.asarray(sorted(set(run.failed)), dtype=np.int64)):
            rows, cols, keep = run.stitcher.footprint((int(r0), int(c0)), (h, h))
            lost[rows, cols] |= keep
        maps[:, lost & (counts == 0)] = np.nan
    cell_size = run.cell * grid.resolution.scale
    assignment = np.full(counts.shape, -1, dtype=np.int16)
    for r in np.flatnonzero(counts.any(axis=1)):  # row by row: no slide-sized temporaries
        row = np.nan_to_num(maps[:, r, :], nan=0.0)
        best = np.argmax(row, axis=0)
        top = np.take_along_axis(row, best[None], axis=0)[0]
        assignment[r] = np.where((top > 0) & tissue_cells[r], best, -1)
    failed = np.asarray(sorted(set(run.failed)), dtype=np.int64)
    locations = grid.locations
    if run.regions is not None:  # each region's corner, context margin included
        scale, m = grid.resolution.scale, grid.margin
        corners = run.regions[:, [1, 0]] * run.cell - m
        locations = np.round(corners * scale).astype(np.int64)
    return SlideExplanation(
        concept_maps=maps,
        assignment=assignment,
        counts=counts,
        tissue_cells=tissue_cells,
        cell_size=float(cell_size),
        origin=(0.0, 0.0),
        tile_locations=locations,
        tile_outputs=run.outputs,
        failed_tiles=locations[failed].reshape(-1, 2),
        concepts=run.attr.concepts_.detach().to("cpu", torch.float32).numpy().copy(),
        slide_path=grid.path,
        slide_fingerprint=fingerprint,
        dimensions=grid.dimensions,
        config={**config, "cell_px": run.cell, "border": run.border},
        tissue=grid.tissue_mask,
    )
