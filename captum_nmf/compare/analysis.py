"""``analyse``: the paper's three analyses in one call, and reproducible tile samples."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from captum_nmf._core.nmf_concept import NMFConceptAttribution
from captum_nmf._utils import activations as acts
from captum_nmf._utils.validation import check_int
from captum_nmf.compare.cams import CAM_METHODS, CamMethod, cam_maps
from captum_nmf.compare.metrics import (
    CamAgreement,
    ConceptCorrelation,
    ConceptSimilarity,
    SurrogateFeature,
    SurrogateReport,
    cam_agreement,
    concept_similarity,
    surrogate_report,
    weight_correlation,
)
from captum_nmf.compare.tables import Table
from captum_nmf.io import write_owned_files

__all__ = ["AnalysisResult", "TileSample", "analyse", "sample_tiles"]

_CAM_NAMES = {"gradcam": "GradCAM", "gradcam++": "GradCAM++", "hirescam": "HiResCAM"}


@dataclass
class TileSample:
    """A reproducible random sample of tiles.

    Attributes:
        indices (ndarray): the chosen positions (sorted): in the tensor or
                    Dataset; for slide explanations, among the readable tiles
                    of all slides in order (``groups`` and ``locations`` name
                    each tile's slide and place).
        inputs (Tensor or None): the tiles themselves (from a tensor or a Dataset).
        maps (ndarray or None): N x K x h x w concept maps (from slide explanations).
        outputs (ndarray or None): N x O model outputs (from slide explanations).
        groups (ndarray or None): a group (slide) id per tile, when known.
        locations (ndarray or None): level-0 (x, y) per tile, for slides.
    """

    indices: NDArray[np.int64]
    inputs: Tensor | None = None
    maps: NDArray[np.float32] | None = None
    outputs: NDArray[np.float32] | None = None
    groups: NDArray[np.int64] | None = None
    locations: NDArray[np.int64] | None = None


def _choose(total: int, n: int | None, random_state: int) -> NDArray[np.int64]:
    if total == 0:
        raise ValueError("the source holds 0 tiles; nothing to sample.")
    count = check_int("n", n, optional=True)
    if count is None or count >= total:
        return np.arange(total, dtype=np.int64)
    rng = np.random.default_rng(random_state)
    return np.sort(rng.choice(total, size=count, replace=False)).astype(np.int64)


def _first(item: Any) -> Tensor:
    image = item[0] if isinstance(item, (tuple, list)) else item
    if not isinstance(image, Tensor):
        raise TypeError(
            f"dataset items must be tensors or (tensor, ...), got {type(image).__name__}."
        )
    return image


def sample_tiles(source: Any, n: int | None, *, random_state: int = 0) -> TileSample:
    r"""Draw ``n`` tiles without replacement, reproducibly (the paper: 10,000 tiles).

    Args:
        source: an N x ... tensor of tiles; a map-style ``Dataset`` of tiles
                    (e.g. :class:`captum_nmf.wsi.SlideTiles`, whose slide index
                    becomes the group); or a sequence of
                    :class:`captum_nmf.wsi.SlideExplanation`, whose tiles' windows
                    of the stitched concept maps and kept model outputs are
                    returned (tiles that could not be read are left out).
        n (int or None): tiles to draw; None or more than available takes all.
        random_state (int, optional): seed.
                    Default: 0

    Returns:
        *TileSample*: indices and, by source, ``inputs`` or ``maps`` and ``outputs``.

    Raises:
        ValueError: an empty source or a bad ``n``.
        TypeError: an unsupported source.
    """
    if isinstance(source, Tensor):
        idx = _choose(source.shape[0], n, random_state)
        return TileSample(idx, inputs=source[torch.from_numpy(idx).to(source.device)])
    if isinstance(source, Dataset):
        idx = _choose(len(source), n, random_state)  # type: ignore[arg-type]
        inputs = torch.stack([_first(source[int(i)]) for i in idx])
        groups = None
        if hasattr(source, "locate"):
            groups = np.asarray([source.locate(int(i))[0] for i in idx], dtype=np.int64)
        return TileSample(idx, inputs=inputs, groups=groups)
    if (
        isinstance(source, Sequence)
        and source
        and all(hasattr(e, "tile_locations") for e in source)
    ):
        return _sample_explanations(source, n, random_state)
    raise TypeError(
        "source must be a tensor of tiles, a map-style Dataset or a sequence of "
        f"SlideExplanation, got {type(source).__name__}."
    )


def _sample_explanations(explanations: Sequence[Any], n: int | None, seed: int) -> TileSample:
    pairs = []
    for s, ex in enumerate(explanations):
        ok = np.ones(len(ex.tile_locations), bool)
        if ex.tile_outputs is not None:
            ok = np.isfinite(ex.tile_outputs).all(axis=1)
        pairs += [(s, t) for t in np.flatnonzero(ok)]
    chosen = _choose(len(pairs), n, seed)
    maps, outputs, groups, locations = [], [], [], []
    for i in chosen:
        s, t = pairs[int(i)]
        ex = explanations[s]
        maps.append(ex.tile_window(t))
        if ex.tile_outputs is not None:
            outputs.append(ex.tile_outputs[t])
        groups.append(s)
        locations.append(tuple(int(v) for v in ex.tile_locations[t]))
    return TileSample(
        chosen,
        maps=np.stack(maps),
        outputs=np.stack(outputs) if len(outputs) == len(maps) else None,
        groups=np.asarray(groups, np.int64),
        locations=np.asarray(locations, np.int64),
    )


def _blocks(data: Any, indices: NDArray[np.int64]) -> NDArray[np.int64] | None:
    """Spatial block (4 x 4 grid positions) of each drawn tile of a SlideTiles-like dataset."""
    if not (hasattr(data, "locate") and hasattr(data, "grids")):
        return None
    ids = []
    for i in indices:
        s, t = data.locate(int(i))
        grid = data.grids[s]
        ids.append((s * 100_000 + int(grid.rows[t]) // 4) * 100_000 + int(grid.cols[t]) // 4)
    blocks = np.asarray(ids, dtype=np.int64)
    return blocks if len(np.unique(blocks)) >= 2 else None


@dataclass
class AnalysisResult:
    """The three analyses of :func:`analyse`, renderable as markdown and savable.

    Attributes:
        similarity (ConceptSimilarity): cosine similarity of concept vectors.
        correlation (ConceptCorrelation): correlation of concept weights.
        surrogate (SurrogateReport or None): the surrogate model (None with a
                    reason in ``notes`` when the tiles hold one predicted label,
                    or the split left one label on the training side).
        cams (dict[str, CamAgreement]): agreement with each CAM method.
        predictions (ndarray): the model's predicted label per tile.
        n_tiles (int): tiles analysed.
        notes (list[str]): anything left out, and why.
        indices (ndarray): positions of the analysed tiles in ``data``.
        concept_maps (ndarray): N x K x h x w concept maps of those tiles.
        cam_values (dict[str, ndarray]): N x h x w signed CAM maps per method.
        outputs (ndarray): N x classes model outputs.
    """

    similarity: ConceptSimilarity
    correlation: ConceptCorrelation
    surrogate: SurrogateReport | None
    cams: dict[str, CamAgreement]
    predictions: NDArray[np.int64]
    n_tiles: int
    notes: list[str] = field(default_factory=list)
    indices: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    concept_maps: NDArray[np.float32] = field(
        default_factory=lambda: np.zeros((0, 0, 0, 0), np.float32), repr=False
    )
    cam_values: dict[str, NDArray[np.float32]] = field(default_factory=dict, repr=False)
    outputs: NDArray[np.float32] = field(
        default_factory=lambda: np.zeros((0, 0), np.float32), repr=False
    )

    def tables(self) -> dict[str, Table]:
        """Every table by a file-friendly name."""
        out = {
            "concept_similarity": self.similarity.table,
            "weight_correlation": self.correlation.table,
        }
        if self.surrogate is not None:
            out["surrogate"] = self.surrogate.table
        for name, agreement in self.cams.items():
            out[f"cam_{name.replace('++', 'pp')}"] = agreement.table
        return out

    def to_markdown(self) -> str:
        """All tables as markdown, with the notes."""
        parts = [f"Analysis of {self.n_tiles} tiles"]
        parts += [t.to_markdown() for t in self.tables().values()]
        parts += [f"Note: {note}" for note in self.notes]
        return "\n\n".join(parts) + "\n"

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``analysis.json`` (all tables and numbers), one CSV per table and ``analysis.md``.

        All are written atomically and together, the record ``analysis.json``
        last; it lists the other files with their SHA-256. Writing again into
        the folder replaces only those files, and removes the tables the new
        analysis has not (a ``surrogate.csv`` of an earlier target).

        Args:
            directory (str or PathLike): created if missing.

        Returns:
            *Path*: the directory.

        Raises:
            FileExistsError: the folder holds a file of one of these names
                        that captum-nmf did not write, or one edited since
                        (nothing is written).
        """
        tables = self.tables()
        files = {f"{name}.csv": t.to_csv().encode("utf-8") for name, t in tables.items()}
        files["analysis.md"] = self.to_markdown().encode("utf-8")
        content = {
            "n_tiles": self.n_tiles,
            "notes": self.notes,
            "tables": {name: t.to_dict() for name, t in tables.items()},
            "surrogate_metrics": None if self.surrogate is None else self.surrogate.metrics,
            "predicted_label_counts": {
                str(int(v)): int((self.predictions == v).sum()) for v in np.unique(self.predictions)
            },
        }
        # a table of the last analysis that this one has not (surrogate.csv) is removed
        return write_owned_files(directory, RECORD, files, content, legacy_files)


#: The record of an analysis folder: written last, it lists the files written with it.
RECORD = "analysis.json"


def analysis_files() -> list[str]:
    """Every file an analysis may write (its record last): for checking a folder before work."""
    tables = ["concept_similarity", "weight_correlation", "surrogate"]
    tables += [f"cam_{m.replace('++', 'pp')}" for m in CAM_METHODS]
    return [f"{t}.csv" for t in tables] + ["analysis.md", RECORD]


def legacy_files(record: dict[str, Any]) -> list[str]:
    """The files an ``analysis.json`` written before its file list names: its tables, the text."""
    return [f"{name}.csv" for name in record.get("tables", {})] + ["analysis.md"]


def _check_cam_methods(cam_methods: Any) -> tuple[CamMethod, ...]:
    """``cam_methods`` as a tuple of known, distinct methods; refused before any work."""
    if isinstance(cam_methods, str):
        raise TypeError(
            f"cam_methods must be a sequence of methods, got the string {cam_methods!r}; "
            f"pass ({cam_methods!r},)."
        )
    methods = tuple(cam_methods)
    for method in methods:
        if method not in CAM_METHODS:
            raise ValueError(f"cam_methods must be among {CAM_METHODS}, got {method!r}.")
    repeated = sorted({m for m in methods if methods.count(m) > 1})
    if repeated:
        raise ValueError(
            f"cam_methods names {', '.join(map(repr, repeated))} twice; name each once."
        )
    return methods


def analyse(
    attr: NMFConceptAttribution,
    data: Any,
    *,
    target: int = 1,
    cam_methods: Sequence[CamMethod] = CAM_METHODS,
    n_tiles: int | None = None,
    groups: Any = None,
    surrogate_feature: SurrogateFeature = "sum",
    batch_size: int = 16,
    random_state: int = 0,
    progress: bool = True,
) -> AnalysisResult:
    r"""Run the paper's three analyses on tiles: structure, surrogate, CAM agreement.

    Tiles are drawn with :func:`sample_tiles`; for each batch the concept
    maps, the model's output (its predicted label = argmax) and the CAMs of
    ``target`` at the concepts' layer (its input for concepts fitted with
    ``attribute_to_layer_input=True``) are computed; then
    :func:`concept_similarity`, :func:`weight_correlation`,
    :func:`surrogate_report` (predicting the model's label) and
    :func:`cam_agreement` per CAM method.

    Args:
        attr (NMFConceptAttribution): fitted concepts; its model and layer are used.
        data (Tensor or Dataset): N x 3 x H x W tiles, or a map-style Dataset
                    of tiles (e.g. :class:`captum_nmf.wsi.SlideTiles`: the
                    slide becomes the group of the surrogate's split). Each batch
                    is moved to the model's device.
        target (int, optional): the output explained by the CAMs (the positive class).
                    Default: 1
        cam_methods (sequence of str, optional): any of ``"gradcam"``,
                    ``"gradcam++"``, ``"hirescam"``.
                    Default: all three
        n_tiles (int, optional): tiles drawn (None: all).
                    Default: None
        groups (array-like, optional): group ids of the drawn tiles for the
                    surrogate's split (overrides the dataset's slides).
                    Default: None
        surrogate_feature (str, optional): see :func:`surrogate_features`.
                    Default: ``"sum"``
        batch_size (int, optional): tiles per forward pass.
                    Default: 16
        random_state (int, optional): seed of the sample and of the split.
                    Default: 0
        progress (bool, optional): show a tqdm progress bar.
                    Default: True

    Returns:
        *AnalysisResult*: the tables, numbers and notes.

    Raises:
        NotFittedError: ``attr`` is not fitted.
        TypeError: ``cam_methods`` given as one string.
        ValueError: an unknown or repeated CAM method, an empty source, or a
                    model whose output is not N x (classes >= 2).
    """
    attr.check_fitted("analyse")
    methods = _check_cam_methods(cam_methods)
    to_input = bool(getattr(attr, "attribute_to_layer_input_", False))
    sample = sample_tiles(data, n_tiles, random_state=random_state)
    if sample.inputs is None:
        raise TypeError("analyse needs tiles (a tensor or a Dataset), not slide explanations.")
    x_all = sample.inputs
    device = acts.model_device(attr.forward_func, attr.layer) or x_all.device
    maps, outputs = [], []
    cams: dict[str, list[Tensor]] = {m: [] for m in methods}
    starts = range(0, x_all.shape[0], batch_size)
    for start in tqdm(starts, disable=not progress, desc="analyse", unit="batch"):
        x = x_all[start : start + batch_size].to(device)  # tiles are read on the CPU
        maps.append(attr.attribute(x, attribute_to_layer_input=to_input).detach().cpu())
        _, out = attr.features(x, return_output=True)
        if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[1] < 2:
            raise ValueError(
                "analyse needs a classifier whose output is N x classes (>= 2) scores; got "
                f"{type(out).__name__} {tuple(out.shape) if isinstance(out, Tensor) else ''}."
            )
        outputs.append(out.detach().cpu())
        for method in methods:
            cam = cam_maps(
                attr.forward_func, attr.layer, x, method, target, attribute_to_layer_input=to_input
            )
            cams[method].append(cam.cpu())
    m = torch.cat(maps).numpy()
    scores = torch.cat(outputs)
    predictions = scores.argmax(dim=1).numpy().astype(np.int64)
    cam_values: dict[str, NDArray[np.float32]] = {
        method: torch.cat(cams[method]).float().numpy() for method in methods
    }
    notes = []
    group_ids = groups if groups is not None else sample.groups
    if group_ids is not None and len(np.unique(np.asarray(group_ids))) < 2:
        group_ids = _blocks(data, sample.indices)
        notes.append(
            "all tiles come from one slide: the surrogate holds out blocks of 4 x 4 tile "
            "positions, so overlapping tiles stay on one side."
            if group_ids is not None
            else "all tiles come from one group: the surrogate split is by tile."
        )
    surrogate = None
    binary = np.where(predictions == target, 1, 0)
    if len(np.unique(binary)) < 2:  # the surrogate predicts "label == target": one class
        labels = np.unique(predictions)
        said = (
            f"every tile is predicted as the target label {target}"
            if binary.all()
            else f"no tile is predicted as the target label {target}"
        )
        shown = ", ".join(str(int(v)) for v in labels[:5]) + (", ..." if len(labels) > 5 else "")
        notes.append(
            f"{said} (predicted labels: {shown}): no surrogate model; choose a target that some "
            "tiles are predicted as and others are not."
        )
    else:
        try:
            surrogate = surrogate_report(
                m, binary, groups=group_ids, feature=surrogate_feature, random_state=random_state
            )
        except ValueError as error:  # a split it cannot fit (one class on the training side)
            notes.append(f"no surrogate model: {error}")
    names = attr.concept_names  # the tables show the concepts' names

    def named(result: Any) -> Any:
        return replace(result, table=result.table.with_concept_names(names))

    agreements: dict[str, CamAgreement] = {
        method: named(cam_agreement(m, cam_values[method], predictions, name=_CAM_NAMES[method]))
        for method in methods
    }
    return AnalysisResult(
        named(concept_similarity(attr)),
        named(weight_correlation(m)),
        None if surrogate is None else named(surrogate),
        agreements,
        predictions,
        int(m.shape[0]),
        notes,
        sample.indices,
        m,
        cam_values,
        scores.float().numpy(),
    )
