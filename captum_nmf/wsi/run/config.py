"""The frozen configuration of a slide run: option checks, description, hash, model fingerprint."""

from __future__ import annotations

import hashlib
import json
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from captum_nmf._core.nmf_concept import NMFConceptAttribution
from captum_nmf._utils.activations import check_device_options
from captum_nmf._utils.activations import model_device as _device_of
from captum_nmf._utils.cpus import usable_cpus
from captum_nmf._utils.describe import describe
from captum_nmf._utils.validation import check_int
from captum_nmf._version import __version__
from captum_nmf.wsi.tiling import TileErrorPolicy, TileGrid
from captum_nmf.wsi.tissue import TissueMask

__all__ = [
    "RunOptions",
    "check_run_options",
    "config_hash",
    "describe",
    "model_device",
    "mask_digest",
    "model_fingerprint",
    "run_config",
]


def model_fingerprint(attr: NMFConceptAttribution, *, cached: bool = True) -> str:
    """SHA-256 of the model's weights, the layer and the concepts (cached by ``attr``).

    Returns:
        *str*: hex digest.
    """
    return attr.model_fingerprint(cached=cached)


def model_device(attr: NMFConceptAttribution) -> torch.device:
    """The device of the model's first parameter or buffer; the CPU for a parameter-free model."""
    return _device_of(attr.forward_func, attr.layer) or torch.device("cpu")


def check_run_options(
    attr: NMFConceptAttribution,
    *,
    border: int,
    mode: str,
    region_size: int,
    region_margin: int,
    tile_size: int,
    stride: int,
    batch_size: int,
    num_workers: int,
    chunk_tiles: int,
    on_tile_error: str,
    autocast: torch.dtype | None,
    channels_last: bool,
) -> None:
    """Check the run options of :func:`explain_slide` that do not need the slide.

    Also counts the CPUs the run may use (:func:`~captum_nmf._utils.cpus.usable_cpus`),
    so that a bad ``LOKY_MAX_CPU_COUNT`` stops a run before any work.

    Raises:
        TypeError: a non-int count, or a bad ``autocast``/``channels_last``.
        ValueError: a value out of range, an unknown ``mode``/``on_tile_error``,
                    a ``stride`` larger than ``tile_size`` in tile mode, or a
                    ``LOKY_MAX_CPU_COUNT`` that is not a whole number.
    """
    check_int("border", border, minimum=0)
    if mode not in ("tile", "region"):
        raise ValueError(f"mode must be 'tile' or 'region', got {mode!r}.")
    sizes = all(  # NumPy integers too: np.int64 sizes skipped this check
        isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1
        for v in (tile_size, stride)
    )
    if mode == "tile" and sizes and stride > tile_size:  # tile_grid checks the values themselves
        raise ValueError(
            f"stride={stride} is larger than tile_size={tile_size}: the slide between the tiles "
            "would get no map. Pass stride <= tile_size (the paper: half a tile, e.g. "
            f"stride={max(1, tile_size // 2)})."
        )
    if mode == "region":
        check_int("region_size", region_size, minimum=1)
        check_int("region_margin", region_margin, minimum=1)
    check_int("batch_size", batch_size, minimum=1)
    check_int("num_workers", num_workers, minimum=0)
    check_device_options(autocast, channels_last, device_type=model_device(attr).type)
    check_int("chunk_tiles", chunk_tiles, minimum=1)
    if on_tile_error not in ("raise", "skip"):
        raise ValueError(f"on_tile_error must be 'raise' or 'skip', got {on_tile_error!r}.")
    usable_cpus()  # the count reading slides relies on (execute.py): its variable checked here


@dataclass(frozen=True)
class RunOptions:
    """The options of :func:`~captum_nmf.wsi.explain_slide` that shape its results.

    Frozen, so one run's options cannot change under it; :func:`run_config`
    turns them (with the plan's grid) into the JSON-able configuration the
    run's hash covers.
    """

    border: int
    mode: str
    region_size: int
    region_margin: int
    edge: str
    min_tissue: float
    transform: Callable[[Tensor], Tensor] | None
    batch_transform: Callable[[Tensor], Tensor] | None
    slide_mpp: float | None
    batch_size: int
    num_workers: int
    on_tile_error: TileErrorPolicy
    chunk_tiles: int
    autocast: torch.dtype | None
    channels_last: bool

    @property
    def forward(self) -> dict[str, Any]:
        """Keyword arguments of the forward pass (``autocast``, ``channels_last``)."""
        return {"autocast": self.autocast, "channels_last": self.channels_last}


def run_config(
    attr: NMFConceptAttribution,
    options: RunOptions,
    grid: TileGrid,
    slide_mpp: float | None,
    regions_list: list[list[int]] | None,
) -> dict[str, Any]:
    """The JSON-able configuration of a run, recorded in its manifest and explanation.

    Returns:
        *dict*: library version, layer, concepts, tiling, edges, transforms and forward options.
    """
    config: dict[str, Any] = {
        "library_version": __version__,
        "layer": attr.layer_name_,
        # what computes the features: the layer the concepts are bound to (layer_name_ is the
        # name saved with them, kept by load(strict=False)), its input or output, the function
        # around the model (its weights are in the hash) and the reshape of the layer's output
        "bound_layer": attr._layer_name,
        "attribute_to_layer_input": bool(attr.attribute_to_layer_input_),
        "forward_func": _forward_description(attr.forward_func),
        "reshape_transform": describe(attr.reshape_transform),
        "n_concepts": int(attr.concepts_.shape[0]),
        "negative": attr.negative,
        "tile_size": grid.tile_size,
        "stride": grid.stride,
        "level": grid.resolution.level,
        "mpp": grid.resolution.mpp,
        "slide_mpp": slide_mpp,
        "resample": grid.resolution.resample,
        # unused in region mode: None there (explain_slide keeps what an older run recorded)
        "border": options.border if options.mode == "tile" else None,
        "edges": "best-tile",  # border cells no interior covers: the tiles that see them best
        # tile mode: per cell the mean of the tiles' x H^T (the carry: K channels); region
        # mode averages nothing
        "averaged": "products" if options.mode == "tile" else None,
        "mode": options.mode,
        "region_margin": options.region_margin if options.mode == "region" else 0,
        "edge": options.edge,
        "min_tissue": float(options.min_tissue),
        # the mask in use decides which cells are solved: detected, given, or none
        "tissue_mask": mask_digest(grid.tissue_mask),
        "n_tiles": len(grid),
        "batch_size": options.batch_size,
        "chunk_tiles": options.chunk_tiles,
        "transform": describe(options.transform),
        "batch_transform": describe(options.batch_transform),
        "on_tile_error": options.on_tile_error,
        "autocast": None if options.autocast is None else str(options.autocast),
        "channels_last": bool(options.channels_last),
    }
    if regions_list is not None:
        config["regions"] = regions_list  # (row, col, height, width) in cells
        config["region_size"] = options.region_size  # to name it: the regions are hashed
        config["batch_size"] = None  # one region per forward
        config["n_tiles"] = len(regions_list)
    return config


def _forward_description(forward_func: Any) -> str | None:
    """A function around the model by :func:`describe`; the model itself by nothing more.

    The model's weights are in the run's hash (as its code is not: a model whose forward
    was fixed after a failure resumes its run).
    """
    if isinstance(forward_func, nn.Module):
        return "the model"
    return describe(forward_func)


def mask_digest(mask: TissueMask | None) -> str | None:
    """The tissue mask a run uses, by its shape, downsample and a digest of its pixels."""
    if mask is None:
        return None
    pixels = np.packbits(np.ascontiguousarray(mask.mask, dtype=bool))
    digest = hashlib.sha256(pixels.tobytes()).hexdigest()[:16]
    down = ", ".join(f"{d:.6g}" for d in mask.downsample)
    return f"{mask.mask.shape[0]} x {mask.mask.shape[1]}, downsample ({down}), sha256 {digest}"


#: recorded in the configuration, but a resume may change them: ``batch_size`` so that a
#: run stopped by an out-of-memory error finishes with smaller batches (the chunks do not
#: depend on it; a tile's features may differ in their last bits between batch sizes)
UNHASHED = ("batch_size",)

#: recorded to name what changed, not hashed: what they decide is (``region_size`` gives
#: the regions), and runs recorded before them resume
DERIVED = ("region_size",)


def config_hash(
    attr: NMFConceptAttribution, config: dict[str, Any], grid: TileGrid, *, cached: bool = True
) -> str:
    """SHA-256 of the configuration (less :data:`UNHASHED` and :data:`DERIVED`), model and tiles.

    ``cached=False`` hashes the weights again (see :func:`model_fingerprint`): for a
    call that computes chunks, fresh or resumed.
    """
    hashed = {k: v for k, v in config.items() if k not in UNHASHED + DERIVED}
    digest = hashlib.sha256(json.dumps(hashed, sort_keys=True).encode())
    digest.update(model_fingerprint(attr, cached=cached).encode())
    digest.update(grid.rows.tobytes() + grid.cols.tobytes())
    return digest.hexdigest()
