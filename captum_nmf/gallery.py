"""Prototype galleries: the tiles where each concept is strongest, its intensity beside them."""

from __future__ import annotations

import csv
import io
import numbers
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor
from tqdm.auto import tqdm

from captum_nmf._utils.activations import model_device
from captum_nmf._utils.spreadsheet import safe_cell
from captum_nmf._utils.validation import check_int
from captum_nmf._version import __version__
from captum_nmf.engines.batches import (
    batch_dataset,
    check_batch_inputs,
    item_ids,
    model_inputs,
    on_device,
    one_pass,
    tile_dataset,
)
from captum_nmf.exceptions import CaptumNMFWarning
from captum_nmf.io import claim_outputs, write_owned_files

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from captum_nmf import NMFConceptAttribution

__all__ = ["MIN_SCORE_FRACTION", "RECORD", "ConceptGallery", "concept_gallery"]

_FIELDS = ["concept", "name", "rank", "tile", "mean_intensity", "x", "y", "slide"]

#: The record of a gallery folder: written last, it lists the files saved with it (SHA-256).
RECORD = "gallery.json"
_FORMAT = "captum-nmf/gallery"

#: A tile scoring at most this fraction of the best score of any concept (concepts are unit
#: vectors, so their scores compare) shows none of its concept: it is left out of the gallery.
MIN_SCORE_FRACTION = 1e-3


def _our_gallery(path: Path) -> bool:
    """Whether ``path`` is a ``gallery.csv`` of this module's layout (its header is ours)."""
    try:
        with path.open(newline="") as fh:
            return next(csv.reader(fh), None) == _FIELDS
    except (OSError, UnicodeDecodeError, csv.Error):
        return False


#: Tiles more alike than this (correlation of their 16 x 16 grey thumbnails) are near-duplicates.
DUPLICATE_CORRELATION = 0.95


@dataclass
class _Entry:
    score: float
    tile: int
    image: NDArray[np.float64]  # h x w x 3 in [0, 1]
    intensity: NDArray[np.float64]  # the concept's map, cells
    location: tuple[int, int] | None
    slide: str | None = None  # the slide file of a SlideTiles tile


@dataclass
class ConceptGallery:
    """The top tiles of every concept (:func:`concept_gallery`).

    Attributes:
        names (list[str]): the concepts' names.
        entries (list[list]): per concept, its tiles from the strongest down:
                    ``(score, tile index, image, intensity map, level-0 location or None)``;
                    empty for a concept no tile shows (see ``min_score``).
        min_score (float): tiles scoring at most this were left out.
    """

    names: list[str]
    entries: list[list[_Entry]] = field(default_factory=list)
    min_score: float = 0.0

    def table(self) -> list[dict[str, Any]]:
        """One row per shown tile: concept, name, rank, tile, slide, mean intensity, location.

        Returns:
            *list[dict]*: the rows.
        """
        rows = []
        for j, entries in enumerate(self.entries):
            for rank, e in enumerate(entries):
                x, y = e.location if e.location is not None else (None, None)
                rows.append(
                    {
                        "concept": j,
                        "name": self.names[j],
                        "rank": rank,
                        "tile": e.tile,
                        "slide": e.slide,
                        "mean_intensity": e.score,
                        "x": x,
                        "y": y,
                    }
                )
        return rows

    def figure(self, concept: int) -> Figure:
        """Concept ``concept``'s tiles, each with its intensity over it beside the tile.

        Args:
            concept (int): the concept's index.

        Returns:
            *Figure*: a matplotlib figure (not attached to pyplot); for a
            concept without tiles, its name and a line saying so.

        Raises:
            IndexError: no such concept.
        """
        from matplotlib.figure import Figure as _Figure

        from captum_nmf.viz import overlay

        if not 0 <= concept < len(self.entries):
            raise IndexError(f"there is no concept {concept} (0 to {len(self.entries) - 1}).")
        entries = self.entries[concept]
        n = max(1, len(entries))
        fig = _Figure(figsize=(4.0, 2.0 * n), layout="constrained")
        axes = fig.subplots(n, 2, squeeze=False)
        k = len(self.names)
        for row, e in enumerate(entries):
            maps = np.zeros((k, *e.intensity.shape))
            maps[concept] = e.intensity
            axes[row][0].imshow(e.image)
            axes[row][1].imshow(overlay(e.image, maps, alpha=0.7))
            where = "" if e.slide is None else f" of {Path(e.slide).name}"
            where += "" if e.location is None else f" at {e.location[0]}, {e.location[1]}"
            axes[row][0].set_title(f"tile {e.tile}{where}", fontsize="small")
            axes[row][1].set_title(f"mean intensity {e.score:.3g}", fontsize="small")
        if not entries:
            fig.text(
                0.5,
                0.5,
                f"no tile scores above {self.min_score:.3g}",
                ha="center",
                va="center",
                fontsize="small",
            )
        for ax in axes.ravel():
            ax.set_axis_off()
        fig.suptitle(self.names[concept])
        return fig

    def to_csv(self) -> str:
        """:meth:`table` as CSV text (the ``gallery.csv`` that :meth:`save` writes).

        Returns:
            *str*: the header and one line per shown tile.
        """
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=_FIELDS)
        writer.writeheader()
        # a concept name or slide path never a formula in a spreadsheet
        writer.writerows({k: safe_cell(v) for k, v in row.items()} for row in self.table())
        return text.getvalue()

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``gallery_concept_<k>.png`` per concept, ``gallery.csv`` and ``gallery.json``.

        All are written atomically and together: every figure is drawn and
        every file written in full before any file of the folder is replaced,
        so an error (a figure that fails, a full disk) leaves the folder as it
        was. The record ``gallery.json``, written last, lists each file with
        its SHA-256. Saving again into the folder replaces only files that
        record lists and that are unchanged since, and removes the files of
        the last save that this one does not write (the figures of concepts
        beyond a smaller gallery's). A file the record lists that was edited
        since is neither replaced nor removed: the save is refused. Files the
        record does not list (a user's own) are left alone.

        A folder holding a gallery saved by an earlier captum-nmf, before the
        record existed (our ``gallery.csv`` without ``gallery.json``), is taken
        over as the earlier version did: its ``gallery.csv`` and
        ``gallery_concept_<k>.png`` are replaced, and none of its files is
        removed (figures of concepts beyond this gallery's stay, unlisted in
        the new record: they cannot be told from a user's).

        Args:
            directory (str or PathLike): the folder, created if missing.

        Returns:
            *Path*: the directory.

        Raises:
            FileExistsError: the folder holds a file of one of these names
                        that captum-nmf did not write, a file the record
                        lists that was edited since, or a ``gallery.json``
                        that is not a gallery record (nothing is written).
        """
        out = Path(directory)
        names = [f"gallery_concept_{j}.png" for j in range(len(self.entries))]
        adopted = _earlier_gallery(out)
        # the folder checked before any figure is drawn
        claim_outputs(out, RECORD, [*names, "gallery.csv", RECORD], _no_legacy, adopted)
        files: dict[str, bytes] = {}
        for j, name in enumerate(names):
            buffer = io.BytesIO()
            self.figure(j).savefig(buffer, format="png", dpi=100)
            files[name] = buffer.getvalue()
        files["gallery.csv"] = self.to_csv().encode("utf-8")
        content = {
            "format": _FORMAT,
            "captum_nmf_version": __version__,
            "names": list(self.names),
            "min_score": self.min_score,
        }
        return write_owned_files(out, RECORD, files, content, _no_legacy, adopted)


def _earlier_gallery(out: Path) -> list[str]:
    """The files of a gallery an earlier version saved in ``out`` (before the record), if any.

    Recognised by our ``gallery.csv`` header without a ``gallery.json``; its
    figures are the ``gallery_concept_<k>.png`` beside it, as it wrote them.
    """
    if (out / RECORD).exists() or not _our_gallery(out / "gallery.csv"):
        return []
    figures = [
        p.name
        for p in out.glob("gallery_concept_*.png")
        if p.stem.removeprefix("gallery_concept_").isdigit()
    ]
    return ["gallery.csv", *sorted(figures)]


def _no_legacy(record: dict[str, Any]) -> Sequence[str]:
    """A gallery record always lists its files: one without that list is not ours."""
    raise ValueError(f"it lists no files (keys {sorted(record)})")


def concept_gallery(
    attr: NMFConceptAttribution,
    source: Tensor | Iterable[Any] | Any,
    *,
    top_n: int = 6,
    batch_size: int = 16,
    labels: Sequence[str] | None = None,
    images: Tensor | None = None,
    additional_forward_args: Any = None,
    batch_inputs: Callable[[Any], Any] | None = None,
    min_score_fraction: float = MIN_SCORE_FRACTION,
    progress: bool = True,
) -> ConceptGallery:
    r"""The ``top_n`` tiles of every concept by mean intensity, near-duplicates left out.

    One pass over the source with :meth:`NMFConceptAttribution.attribute`.
    A tile's score for a concept is the mean of the concept's intensity over
    the tile. A tile is left out of a concept's gallery when it nearly repeats
    a better-ranked one: for :class:`~captum_nmf.wsi.SlideTiles`, when the two
    are tiles of one slide less than half a tile apart along both axes (half
    of that slide's level-0 tile size, so slides scanned at different
    resolutions are each judged by their own tile); otherwise when their
    16 x 16 grey thumbnails correlate above 0.95. Tiles of a ``SlideTiles``
    are shown as read from the slide (before its ``transform``); other tiles
    as given, rescaled to [0, 1] when they are not in that range.

    A tile whose score is at most ``min_score_fraction`` of the best score
    of any concept on these tiles shows none of the concept and is left out
    (the concepts are unit vectors, so their scores compare): a concept
    absent from the tiles gets an empty gallery rather than its six
    least-empty tiles, and a concept present in fewer than ``top_n`` tiles
    shows only those. A :class:`~captum_nmf.exceptions.CaptumNMFWarning`
    names each concept that lost tiles this way.

    Args:
        attr (NMFConceptAttribution): fitted concepts.
        source (Tensor, iterable of batches or map-style Dataset): the tiles
                    (N x 3 x H x W; batches may be ``(x, ...)`` tuples).
        top_n (int, optional): tiles per concept.
                    Default: 6
        batch_size (int, optional): tiles per forward (tensors and datasets).
                    Default: 16
        labels (sequence of str, optional): concept names.
                    Default: None (``attr.concept_names``)
        images (Tensor, optional): N x 3 x H x W images in [0, 1] to show for
                    the tiles of a tensor or batch source, in stream order
                    (e.g. the tiles before their normalisation).
                    Default: None (the tiles as given)
        additional_forward_args (Any, optional): extra arguments of the
                    model, as for :meth:`NMFConceptAttribution.attribute`.
                    Default: None
        batch_inputs (Callable, optional): turns one batch into the model's
                    inputs, as for :meth:`NMFConceptAttribution.fit`; the
                    first input is the one shown.
                    Default: None (the batch, or its first element)
        min_score_fraction (float, optional): tiles scoring at most this
                    fraction of the best score over all concepts are left
                    out; 0 keeps every tile with a score above 0.
                    Default: 1e-3 (:data:`MIN_SCORE_FRACTION`)
        progress (bool, optional): show a tqdm progress bar.
                    Default: True

    Returns:
        *ConceptGallery*: per concept its tiles, ``figure(k)``, ``save(dir)``.

    Raises:
        NotFittedError: ``attr`` is not fitted.
        TypeError, ValueError: a bad ``top_n``, ``batch_size`` or
                    ``min_score_fraction``, an empty source, or a bad
                    ``batch_inputs`` (see :meth:`NMFConceptAttribution.fit`).

    Warns:
        CaptumNMFWarning: a concept lost tiles to ``min_score_fraction``
                    (named, with its best score): it is absent from, or
                    rare in, these tiles.
    """
    attr.check_fitted("concept_gallery")
    top_n = check_int("top_n", top_n, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    batch_inputs = check_batch_inputs(batch_inputs)
    min_score_fraction = _check_fraction("min_score_fraction", min_score_fraction)
    k = int(attr.concepts_.shape[0])
    names = list(labels) if labels is not None else attr.concept_names
    if len(names) != k:
        raise ValueError(f"labels must hold {k} names (one per concept), got {len(names)}.")
    dataset = tile_dataset(source)
    if images is not None and dataset is not None:
        raise ValueError(
            "images= is for tensor or batch sources; the tiles of a SlideTiles are shown as "
            "read from the slide. Pass images=None."
        )
    pools: list[list[_Candidate]] = [[] for _ in range(k)]
    seen = 0
    device = model_device(attr.forward_func, attr.layer)
    batches = one_pass(source, batch_size, device=device)
    for batch in tqdm(batches, disable=not progress, desc="gallery"):
        inputs = model_inputs(batch, batch_inputs)
        x = inputs[0]
        if x.shape[0] == 0:
            continue
        here = batch_dataset(batch, dataset)  # None: bare images, shown as given
        ids = item_ids(batch, here, seen, int(x.shape[0]))
        if images is not None and max(ids) >= images.shape[0]:
            raise ValueError(
                f"images holds {images.shape[0]} images but the source has more tiles; pass "
                "one image per tile, in stream order."
            )
        with torch.no_grad():
            maps = attr.attribute(on_device(inputs, device), additional_forward_args)
        maps64 = maps.detach().to("cpu", torch.float64)
        scores = maps64.mean(dim=(2, 3)).numpy()
        for j in range(k):
            new = [
                _Candidate(
                    float(scores[i, j]),
                    ids[i],
                    maps64[i, j].numpy(),
                    _location(here, ids[i]),
                    _slide(here, ids[i]),
                    _tile_side(here, ids[i]),
                    None if here is not None else (x[i] if images is None else images[ids[i]]),
                )
                for i in range(len(ids))
            ]
            pools[j] = _unique(sorted(pools[j] + new, key=lambda e: -e.score), top_n)
        kept: dict[int, Tensor] = {}  # each kept tile copied once: a view would hold the batch
        for pool in pools:
            for c in pool:
                if c.fresh and c.raw is not None:
                    c.raw = kept.setdefault(c.tile, c.raw.detach().to("cpu").clone())
                c.fresh = False
        seen += int(x.shape[0])
    if seen == 0:
        raise ValueError("source holds no tiles; pass at least one tile.")
    if images is not None and images.shape[0] != seen:
        raise ValueError(
            f"images holds {images.shape[0]} images for {seen} tiles; pass one image per tile, "
            "in stream order."
        )
    min_score = _drop_absent(pools, names, min_score_fraction, top_n)
    entries = [[c.entry(dataset) for c in pool] for pool in pools]
    return ConceptGallery(names, entries, min_score)


def _check_fraction(name: str, value: object) -> float:
    """A number in [0, 1).

    Raises:
        TypeError: not a real number.
        ValueError: outside [0, 1).
    """
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float in [0, 1), got {value!r}; e.g. 1e-3.")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(
            f"{name} must be in [0, 1), got {value!r}; pass e.g. 1e-3 (0 keeps every tile "
            "with a score above 0)."
        )
    return float(value)


def _drop_absent(
    pools: list[list[_Candidate]], names: Sequence[str], fraction: float, top_n: int
) -> float:
    """Leave out the tiles scoring at most ``fraction`` of the best score; warn of each concept.

    Returns:
        *float*: the score at or under which tiles were left out.
    """
    best = max((pool[0].score for pool in pools if pool), default=0.0)
    floor = max(fraction * best, 0.0)
    lost = []
    for j, pool in enumerate(pools):
        kept = [c for c in pool if c.score > floor]
        if len(kept) < len(pool):
            lost.append(
                f"concept {j} ({names[j]!r}): {len(kept)} of {len(pool)} tiles kept, best "
                f"score {pool[0].score:.3g}"
            )
        pool[:] = kept
    if lost:
        warnings.warn(
            f"concept_gallery left out tiles scoring at most {floor:.3g} "
            f"(min_score_fraction={fraction:g} of the best score of any concept, {best:.3g}): "
            f"they show none of their concept. {'; '.join(lost)}. A concept with fewer than "
            f"top_n={top_n} tiles left is absent from, or rare in, these tiles: pass tiles "
            "where it appears, fit fewer concepts, or pass min_score_fraction=0 to show every "
            "tile.",
            CaptumNMFWarning,
            stacklevel=3,
        )
    return floor


@dataclass
class _Candidate:
    """A tile in the running: its score, map and place; its image made once, when needed."""

    score: float
    tile: int
    intensity: NDArray[np.float64]
    location: tuple[int, int] | None
    slide: str | None
    side: float | None  # the level-0 tile size of its slide's grid (None: not a slide tile)
    raw: Tensor | None  # the tile of a tensor or batch source (None: read from the slide)
    fresh: bool = True  # from the batch in hand (its raw still a view of that batch)
    _image: NDArray[np.float64] | None = None
    _thumb: NDArray[np.float64] | None = None

    def image(self, dataset: Any) -> NDArray[np.float64]:
        if self._image is None:
            self._image = _display(self.raw, dataset, self.tile)
            self.raw = None
        return self._image

    def thumb(self) -> NDArray[np.float64]:
        if self._thumb is None:
            self._thumb = _thumb(self.image(None))
        return self._thumb

    def entry(self, dataset: Any) -> _Entry:
        return _Entry(
            self.score, self.tile, self.image(dataset), self.intensity, self.location, self.slide
        )


def _display(tile: Tensor | None, dataset: Any, index: int) -> NDArray[np.float64]:
    """The tile as an h x w x 3 image in [0, 1]: the slide's pixels, or the tensor rescaled."""
    if tile is None:
        return np.asarray(dataset.read(index), np.float64) / 255.0
    img = tile.detach().to("cpu", torch.float64).permute(1, 2, 0).numpy()
    low, high = float(img.min()), float(img.max())
    if low < 0.0 or high > 1.0:
        img = (img - low) / max(high - low, 1e-12)
    return np.asarray(img[..., :3])


def _location(dataset: Any, index: int) -> tuple[int, int] | None:
    if dataset is None:
        return None
    s, t = dataset.locate(index)
    x, y = dataset.grids[s].location(t)
    return int(x), int(y)


def _slide(dataset: Any, index: int) -> str | None:
    if dataset is None:
        return None
    return str(dataset.grids[dataset.locate(index)[0]].path)


def _tile_side(dataset: Any, index: int) -> float | None:
    """The level-0 size of item ``index``'s tile: its own slide's grid (slides differ in mpp)."""
    if dataset is None or not getattr(dataset, "grids", None):
        return None
    return float(dataset.grids[dataset.locate(index)[0]].tile_size_level0)


def _thumb(image: NDArray[np.float64]) -> NDArray[np.float64]:
    grey = image.mean(axis=2)
    h, w = grey.shape
    ys = (np.arange(16) * h) // 16
    xs = (np.arange(16) * w) // 16
    small = grey[np.ix_(ys, xs)].ravel()
    small = small - small.mean()
    norm = float(np.linalg.norm(small))
    out: NDArray[np.float64] = small / norm if norm > 0 else small
    return out


def _unique(candidates: list[_Candidate], top_n: int) -> list[_Candidate]:
    """The best ``top_n`` candidates, skipping those that nearly repeat a better one.

    Applied to the running pool and each batch's tiles, so a concept whose
    best tiles are near-copies of one another still gets ``top_n`` distinct ones.
    """
    chosen: list[_Candidate] = []
    for e in candidates:
        if len(chosen) == top_n:
            break
        if any(c.tile == e.tile for c in chosen):
            continue
        if e.side is not None and e.location is not None:
            half = e.side / 2  # of this slide's tile: another slide's may be another size
            if any(  # a near repeat is on the same slide
                c.location is not None
                and c.slide == e.slide
                and abs(c.location[0] - e.location[0]) < half
                and abs(c.location[1] - e.location[1]) < half
                for c in chosen
            ):
                continue
        elif any(float(e.thumb() @ c.thumb()) > DUPLICATE_CORRELATION for c in chosen):
            continue
        chosen.append(e)
    return chosen
