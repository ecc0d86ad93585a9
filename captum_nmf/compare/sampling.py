"""Streaming a source once through a layer into a capped, seeded sample of its feature rows."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from captum_nmf._core.nmf_concept import NMFConceptAttribution
from captum_nmf._utils import activations as acts
from captum_nmf._utils.validation import check_int
from captum_nmf.engines.batches import (
    BatchInputs,
    batch_dataset,
    check_batch_inputs,
    is_map_dataset,
    item_ids,
    model_inputs,
    on_device,
    one_pass,
    tile_dataset,
)
from captum_nmf.exceptions import NoTissueError

__all__ = ["RowSample", "Source", "sample_rows"]

Source = Tensor | Iterable[Any] | Dataset[Any]


def _as_attribution(
    attr: NMFConceptAttribution | tuple[Callable[..., Any], nn.Module], random_state: int
) -> NMFConceptAttribution:
    if isinstance(attr, NMFConceptAttribution):
        return attr
    if isinstance(attr, tuple) and len(attr) == 2 and isinstance(attr[1], nn.Module):
        return NMFConceptAttribution(attr[0], attr[1], 1, random_state=random_state)
    raise TypeError(
        "attr must be an NMFConceptAttribution or a (model, layer) pair, got "
        f"{type(attr).__name__}; pass e.g. (model, model.head_relu)."
    )


@dataclass
class RowSample:
    """A capped, seeded sample of a layer's feature rows, with the tile each row comes from.

    Attributes:
        rows (Tensor): n x C non-negative feature rows (float, on the model's device).
        tiles (ndarray): n ``int64``: the position of each row's tile in the source.
        groups (ndarray): n ``int64``: each row's slide (or group) id; -1 when
                    the source does not say.
        n_tiles_seen (int): tiles streamed through the layer.
        locations_per_tile (int): locations kept per tile (at most).
        group_names (list[str]): a name per group id (slide file names), when known.
        notes (list[str]): anything a reader should know (slides without tissue...).
        seconds (float): wall-clock time of the streaming pass.
    """

    rows: Tensor
    tiles: NDArray[np.int64]
    groups: NDArray[np.int64]
    n_tiles_seen: int
    locations_per_tile: int
    group_names: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def n_channels(self) -> int:
        """C, the layer's channel count."""
        return int(self.rows.shape[1])

    @property
    def n_tiles(self) -> int:
        """Tiles with at least one row in the sample."""
        return len(np.unique(self.tiles))


class _Reservoir:
    """The tiles with the smallest random keys whose rows fit in ``max_rows`` (bottom-k sample).

    Rows are kept per tile; pruning happens when twice ``max_rows`` are held,
    so memory stays O(max_rows x C) and the result (a prefix of the tiles in
    key order) does not depend on when pruning ran.
    """

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.rows: list[Tensor] = []  # one q x C tensor per tile
        self.keys: list[float] = []
        self.tiles: list[int] = []
        self.groups: list[int] = []
        self.held = 0

    def add(self, rows: Tensor, keys: Tensor, tiles: list[int], groups: list[int]) -> None:
        for i, tile in enumerate(tiles):
            self.rows.append(rows[i])
            self.keys.append(float(keys[i]))
            self.tiles.append(tile)
            self.groups.append(groups[i])
            self.held += int(rows[i].shape[0])
        if self.held > 2 * self.max_rows:
            self._prune()

    def _prune(self) -> None:
        order = sorted(range(len(self.keys)), key=self.keys.__getitem__)
        kept, total = [], 0
        for i in order:
            n = int(self.rows[i].shape[0])
            if total + n > self.max_rows:
                break
            kept.append(i)
            total += n
        kept.sort(key=self.tiles.__getitem__)  # back in stream order
        self.rows = [self.rows[i] for i in kept]
        self.keys = [self.keys[i] for i in kept]
        self.tiles = [self.tiles[i] for i in kept]
        self.groups = [self.groups[i] for i in kept]
        self.held = total

    def result(self) -> tuple[Tensor, NDArray[np.int64], NDArray[np.int64]]:
        self._prune()
        counts = [int(r.shape[0]) for r in self.rows]
        rows = torch.cat(self.rows) if self.rows else torch.empty(0, 0)
        tiles = np.repeat(np.asarray(self.tiles, np.int64), counts)
        groups = np.repeat(np.asarray(self.groups, np.int64), counts)
        return rows, tiles, groups


def _count_tiles(source: Any, batch_inputs: BatchInputs | None) -> int | None:
    """Tiles in ``source`` when that is known without reading any."""
    if isinstance(source, Tensor):
        return int(source.shape[0])
    if is_map_dataset(source):
        return len(source)
    if isinstance(source, DataLoader) and isinstance(source.dataset, Sized):
        return len(source.dataset)
    if isinstance(source, (list, tuple)):
        return sum(int(model_inputs(b, batch_inputs)[0].shape[0]) for b in source)
    return None


def _slide_names(dataset: Any) -> list[str]:
    return [Path(str(g.path)).name for g in dataset.grids]


def _check_tissue(dataset: Any) -> list[str]:
    """Raise when no slide has a tile; return notes naming the slides without tissue."""
    names = _slide_names(dataset)
    empty = [n for n, g in zip(names, dataset.grids, strict=True) if len(g) == 0]
    if len(empty) == len(names):
        raise NoTissueError(
            f"No tile of {', '.join(empty)} has enough tissue; select_k has nothing to fit. "
            "Lower min_tissue, pass tissue_mask=None, or check the slide(s)."
        )
    if empty:
        return [f"slides without tissue, left out: {', '.join(empty)}"]
    return []


def _batch_features(
    attr: NMFConceptAttribution, inputs: tuple[Tensor, ...], additional_forward_args: Any
) -> Tensor:
    """The layer's activations of ``inputs``, moved to the model's device first."""
    args = on_device(inputs, acts.model_device(attr.forward_func, attr.layer))
    return cast("Tensor", attr.features(args, additional_forward_args))


def _check_max_k(attr: NMFConceptAttribution, max_k: int | None, channels: int) -> None:
    """Refuse a largest K above the layer's channel count (after the first batch)."""
    if max_k is not None and max_k > channels:
        name = acts.layer_name(attr.forward_func, attr.layer)
        label = repr(name) if name else "the hooked layer"
        raise ValueError(
            f"ks includes K={max_k} but layer {label} has {channels} channels; choose every "
            f"K <= {channels}."
        )


def _pick_locations(act: Tensor, quota: int, generator: torch.Generator) -> Tensor:
    """N x q x C: ``q = min(quota, h * w)`` random locations of each tile's N x C x h x w map."""
    n, c, hw = int(act.shape[0]), int(act.shape[1]), int(act.shape[2] * act.shape[3])
    q = min(quota, hw)
    pick = torch.rand(n, hw, generator=generator).argsort(dim=1)[:, :q]
    flat = act.permute(0, 2, 3, 1).reshape(n, hw, c)
    return torch.gather(flat, 1, pick.to(flat.device)[:, :, None].expand(n, q, c))


def _tile_groups(ids: list[int], group_ids: NDArray[np.int64] | None, dataset: Any) -> list[int]:
    """Each tile's group: from ``groups``, else its slide in a ``SlideTiles``, else -1."""
    if group_ids is not None:
        if max(ids) >= len(group_ids):
            raise ValueError(
                f"groups has {len(group_ids)} entries but the source has more tiles; "
                "pass one group id per tile."
            )
        return [int(group_ids[i]) for i in ids]
    if dataset is not None:
        return [dataset.locate(i)[0] for i in ids]
    return [-1] * len(ids)


def _check_seen(seen: int, group_ids: NDArray[np.int64] | None) -> None:
    """Refuse a source whose batches were all empty, or ``groups`` of another length."""
    if seen == 0:
        raise ValueError(
            "source holds no tiles (every batch was empty); pass at least one non-empty batch."
        )
    if group_ids is not None and len(group_ids) != seen:
        raise ValueError(
            f"groups has {len(group_ids)} entries but the source has {seen} tiles; pass one "
            "group id per tile."
        )


def sample_rows(
    attr: NMFConceptAttribution | tuple[Callable[..., Any], nn.Module],
    source: Source,
    *,
    max_rows: int = 10_000,
    locations_per_tile: int | None = None,
    groups: Sequence[int] | NDArray[np.integer[Any]] | None = None,
    max_k: int | None = None,
    batch_size: int = 32,
    additional_forward_args: Any = None,
    batch_inputs: BatchInputs | None = None,
    random_state: int = 0,
    progress: bool = True,
) -> RowSample:
    r"""Stream ``source`` once through the layer and keep a capped, seeded sample of its rows.

    Each tile contributes up to ``locations_per_tile`` randomly chosen
    locations (post-ReLU feature vectors of the layer), and the tiles kept
    are a uniform random sample (the smallest of one random key per tile)
    such that at most ``max_rows`` rows are kept. Memory is O(``max_rows``
    x C) whatever the length of the source, and the sample depends only on
    ``random_state`` and the order of the tiles.

    Args:
        attr (NMFConceptAttribution or tuple): concepts whose model and layer
                    are used (fitted or not), or a ``(model, layer)`` pair.
        source (Tensor, Iterable or Dataset): tiles as for
                    :meth:`NMFConceptAttribution.fit`: an N x ... tensor,
                    an iterable of batches (tensors or ``(tensor, ...)``), or
                    a map-style ``Dataset`` such as
                    :class:`captum_nmf.wsi.SlideTiles` (whose slide of each
                    tile is recorded as its group).
        max_rows (int, optional): most rows kept (10,000 rows of 1,280
                    float32 channels take 49 MiB).
                    Default: 10000
        locations_per_tile (int, optional): most locations kept per tile;
                    None uses ``ceil(max_rows / tiles)`` when the number of
                    tiles is known up front (so every tile is represented)
                    and every location otherwise, at most ``max_rows``.
                    Default: None
        groups (sequence of int, optional): a group (e.g. slide or patient)
                    id per tile of the source, in source order; overrides
                    the slides of a ``SlideTiles`` source.
                    Default: None
        max_k (int, optional): the largest K that will be fitted; checked
                    against the layer's channels after the first batch,
                    before the rest is streamed.
                    Default: None
        batch_size (int, optional): tiles per forward pass (tensor and
                    ``Dataset`` sources).
                    Default: 32
        additional_forward_args (Any, optional): extra arguments of the model.
                    Default: None
        batch_inputs (Callable, optional): turns one batch into the model's
                    inputs, as for :meth:`NMFConceptAttribution.fit` (e.g.
                    ``lambda b: (b[0], b[1])``).
                    Default: None (the batch, or its first element)
        random_state (int, optional): seed of the locations and tiles kept.
                    Default: 0
        progress (bool, optional): show a tqdm progress bar.
                    Default: True

    Returns:
        *RowSample*: the rows, their tiles and groups.

    Raises:
        TypeError: a bad argument type or batch type, or a ``batch_inputs``
                    that is not callable or returns other than tensors.
        ValueError: ``max_rows``/``locations_per_tile``/``batch_size`` < 1,
                    ``locations_per_tile`` > ``max_rows``, ``max_k`` larger than
                    the layer's channels, ``groups`` shorter than the source,
                    a source with no tiles, or inputs of different lengths
                    from ``batch_inputs``.
        NoTissueError: a ``SlideTiles`` source none of whose slides has a
                    tile with tissue (the slides are named).
        NegativeActivationError, NonFiniteActivationError, LayerError: as
                    :meth:`NMFConceptAttribution.fit`.
    """
    attr = _as_attribution(attr, random_state)
    max_rows = check_int("max_rows", max_rows, hint="pass e.g. max_rows=20000.")
    quota = check_int(
        "locations_per_tile", locations_per_tile, optional=True, hint="pass e.g. 16, or None."
    )
    if quota is not None and quota > max_rows:  # no whole tile would fit: an empty sample
        raise ValueError(
            f"locations_per_tile={quota} is more than max_rows={max_rows}: not one tile's "
            "locations would fit in the sample. Pass locations_per_tile <= max_rows."
        )
    batch_size = check_int("batch_size", batch_size, hint="pass e.g. batch_size=32.")
    seed = check_int("random_state", random_state, minimum=0, hint="pass e.g. random_state=0.")
    max_k = check_int("max_k", max_k, optional=True)
    batch_inputs = check_batch_inputs(batch_inputs)
    group_ids = None if groups is None else np.asarray(groups, dtype=np.int64).reshape(-1)
    dataset = tile_dataset(source)
    notes = _check_tissue(dataset) if dataset is not None else []
    group_names = _slide_names(dataset) if dataset is not None and group_ids is None else []
    n_known = _count_tiles(source, batch_inputs)
    if n_known == 0:
        raise ValueError("source holds no tiles; pass at least one tile.")

    device = acts.model_device(attr.forward_func, attr.layer)
    batches = one_pass(source, batch_size, device=device, seed=seed, progress=progress)
    total = len(batches) if isinstance(batches, Sized) else None
    generator = torch.Generator().manual_seed(seed)
    reservoir = _Reservoir(max_rows)
    seen = 0
    start = time.perf_counter()
    for batch in tqdm(batches, total=total, disable=not progress, desc="sample rows", unit="batch"):
        inputs = model_inputs(batch, batch_inputs)
        n = int(inputs[0].shape[0])
        if n == 0:
            continue
        here = batch_dataset(batch, dataset)  # None: the batch names no dataset indices
        ids = item_ids(batch, here, seen, n)
        act = _batch_features(attr, inputs, additional_forward_args)
        _check_max_k(attr, max_k, int(act.shape[1]))
        if quota is None:
            hw = int(act.shape[2] * act.shape[3])
            share = max_rows if n_known is None else -(-max_rows // n_known)
            quota = max(1, min(hw, share))  # a tile never exceeds max_rows on its own
        rows = _pick_locations(act, quota, generator)
        keys = torch.rand(n, generator=generator)
        reservoir.add(rows, keys, ids, _tile_groups(ids, group_ids, here))
        seen += n
    _check_seen(seen, group_ids)
    rows, tiles, row_groups = reservoir.result()
    return RowSample(
        rows=rows,
        tiles=tiles,
        groups=row_groups,
        n_tiles_seen=seen,
        locations_per_tile=int(quota if quota is not None else 0),
        group_names=group_names,
        notes=notes,
        seconds=time.perf_counter() - start,
    )
