"""The paper's three analyses: concept structure, a surrogate model, and agreement with CAMs.

Every function takes plain arrays or tensors (concept maps N x K x h x w,
predictions, CAM maps N x h x w), returns a small result object holding the
numbers as arrays and a printable :class:`~captum_nmf.compare.tables.Table` laid out by
:mod:`captum_nmf.compare.tables`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score
from sklearn.model_selection import GroupShuffleSplit, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from captum_nmf.compare.tables import (
    Table,
    agreement_table,
    correlation_table,
    similarity_table,
    surrogate_table,
)
from captum_nmf.exceptions import CamScaleWarning

__all__ = [
    "CamAgreement",
    "ConceptCorrelation",
    "ConceptSimilarity",
    "SurrogateFeature",
    "SurrogateReport",
    "Table",
    "cam_agreement",
    "concept_similarity",
    "surrogate_features",
    "surrogate_report",
    "weight_correlation",
]

SurrogateFeature = Literal["sum", "coverage", "max", "mean_positive"]
_FEATURES = ("sum", "coverage", "max", "mean_positive")
Array = NDArray[np.float64]


def _np(x: Any, name: str) -> NDArray[Any]:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu").numpy()
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (list, tuple)):
        return np.asarray(x)
    raise TypeError(f"{name} must be a Tensor or ndarray, got {type(x).__name__}.")


def _maps(maps: Any) -> Array:
    arr = _np(maps, "maps").astype(np.float64)
    if arr.ndim != 4:
        raise ValueError(
            f"maps must be N x K x h x w concept maps (e.g. NMFConceptAttribution.attribute), "
            f"got shape {arr.shape}."
        )
    if arr.shape[0] == 0:
        raise ValueError("maps holds 0 tiles; pass at least one.")
    _check_finite(arr, "maps")
    return arr


def _check_finite(arr: NDArray[Any], name: str) -> None:
    """Refuse NaN or infinite values, naming how many tiles hold them and the first."""
    bad = ~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name} holds NaN or infinite values on {int(bad.sum())} of {arr.shape[0]} tiles "
            f"(the first: tile {first}); drop those tiles or recompute them."
        )


def _centred(x: Array) -> tuple[Array, Array]:
    """Each row minus its mean over the last axis, and the centred rows' norms (Pearson's parts).

    A row that is constant gets norm 0 exactly (so its correlations are NaN),
    not the rounding error of its centring (about 1e-16 in float64).
    """
    centred = x - x.mean(axis=-1, keepdims=True)
    norms = np.sqrt((centred**2).sum(axis=-1))
    norms[x.max(axis=-1) == x.min(axis=-1)] = 0.0
    return centred, norms


# ------------------------------------------------------------------ structure
@dataclass(frozen=True)
class ConceptSimilarity:
    """Cosine similarity between concept vectors (K x K)."""

    matrix: Array
    table: Table


def concept_similarity(concepts: Any) -> ConceptSimilarity:
    r"""Cosine similarity between concept vectors (the rows of H), as in the paper's Fig. 4.

    Args:
        concepts (NMFConceptAttribution, Tensor or ndarray): a fitted concept
                    model (its ``concepts_``) or a K x C matrix.

    Returns:
        *ConceptSimilarity*: ``matrix`` (K x K, 1 on the diagonal) and ``table``.

    Raises:
        ValueError: not a 2-D matrix, or a concept vector of norm 0.
    """
    h = _np(getattr(concepts, "concepts_", concepts), "concepts").astype(np.float64)
    if h.ndim != 2:
        raise ValueError(f"concepts must be a K x C matrix, got shape {h.shape}.")
    norms = np.linalg.norm(h, axis=1)
    if np.any(norms == 0):
        raise ValueError("a concept vector has norm 0; its cosine similarity is undefined.")
    unit = h / norms[:, None]
    matrix = unit @ unit.T
    return ConceptSimilarity(matrix, similarity_table(matrix))


@dataclass(frozen=True)
class ConceptCorrelation:
    """Pearson correlation of concept weights over each tile's locations, mean and std over tiles.

    Attributes:
        mean (ndarray): K x K mean correlation.
        std (ndarray): K x K standard deviation over tiles.
        n_tiles (ndarray): K x K number of tiles where both concepts vary.
        per_tile (ndarray): N x K x K correlations (NaN where a concept is constant).
        table (Table): "mean ± std" per pair.
    """

    mean: Array
    std: Array
    n_tiles: NDArray[np.int64]
    per_tile: Array
    table: Table


def weight_correlation(maps: Any) -> ConceptCorrelation:
    r"""Correlation between concepts' weights within tiles (mean ± std over tiles, Fig. 4).

    For each tile, the K weight maps are flattened over its h x w locations and
    their Pearson correlations computed; a concept constant on a tile (e.g.
    absent) gives no correlation there and that tile is left out of the pair's
    mean.

    Args:
        maps (Tensor or ndarray): N x K x h x w concept maps.

    Returns:
        *ConceptCorrelation*: mean, std, counts and per-tile matrices, and a table.

    Raises:
        ValueError: ``maps`` is not N x K x h x w or holds no tile.
    """
    m = _maps(maps)
    n, k = m.shape[:2]
    x, norms = _centred(m.reshape(n, k, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        per_tile = np.einsum("nkl,njl->nkj", x, x) / (norms[:, :, None] * norms[:, None, :])
    per_tile[~np.isfinite(per_tile)] = np.nan
    valid = np.isfinite(per_tile)
    count = valid.sum(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(per_tile, axis=0)
        std = np.nanstd(per_tile, axis=0)
    table = correlation_table(mean, std, n, count)
    return ConceptCorrelation(mean, std, count.astype(np.int64), per_tile, table)


# ------------------------------------------------------------------ surrogate
def _labels(predictions: Any, n: int) -> NDArray[np.int64]:
    p = _np(predictions, "predictions")
    if p.ndim not in (1, 2):
        raise ValueError(f"predictions must be (n,) labels or (n, 2) scores, got shape {p.shape}.")
    if p.shape[0] != n:
        raise ValueError(f"predictions has {p.shape[0]} entries for {n} tiles of maps.")
    if p.ndim == 2:  # scores or logits per class: the predicted class
        if p.shape[1] != 2:
            raise ValueError(
                f"predictions with {p.shape[1]} columns: pass binary labels (n,) or two-class "
                "scores (n, 2)."
            )
        return _argmax(p, "predictions")
    if p.dtype.kind == "f":
        if np.any(np.isnan(p)):
            raise ValueError("predictions contain NaN; drop those tiles first.")
        if not np.all((p >= 0) & (p <= 1)):
            raise ValueError("float predictions must be probabilities in [0, 1] (or labels).")
        return (p >= 0.5).astype(np.int64)
    labels = p.astype(np.int64)
    if not np.all(np.isin(labels, (0, 1))):
        raise ValueError(f"labels must be 0 or 1, got values {np.unique(labels)[:5].tolist()}.")
    return labels


def _argmax(scores: NDArray[Any], name: str) -> NDArray[np.int64]:
    """The predicted class of each row of scores; NaN refused (argmax would pick it)."""
    if scores.dtype.kind == "f" and np.isnan(scores).any():
        rows = int(np.isnan(scores).any(axis=1).sum())
        raise ValueError(f"{name} holds NaN scores on {rows} tiles; drop those tiles first.")
    return np.asarray(np.argmax(scores, axis=1), dtype=np.int64)


def _predicted_labels(predicted: Any, n: int) -> NDArray[np.int64]:
    """``cam_agreement``'s labels: ints, integral floats, probabilities (cut at 0.5) or scores."""
    p = _np(predicted, "predicted_labels")
    if p.ndim == 2 and p.shape[1] == 1:
        p = p[:, 0]
    if p.ndim not in (1, 2):
        raise ValueError(
            f"predicted_labels must be (n,) labels or (n, classes) scores, got shape {p.shape}."
        )
    if p.shape[0] != n:
        raise ValueError(f"predicted_labels has {p.shape[0]} entries for {n} tiles.")
    if p.ndim == 2:
        return _argmax(p, "predicted_labels")
    if p.dtype.kind == "b":
        return p.astype(np.int64)
    if p.dtype.kind in "iu":
        return p.astype(np.int64)
    if p.dtype.kind != "f":
        raise TypeError(f"predicted_labels must be numbers, got dtype {p.dtype}.")
    if np.isnan(p).any():
        raise ValueError("predicted_labels contain NaN; drop those tiles first.")
    if np.all(p == np.round(p)):
        return p.astype(np.int64)
    if np.all((p >= 0) & (p <= 1)):  # probabilities of the positive class, as surrogate_report
        return (p >= 0.5).astype(np.int64)
    raise ValueError(
        "predicted_labels holds fractional values outside [0, 1] (e.g. "
        f"{float(p[p != np.round(p)][0])!r}): pass the predicted labels, probabilities in "
        "[0, 1] or (n, classes) scores."
    )


def surrogate_features(maps: Any, feature: SurrogateFeature = "sum") -> Array:
    """Per-tile features of each concept (N x K) for the surrogate model.

    ``"sum"``: sum of the concept's weights over the tile (the paper's main
    variant); ``"coverage"``: share of the tile's locations where the concept
    is the argmax (and positive); ``"max"``: largest weight; ``"mean_positive"``:
    mean weight over the locations where it is > 0 (0 if none).

    Returns:
        *ndarray*: N x K float64.

    Raises:
        ValueError: an unknown ``feature``.
    """
    if feature not in _FEATURES:
        raise ValueError(f"feature must be one of {_FEATURES}, got {feature!r}.")
    m = _maps(maps)
    n, k = m.shape[:2]
    x = m.reshape(n, k, -1)
    if feature == "sum":
        return np.asarray(x.sum(axis=2), dtype=np.float64)
    if feature == "max":
        return np.asarray(x.max(axis=2), dtype=np.float64)
    if feature == "coverage":
        winner = np.argmax(x, axis=1)
        alive = x.max(axis=1) > 0
        return np.stack([((winner == j) & alive).mean(axis=1) for j in range(k)], axis=1)
    positive = x > 0
    counts = positive.sum(axis=2)
    return np.where(counts > 0, (x * positive).sum(axis=2) / np.maximum(counts, 1), 0.0)


@dataclass(frozen=True)
class SurrogateReport:
    """A logistic regression predicting the model's label from per-tile concept features.

    Attributes:
        feature (str): the per-tile feature used.
        coefficients (ndarray): K coefficients on standardised features (so
                    they compare across concepts); > 0 pushes towards label 1.
        intercept (float): the intercept.
        metrics (dict[str, float]): accuracy, precision, recall, f1, roc_auc on
                    the held-out tiles; NaN where undefined (recall with no
                    label-1 tile held out, precision with none predicted 1, AUC
                    with one label held out), which the table's title says.
        n_train (int): training tiles.
        n_test (int): held-out tiles.
        grouped (bool): whether the split kept each group (slide) on one side.
        table (Table): coefficients and metrics.
    """

    feature: str
    coefficients: Array
    intercept: float
    metrics: dict[str, float]
    n_train: int
    n_test: int
    grouped: bool
    table: Table


def surrogate_report(
    maps: Any,
    predictions: Any,
    *,
    groups: Any = None,
    feature: SurrogateFeature = "sum",
    test_size: float = 0.25,
    random_state: int = 0,
) -> SurrogateReport:
    r"""How well concept weights explain the model's decisions (the paper's Table 1).

    A standardised logistic regression is fitted on per-tile concept features
    (:func:`surrogate_features`) to predict the model's own predicted label, and
    scored on held-out tiles. With ``groups`` (e.g. slide ids) the split keeps
    every group on one side, so no slide is in both.

    Args:
        maps (Tensor or ndarray): N x K x h x w concept maps.
        predictions (Tensor or ndarray): the model's labels (n,) in {0, 1},
                    probabilities (n,) in [0, 1] (cut at 0.5), or two-class
                    scores (n, 2) (argmax).
        groups (array-like, optional): a group id per tile for the split.
                    Default: None
        feature (str, optional): ``"sum"``, ``"coverage"``, ``"max"`` or
                    ``"mean_positive"``.
                    Default: ``"sum"``
        test_size (float, optional): share of tiles (or groups) held out.
                    Default: 0.25
        random_state (int, optional): seed of the split.
                    Default: 0

    Returns:
        *SurrogateReport*: coefficients, held-out metrics and a table.

    Raises:
        ValueError: mismatched lengths, labels other than 0/1, a single class,
                    too few tiles or groups to split, or a bad ``feature``.
    """
    x = surrogate_features(maps, feature)
    n = x.shape[0]
    y = _labels(predictions, n)
    if len(np.unique(y)) < 2:
        raise ValueError(
            f"predictions hold one class only ({int(y[0])}) over {n} tiles; the surrogate needs "
            "tiles of both labels."
        )
    if not 0 < test_size < 1:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}.")
    idx = np.arange(n)
    if groups is not None:
        g = np.asarray(_np(groups, "groups"))
        if g.shape[0] != n:
            raise ValueError(f"groups has {g.shape[0]} entries for {n} tiles.")
        if len(np.unique(g)) < 2:
            raise ValueError("groups holds one group only; a grouped split needs at least two.")
        splitter = GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=random_state)
        train, test = next(splitter.split(x, y, g))
    else:
        n_test = math.ceil(test_size * n)  # sklearn's rounding of the held-out share
        classes = len(np.unique(y))
        fits = np.bincount(y).min() >= 2 and min(n_test, n - n_test) >= classes
        stratify = y if fits else None  # a stratified split needs each class on both sides
        train, test = train_test_split(
            idx, test_size=test_size, random_state=random_state, stratify=stratify
        )
    if len(np.unique(y[train])) < 2:
        raise ValueError(
            "the training split holds one class only; pass more tiles or another random_state."
        )
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    model.fit(x[train], y[train])
    clf = model[-1]
    pred = model.predict(x[test])
    proba = model.predict_proba(x[test])[:, 1]
    both = len(np.unique(y[test])) == 2
    nan = np.nan  # undefined metrics are NaN, never a 0 that reads as a poor score
    metrics = {
        "accuracy": float(accuracy_score(y[test], pred)),
        "precision": float(precision_score(y[test], pred, zero_division=nan)),
        "recall": float(recall_score(y[test], pred, zero_division=nan)),
        "f1": float(f1_score(y[test], pred, zero_division=nan)),
        "roc_auc": float(roc_auc_score(y[test], proba)) if both else nan,
    }
    coefficients = clf.coef_[0].astype(np.float64)
    table = surrogate_table(
        coefficients,
        metrics,
        feature=feature,
        n_train=len(train),
        n_test=len(test),
        grouped=groups is not None,
        test_labels=np.unique(y[test]).tolist(),
    )
    return SurrogateReport(
        feature,
        coefficients,
        float(clf.intercept_[0]),
        metrics,
        len(train),
        len(test),
        groups is not None,
        table,
    )


# ------------------------------------------------------------- CAM agreement
@dataclass(frozen=True)
class CamAgreement:
    """Per concept: IoU of positive regions and correlation with a CAM (or any map).

    Attributes:
        iou (ndarray): N x K IoU of ``{concept > 0}`` and ``{cam > 0}`` (NaN
                    where both are empty).
        correlation (ndarray): N x K Pearson correlation over each tile's
                    locations (NaN where either map is constant).
        labels (ndarray): the predicted label of each tile.
        summary (dict): ``"all"`` and ``"label <v>"`` for each predicted label
                    ``v``: K means and stds of IoU and correlation, and the
                    tiles each is defined on (``iou_n``, ``corr_n``).
        table (Table): the paper's Table 2 layout.
        name (str): what the concepts were compared with.
        by_label (dict[int, dict]): the same statistics keyed by the label value
                    itself (sorted), for code that needs the labels as numbers.
    """

    iou: Array
    correlation: Array
    labels: NDArray[np.int64]
    summary: dict[str, dict[str, Array]] = field(repr=False)
    table: Table = field(repr=False)
    name: str = "cam"
    by_label: dict[int, dict[str, Array]] = field(default_factory=dict, repr=False)


def _stats(values: Array) -> tuple[Array, Array]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=0), np.nanstd(values, axis=0)


def _summary(iou: Array, corr: Array) -> dict[str, Array]:
    """K means, stds and counts of the tiles where each is defined, of IoU and correlation."""
    iou_m, iou_s = _stats(iou)
    cor_m, cor_s = _stats(corr)
    return {
        "iou_mean": iou_m,
        "iou_std": iou_s,
        "iou_n": np.isfinite(iou).sum(axis=0),
        "corr_mean": cor_m,
        "corr_std": cor_s,
        "corr_n": np.isfinite(corr).sum(axis=0),
    }


def cam_agreement(
    maps: Any,
    cams: Any,
    predicted_labels: Any,
    *,
    name: str = "GradCAM",
) -> CamAgreement:
    r"""Agreement of each concept with a CAM (the paper's Table 2), per predicted label.

    For every tile and concept: the IoU between the region where the concept's
    weight is > 0 and the region where the CAM is > 0, and the Pearson
    correlation between the concept's weights and the CAM over the tile's
    locations. Both are summarised as mean ± std over tiles, for all tiles and
    separately for each predicted label. ``cams`` may be any map on the same
    grid, e.g. a rasterised neoplastic-nuclei mask.

    CAMs must be signed maps at the layer's resolution
    (:func:`~captum_nmf.compare.cam_maps`): pytorch-grad-cam's ReLU'd,
    min-max scaled maps are > 0 almost everywhere; such input warns
    :class:`~captum_nmf.exceptions.CamScaleWarning`.

    Args:
        maps (Tensor or ndarray): N x K x h x w concept maps.
        cams (Tensor or ndarray): N x h x w (or N x 1 x h x w) maps.
        predicted_labels (array-like): the model's label per tile: any ints
                    (or floats with integer values), probabilities (n,) in
                    [0, 1] (cut at 0.5, as :func:`surrogate_report`) or scores
                    (n, classes) (argmax).
        name (str, optional): what ``cams`` is, for the table.
                    Default: ``"GradCAM"``

    Returns:
        *CamAgreement*: per-tile IoU and correlation, summaries and a table.

    Raises:
        ValueError: shapes that do not match (use ``LayerAttribution.interpolate``
                    to bring maps to one grid), a wrong number of labels,
                    fractional labels outside [0, 1], or NaN in any input.
    """
    m = _maps(maps)
    c = _np(cams, "cams").astype(np.float64)
    if c.ndim == 4 and c.shape[1] == 1:
        c = c[:, 0]
    n, k, h, w = m.shape
    if c.shape != (n, h, w):
        raise ValueError(
            f"cams must be N x h x w = {(n, h, w)} to match the concept maps, got {c.shape}; "
            "compute CAMs at the concepts' layer or interpolate one grid to the other."
        )
    _check_finite(c, "cams")
    labels = _predicted_labels(predicted_labels, n)
    flat = c.reshape(n, -1)
    scaled = (np.abs(flat.min(axis=1)) < 1e-6) & (np.abs(flat.max(axis=1) - 1) < 1e-3)
    mask = bool(np.isin(c, (0.0, 1.0)).all())  # a binary map (e.g. a nuclei mask) is no CAM
    if not mask and scaled.mean() > 0.9 and float((c > 0).mean()) > 0.5:
        warnings.warn(
            f"{name} has minimum 0 and maximum 1 on {100 * scaled.mean():.0f} % of tiles and is "
            f"> 0 on {100 * float((c > 0).mean()):.0f} % of locations: it looks ReLU'd and "
            "min-max scaled (pytorch-grad-cam's output), so '> 0' is almost everywhere. Use "
            "captum_nmf.compare.cam_maps for signed CAMs.",
            CamScaleWarning,
            stacklevel=2,
        )
    concept_pos = m > 0
    cam_pos = (c > 0)[:, None]
    inter = (concept_pos & cam_pos).sum(axis=(2, 3))
    union = (concept_pos | cam_pos).sum(axis=(2, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
        xm, norm_m = _centred(m.reshape(n, k, -1))
        xc, norm_c = _centred(c.reshape(n, 1, -1))
        corr = (xm * xc).sum(axis=2) / (norm_m * norm_c)
    corr[~np.isfinite(corr)] = np.nan
    overall = _summary(iou, corr)
    by_label: dict[int, dict[str, Array]] = {}
    for value in np.unique(labels).tolist():
        sel = labels == value
        by_label[value] = _summary(iou[sel], corr[sel])
    summary = {"all": overall, **{f"label {v}": stats for v, stats in by_label.items()}}
    counts = [(v, int((labels == v).sum()), stats) for v, stats in by_label.items()]
    table = agreement_table(overall, counts, name)
    return CamAgreement(iou, corr, labels, summary, table, name, by_label)
