"""Choosing K and trusting concepts: a held-out sweep over K and concept stability across seeds.

* :func:`sample_rows` streams a source once through the layer and keeps a
  capped, seeded sample of feature rows, remembering the tile (and slide)
  each row comes from;
* :func:`select_k` fits K over a range on that sample, measures the held-out
  reconstruction error (split by tile or slide, never by location) and the
  stability of the concepts across seeds, and recommends a K by a stated rule;
* :func:`concept_stability` measures the stability of fitted concepts
  (one K); :func:`match_concepts` and :func:`stability_from_runs` are the
  matching itself (Hungarian method on cosine similarity).

Every result holds plain arrays and renders as markdown, CSV and JSON.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from collections.abc import Callable, Iterable, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from numpy.typing import NDArray
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from captum_nmf._core.nmf import NMF, InitName
from captum_nmf._core.nmf_concept import NMFConceptAttribution
from captum_nmf._utils import activations as acts
from captum_nmf._utils.validation import check_int
from captum_nmf.compare.metrics import Table
from captum_nmf.engines import FitOptions
from captum_nmf.engines.batches import epochs, first_tensor, is_map_dataset
from captum_nmf.exceptions import NoTissueError
from captum_nmf.io import atomic_write_all

__all__ = [
    "ConceptStability",
    "KSelection",
    "RowSample",
    "concept_stability",
    "match_concepts",
    "sample_rows",
    "select_k",
    "stability_from_runs",
]

Source = Tensor | Iterable[Any] | Dataset[Any]
Perturbation = Literal["resample", "init"]
_PERTURBATIONS = ("resample", "init")
RESAMPLE_SHARE = 0.5  # share of the training tiles each reseeded fit sees (perturbation="resample")
_PERTURBATION_TEXT = {
    "resample": "each on a seeded half of the training tiles",
    "init": "each from a random initialisation on every training row",
}
_ROW_CHUNK = 8192  # rows per chunk of the float64 held-out residual


# ------------------------------------------------------------------ validation
def _check_fraction(name: str, value: object, *, low: float, high: float, hint: str) -> float:
    """A real number in ``(low, high)`` (``high`` included when it is 1 for cosines)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {value!r} ({type(value).__name__}); {hint}")
    v = float(value)
    if not (math.isfinite(v) and low < v < high):
        raise ValueError(f"{name} must be in ({low:g}, {high:g}), got {value!r}; {hint}")
    return v


def _check_ks(ks: object) -> list[int]:
    """The K values as a sorted list of distinct ints >= 1."""
    if isinstance(ks, (str, bytes)) or not isinstance(ks, Iterable):
        raise TypeError(
            f"ks must be an iterable of ints, got {ks!r} ({type(ks).__name__}); pass e.g. "
            "ks=range(2, 13)."
        )
    values = [
        check_int("ks", k, hint="every K must be >= 1; pass e.g. ks=range(2, 13).") for k in ks
    ]
    if not values:
        raise ValueError("ks is empty; pass at least one K, e.g. ks=range(2, 13).")
    return sorted(set(values))


def _check_perturbation(perturbation: object) -> None:
    if perturbation not in _PERTURBATIONS:
        raise ValueError(
            f"perturbation must be one of {_PERTURBATIONS}, got {perturbation!r}; pass "
            "perturbation='resample' (default) or 'init'."
        )


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


# ----------------------------------------------------------------- the sample
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


def _tile_dataset(source: Any) -> Any:
    """The ``SlideTiles``-like dataset behind ``source`` (item i is ``(image, i)``), or None."""
    for candidate in (source, getattr(source, "dataset", None)):
        if candidate is not None and hasattr(candidate, "locate") and hasattr(candidate, "grids"):
            return candidate
    return None


def _count_tiles(source: Any) -> int | None:
    """Tiles in ``source`` when that is known without reading any."""
    if isinstance(source, Tensor):
        return int(source.shape[0])
    if is_map_dataset(source):
        return len(source)
    if isinstance(source, DataLoader) and isinstance(source.dataset, Sized):
        return len(source.dataset)
    if isinstance(source, (list, tuple)):
        return sum(int(first_tensor(b).shape[0]) for b in source)
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
                    and every location otherwise.
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
        random_state (int, optional): seed of the locations and tiles kept.
                    Default: 0
        progress (bool, optional): show a tqdm progress bar.
                    Default: True

    Returns:
        *RowSample*: the rows, their tiles and groups.

    Raises:
        TypeError: a bad argument type or batch type.
        ValueError: ``max_rows``/``locations_per_tile``/``batch_size`` < 1,
                    ``max_k`` larger than the layer's channels, ``groups``
                    shorter than the source, or a source with no tiles.
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
    batch_size = check_int("batch_size", batch_size, hint="pass e.g. batch_size=32.")
    seed = check_int("random_state", random_state, minimum=0, hint="pass e.g. random_state=0.")
    max_k = check_int("max_k", max_k, optional=True)
    group_ids = None if groups is None else np.asarray(groups, dtype=np.int64).reshape(-1)
    dataset = _tile_dataset(source)
    notes = _check_tissue(dataset) if dataset is not None else []
    group_names = _slide_names(dataset) if dataset is not None and group_ids is None else []
    n_known = _count_tiles(source)
    if n_known == 0:
        raise ValueError("source holds no tiles; pass at least one tile.")

    if isinstance(source, Tensor):
        batches: Iterable[Any] = [
            source[i : i + batch_size] for i in range(0, source.shape[0], batch_size)
        ]
    else:
        device = acts.model_device(attr.forward_func, attr.layer)
        options = FitOptions(
            batch_size=batch_size,
            n_epochs=1,
            seed=seed,
            progress=progress,
            pin_memory=device is not None and device.type == "cuda",
        )
        batches = epochs(source, options)[0]
    total = len(batches) if isinstance(batches, Sized) else None
    generator = torch.Generator().manual_seed(seed)
    reservoir = _Reservoir(max_rows)
    seen = 0
    start = time.perf_counter()
    for batch in tqdm(batches, total=total, disable=not progress, desc="sample rows", unit="batch"):
        x = first_tensor(batch)
        n = int(x.shape[0])
        if n == 0:
            continue
        if dataset is not None and isinstance(batch, (tuple, list)) and len(batch) > 1:
            ids = [int(i) for i in batch[1]]  # SlideTiles: item i is (image, i)
        else:
            ids = list(range(seen, seen + n))
        device = acts.model_device(attr.forward_func, attr.layer)
        if device is not None and x.device != device:
            x = x.to(device, non_blocking=x.is_pinned())
        act = cast("Tensor", attr.features(x, additional_forward_args))
        c, hw = int(act.shape[1]), int(act.shape[2] * act.shape[3])
        if max_k is not None and max_k > c:
            name = acts.layer_name(attr.forward_func, attr.layer)
            label = repr(name) if name else "the hooked layer"
            raise ValueError(
                f"ks includes K={max_k} but layer {label} has {c} channels; choose every K <= {c}."
            )
        if quota is None:
            quota = hw if n_known is None else max(1, min(hw, -(-max_rows // n_known)))
        q = min(quota, hw)
        pick = torch.rand(n, hw, generator=generator).argsort(dim=1)[:, :q]
        flat = act.permute(0, 2, 3, 1).reshape(n, hw, c)
        rows = torch.gather(flat, 1, pick.to(flat.device)[:, :, None].expand(n, q, c))
        keys = torch.rand(n, generator=generator)
        if group_ids is not None:
            if max(ids) >= len(group_ids):
                raise ValueError(
                    f"groups has {len(group_ids)} entries but the source has more tiles; "
                    "pass one group id per tile."
                )
            tile_groups = [int(group_ids[i]) for i in ids]
        elif dataset is not None:
            tile_groups = [dataset.locate(i)[0] for i in ids]
        else:
            tile_groups = [-1] * n
        reservoir.add(rows, keys, ids, tile_groups)
        seen += n
    if seen == 0:
        raise ValueError(
            "source holds no tiles (every batch was empty); pass at least one non-empty batch."
        )
    if group_ids is not None and len(group_ids) != seen:
        raise ValueError(
            f"groups has {len(group_ids)} entries but the source has {seen} tiles; pass one "
            "group id per tile."
        )
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


def _split(
    sample: RowSample, holdout: float, random_state: int
) -> tuple[NDArray[np.bool_], str, NDArray[np.int64], NDArray[np.int64]]:
    """Held-out rows by whole tiles, or whole groups when there are several.

    Returns:
        *tuple*: a held-out mask over the rows, the unit (``"slide"`` or
        ``"tile"``), and the held-out and training tile ids.
    """
    tiles = np.unique(sample.tiles)
    if len(tiles) < 2:
        raise ValueError(
            f"the sample holds rows of {len(tiles)} tile; holding out part of it needs at "
            "least 2 tiles. Pass more tiles."
        )
    known = sample.groups[sample.groups >= 0]
    by_group = len(known) == len(sample.groups) and len(np.unique(known)) >= 2
    units = sample.groups if by_group else sample.tiles
    tile_unit = {int(t): int(u) for t, u in zip(sample.tiles, units, strict=True)}
    unit_ids = np.unique(units)
    tiles_per_unit = {int(u): 0 for u in unit_ids}
    for u in tile_unit.values():
        tiles_per_unit[u] += 1
    order = np.random.default_rng(random_state).permutation(unit_ids)
    goal = holdout * len(tiles)
    held: set[int] = set()
    count = 0
    for u in order[:-1]:  # the last unit always trains
        if count >= goal:
            break
        held.add(int(u))
        count += tiles_per_unit[int(u)]
    mask = np.isin(units, np.fromiter(held, np.int64, len(held)))
    held_tiles = np.unique(sample.tiles[mask])
    train_tiles = np.unique(sample.tiles[~mask])
    return mask, "slide" if by_group else "tile", held_tiles, train_tiles


# ------------------------------------------------------------------ stability
def _unit_rows(h: Any) -> NDArray[np.float64]:
    arr = h.detach().cpu().double().numpy() if isinstance(h, Tensor) else np.asarray(h, float)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"concepts must be a K x C matrix, got shape {arr.shape}.")
    if not np.isfinite(arr).all():
        raise ValueError("concepts must be finite; got NaN or Inf values.")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return np.asarray(np.divide(arr, norms, out=np.zeros_like(arr), where=norms > 0), np.float64)


def match_concepts(reference: Any, other: Any) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    r"""Match two sets of concepts one to one by the Hungarian method on cosine similarity.

    Args:
        reference (Tensor or ndarray): K x C concepts.
        other (Tensor or ndarray): K x C concepts of another fit.

    Returns:
        *tuple*: ``index`` (K ``int64``: the concept of ``other`` matched to
        each reference concept) and ``cosine`` (K: their cosine similarity;
        0 for an all-zero concept). The matching maximises the summed cosine.

    Raises:
        ValueError: the shapes differ or are not K x C, or a value is not finite.
    """
    a, b = _unit_rows(reference), _unit_rows(other)
    if a.shape != b.shape:
        raise ValueError(
            f"reference and other must have the same K x C shape, got {a.shape} and {b.shape}."
        )
    cos = a @ b.T
    rows, cols = linear_sum_assignment(cos, maximize=True)
    index = np.empty(a.shape[0], np.int64)
    index[rows] = cols
    return index, np.clip(cos[np.arange(a.shape[0]), index], -1.0, 1.0)


@dataclass
class ConceptStability:
    """How well each concept of a reference fit is found again by fits with other seeds.

    Attributes:
        matched_cosine (ndarray): K x R cosine of each reference concept with
                    its Hungarian match in each of R other fits.
        matched_index (ndarray): K x R index of that match in each fit.
        mean_cosine (ndarray): K, mean over the R fits.
        min_cosine (ndarray): K, minimum over the R fits.
        threshold (float): a concept is stable when its minimum is >= this.
    """

    matched_cosine: NDArray[np.float64]
    matched_index: NDArray[np.int64]
    threshold: float = 0.9

    @property
    def n_concepts(self) -> int:
        """K."""
        return int(self.matched_cosine.shape[0])

    @property
    def mean_cosine(self) -> NDArray[np.float64]:
        """Per concept, the mean matched cosine over the other fits."""
        return np.asarray(self.matched_cosine.mean(axis=1), np.float64)

    @property
    def min_cosine(self) -> NDArray[np.float64]:
        """Per concept, the smallest matched cosine over the other fits."""
        return np.asarray(self.matched_cosine.min(axis=1), np.float64)

    @property
    def stable(self) -> NDArray[np.bool_]:
        """Per concept, whether its minimum matched cosine is >= ``threshold``."""
        return np.asarray(self.min_cosine >= self.threshold)

    @property
    def share_stable(self) -> float:
        """The share of concepts that are stable."""
        return float(self.stable.mean())

    def table(self) -> Table:
        """One row per concept: mean and minimum matched cosine, stable or not."""
        rows = [
            [k, float(m), float(lo), "yes" if s else "no"]
            for k, (m, lo, s) in enumerate(
                zip(self.mean_cosine, self.min_cosine, self.stable, strict=True)
            )
        ]
        title = (
            f"Concept stability over {self.matched_cosine.shape[1]} reseeded fit(s) "
            f"(stable: minimum cosine >= {self.threshold:g})"
        )
        return Table(["concept", "mean cosine", "min cosine", "stable"], rows, title)

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible numbers (lists), enough to rebuild with :meth:`from_dict`."""
        return {
            "threshold": self.threshold,
            "matched_cosine": self.matched_cosine.tolist(),
            "matched_index": self.matched_index.tolist(),
            "mean_cosine": self.mean_cosine.tolist(),
            "min_cosine": self.min_cosine.tolist(),
            "stable": self.stable.tolist(),
            "share_stable": self.share_stable,
        }

    def to_metadata(self) -> dict[str, str]:
        """String metadata for a ``.safetensors`` header: ``{"stability": <json>}``."""
        return {"stability": json.dumps(self.to_dict(), separators=(",", ":"))}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConceptStability:
        """Rebuild from :meth:`to_dict` (or the JSON of :meth:`to_metadata`).

        Raises:
            ValueError: a missing key or mismatched shapes.
        """
        try:
            cos = np.asarray(data["matched_cosine"], np.float64)
            idx = np.asarray(data["matched_index"], np.int64)
            threshold = float(data["threshold"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a ConceptStability record: {exc}") from exc
        if cos.ndim != 2 or cos.shape != idx.shape:
            raise ValueError(f"matched_cosine {cos.shape} and matched_index {idx.shape} differ.")
        return cls(cos, idx, threshold)


def stability_from_runs(
    reference: Any, runs: Sequence[Any], *, stable_cosine: float = 0.9
) -> ConceptStability:
    r"""Stability of ``reference``'s concepts, matched in each of ``runs``.

    Args:
        reference (Tensor or ndarray): K x C concepts of the reference fit.
        runs (sequence of Tensor or ndarray): K x C concepts of other fits
                    (other seeds) of the same data.
        stable_cosine (float, optional): minimum matched cosine of a stable concept.
                    Default: 0.9

    Returns:
        *ConceptStability*: per concept the matched cosines, mean, minimum, stable.

    Raises:
        ValueError: no runs, shapes that differ, or ``stable_cosine`` not in (0, 1].
        TypeError: ``stable_cosine`` is not a number.
    """
    threshold = _check_fraction(
        "stable_cosine", stable_cosine, low=0.0, high=1.0 + 1e-12, hint="pass e.g. 0.9."
    )
    if len(runs) == 0:
        raise ValueError("runs is empty; pass the concepts of at least one other fit.")
    matches = [match_concepts(reference, run) for run in runs]
    index = np.stack([m[0] for m in matches], axis=1)
    cosine = np.stack([m[1] for m in matches], axis=1)
    return ConceptStability(cosine, index, threshold)


# ------------------------------------------------------------------- the sweep
def _solver(k: int, attr: NMFConceptAttribution, init: InitName, seed: int) -> NMF:
    return NMF(k, init=init, max_iter=attr.max_iter, tol=attr.tol, random_state=seed)


def _refits(
    v: Tensor,
    tiles: NDArray[np.int64],
    k: int,
    attr: NMFConceptAttribution,
    n_runs: int,
    random_state: int,
    perturbation: Perturbation,
) -> list[Tensor]:
    """Concepts of ``n_runs`` reseeded fits (seeds ``random_state + 1, ...``).

    ``"resample"``: ``attr``'s initialisation on a seeded share
    (:data:`RESAMPLE_SHARE`) of the tiles, whole; ``"init"``: random
    initialisations on every row.
    """
    out = []
    ids = np.unique(tiles)
    size = max(1, round(RESAMPLE_SHARE * len(ids)))
    for r in range(1, n_runs + 1):
        seed = random_state + r
        if perturbation == "init":
            solver = _solver(k, attr, "random", seed).fit(v)
        else:
            chosen = np.random.default_rng(seed).choice(ids, size=size, replace=False)
            keep = torch.from_numpy(np.isin(tiles, chosen)).to(v.device)
            rows = v[keep] if int(keep.sum()) >= k else v
            solver = _solver(k, attr, attr.init, seed).fit(rows)
        out.append(solver.components)
    return out


def _relative_error(solver: NMF, v: Tensor, sq: float) -> float:
    """``||V - W H||^2 / ||V||^2`` with ``W`` the exact NNLS for fixed ``H`` (float64 sums)."""
    h = solver.components.to(torch.float64)
    total = 0.0
    for start in range(0, v.shape[0], _ROW_CHUNK):
        chunk = v[start : start + _ROW_CHUNK]
        w = cast("Tensor", solver.transform(chunk))  # tensors in, tensors out
        res = chunk.double() - w.double() @ h.to(chunk.device)
        total += float((res * res).sum())
    return total / sq if sq > 0 else 0.0


def _sq(v: Tensor) -> float:
    total = 0.0
    for start in range(0, v.shape[0], _ROW_CHUNK):
        total += float((v[start : start + _ROW_CHUNK].double() ** 2).sum())
    return total


@dataclass
class KSelection:
    """The result of :func:`select_k`: per K held-out error, gain, stability and fit time.

    Attributes:
        ks (list[int]): the K values fitted, increasing.
        heldout_error (ndarray): per K, ``||V_h - W_h H||^2 / ||V_h||^2`` on the
                    held-out rows, ``W_h`` the exact NNLS for the fitted ``H``.
        train_error (ndarray): the same on the training rows.
        gain (ndarray): per K, the held-out error of the previous K of the
                    sweep minus this K's (NaN for the first).
        stability (dict[int, ConceptStability]): per K, the reference
                    concepts matched in the reseeded fits.
        concepts (dict[int, ndarray]): per K, the K x C reference concepts.
        fit_seconds (ndarray): per K, the reference fit and its held-out error.
        stability_seconds (ndarray): per K, the reseeded fits and the matching.
        recommended (int or None): the recommended K.
        rule (str): the rule that chose it, in words, with the clause applied.
        gain_threshold (float): the rule's gain threshold.
        stable_cosine (float): the rule's stability threshold.
        n_seeds (int): fits compared per K (the reference included).
        holdout (float): the share of tiles asked to be held out.
        split_by (str): ``"slide"`` (groups known, at least two) or ``"tile"``.
        heldout_tiles (ndarray): source positions of the held-out tiles.
        train_tiles (ndarray): source positions of the training tiles.
        n_train_rows (int): rows fitted.
        n_heldout_rows (int): rows held out.
        n_tiles_seen (int): tiles streamed.
        locations_per_tile (int): locations kept per tile (at most).
        n_channels (int): C.
        layer_name (str or None): the layer's name in the model.
        perturbation (str): what changed between the reference and a reseeded
                    fit (see :func:`select_k`).
        sample_seconds (float): the streaming pass.
        notes (list[str]): anything left out, and why.
    """

    ks: list[int]
    heldout_error: NDArray[np.float64]
    train_error: NDArray[np.float64]
    gain: NDArray[np.float64]
    stability: dict[int, ConceptStability]
    concepts: dict[int, NDArray[np.float32]]
    fit_seconds: NDArray[np.float64]
    stability_seconds: NDArray[np.float64]
    recommended: int | None
    rule: str
    gain_threshold: float
    stable_cosine: float
    n_seeds: int
    holdout: float
    split_by: str
    heldout_tiles: NDArray[np.int64]
    train_tiles: NDArray[np.int64]
    n_train_rows: int
    n_heldout_rows: int
    n_tiles_seen: int
    locations_per_tile: int
    n_channels: int
    layer_name: str | None = None
    perturbation: str = "resample"
    sample_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def share_stable(self) -> NDArray[np.float64]:
        """Per K, the share of concepts whose minimum matched cosine is >= ``stable_cosine``."""
        return np.asarray([self.stability[k].share_stable for k in self.ks], np.float64)

    @property
    def total_seconds(self) -> float:
        """Streaming, fits and stability together."""
        return float(self.sample_seconds + self.fit_seconds.sum() + self.stability_seconds.sum())

    def table(self) -> Table:
        """One row per K: errors, gain, stability and times."""
        rows = []
        for i, k in enumerate(self.ks):
            stab = self.stability[k]
            unstable = [int(j) for j in np.flatnonzero(~stab.stable)]
            rows.append(
                [
                    k,
                    float(self.heldout_error[i]),
                    float(self.gain[i]),
                    float(self.train_error[i]),
                    stab.share_stable,
                    float(stab.min_cosine.min()),
                    " ".join(map(str, unstable)) or "-",
                    float(self.fit_seconds[i]),
                    float(self.stability_seconds[i]),
                    "yes" if k == self.recommended else "",
                ]
            )
        columns = [
            "K",
            "held-out error",
            "gain",
            "train error",
            "stable share",
            "worst min cosine",
            "unstable concepts",
            "fit s",
            "stability s",
            "recommended",
        ]
        return Table(columns, rows, "Choosing K: held-out relative error and concept stability")

    def concept_table(self) -> Table:
        """One row per (K, concept): mean and minimum matched cosine, stable or not."""
        rows = [
            [k, j, float(m), float(lo), "yes" if s else "no"]
            for k in self.ks
            for j, (m, lo, s) in enumerate(
                zip(
                    self.stability[k].mean_cosine,
                    self.stability[k].min_cosine,
                    self.stability[k].stable,
                    strict=True,
                )
            )
        ]
        return Table(["K", "concept", "mean cosine", "min cosine", "stable"], rows, "Concepts")

    def describe(self) -> str:
        """The sample, the split and the settings, in one paragraph."""
        return (
            f"{self.n_train_rows} training and {self.n_heldout_rows} held-out feature rows "
            f"(C = {self.n_channels}) of layer {self.layer_name or '?'}, at most "
            f"{self.locations_per_tile} locations from each of {len(self.train_tiles)} + "
            f"{len(self.heldout_tiles)} tiles (of {self.n_tiles_seen} streamed); held out by "
            f"{self.split_by} (asked {self.holdout:g} of the tiles, got "
            f"{len(self.heldout_tiles) / (len(self.heldout_tiles) + len(self.train_tiles)):.3g})."
            f" Stability: {self.n_seeds} fits per K (the reference and {self.n_seeds - 1} "
            f"reseeded fits, {_PERTURBATION_TEXT[self.perturbation]}), concepts matched by "
            "the Hungarian method on cosine similarity."
        )

    def to_markdown(self) -> str:
        """The sweep as markdown: the sample, the table, the rule and the recommendation."""
        parts = [
            "## Choosing K",
            self.describe(),
            self.table().to_markdown(),
            f"**Rule.** {self.rule}",
        ]
        parts += [f"Note: {note}" for note in self.notes]
        return "\n\n".join(parts) + "\n"

    def to_csv(self) -> str:
        """The per-K table as CSV (full precision)."""
        return self.table().to_csv()

    def to_dict(self) -> dict[str, Any]:
        """Every number, JSON-compatible (NaN as None)."""

        def num(values: NDArray[np.float64]) -> list[float | None]:
            return [None if math.isnan(float(v)) else float(v) for v in values]

        return {
            "ks": list(self.ks),
            "recommended": self.recommended,
            "rule": self.rule,
            "gain_threshold": self.gain_threshold,
            "stable_cosine": self.stable_cosine,
            "heldout_error": num(self.heldout_error),
            "train_error": num(self.train_error),
            "gain": num(self.gain),
            "share_stable": num(self.share_stable),
            "fit_seconds": num(self.fit_seconds),
            "stability_seconds": num(self.stability_seconds),
            "stability": {str(k): self.stability[k].to_dict() for k in self.ks},
            "sample": {
                "n_train_rows": self.n_train_rows,
                "n_heldout_rows": self.n_heldout_rows,
                "n_tiles_seen": self.n_tiles_seen,
                "train_tiles": self.train_tiles.tolist(),
                "heldout_tiles": self.heldout_tiles.tolist(),
                "locations_per_tile": self.locations_per_tile,
                "n_channels": self.n_channels,
                "layer_name": self.layer_name,
                "holdout": self.holdout,
                "split_by": self.split_by,
                "n_seeds": self.n_seeds,
                "perturbation": self.perturbation,
                "sample_seconds": self.sample_seconds,
            },
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2)

    def figure_data(self) -> dict[str, Any]:
        """What a figure of error and stability against K needs.

        Returns:
            *dict*: ``ks``, ``heldout_error``, ``train_error``, ``gain``,
            ``share_stable`` (arrays over K); ``min_cosine`` and ``unstable``
            (per K, arrays over its concepts); ``recommended``,
            ``gain_threshold``, ``stable_cosine``.
        """
        return {
            "ks": np.asarray(self.ks, np.int64),
            "heldout_error": self.heldout_error.copy(),
            "train_error": self.train_error.copy(),
            "gain": self.gain.copy(),
            "share_stable": self.share_stable,
            "min_cosine": [self.stability[k].min_cosine for k in self.ks],
            "unstable": [~self.stability[k].stable for k in self.ks],
            "recommended": self.recommended,
            "gain_threshold": self.gain_threshold,
            "stable_cosine": self.stable_cosine,
        }

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``select_k.csv``, ``select_k_concepts.csv``, ``select_k.md`` and ``select_k.json``.

        All four are written atomically and together (the JSON record last):
        an error leaves every file as it was.

        Args:
            directory (str or PathLike): created if missing.

        Returns:
            *Path*: the directory.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        names = ["select_k.csv", "select_k_concepts.csv", "select_k.md", "select_k.json"]
        texts = [self.to_csv(), self.concept_table().to_csv(), self.to_markdown(), self.to_json()]
        with atomic_write_all([out / n for n in names]) as handles:
            for handle, text in zip(handles, texts, strict=True):
                handle.write(text)
        return out


def _recommend(
    ks: list[int],
    gain: NDArray[np.float64],
    shares: NDArray[np.float64],
    gain_threshold: float,
    stable_cosine: float,
    n_seeds: int,
) -> tuple[int | None, str]:
    """The rule: the smallest K whose gain to the next K is below the threshold, all stable."""
    rule = (
        f"the smallest K of the sweep whose held-out error falls by less than "
        f"{gain_threshold:g} (a share of the held-out ||V||^2) at the next K of the sweep, and "
        f"whose concepts are all stable (each concept's minimum matched cosine over the "
        f"{n_seeds - 1} reseeded fits >= {stable_cosine:g})"
    )
    for i in range(len(ks) - 1):
        if gain[i + 1] < gain_threshold and shares[i] >= 1.0:
            return ks[i], f"Recommended K = {ks[i]}: {rule}."
    stable = [k for k, s in zip(ks, shares, strict=True) if s >= 1.0]
    why = "a single K has no gain to compare" if len(ks) == 1 else "no K of the sweep meets it"
    if stable:
        return stable[-1], (
            f"Recommended K = {stable[-1]} (fallback: {why}; the largest K whose concepts "
            f"are all stable). Rule: {rule}. Extend ks or loosen the thresholds."
        )
    return None, f"No K recommended: {why}, and no K has all concepts stable. Rule: {rule}."


def select_k(
    attr: NMFConceptAttribution | tuple[Callable[..., Any], nn.Module],
    source: Source | RowSample,
    *,
    ks: Iterable[int] = range(2, 13),
    holdout: float = 0.2,
    n_seeds: int = 5,
    perturbation: Perturbation = "resample",
    gain_threshold: float = 0.01,
    stable_cosine: float = 0.9,
    max_rows: int = 10_000,
    locations_per_tile: int | None = None,
    groups: Sequence[int] | NDArray[np.integer[Any]] | None = None,
    batch_size: int = 32,
    additional_forward_args: Any = None,
    random_state: int = 0,
    progress: bool = True,
) -> KSelection:
    r"""Fit K over a range on one streamed sample and recommend K by a stated rule.

    The source is streamed once through the layer (:func:`sample_rows`: at
    most ``max_rows`` rows, memory O(``max_rows`` x C)); whole tiles, or whole
    slides when the source says which slide a tile comes from (a
    :class:`captum_nmf.wsi.SlideTiles` with several slides, or ``groups``),
    are held out, never single locations. For every K, on the training rows:

    * the reference fit, :class:`captum_nmf.NMF` with the settings of
      ``attr`` (``init``, ``max_iter``, ``tol``) and ``random_state``,
      which is what ``NMFConceptAttribution.fit`` would give on this sample;
      its held-out relative error ``||V_h - W_h H||^2 / ||V_h||^2`` (``W_h``
      the exact non-negative least squares for the fixed ``H``,
      :meth:`NMF.transform`), and the gain over the previous K;
    * ``n_seeds - 1`` reseeded fits (seeds ``random_state + 1, ...``; see
      ``perturbation``); each reference concept is matched in each
      refit by the Hungarian method on cosine similarity
      (:func:`stability_from_runs`); a concept is stable when its minimum
      matched cosine is >= ``stable_cosine``.

    Each fit costs O(K x C) memory beyond the sample. The recommended K is
    the smallest K whose held-out error falls by less than ``gain_threshold``
    at the next K of the sweep and whose concepts are all stable; when none
    qualifies, the largest K whose concepts are all stable (said so in
    :attr:`KSelection.rule`).

    Args:
        attr (NMFConceptAttribution or tuple): concepts whose model, layer
                    and solver settings are used (fitted or not), or a
                    ``(model, layer)`` pair (default settings).
        source (Tensor, Iterable, Dataset or RowSample): tiles as for
                    :meth:`NMFConceptAttribution.fit`, or a sample already
                    drawn by :func:`sample_rows`.
        ks (iterable of int, optional): the K values, each in [1, C].
                    Default: ``range(2, 13)``
        holdout (float, optional): share of the tiles (or slides) held out, in (0, 1).
                    Default: 0.2
        n_seeds (int, optional): fits compared per K, the reference included (>= 2).
                    Default: 5
        perturbation (str, optional): what changes between the reference and
                    a reseeded fit: ``"resample"`` fits ``attr``'s
                    initialisation, with the seed, on a seeded half of the
                    training tiles (whole tiles; do the concepts come back from
                    other data?); ``"init"`` fits every training row from a
                    random initialisation (do they come back from another
                    starting point?), which usually costs more iterations.
                    Default: ``"resample"``
        gain_threshold (float, optional): the rule's held-out gain threshold
                    (a share of ``||V_h||^2``), >= 0.
                    Default: 0.01
        stable_cosine (float, optional): minimum matched cosine of a stable
                    concept, in (0, 1].
                    Default: 0.9
        max_rows (int, optional): most rows in the sample (see :func:`sample_rows`).
                    Default: 10000
        locations_per_tile (int, optional): see :func:`sample_rows`.
                    Default: None
        groups (sequence of int, optional): a group id per tile of the
                    source (see :func:`sample_rows`); groups are held out whole.
                    Default: None
        batch_size (int, optional): tiles per forward pass.
                    Default: 32
        additional_forward_args (Any, optional): extra arguments of the model.
                    Default: None
        random_state (int, optional): seed of the sample, the split and the fits.
                    Default: 0
        progress (bool, optional): show tqdm progress bars.
                    Default: True

    Returns:
        *KSelection*: the per-K table, the stability of every concept, the
        recommended K and the rule.

    Raises:
        TypeError: a bad argument type.
        ValueError: an empty ``ks``, a K < 1 or > C (checked after the first
                    batch, before any fit), ``holdout`` outside (0, 1),
                    ``n_seeds`` < 2, a sample of fewer than 2 tiles or fewer
                    training rows than the largest K, or an empty source.
        NoTissueError: a ``SlideTiles`` source none of whose slides has tissue.
        NegativeActivationError, NonFiniteActivationError, LayerError: as
                    :meth:`NMFConceptAttribution.fit`.
    """
    k_values = _check_ks(ks)
    holdout = _check_fraction("holdout", holdout, low=0.0, high=1.0, hint="pass e.g. 0.2.")
    n_seeds = check_int("n_seeds", n_seeds, minimum=2, hint="pass e.g. n_seeds=5.")
    _check_perturbation(perturbation)
    if isinstance(gain_threshold, bool) or not isinstance(gain_threshold, numbers.Real):
        raise TypeError(f"gain_threshold must be a float, got {gain_threshold!r}.")
    if not (math.isfinite(float(gain_threshold)) and gain_threshold >= 0):
        raise ValueError(f"gain_threshold must be >= 0, got {gain_threshold!r}; pass e.g. 0.01.")
    stable = _check_fraction(
        "stable_cosine", stable_cosine, low=0.0, high=1.0 + 1e-12, hint="pass e.g. 0.9."
    )
    seed = check_int("random_state", random_state, minimum=0, hint="pass e.g. random_state=0.")
    model = _as_attribution(attr, seed)
    if isinstance(source, RowSample):
        sample = source
        if k_values[-1] > sample.n_channels:
            raise ValueError(
                f"ks includes K={k_values[-1]} but the sample has {sample.n_channels} "
                f"channels; choose every K <= {sample.n_channels}."
            )
    else:
        sample = sample_rows(
            model,
            source,
            max_rows=max_rows,
            locations_per_tile=locations_per_tile,
            groups=groups,
            max_k=k_values[-1],
            batch_size=batch_size,
            additional_forward_args=additional_forward_args,
            random_state=seed,
            progress=progress,
        )
    held, split_by, held_tiles, train_tiles = _split(sample, holdout, seed)
    mask = torch.from_numpy(held).to(sample.rows.device)
    v_train, v_held = sample.rows[~mask], sample.rows[mask]
    train_row_tiles = sample.tiles[~held]
    if k_values[-1] > v_train.shape[0]:
        raise ValueError(
            f"ks includes K={k_values[-1]} but the sample has only {v_train.shape[0]} "
            "training rows; raise max_rows or locations_per_tile, or pass more tiles."
        )
    sq_train, sq_held = _sq(v_train), _sq(v_held)
    n = len(k_values)
    heldout_error, train_error = np.full(n, np.nan), np.full(n, np.nan)
    fit_s, stab_s = np.zeros(n), np.zeros(n)
    stability: dict[int, ConceptStability] = {}
    concepts: dict[int, NDArray[np.float32]] = {}
    for i, k in enumerate(tqdm(k_values, disable=not progress, desc="select K", unit="K")):
        start = time.perf_counter()
        reference = _solver(k, model, model.init, seed).fit(v_train)
        heldout_error[i] = _relative_error(reference, v_held, sq_held)
        train_error[i] = float(reference.reconstruction_err_) ** 2 / sq_train if sq_train else 0.0
        fit_s[i] = time.perf_counter() - start
        start = time.perf_counter()
        runs = _refits(v_train, train_row_tiles, k, model, n_seeds - 1, seed, perturbation)
        stability[k] = stability_from_runs(reference.components, runs, stable_cosine=stable)
        stab_s[i] = time.perf_counter() - start
        concepts[k] = reference.components.detach().cpu().float().numpy()
    gain = np.full(n, np.nan)
    gain[1:] = heldout_error[:-1] - heldout_error[1:]
    shares = np.asarray([stability[k].share_stable for k in k_values])
    recommended, rule = _recommend(k_values, gain, shares, float(gain_threshold), stable, n_seeds)
    return KSelection(
        ks=k_values,
        heldout_error=heldout_error,
        train_error=train_error,
        gain=gain,
        stability=stability,
        concepts=concepts,
        fit_seconds=fit_s,
        stability_seconds=stab_s,
        recommended=recommended,
        rule=rule,
        gain_threshold=float(gain_threshold),
        stable_cosine=stable,
        n_seeds=n_seeds,
        holdout=holdout,
        split_by=split_by,
        heldout_tiles=held_tiles,
        train_tiles=train_tiles,
        n_train_rows=int(v_train.shape[0]),
        n_heldout_rows=int(v_held.shape[0]),
        n_tiles_seen=sample.n_tiles_seen,
        locations_per_tile=sample.locations_per_tile,
        n_channels=sample.n_channels,
        layer_name=acts.layer_name(model.forward_func, model.layer),
        perturbation=perturbation,
        sample_seconds=sample.seconds,
        notes=list(sample.notes),
    )


def concept_stability(
    attr: NMFConceptAttribution,
    source: Source | RowSample,
    *,
    n_seeds: int = 5,
    perturbation: Perturbation = "resample",
    stable_cosine: float = 0.9,
    max_rows: int = 10_000,
    locations_per_tile: int | None = None,
    batch_size: int = 32,
    additional_forward_args: Any = None,
    random_state: int = 0,
    progress: bool = True,
) -> ConceptStability:
    r"""Stability of fitted concepts: are they found again by fits from other seeds?

    The source is sampled once (:func:`sample_rows`); ``n_seeds - 1`` NMF
    fits with K = ``attr``'s number of concepts are run on that sample (seeds
    ``random_state + 1, ...``; see ``perturbation``), and each
    of ``attr.concepts_`` is matched in each fit by the Hungarian method on
    cosine similarity. The result holds plain arrays;
    :meth:`ConceptStability.to_metadata` gives strings that can be stored
    with the concepts.

    Args:
        attr (NMFConceptAttribution): fitted (or loaded) concepts.
        source (Tensor, Iterable, Dataset or RowSample): tiles as for
                    :func:`select_k`, ideally those the concepts were fitted on.
        n_seeds (int, optional): fits compared, the reference (``attr``) included (>= 2).
                    Default: 5
        perturbation (str, optional): ``"resample"`` or ``"init"``, as in
                    :func:`select_k`.
                    Default: ``"resample"``
        stable_cosine (float, optional): minimum matched cosine of a stable concept.
                    Default: 0.9
        max_rows (int, optional): see :func:`sample_rows`.
                    Default: 10000
        locations_per_tile (int, optional): see :func:`sample_rows`.
                    Default: None
        batch_size (int, optional): tiles per forward pass.
                    Default: 32
        additional_forward_args (Any, optional): extra arguments of the model.
                    Default: None
        random_state (int, optional): seed of the sample and the refits.
                    Default: 0
        progress (bool, optional): show a tqdm progress bar.
                    Default: True

    Returns:
        *ConceptStability*: per concept of ``attr`` the matched cosines, their
        mean and minimum, and whether it is stable.

    Raises:
        NotFittedError: ``attr`` is not fitted.
        TypeError: ``attr`` is not an NMFConceptAttribution, or a bad argument type.
        ValueError: ``n_seeds`` < 2, a sample with other channels than the
                    concepts or fewer rows than K, or an empty source.
        NoTissueError: a ``SlideTiles`` source without tissue.
    """
    if not isinstance(attr, NMFConceptAttribution):
        raise TypeError(f"attr must be a fitted NMFConceptAttribution, got {type(attr).__name__}.")
    attr.check_fitted("concept_stability")
    n_seeds = check_int("n_seeds", n_seeds, minimum=2, hint="pass e.g. n_seeds=5.")
    _check_perturbation(perturbation)
    seed = check_int("random_state", random_state, minimum=0, hint="pass e.g. random_state=0.")
    reference = attr.concepts_
    k = int(reference.shape[0])
    if isinstance(source, RowSample):
        sample = source
    else:
        sample = sample_rows(
            attr,
            source,
            max_rows=max_rows,
            locations_per_tile=locations_per_tile,
            batch_size=batch_size,
            additional_forward_args=additional_forward_args,
            random_state=seed,
            progress=progress,
        )
    if sample.n_channels != int(reference.shape[1]):
        raise ValueError(
            f"the sample has {sample.n_channels} channels but the concepts have "
            f"{int(reference.shape[1])}; sample the layer the concepts were fitted on."
        )
    if sample.rows.shape[0] < k:
        raise ValueError(
            f"the sample has {sample.rows.shape[0]} rows, fewer than K = {k}; raise max_rows "
            "or pass more tiles."
        )
    runs = _refits(sample.rows, sample.tiles, k, attr, n_seeds - 1, seed, perturbation)
    return stability_from_runs(reference, runs, stable_cosine=stable_cosine)
