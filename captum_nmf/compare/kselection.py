"""The result of :func:`~captum_nmf.compare.selection.select_k`: per-K errors, stability, output."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from captum_nmf.compare.stability import ConceptStability, concepts_digest
from captum_nmf.compare.tables import Table
from captum_nmf.io import load_tensors, sha256_file, tensor_file_bytes, write_owned_files

__all__ = ["KSelection"]

#: The record of a K sweep's folder: written last, it lists the files written with it.
RECORD = "select_k.json"
#: Each K's reference concepts (K x C float32, tensor ``k<K>``), written with the record.
CONCEPTS_FILE = "select_k_concepts.safetensors"
CONCEPTS_FORMAT = "captum-nmf/select-k-concepts"


def legacy_files(record: dict[str, Any]) -> list[str]:
    """The files a ``select_k.json`` written before its file list names (fixed names)."""
    return ["select_k.csv", "select_k_concepts.csv", "select_k.md", "select_k.png"]


_PERTURBATION_TEXT = {
    "resample": "each on a seeded half of the training tiles",
    "init": "each from a random initialisation on every training row",
}


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

    def save(self, directory: str | os.PathLike[str], *, figure: bytes | None = None) -> Path:
        """Write ``select_k.csv``, ``select_k_concepts.csv``, ``select_k.md`` and ``select_k.json``.

        And ``select_k_concepts.safetensors``: each K's reference concepts, so
        that :meth:`load` gives the whole result back. All are written
        atomically and together (the JSON record last, listing the other files
        with their SHA-256): an error leaves every file as it was. Writing
        again into the folder replaces only the files it lists.

        Args:
            directory (str or PathLike): created if missing.
            figure (bytes, optional): a PNG of the sweep (e.g.
                        :func:`~captum_nmf.viz.plot_select_k` saved to bytes),
                        written with them as ``select_k.png``.
                        Default: None

        Returns:
            *Path*: the directory.

        Raises:
            FileExistsError: the folder holds a file of one of these names
                        that captum-nmf did not write, or one edited since
                        (nothing is written).
        """
        files = {
            "select_k.csv": self.to_csv().encode("utf-8"),
            "select_k_concepts.csv": self.concept_table().to_csv().encode("utf-8"),
            "select_k.md": self.to_markdown().encode("utf-8"),
        }
        if self.concepts:  # a result loaded from a record without them has none
            files[CONCEPTS_FILE] = tensor_file_bytes(
                {
                    f"k{k}": torch.from_numpy(np.ascontiguousarray(v))
                    for k, v in self.concepts.items()
                },
                {"ks": json.dumps(sorted(self.concepts))},
                format_name=CONCEPTS_FORMAT,
            )
        if figure is not None:
            files["select_k.png"] = bytes(figure)
        # an earlier sweep's figure, when this one has none, is removed
        return write_owned_files(directory, RECORD, files, self.to_dict(), legacy_files)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> KSelection:
        """The result :meth:`save` (or ``captum-nmf select-k``) wrote into ``directory``.

        Every number comes back as it was saved, and each K's concepts from
        ``select_k_concepts.safetensors`` (checked against the SHA-256 the
        record lists and its own content digest, and tied to the stability
        measured on them). A record written before that file existed gives
        ``concepts`` empty, with a note saying so.

        Args:
            directory (str or PathLike): the folder, or its ``select_k.json``.

        Returns:
            *KSelection*: the sweep; :meth:`figure_data`, :meth:`to_markdown` and
            :func:`~captum_nmf.viz.plot_select_k` work on it as on a fresh one.

        Raises:
            FileNotFoundError: no ``select_k.json`` there, or a concepts file it lists is gone.
            ValueError: the record is not one ``select_k`` wrote, or its concepts file
                        was changed since (a flipped byte, or another sweep's) or does not
                        match the record's K, C and stability.
            ConceptModelFormatError: the concepts file is not a valid file of its format.
        """
        path = Path(directory)
        folder = path.parent if path.name == RECORD and path.is_file() else path
        record_path = folder / RECORD
        if not record_path.is_file():
            raise FileNotFoundError(
                f"no {RECORD} in {folder}: pass the folder KSelection.save or "
                "`captum-nmf select-k --out` wrote."
            )
        try:
            data = json.loads(record_path.read_text(encoding="utf-8"))
            result = cls._from_record(data)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            raise ValueError(
                f"{record_path} is not a select_k record captum-nmf can read ({exc!r}); "
                "run select_k again and save it."
            ) from exc
        files = data.get("files") or {}
        if CONCEPTS_FILE not in files:
            result.notes.append(
                f"the concepts of each K were not saved with this record (no {CONCEPTS_FILE}: "
                "an earlier captum-nmf); fit the chosen K again to get them."
            )
            return result
        result.concepts = _load_concepts(folder / CONCEPTS_FILE, str(files[CONCEPTS_FILE]), result)
        return result

    @classmethod
    def _from_record(cls, data: dict[str, Any]) -> KSelection:
        """The result of :meth:`to_dict`'s record, without its concepts."""
        ks = [int(k) for k in data["ks"]]
        sample = data["sample"]

        def floats(name: str) -> NDArray[np.float64]:
            values = np.asarray([np.nan if v is None else v for v in data[name]], np.float64)
            if values.shape != (len(ks),):
                raise ValueError(f"{name} has {values.size} values for {len(ks)} K")
            return values

        stability = {k: ConceptStability.from_dict(data["stability"][str(k)]) for k in ks}
        for k in ks:
            if stability[k].n_concepts != k:
                raise ValueError(f"the stability of K = {k} has {stability[k].n_concepts} rows")
        recommended = data["recommended"]
        return cls(
            ks=ks,
            heldout_error=floats("heldout_error"),
            train_error=floats("train_error"),
            gain=floats("gain"),
            stability=stability,
            concepts={},
            fit_seconds=floats("fit_seconds"),
            stability_seconds=floats("stability_seconds"),
            recommended=None if recommended is None else int(recommended),
            rule=str(data["rule"]),
            gain_threshold=float(data["gain_threshold"]),
            stable_cosine=float(data["stable_cosine"]),
            n_seeds=int(sample["n_seeds"]),
            holdout=float(sample["holdout"]),
            split_by=str(sample["split_by"]),
            heldout_tiles=np.asarray(sample["heldout_tiles"], np.int64).reshape(-1),
            train_tiles=np.asarray(sample["train_tiles"], np.int64).reshape(-1),
            n_train_rows=int(sample["n_train_rows"]),
            n_heldout_rows=int(sample["n_heldout_rows"]),
            n_tiles_seen=int(sample["n_tiles_seen"]),
            locations_per_tile=int(sample["locations_per_tile"]),
            n_channels=int(sample["n_channels"]),
            layer_name=sample.get("layer_name"),
            perturbation=str(sample.get("perturbation", "resample")),
            sample_seconds=float(sample.get("sample_seconds", 0.0)),
            notes=[str(n) for n in data.get("notes", [])],
        )


def _load_concepts(path: Path, recorded: str, result: KSelection) -> dict[int, NDArray[np.float32]]:
    """Each K's concepts from ``path``, checked against the record and ``result``.

    Raises:
        FileNotFoundError: the file is gone.
        ValueError: changed since the record was written, or not the record's concepts.
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is listed in {RECORD} but missing; save the sweep again (or load a copy)."
        )
    if sha256_file(path) != recorded:
        raise ValueError(
            f"{path} changed since {RECORD} was written (its SHA-256 differs from the one "
            "recorded): it is damaged or another sweep's. Restore it from a copy or save the "
            "sweep again."
        )
    tensors, _ = load_tensors(path, format_name=CONCEPTS_FORMAT)
    concepts: dict[int, NDArray[np.float32]] = {}
    for k in result.ks:
        tensor = tensors.get(f"k{k}")
        if tensor is None or tuple(tensor.shape) != (k, result.n_channels):
            got = None if tensor is None else tuple(tensor.shape)
            raise ValueError(
                f"{path} does not hold the {k} x {result.n_channels} concepts of K = {k} "
                f"(got {got}); save the sweep again."
            )
        values = tensor.numpy().astype(np.float32, copy=False)
        reference = result.stability[k].reference
        if reference is not None and concepts_digest(values) != reference:
            raise ValueError(
                f"{path}: the concepts of K = {k} are not the ones their stability was "
                "measured on; save the sweep again."
            )
        concepts[k] = values
    return concepts
