"""Assemblers: from batches of layer activations to the slide's K-channel maps, chunk by chunk.

Both modes share one protocol (:class:`Assembler`): ``add`` a batch (its
activations, the model's output, the indices read and the indices that
failed), ``write_chunk`` / ``restore`` the finished part through the run
store, and ``finish`` the maps. :class:`TileAssembler` averages overlapping
tiles on the cell grid (:class:`~captum_nmf.wsi.FeatureStitcher`) on the
model's device and solves each finished band of rows there in one call (only
the K-channel weights come back to the host). It averages each location's
products ``x H^T`` (K channels) rather than its feature vector ``x`` (C
channels): the solve with ``H`` fixed needs nothing else of ``x``, and the mean
of the products is the product of the mean, so the weights are those of the
averaged feature vectors (up to float rounding) at K / C of the stitching's
work and memory. :class:`RegionAssembler` solves the interior cells of each
region on their own.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from captum_nmf._core.nmf_concept import NMFConceptAttribution
from captum_nmf._utils.activations import PendingCheck, reported_first
from captum_nmf._utils.transfer import upload
from captum_nmf.exceptions import RunStateError
from captum_nmf.io import load_tensors, save_tensors
from captum_nmf.wsi.run.config import model_device
from captum_nmf.wsi.run.plan import Plan
from captum_nmf.wsi.stitching import FeatureStitcher, StitchedRows, cell_coverage
from captum_nmf.wsi.store import CHUNK_DIR, RunStore

__all__ = ["Assembler", "RegionAssembler", "TileAssembler", "assembler_for"]

CHUNK_FORMAT = "captum-nmf/slide-chunk"


class Assembler:
    """What both modes share: the output arrays, per-unit model outputs, failures, chunk files.

    A *unit* is a tile (tile mode) or a region (region mode). The model's output
    per unit is kept when it is N x O (or N x ... of one size, tile mode); a
    spatial output of regions, whose size varies with the region, is not kept.
    """

    spatial_units = False  # units of different sizes (regions): keep N x O outputs only

    def __init__(self, attr: NMFConceptAttribution, plan: Plan, store: RunStore | None) -> None:
        self.attr = attr
        self.plan = plan
        self.store = store
        self.k = int(attr.concepts_.shape[0])
        self.maps: NDArray[np.float32] = np.zeros((self.k, *plan.shape), dtype=np.float32)
        self.counts: NDArray[np.int32] = np.zeros(plan.shape, dtype=np.int32)
        self.outputs: NDArray[np.float32] | None = None
        self.n_outputs = -1  # unknown until the first batch; 0 = model output not kept
        self.failed: list[int] = []

    @property
    def n_units(self) -> int:
        """Tiles (tile mode) or regions (region mode) of the run."""
        return len(self.plan.grid)

    # ----------------------------------------------------------------- batches
    def add(
        self,
        act: Tensor,
        output: Any,
        idx: NDArray[np.int64],
        failed: NDArray[np.int64],
        pending: PendingCheck | None = None,
    ) -> None:
        """Take a batch: activations N x C x h x w, the model's output, units read and failed.

        ``pending``: the activations' value check, finished by :meth:`add_features`
        once the device work on them is queued and before any result is used (on
        any error first: bad activations are the error to report).
        """
        self.failed.extend(int(i) for i in failed)
        if act.shape[0] == 0:
            return
        n = int(act.shape[0])
        with reported_first(pending):
            self.attr.check_channels(int(act.shape[1]))
            self.add_features(act, idx, pending)
        keep = isinstance(output, Tensor) and output.ndim >= 1 and output.shape[0] == n
        keep = keep and (output.ndim <= 2 or not self.spatial_units)
        self.keep_outputs(int(output[:1].numel()) if keep else 0)
        if self.n_outputs and self.outputs is not None:
            self.outputs[idx] = output.detach().reshape(n, -1).float().cpu().numpy()

    def keep_outputs(self, n_outputs: int) -> None:
        """Allocate the per-unit outputs once their size is known."""
        if self.n_outputs < 0:
            self.n_outputs = n_outputs
            if n_outputs:
                self.outputs = np.full((self.n_units, n_outputs), np.nan, dtype=np.float32)

    def add_features(
        self, act: Tensor, idx: NDArray[np.int64], pending: PendingCheck | None = None
    ) -> None:
        """Mode-specific: stitch or solve the batch's activations (``pending``: see :meth:`add`)."""
        raise NotImplementedError

    def solve(self, features: Tensor) -> NDArray[np.float32]:
        """Concept weights (n x K) of ``features`` (n x C) with the fitted concepts.

        Solved where ``features`` are (the model's device), or on the NMF's
        ``device`` when that is set; only the n x K weights come back to the host.
        """
        weights = self.attr.nmf_.transform(features.float())
        return np.asarray(weights.cpu().numpy(), dtype=np.float32)

    # ------------------------------------------------------------------ chunks
    @staticmethod
    def chunk_name(i: int, kind: str) -> str:
        """A chunk file's path relative to the run folder."""
        return f"{CHUNK_DIR}/{kind}_{i:05d}.safetensors"

    def save_chunk(self, i: int, kind: str, arrays: dict[str, Any]) -> None:
        """Write one chunk file atomically (recorded in the manifest by :meth:`commit_chunk`)."""
        if self.store is None:
            raise RuntimeError("internal error: chunk files need an out_dir")
        save_tensors(
            self.store.work_dir / self.chunk_name(i, kind),
            {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()},
            {"chunk": str(i)},
            format_name=CHUNK_FORMAT,
        )

    def load_chunk(self, i: int, kind: str) -> dict[str, Tensor]:
        """A finished chunk file, its SHA-256 checked against the manifest.

        Raises:
            RunStateError: the file is missing, changed or unreadable.
        """
        if self.store is None:
            raise RuntimeError("internal error: chunk files need an out_dir")
        path = self.store.verify(self.chunk_name(i, kind))
        try:
            tensors, _ = load_tensors(path, format_name=CHUNK_FORMAT)
        except ValueError as exc:
            raise RunStateError(
                f"{path} is unreadable ({exc}); pass overwrite=True to start the run over."
            ) from exc
        return tensors

    def commit_chunk(self, i: int) -> None:
        """Write chunk ``i``, record it (with its digest) in the manifest, drop the old carry."""
        if self.store is None:
            self.write_chunk(i)
            return
        self.write_chunk(i)
        names = [self.chunk_name(i, kind) for kind in ("chunk", "carry")]
        self.store.record(*(n for n in names if (self.store.work_dir / n).is_file()))
        self.store.manifest.update(
            done=i + 1,
            cell=self.plan.cell,
            n_outputs=self.n_outputs if self.n_outputs >= 0 else None,
        )
        self.store.write_manifest()
        if i:
            self.store.forget(self.chunk_name(i - 1, "carry"))
            self.store.write_manifest()

    def write_chunk(self, i: int) -> None:
        """Mode-specific: persist chunk ``i`` (nothing without an ``out_dir``)."""
        raise NotImplementedError

    def restore(self, manifest: dict[str, Any]) -> None:
        """Mode-specific: load the finished chunks of an interrupted run."""
        raise NotImplementedError

    def finish(self) -> None:
        """Mode-specific: complete the maps after the last batch."""


class TileAssembler(Assembler):
    """Tile mode: overlapping tiles averaged per cell, each finished band solved in one call.

    What is averaged per cell is each tile's ``x H^T`` (K channels, see the module).
    """

    def __init__(
        self, attr: NMFConceptAttribution, plan: Plan, store: RunStore | None, border: int
    ) -> None:
        super().__init__(attr, plan, store)
        grid = plan.grid
        self.border = border
        self.tile_cells = grid.tile_size // plan.cell
        h = self.tile_cells
        every = self.origins(np.arange(len(grid), dtype=np.int64))
        self.coverage = cell_coverage(every, (h, h), border, plan.shape)
        self.device = model_device(attr)  # the products are formed, averaged and solved there
        self.stitcher = FeatureStitcher(  # of the products x H^T: K channels
            plan.shape,
            self.k,
            border=border,
            coverage=self.coverage,
            device=self.device,
        )
        self.chunk_rows: list[int] = []

    def origins(self, idx: NDArray[np.int64]) -> NDArray[np.int64]:
        """Cell (row, col) of the top-left feature-map location of tiles ``idx``."""
        grid = self.plan.grid
        step = grid.stride // self.plan.cell
        return np.stack([grid.rows[idx] * step, grid.cols[idx] * step], axis=1)

    def add_features(
        self, act: Tensor, idx: NDArray[np.int64], pending: PendingCheck | None = None
    ) -> None:
        """Stitch the tiles' products ``x H^T`` on their device; solve the rows now final.

        The value check is read back after the products, the stitching and the
        solve are queued (on a GPU their kernels are not launched while the
        device waits) and before any weight is looked at; a batch that fails it
        stops the run, and nothing of it reaches a chunk (the run's state is the
        last chunk's).
        """
        products = self.attr.nmf_._products_maps(act.detach())  # N x K x h x w
        feats = products.permute(0, 2, 3, 1)  # a view: N x h x w x K
        self.stitcher.add(
            feats if feats.dtype == torch.float32 else feats.float(), self.origins(idx)
        )
        self.solve_rows(self.stitcher.pop_final_rows(), pending)

    def solve_rows(self, taken: StitchedRows, pending: PendingCheck | None = None) -> None:
        """Solve the concept weights of finished rows, all in one call (a band, not a row).

        The averaged products stay on the device; only the K-channel weights
        come back. ``pending`` (the value check of the batch whose tiles
        finished these rows) is finished once the solve is queued, before the
        weights are read.
        """
        weights = None
        if taken.counts.any():
            # only the cells with data are solved: one without (glass, or no tile reached
            # it) has products 0 and keeps weights 0. The products are averages of checked
            # activations' products: no second value check.
            n, wc, k = taken.features.shape
            cross = taken.features.reshape(n * wc, k)  # (n Wc) x K
            held = np.flatnonzero(taken.counts.reshape(-1))
            if held.size < cross.shape[0]:  # indices uploaded without waiting for the device
                cross = cross.index_select(0, upload(torch.from_numpy(held), cross.device))
            solved = self.attr.nmf_._transform_products(cross, pending).cpu().numpy()
            weights = np.zeros((n * wc, k), dtype=np.float32)
            weights[held] = solved
        elif pending is not None:
            pending.finish()
        rows = taken.rows  # recorded only once the batch's values passed
        self.counts[rows] = taken.counts
        self.chunk_rows.extend(int(r) for r in rows)
        if weights is not None:  # rows without data keep weights 0
            self.maps[:, rows, :] = weights.reshape(len(rows), -1, self.k).transpose(2, 0, 1)

    def write_chunk(self, i: int) -> None:
        """Chunk ``i``: its finished rows, tile outputs and failures, and the stitcher's carry."""
        if self.store is None:
            self.chunk_rows = []
            return
        start, end = self.plan.chunks[i]
        rows = np.asarray(self.chunk_rows, dtype=np.int64)
        arrays: dict[str, Any] = {
            "failed": np.asarray([f for f in self.failed if start <= f < end], dtype=np.int64),
            "rows": rows,
        }
        if rows.size:
            arrays["maps"] = self.maps[:, rows, :]
            arrays["counts"] = self.counts[rows]
        if self.outputs is not None:
            arrays["outputs"] = self.outputs[start:end]
        self.save_chunk(i, "chunk", arrays)
        self.save_chunk(i, "carry", dict(self.stitcher.state()))
        self.chunk_rows = []

    def restore(self, manifest: dict[str, Any]) -> None:
        """The finished chunks' rows, outputs and failures, and the last chunk's carry."""
        done = int(manifest["done"])
        if not done:
            return
        carry = self.load_chunk(done - 1, "carry")
        state = {k: v.numpy() for k, v in carry.items()}
        self.stitcher = FeatureStitcher.from_state(
            state, self.k, coverage=self.coverage, device=self.device
        )
        if manifest.get("n_outputs") is not None:
            self.keep_outputs(int(manifest["n_outputs"]))
        for i in range(done):
            tensors = self.load_chunk(i, "chunk")
            self.failed.extend(int(f) for f in tensors["failed"].numpy())
            if "maps" in tensors:
                rows = tensors["rows"].numpy()
                self.maps[:, rows, :] = tensors["maps"].numpy()
                self.counts[rows] = tensors["counts"].numpy()
            if self.outputs is not None and "outputs" in tensors:
                start, end = self.plan.chunks[i]
                self.outputs[start:end] = tensors["outputs"].numpy()

    def finish(self) -> None:
        """Solve the last rows; cells only failed tiles would have given become NaN, not 0."""
        self.solve_rows(self.stitcher.finish_rows())
        if not self.failed:
            return
        lost = np.zeros(self.counts.shape, dtype=bool)
        h = self.tile_cells
        for r0, c0 in self.origins(np.asarray(sorted(set(self.failed)), dtype=np.int64)):
            rows, cols, keep = self.stitcher.footprint((int(r0), int(c0)), (h, h))
            lost[rows, cols] |= keep
        self.maps[:, lost & (self.counts == 0)] = np.nan


class RegionAssembler(Assembler):
    """Region mode: the interior cells of each region solved on their own (no overlap)."""

    spatial_units = True

    def __init__(self, attr: NMFConceptAttribution, plan: Plan, store: RunStore | None) -> None:
        super().__init__(attr, plan, store)
        if plan.regions is None:
            raise RuntimeError("internal error: a region run needs planned regions")
        self.regions: NDArray[np.int64] = plan.regions
        self.border = plan.grid.margin // plan.cell

    @property
    def n_units(self) -> int:
        """The planned regions."""
        return len(self.regions)

    def add_features(
        self, act: Tensor, idx: NDArray[np.int64], pending: PendingCheck | None = None
    ) -> None:
        """Solve the interior cells of each region (its margin dropped), values checked first."""
        if pending is not None:
            pending.finish()
        b, c = self.border, int(act.shape[1])
        for j, i in enumerate(idx):
            r0, c0, h, w = (int(v) for v in self.regions[i])
            inner = act[j, :, b : act.shape[2] - b, b : act.shape[3] - b]
            if tuple(inner.shape[1:]) != (h, w):
                raise ValueError(
                    f"A region of {h + 2 * b} x {w + 2 * b} cells gave a {act.shape[2]} x "
                    f"{act.shape[3]} feature map; region mode needs a network whose feature "
                    "map is the input size divided by its total stride (use mode='tile')."
                )
            rows = inner.detach().permute(1, 2, 0).reshape(-1, c)
            self.maps[:, r0 : r0 + h, c0 : c0 + w] = self.solve(rows).T.reshape(self.k, h, w)
            self.counts[r0 : r0 + h, c0 : c0 + w] = 1

    def _mark_failed(self) -> None:
        for f in set(self.failed):
            r0, c0, h, w = (int(v) for v in self.regions[f])
            self.maps[:, r0 : r0 + h, c0 : c0 + w] = np.nan

    def write_chunk(self, i: int) -> None:
        """Chunk ``i``: the solved blocks of its regions, their outputs and failures."""
        if self.store is None:
            return
        start, end = self.plan.chunks[i]
        failed = {f for f in self.failed if start <= f < end}
        blocks = [
            self.maps[:, r0 : r0 + h, c0 : c0 + w].reshape(self.k, -1)
            for j, (r0, c0, h, w) in enumerate(self.regions[start:end].tolist())
            if start + j not in failed
        ]
        arrays: dict[str, Any] = {
            "failed": np.asarray(sorted(failed), dtype=np.int64),
            "maps": np.concatenate([np.zeros((self.k, 0), np.float32), *blocks], axis=1),
        }
        if self.outputs is not None:
            arrays["outputs"] = self.outputs[start:end]
        self.save_chunk(i, "chunk", arrays)

    def restore(self, manifest: dict[str, Any]) -> None:
        """The finished chunks' regions, outputs and failures."""
        n_out = manifest.get("n_outputs")  # None: no region of a finished chunk was read
        if n_out is not None:
            self.keep_outputs(int(n_out))
        for i in range(int(manifest["done"])):
            tensors = self.load_chunk(i, "chunk")
            failed = {int(f) for f in tensors["failed"].numpy()}
            self.failed.extend(sorted(failed))
            flat, at = tensors["maps"].numpy(), 0
            start, end = self.plan.chunks[i]
            for j, (r0, c0, h, w) in enumerate(self.regions[start:end].tolist()):
                if start + j in failed:
                    continue
                self.maps[:, r0 : r0 + h, c0 : c0 + w] = flat[:, at : at + h * w].reshape(-1, h, w)
                self.counts[r0 : r0 + h, c0 : c0 + w] = 1
                at += h * w
            if self.outputs is not None and "outputs" in tensors:
                self.outputs[start:end] = tensors["outputs"].numpy()

    def finish(self) -> None:
        """Regions that could not be read have NaN cells (no data), not 0."""
        self._mark_failed()


def assembler_for(
    attr: NMFConceptAttribution, plan: Plan, store: RunStore | None, border: int
) -> Assembler:
    """The assembler of the plan's mode.

    Returns:
        *Assembler*: :class:`RegionAssembler` for planned regions, else :class:`TileAssembler`.
    """
    if plan.regions is not None:
        return RegionAssembler(attr, plan, store)
    return TileAssembler(attr, plan, store, border)
