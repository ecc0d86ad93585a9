"""``SlideExplanation``: one slide's concept maps on its cell grid, saved safely."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from captum_nmf.exceptions import ConceptModelFormatError
from captum_nmf.io import atomic_write_all, load_tensors, tensor_file_bytes
from captum_nmf.wsi.tissue import TissueMask

__all__ = ["EXPLANATION_FILE", "SlideExplanation"]

EXPLANATION_FILE = "explanation.safetensors"
SUMMARY_FILE = "explanation.json"
FORMAT = "captum-nmf/slide-explanation"


@dataclass
class SlideExplanation:
    r"""The concept maps of one whole slide, on the grid of feature-map cells.

    Cell ``(i, j)`` covers level-0 pixels ``origin[0] + j * cell_size`` to
    ``origin[0] + (j + 1) * cell_size`` horizontally (likewise ``i``
    vertically). Its concept weights were solved on the mean of the feature
    vectors of every tile that covered it (minus each tile's border). That
    mean enters the solve only through its products with the K concepts, so
    a run averages the tiles' products ``x H^T`` (equal up to float rounding).

    Attributes:
        concept_maps (ndarray): K x Hc x Wc float32 concept weights; 0 where
                    no tile landed, NaN where the only covering tiles could not
                    be read (``on_tile_error="skip"``).
        assignment (ndarray): Hc x Wc ``int16`` concept index (argmax), -1
                    outside tissue (:attr:`tissue_mask`), or where every weight is
                    0 or NaN. ``concept_maps`` keep the weights of every covered
                    cell, background inside tissue tiles included.
        counts (ndarray): Hc x Wc int32 number of tiles averaged in each cell.
        tissue_cells (ndarray): Hc x Wc bool, cells whose area is at least half
                    tissue by the thumbnail tissue mask (all True without a mask).
        cell_size (float): cell side in level-0 pixels.
        origin (tuple[float, float]): level-0 (x, y) of cell (0, 0)'s corner.
        tile_locations (ndarray): n x 2 int64 level-0 (x, y) of every kept
                    tile, in the order of ``tile_outputs``.
        tile_outputs (ndarray or None): n x O float32 model outputs per tile
                    (NaN rows for tiles that could not be read), or None when
                    the model's output is not a per-tile tensor.
        failed_tiles (ndarray): m x 2 int64 level-0 (x, y) of tiles skipped
                    because they could not be read.
        concepts (ndarray): K x C concept vectors used.
        slide_path (str): the slide file.
        slide_fingerprint (str): content hash of the slide.
        dimensions (tuple[int, int]): level-0 (width, height).
        config (dict): tiling and model settings of the run.
        tissue (TissueMask or None): the thumbnail tissue mask used.
    """

    concept_maps: NDArray[np.float32]
    assignment: NDArray[np.int16]
    counts: NDArray[np.int32]
    tissue_cells: NDArray[np.bool_]
    cell_size: float
    origin: tuple[float, float]
    tile_locations: NDArray[np.int64]
    tile_outputs: NDArray[np.float32] | None
    failed_tiles: NDArray[np.int64]
    concepts: NDArray[np.float32]
    slide_path: str
    slide_fingerprint: str
    dimensions: tuple[int, int]
    config: dict[str, Any] = field(default_factory=dict)
    tissue: TissueMask | None = None

    @property
    def n_concepts(self) -> int:
        """K."""
        return int(self.concept_maps.shape[0])

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(Hc, Wc) cells."""
        return int(self.counts.shape[0]), int(self.counts.shape[1])

    @property
    def tissue_mask(self) -> NDArray[np.bool_]:
        """Hc x Wc: tissue cells that received at least one tile."""
        return (self.counts > 0) & self.tissue_cells

    @property
    def unexplained_cells(self) -> NDArray[np.bool_]:
        """Hc x Wc: tissue cells that only unreadable tiles covered (NaN in ``concept_maps``)."""
        cells: NDArray[np.bool_] = np.isnan(self.concept_maps).any(axis=0) & self.tissue_cells
        return cells

    @property
    def tile_cells(self) -> int:
        """Cells along one side of a tile (tile size / cell size in output pixels)."""
        return max(
            1, int(self.config.get("tile_size", 1)) // max(int(self.config.get("cell_px", 1)), 1)
        )

    def tile_window(self, index: int) -> NDArray[np.float32]:
        """Concept weights of the cells under tile ``index`` (K x t x t; 0 outside the grid).

        Tiles may reach past the grid (``edge="pad"``); those parts are 0. NaN
        cells (unreadable tiles) are 0 too.

        Raises:
            ValueError: a region-mode explanation (its regions differ in size).
        """
        if self.config.get("mode") == "region":
            raise ValueError(
                "This explanation was made with mode='region': its regions of different sizes "
                "are not tiles. Tile windows (and the tile analyses) need mode='tile'."
            )
        t = self.tile_cells
        x, y = (float(v) for v in self.tile_locations[index])
        r0 = round((y - self.origin[1]) / self.cell_size)
        c0 = round((x - self.origin[0]) / self.cell_size)
        window = np.zeros((self.n_concepts, t, t), np.float32)
        hc, wc = self.grid_shape
        rs, cs = max(r0, 0), max(c0, 0)
        re, ce = min(r0 + t, hc), min(c0 + t, wc)
        if rs < re and cs < ce:
            part = self.concept_maps[:, rs:re, cs:ce]
            window[:, rs - r0 : re - r0, cs - c0 : ce - c0] = np.nan_to_num(part)
        return window

    def cell_to_level0(self, rows: Any, cols: Any) -> NDArray[np.float64]:
        """Level-0 (x, y) of the centres of cells ``(rows, cols)``.

        Returns:
            *ndarray*: ... x 2 float64 (x, y).
        """
        r = np.asarray(rows, dtype=np.float64)
        c = np.asarray(cols, dtype=np.float64)
        x = self.origin[0] + (c + 0.5) * self.cell_size
        y = self.origin[1] + (r + 0.5) * self.cell_size
        return np.stack([x, y], axis=-1)

    def __repr__(self) -> str:
        k = self.n_concepts
        hc, wc = self.grid_shape
        return (
            f"SlideExplanation({Path(self.slide_path).name!r}, K={k}, cells={hc} x {wc} of "
            f"{self.cell_size:g} px, {len(self.tile_locations)} tiles, "
            f"{int(self.tissue_mask.sum())} tissue cells)"
        )

    # ------------------------------------------------------------------ persist
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``explanation.safetensors`` (arrays, metadata) and a readable ``explanation.json``.

        Both files are written in full before either replaces its old version
        (a full disk leaves both old files); the JSON holds the SHA-256 of the
        arrays file it describes. Nothing is pickled.

        Args:
            directory (str or PathLike): created if missing.

        Returns:
            *Path*: the ``.safetensors`` file.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {
            "concept_maps": self.concept_maps,
            "assignment": self.assignment,
            "counts": self.counts,
            "tissue_cells": self.tissue_cells.astype(np.uint8),
            "tile_locations": self.tile_locations,
            "failed_tiles": self.failed_tiles.reshape(-1, 2),
            "concepts": self.concepts,
        }
        if self.tile_outputs is not None:
            tensors["tile_outputs"] = self.tile_outputs
        if self.tissue is not None:
            tensors["tissue_mask"] = self.tissue.mask.astype(np.uint8)
        meta = {
            "cell_size": self.cell_size,
            "origin": list(self.origin),
            "slide_path": self.slide_path,
            "slide_fingerprint": self.slide_fingerprint,
            "dimensions": list(self.dimensions),
            "config": self.config,
            "tissue_downsample": None if self.tissue is None else list(self.tissue.downsample),
            "tissue_threshold": None if self.tissue is None else self.tissue.threshold,
            "tissue_saturation_threshold": (
                None if self.tissue is None else self.tissue.saturation_threshold
            ),
            "tissue_glass": None if self.tissue is None else self.tissue.glass,
        }
        text = json.dumps(meta, sort_keys=True)
        tensors_t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}
        blob = tensor_file_bytes(tensors_t, {"explanation": text}, format_name=FORMAT)
        summary = {
            **meta,
            "n_concepts": self.n_concepts,
            "grid_shape": list(self.grid_shape),
            "n_tiles": len(self.tile_locations),
            "n_failed_tiles": len(self.failed_tiles),
            "tissue_cells": int(self.tissue_mask.sum()),
            # the arrays this summary describes (a kill between the two renames shows)
            "explanation_sha256": hashlib.sha256(blob).hexdigest(),
        }
        path = out / EXPLANATION_FILE
        with atomic_write_all([path, out / SUMMARY_FILE], "wb") as (arrays, readable):
            arrays.write(blob)
            readable.write(json.dumps(summary, indent=2, sort_keys=True).encode("utf-8"))
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> SlideExplanation:
        """Read an explanation written by :meth:`save`.

        Args:
            directory (str or PathLike): the directory passed to :meth:`save`
                        (or the ``.safetensors`` file itself).

        Returns:
            *SlideExplanation*: the explanation.

        Raises:
            FileNotFoundError: no explanation there.
            ConceptModelFormatError: the file is corrupt (unparsable, or its
                        SHA-256 content digest does not match: changed bytes),
                        not an explanation, or from a newer version.
        """
        source = Path(directory)
        file = source if source.suffix == ".safetensors" else source / EXPLANATION_FILE
        tensors, meta = load_tensors(
            file,
            required=("concept_maps", "assignment", "counts", "tile_locations", "concepts"),
            format_name=FORMAT,
        )
        try:
            info = json.loads(meta["explanation"])
            arrays = {k: v.numpy() for k, v in tensors.items()}
            tissue = None
            if "tissue_mask" in arrays and info["tissue_downsample"] is not None:
                tissue = TissueMask(
                    arrays["tissue_mask"].astype(bool),
                    (float(info["tissue_downsample"][0]), float(info["tissue_downsample"][1])),
                    info["tissue_threshold"],
                    info.get("tissue_saturation_threshold"),
                    glass=_glass(info.get("tissue_glass")),
                )
            return cls(
                concept_maps=arrays["concept_maps"],
                assignment=arrays["assignment"],
                counts=arrays["counts"],
                tissue_cells=arrays.get(
                    "tissue_cells", np.ones(arrays["counts"].shape, np.uint8)
                ).astype(bool),
                cell_size=float(info["cell_size"]),
                origin=(float(info["origin"][0]), float(info["origin"][1])),
                tile_locations=arrays["tile_locations"],
                tile_outputs=arrays.get("tile_outputs"),
                failed_tiles=arrays.get("failed_tiles", np.zeros((0, 2), np.int64)),
                concepts=arrays["concepts"],
                slide_path=str(info["slide_path"]),
                slide_fingerprint=str(info["slide_fingerprint"]),
                dimensions=(int(info["dimensions"][0]), int(info["dimensions"][1])),
                config=dict(info["config"]),
                tissue=tissue,
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ConceptModelFormatError(f"{file} has incomplete metadata ({exc!r}).") from exc


def _glass(value: object) -> tuple[int, int, int] | None:
    """A saved glass colour (three ints in [0, 255], or null); files before it have none."""
    if value is None:
        return None
    if not (
        isinstance(value, list)
        and len(value) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)
    ):
        raise ValueError(f"tissue_glass must be three ints in [0, 255] or null, got {value!r}")
    return (value[0], value[1], value[2])
