"""Concept stability across seeds: Hungarian matching on cosine similarity, reseeded refits."""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from captum_nmf._core.nmf import NMF
from captum_nmf._core.nmf_concept import NMFConceptAttribution
from captum_nmf._core.nmf_input import InitName
from captum_nmf._utils.validation import check_int
from captum_nmf.compare.sampling import RowSample, Source, sample_rows
from captum_nmf.compare.tables import Table

__all__ = [
    "RESAMPLE_SHARE",
    "ConceptStability",
    "Perturbation",
    "concept_stability",
    "match_concepts",
    "stability_from_runs",
]

Perturbation = Literal["resample", "init"]
_PERTURBATIONS = ("resample", "init")
RESAMPLE_SHARE = 0.5  # share of the training tiles each reseeded fit sees (perturbation="resample")
# A matched cosine this far below ``stable_cosine`` still counts as stable: the cosine of two
# identical float64 concepts can come out 1 - 1.1e-16, and stable_cosine=1.0 must accept it.
_COSINE_TOLERANCE = 1e-9


def _check_fraction(
    name: str, value: object, *, low: float, high: float, hint: str, high_included: bool = False
) -> float:
    """A real number in ``(low, high)``, or ``(low, high]`` with ``high_included``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {value!r} ({type(value).__name__}); {hint}")
    v = float(value)
    inside = low < v <= high if high_included else low < v < high
    if not (math.isfinite(v) and inside):
        bracket = "]" if high_included else ")"
        raise ValueError(f"{name} must be in ({low:g}, {high:g}{bracket}, got {value!r}; {hint}")
    return v


def _check_stable_cosine(stable_cosine: object) -> float:
    """``stable_cosine`` as a float in (0, 1]."""
    return _check_fraction(
        "stable_cosine", stable_cosine, low=0.0, high=1.0, hint="pass e.g. 0.9.", high_included=True
    )


def _check_perturbation(perturbation: object) -> None:
    if perturbation not in _PERTURBATIONS:
        raise ValueError(
            f"perturbation must be one of {_PERTURBATIONS}, got {perturbation!r}; pass "
            "perturbation='resample' (default) or 'init'."
        )


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
        threshold (float): a concept is stable when its minimum is >= this
                    (less 1e-9, so that rounding does not make a concept
                    found again exactly unstable at ``threshold=1.0``).
        reference (str or None): SHA-256 of the reference concepts (as float64),
                    so that :meth:`attach` refuses other concepts; None in
                    records made before it existed.
    """

    matched_cosine: NDArray[np.float64]
    matched_index: NDArray[np.int64]
    threshold: float = 0.9
    reference: str | None = None

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
        """Per concept, whether its minimum matched cosine is >= ``threshold`` (less 1e-9)."""
        return np.asarray(self.min_cosine >= self.threshold - _COSINE_TOLERANCE)

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
            **({} if self.reference is None else {"reference_sha256": self.reference}),
        }

    def to_metadata(self) -> dict[str, str]:
        """String metadata for a ``.safetensors`` header: ``{"stability": <json>}``."""
        return {"stability": json.dumps(self.to_dict(), separators=(",", ":"))}

    def attach(self, attr: Any) -> Any:
        """Record this stability on ``attr`` (saved with its concepts by ``attr.save``).

        Returns:
            *NMFConceptAttribution*: ``attr``.

        Raises:
            ValueError: ``attr`` has another number of concepts, or other
                        concepts than the ones this stability was measured on
                        (a refit since, or another model's concepts).
        """
        k = int(attr.concepts_.shape[0])
        if self.matched_cosine.shape[0] != k:
            raise ValueError(
                f"this stability is of {self.matched_cosine.shape[0]} concepts, attr has {k}."
            )
        if self.reference is not None and concepts_digest(attr.concepts_) != self.reference:
            raise ValueError(
                "this stability was measured on other concepts than attr's (refitted since, "
                "or another fit's): its stable and unstable concepts would label the wrong "
                "ones. Measure it again: concept_stability(attr, tiles).attach(attr)."
            )
        attr.stability_ = self.to_dict()
        return attr

    @classmethod
    def of(cls, attr: Any) -> ConceptStability | None:
        """The stability recorded on ``attr`` (attached, or loaded with its concepts), if any.

        Returns:
            *ConceptStability or None*: the record.
        """
        record = getattr(attr, "stability_", None)
        return None if record is None else cls.from_dict(record)

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
        reference = data.get("reference_sha256")
        return cls(cos, idx, threshold, None if reference is None else str(reference))


def concepts_digest(concepts: Any) -> str:
    """SHA-256 of K x C concepts as float64 (a tensor on any device, or an array).

    Returns:
        *str*: the hex digest.
    """
    if isinstance(concepts, Tensor):
        concepts = concepts.detach().to("cpu", torch.float64).numpy()
    array = np.ascontiguousarray(np.asarray(concepts, dtype=np.float64))
    return hashlib.sha256(repr(array.shape).encode() + array.tobytes()).hexdigest()


def stability_from_runs(
    reference: Any, runs: Sequence[Any], *, stable_cosine: float = 0.9
) -> ConceptStability:
    r"""Stability of ``reference``'s concepts, matched in each of ``runs``.

    Args:
        reference (Tensor or ndarray): K x C concepts of the reference fit.
        runs (sequence of Tensor or ndarray): K x C concepts of other fits
                    (other seeds) of the same data.
        stable_cosine (float, optional): minimum matched cosine of a stable
                    concept, in (0, 1]; a cosine 1e-9 below it still counts
                    (float rounding), so 1.0 accepts concepts found again exactly.
                    Default: 0.9

    Returns:
        *ConceptStability*: per concept the matched cosines, mean, minimum, stable.

    Raises:
        ValueError: no runs, shapes that differ, or ``stable_cosine`` not in (0, 1].
        TypeError: ``stable_cosine`` is not a number.
    """
    threshold = _check_stable_cosine(stable_cosine)
    if len(runs) == 0:
        raise ValueError("runs is empty; pass the concepts of at least one other fit.")
    matches = [match_concepts(reference, run) for run in runs]
    index = np.stack([m[0] for m in matches], axis=1)
    cosine = np.stack([m[1] for m in matches], axis=1)
    return ConceptStability(cosine, index, threshold, concepts_digest(reference))


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
    if perturbation == "resample":
        _check_resample(tiles, k, n_runs, random_state)
    for r in range(1, n_runs + 1):
        seed = random_state + r
        if perturbation == "init":
            solver = _solver(k, attr, "random", seed).fit(v)
        else:
            keep = torch.from_numpy(_resampled(tiles, seed)).to(v.device)
            solver = _solver(k, attr, attr.init, seed).fit(v[keep])
        out.append(solver.components)
    return out


def _resampled(tiles: NDArray[np.int64], seed: int) -> NDArray[np.bool_]:
    """Which rows belong to the seeded share (:data:`RESAMPLE_SHARE`) of the tiles."""
    ids = np.unique(tiles)
    size = max(1, round(RESAMPLE_SHARE * len(ids)))
    chosen = np.random.default_rng(seed).choice(ids, size=size, replace=False)
    return np.isin(tiles, chosen)


def _check_resample(tiles: NDArray[np.int64], k: int, n_runs: int, random_state: int) -> None:
    """Refuse ``perturbation="resample"`` when a reseeded share is every tile, or under K rows.

    With fewer than 2 tiles the share is every tile; a share with fewer than
    K rows cannot be fitted, and fitting all rows instead would do the same. Either
    way, with a deterministic initialisation, each reseeded fit would repeat the
    reference fit and call every concept stable (cosine 1.0, even on noise).
    Checked before any fit.

    Raises:
        ValueError: naming the tiles or the share's rows, K and the ways out.
    """
    n_tiles = len(np.unique(tiles))
    if n_tiles < 2:
        raise ValueError(
            f"perturbation='resample' fits each reseeded run on a seeded {RESAMPLE_SHARE:.0%} "
            f"of the tiles, but there are rows of only {n_tiles} tile to draw from: the share "
            "would be every row, so each reseeded fit would repeat the reference fit and call "
            "every concept stable. Pass more tiles (at least 2; raise max_rows or lower "
            "locations_per_tile so that more fit), or use perturbation='init'."
        )
    for r in range(1, n_runs + 1):
        rows = int(_resampled(tiles, random_state + r).sum())
        if rows < k:
            raise ValueError(
                f"perturbation='resample' fits each reseeded run on {RESAMPLE_SHARE:.0%} of the "
                f"{len(np.unique(tiles))} sampled tiles; the run with seed {random_state + r} "
                f"gets {rows} rows, fewer than K = {k}. Pass more tiles or raise max_rows / "
                "locations_per_tile, lower K, or use perturbation='init'."
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
    batch_inputs: Callable[[Any], Any] | None = None,
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
        stable_cosine (float, optional): minimum matched cosine of a stable
                    concept, in (0, 1] (see :func:`stability_from_runs`).
                    Default: 0.9
        max_rows (int, optional): see :func:`sample_rows`.
                    Default: 10000
        locations_per_tile (int, optional): see :func:`sample_rows`.
                    Default: None
        batch_size (int, optional): tiles per forward pass.
                    Default: 32
        additional_forward_args (Any, optional): extra arguments of the model.
                    Default: None
        batch_inputs (Callable, optional): turns one batch into the model's
                    inputs; see :func:`sample_rows`.
                    Default: None (the batch, or its first element)
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
        ValueError: ``n_seeds`` < 2, ``stable_cosine`` outside (0, 1]
                    (checked before anything is streamed), a sample with other
                    channels than the concepts or fewer rows than K (with
                    ``"resample"``: rows of fewer than 2 tiles, or a reseeded
                    share of its tiles with fewer rows than K), or an empty
                    source.
        NoTissueError: a ``SlideTiles`` source without tissue.
    """
    if not isinstance(attr, NMFConceptAttribution):
        raise TypeError(f"attr must be a fitted NMFConceptAttribution, got {type(attr).__name__}.")
    attr.check_fitted("concept_stability")
    n_seeds = check_int("n_seeds", n_seeds, minimum=2, hint="pass e.g. n_seeds=5.")
    _check_perturbation(perturbation)
    threshold = _check_stable_cosine(stable_cosine)
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
            batch_inputs=batch_inputs,
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
    return stability_from_runs(reference, runs, stable_cosine=threshold)
