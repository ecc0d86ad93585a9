"""Choosing K: a held-out sweep over K on one streamed sample, with concept stability per K.

* :func:`select_k` fits K over a range on a sample of feature rows
  (:func:`~captum_nmf.compare.sampling.sample_rows`), measures the held-out
  reconstruction error (split by tile or slide, never by location) and the
  stability of the concepts across seeds, and recommends a K by a stated rule;
  its result is a :class:`~captum_nmf.compare.kselection.KSelection`;
* :func:`concept_stability`, :func:`match_concepts` and
  :func:`stability_from_runs` (:mod:`captum_nmf.compare.stability`) measure the
  stability of fitted concepts (Hungarian method on cosine similarity).

Every result holds plain arrays and renders as markdown, CSV and JSON. The
sample, the stability and the result live in modules of their own; this
module re-exports them, so ``captum_nmf.compare.selection`` names them all.
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn
from tqdm.auto import tqdm

from captum_nmf._core.nmf import NMF
from captum_nmf._core.nmf_concept import NMFConceptAttribution
from captum_nmf._utils import activations as acts
from captum_nmf._utils.validation import check_int
from captum_nmf.compare.kselection import KSelection
from captum_nmf.compare.sampling import RowSample, Source, _as_attribution, sample_rows
from captum_nmf.compare.stability import (
    RESAMPLE_SHARE,
    ConceptStability,
    Perturbation,
    _check_fraction,
    _check_perturbation,
    _check_resample,
    _check_stable_cosine,
    _refits,
    _solver,
    concept_stability,
    match_concepts,
    stability_from_runs,
)
from captum_nmf.exceptions import CaptumNMFWarning

__all__ = [
    "RESAMPLE_SHARE",
    "ConceptStability",
    "KSelection",
    "RowSample",
    "concept_stability",
    "match_concepts",
    "sample_rows",
    "select_k",
    "stability_from_runs",
]

_ROW_CHUNK = 8192  # rows per chunk of the float64 held-out residual
_MIN_TRAIN_TILES = 2  # one training tile leaves "resample" nothing to resample, and little to fit


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


def _closest_sum(sizes: list[int], target: int, most: int) -> list[int]:
    """Positions in ``sizes`` whose sum, in [1, ``most``], is closest to ``target``.

    Exact (subset sums as bits of a Python int, O(len(sizes) x most) bit
    operations). Ties go to the larger sum; among the subsets of the chosen
    sum, each position is taken when the rest can still reach it, so units of
    one tile give the first ``target`` positions. ``most`` >= the smallest size.
    """
    if all(size == 1 for size in sizes):  # single tiles: the first ones (no n^2 bit sets)
        return list(range(max(1, min(target, most))))
    suffix = [1] * (len(sizes) + 1)  # suffix[i]: the sums reachable from sizes[i:]
    mask = (1 << (most + 1)) - 1
    for i in range(len(sizes) - 1, -1, -1):
        suffix[i] = (suffix[i + 1] | (suffix[i + 1] << sizes[i])) & mask
    best = min(
        (t for t in range(1, most + 1) if suffix[0] >> t & 1),
        key=lambda t: (abs(t - target), -t),
    )
    chosen, left = [], best
    for i, size in enumerate(sizes):
        if left == 0:
            break
        if size <= left and suffix[i + 1] >> (left - size) & 1:
            chosen.append(i)
            left -= size
    return chosen


def _split(
    sample: RowSample, holdout: float, random_state: int
) -> tuple[NDArray[np.bool_], str, NDArray[np.int64], NDArray[np.int64]]:
    """Held-out rows by whole tiles, or whole groups when there are several.

    The units (tiles or groups) are put in a seeded random order; the held-out
    units are those whose tile count is closest to ``ceil(holdout x tiles)``
    (ties: the larger count; among equal counts, the earliest units of the order)
    while leaving at least 2 tiles to train on and holding out at most half of
    the tiles (or the goal, when that is more). Units of one tile each give the
    first ``ceil(holdout x tiles)`` tiles of the order.

    Returns:
        *tuple*: a held-out mask over the rows, the unit (``"slide"`` or
        ``"tile"``), and the held-out and training tile ids.

    Raises:
        ValueError: the sample holds rows of fewer than 3 tiles.
    """
    tiles = np.unique(sample.tiles)
    if len(tiles) < _MIN_TRAIN_TILES + 1:
        raise ValueError(
            f"the sample holds rows of {len(tiles)} tile{'' if len(tiles) == 1 else 's'} (of "
            f"{sample.n_tiles_seen} seen, "
            f"{sample.locations_per_tile or 'all'} locations each); holding out part of it needs "
            f"at least {_MIN_TRAIN_TILES + 1} tiles (1 held out, {_MIN_TRAIN_TILES} to train on). "
            "Pass more tiles, or a smaller locations_per_tile or a larger max_rows so that more "
            "tiles fit."
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
    # at least 3 tiles in at least 2 units: the smallest unit leaves >= 2 tiles to train on
    goal = math.ceil(holdout * len(tiles))
    # never more than half of the tiles (or the goal, when that is more): holding out one big
    # slide of 50 beside three of 1 tile was "closest" to a goal of 27 and trained on 3 tiles
    most = min(len(tiles) - _MIN_TRAIN_TILES, max(goal, math.ceil(len(tiles) / 2)))
    chosen = _closest_sum([tiles_per_unit[int(u)] for u in order], goal, most)
    held = order[chosen].astype(np.int64)
    mask = np.isin(units, held)
    held_tiles = np.unique(sample.tiles[mask])
    train_tiles = np.unique(sample.tiles[~mask])
    return mask, "slide" if by_group else "tile", held_tiles, train_tiles


def _warn_overlapping(source: object) -> None:
    """Warn when whole tiles are held out of tiles that overlap: they share pixels."""
    grids = getattr(source, "grids", None) or ()
    overlapping = [g for g in grids if g.stride < g.tile_size]
    if overlapping:
        g = overlapping[0]
        warnings.warn(
            f"select_k holds out whole tiles, but the tiles overlap (stride={g.stride} < "
            f"tile_size={g.tile_size} on {Path(str(g.path)).name}): a held-out tile shares "
            "pixels with the training tiles beside it, so the held-out error is optimistic. "
            f"Pass tiles that do not overlap (stride={g.tile_size}), or several slides (held "
            "out whole).",
            CaptumNMFWarning,
            stacklevel=3,
        )


def _train_and_held_rows(
    sample: RowSample, held: NDArray[np.bool_], max_k: int, split_by: str, random_state: int
) -> tuple[Tensor, Tensor]:
    """The training and held-out rows of ``sample``.

    Raises:
        ValueError: fewer training rows than the largest K, or a side whose rows
                    are all zero (blank tiles: the held-out error would be 0,
                    or every concept zero, for every K).
    """
    mask = torch.from_numpy(held).to(sample.rows.device)
    v_train, v_held = sample.rows[~mask], sample.rows[mask]
    if max_k > v_train.shape[0]:
        raise ValueError(
            f"ks includes K={max_k} but the sample has only {v_train.shape[0]} "
            "training rows; raise max_rows or locations_per_tile, or pass more tiles."
        )
    for side, rows, tiles, consequence in (
        ("held-out", v_held, sample.tiles[held], "the held-out error would be 0 for every K"),
        ("training", v_train, sample.tiles[~held], "every concept would be zero"),
    ):
        if _sq(rows) == 0:
            n = len(np.unique(tiles))
            raise ValueError(
                f"the {n} {side} tile{'' if n == 1 else 's'} ({rows.shape[0]} rows; split by "
                f"{split_by}, random_state={random_state}) {'has' if n == 1 else 'have'} only "
                "zero activations at this layer (blank tiles, e.g. glass or background), so "
                f"{consequence}. Pass other tiles (for slides, a tissue mask), another "
                "random_state, or another holdout."
            )
    return v_train, v_held


def _relative_error(solver: NMF, v: Tensor, sq: float) -> float:
    """``||V - W H||^2 / ||V||^2`` with ``W`` the exact NNLS for fixed ``H`` (float64 sums)."""
    h = solver.components.to(torch.float64)
    total = 0.0
    for start in range(0, v.shape[0], _ROW_CHUNK):
        chunk = v[start : start + _ROW_CHUNK]
        w = cast("Tensor", solver.transform(chunk))  # tensors in, tensors out
        res = chunk.double() - w.double() @ h.to(chunk.device)
        total += float((res * res).sum())
    return total / sq if sq > 0 else math.nan  # select_k refuses blank held-out rows


def _sq(v: Tensor) -> float:
    total = 0.0
    for start in range(0, v.shape[0], _ROW_CHUNK):
        total += float((v[start : start + _ROW_CHUNK].double() ** 2).sum())
    return total


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


def _check_gain_threshold(gain_threshold: float) -> float:
    """A finite real number >= 0."""
    if isinstance(gain_threshold, bool) or not isinstance(gain_threshold, numbers.Real):
        raise TypeError(f"gain_threshold must be a float, got {gain_threshold!r}.")
    if not (math.isfinite(float(gain_threshold)) and gain_threshold >= 0):
        raise ValueError(f"gain_threshold must be >= 0, got {gain_threshold!r}; pass e.g. 0.01.")
    return float(gain_threshold)


def _check_sweep(
    ks: Iterable[int],
    holdout: float,
    n_seeds: int,
    perturbation: Perturbation,
    gain_threshold: float,
    stable_cosine: float,
    random_state: int,
) -> tuple[list[int], float, int, float, float, int]:
    """The checked settings of :func:`select_k`, in the order of its arguments."""
    k_values = _check_ks(ks)
    holdout = _check_fraction("holdout", holdout, low=0.0, high=1.0, hint="pass e.g. 0.2.")
    n_seeds = check_int("n_seeds", n_seeds, minimum=2, hint="pass e.g. n_seeds=5.")
    _check_perturbation(perturbation)
    threshold = _check_gain_threshold(gain_threshold)
    stable = _check_stable_cosine(stable_cosine)
    seed = check_int("random_state", random_state, minimum=0, hint="pass e.g. random_state=0.")
    return k_values, holdout, n_seeds, threshold, stable, seed


def _sample_for_sweep(
    model: NMFConceptAttribution, source: Source | RowSample, max_k: int, **sample_args: Any
) -> RowSample:
    """``source`` when it is a sample (channels checked against ``max_k``), else its sample."""
    if not isinstance(source, RowSample):
        return sample_rows(model, source, max_k=max_k, **sample_args)
    if max_k > source.n_channels:
        raise ValueError(
            f"ks includes K={max_k} but the sample has {source.n_channels} "
            f"channels; choose every K <= {source.n_channels}."
        )
    return source


@dataclass
class _PerK:
    """What the sweep measures at each K, in the order of the K values."""

    heldout_error: NDArray[np.float64]
    train_error: NDArray[np.float64]
    fit_seconds: NDArray[np.float64]
    stability_seconds: NDArray[np.float64]
    stability: dict[int, ConceptStability] = field(default_factory=dict)
    concepts: dict[int, NDArray[np.float32]] = field(default_factory=dict)

    @property
    def gain(self) -> NDArray[np.float64]:
        """Per K, the held-out error of the previous K minus this K's (NaN for the first)."""
        gain = np.full(len(self.heldout_error), np.nan)
        gain[1:] = self.heldout_error[:-1] - self.heldout_error[1:]
        return gain


def _sweep(
    model: NMFConceptAttribution,
    v_train: Tensor,
    v_held: Tensor,
    train_row_tiles: NDArray[np.int64],
    k_values: list[int],
    *,
    n_seeds: int,
    seed: int,
    perturbation: Perturbation,
    stable: float,
    progress: bool,
) -> _PerK:
    """Per K: the reference fit, its held-out and training errors, and its stability."""
    sq_train, sq_held = _sq(v_train), _sq(v_held)
    n = len(k_values)
    out = _PerK(np.full(n, np.nan), np.full(n, np.nan), np.zeros(n), np.zeros(n))
    for i, k in enumerate(tqdm(k_values, disable=not progress, desc="select K", unit="K")):
        start = time.perf_counter()
        reference = _solver(k, model, model.init, seed).fit(v_train)
        out.heldout_error[i] = _relative_error(reference, v_held, sq_held)
        error = float(reference.reconstruction_err_) ** 2 / sq_train if sq_train else 0.0
        out.train_error[i] = error
        out.fit_seconds[i] = time.perf_counter() - start
        start = time.perf_counter()
        runs = _refits(v_train, train_row_tiles, k, model, n_seeds - 1, seed, perturbation)
        # the concepts as kept (float32): the stability's reference digest is of these
        out.concepts[k] = reference.components.detach().cpu().float().numpy()
        out.stability[k] = stability_from_runs(out.concepts[k], runs, stable_cosine=stable)
        out.stability_seconds[i] = time.perf_counter() - start
    return out


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
    batch_inputs: Callable[[Any], Any] | None = None,
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
        holdout (float, optional): share of the tiles held out, in (0, 1):
                    ``ceil(holdout x tiles)`` whole tiles, or the whole slides
                    (groups) whose tile count comes closest to it while at least
                    2 tiles are left to train on (the share held out is in the
                    result's description).
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
                    concept, in (0, 1]; a cosine 1e-9 below it still counts
                    (float rounding), so 1.0 accepts concepts found again exactly.
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
        batch_inputs (Callable, optional): turns one batch into the model's
                    inputs; see :func:`sample_rows`.
                    Default: None (the batch, or its first element)
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
                    ``n_seeds`` < 2, ``stable_cosine`` outside (0, 1], a
                    sample of fewer than 3 tiles (1 held out, 2 to train on)
                    or fewer training rows than the largest K (with
                    ``"resample"``: a reseeded share of the training tiles with
                    fewer rows than it), held-out or training tiles whose
                    activations are all zero (blank tiles), or an empty source
                    (each before any fit).
        NoTissueError: a ``SlideTiles`` source none of whose slides has tissue.
        NegativeActivationError, NonFiniteActivationError, LayerError: as
                    :meth:`NMFConceptAttribution.fit`.
    """
    k_values, holdout, n_seeds, threshold, stable, seed = _check_sweep(
        ks, holdout, n_seeds, perturbation, gain_threshold, stable_cosine, random_state
    )
    model = _as_attribution(attr, seed)
    sample = _sample_for_sweep(
        model,
        source,
        k_values[-1],
        max_rows=max_rows,
        locations_per_tile=locations_per_tile,
        groups=groups,
        batch_size=batch_size,
        additional_forward_args=additional_forward_args,
        batch_inputs=batch_inputs,
        random_state=seed,
        progress=progress,
    )
    held, split_by, held_tiles, train_tiles = _split(sample, holdout, seed)
    if split_by == "tile":
        _warn_overlapping(source)
    v_train, v_held = _train_and_held_rows(sample, held, k_values[-1], split_by, seed)
    if perturbation == "resample":  # before any fit: every reseeded share fits the largest K
        _check_resample(sample.tiles[~held], k_values[-1], n_seeds - 1, seed)
    per_k = _sweep(
        model,
        v_train,
        v_held,
        sample.tiles[~held],
        k_values,
        n_seeds=n_seeds,
        seed=seed,
        perturbation=perturbation,
        stable=stable,
        progress=progress,
    )
    shares = np.asarray([per_k.stability[k].share_stable for k in k_values])
    recommended, rule = _recommend(k_values, per_k.gain, shares, threshold, stable, n_seeds)
    return KSelection(
        ks=k_values,
        heldout_error=per_k.heldout_error,
        train_error=per_k.train_error,
        gain=per_k.gain,
        stability=per_k.stability,
        concepts=per_k.concepts,
        fit_seconds=per_k.fit_seconds,
        stability_seconds=per_k.stability_seconds,
        recommended=recommended,
        rule=rule,
        gain_threshold=threshold,
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
