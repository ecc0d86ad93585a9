"""Prototype galleries: the tiles where each concept is strongest, its intensity beside them."""

from __future__ import annotations

import csv
import io
import os
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
from captum_nmf._utils.validation import check_int
from captum_nmf.engines.batches import (
    batch_dataset,
    check_batch_inputs,
    item_ids,
    model_inputs,
    on_device,
    one_pass,
    tile_dataset,
)
from captum_nmf.io import atomic_write

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from captum_nmf import NMFConceptAttribution

__all__ = ["ConceptGallery", "concept_gallery"]

_FIELDS = ["concept", "name", "rank", "tile", "mean_intensity", "x", "y", "slide"]


def _our_gallery(path: Path) -> bool:
    """Whether ``path`` is a ``gallery.csv`` this module wrote (its header is ours)."""
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
                    ``(score, tile index, image, intensity map, level-0 location or None)``.
    """

    names: list[str]
    entries: list[list[_Entry]] = field(default_factory=list)

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

        Returns:
            *Figure*: a matplotlib figure (not attached to pyplot).

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
        for ax in axes.ravel():
            ax.set_axis_off()
        fig.suptitle(self.names[concept])
        return fig

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``gallery_concept_<k>.png`` per concept and ``gallery.csv``, atomically.

        Saving over an earlier gallery of more concepts removes its extra
        ``gallery_concept_<k>.png`` files (only when the folder's ``gallery.csv``
        is one of ours), so the folder never shows concepts the CSV does not list.

        Returns:
            *Path*: the directory.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        ours = _our_gallery(out / "gallery.csv")  # before it is replaced
        for j in range(len(self.entries)):
            with atomic_write(out / f"gallery_concept_{j}.png", "wb") as fh:
                self.figure(j).savefig(fh, format="png", dpi=100)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=_FIELDS)
        writer.writeheader()
        writer.writerows(self.table())
        with atomic_write(out / "gallery.csv", newline="") as fh:
            fh.write(text.getvalue())
        if ours:  # a gallery of more concepts was saved here: its extra figures go
            for path in out.glob("gallery_concept_*.png"):
                index = path.stem.removeprefix("gallery_concept_")
                if index.isdigit() and int(index) >= len(self.entries):
                    path.unlink(missing_ok=True)
        return out


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
    progress: bool = True,
) -> ConceptGallery:
    r"""The ``top_n`` tiles of every concept by mean intensity, near-duplicates left out.

    One pass over the source with :meth:`NMFConceptAttribution.attribute`.
    A tile's score for a concept is the mean of the concept's intensity over
    the tile. A tile is left out of a concept's gallery when it nearly repeats
    a better-ranked one: for :class:`~captum_nmf.wsi.SlideTiles`, when the two
    overlap by more than half a tile; otherwise when their 16 x 16 grey
    thumbnails correlate above 0.95. Tiles of a ``SlideTiles`` are shown as
    read from the slide (before its ``transform``); other tiles as given,
    rescaled to [0, 1] when they are not in that range.

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
        progress (bool, optional): show a tqdm progress bar.
                    Default: True

    Returns:
        *ConceptGallery*: per concept its tiles, ``figure(k)``, ``save(dir)``.

    Raises:
        NotFittedError: ``attr`` is not fitted.
        TypeError, ValueError: a bad ``top_n`` or ``batch_size``, an empty
                    source, or a bad ``batch_inputs`` (see
                    :meth:`NMFConceptAttribution.fit`).
    """
    attr.check_fitted("concept_gallery")
    top_n = check_int("top_n", top_n, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    batch_inputs = check_batch_inputs(batch_inputs)
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
    side = _tile_side(dataset)
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
                    None if here is not None else (x[i] if images is None else images[ids[i]]),
                )
                for i in range(len(ids))
            ]
            pools[j] = _unique(sorted(pools[j] + new, key=lambda e: -e.score), top_n, side)
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
    entries = [[c.entry(dataset) for c in pool] for pool in pools]
    return ConceptGallery(names, entries)


@dataclass
class _Candidate:
    """A tile in the running: its score, map and place; its image made once, when needed."""

    score: float
    tile: int
    intensity: NDArray[np.float64]
    location: tuple[int, int] | None
    slide: str | None
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


def _tile_side(dataset: Any) -> float | None:
    if dataset is None or not getattr(dataset, "grids", None):
        return None
    return float(dataset.grids[0].tile_size_level0)


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


def _unique(candidates: list[_Candidate], top_n: int, side: float | None) -> list[_Candidate]:
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
        if side is not None and e.location is not None:
            if any(  # a near repeat is on the same slide
                c.location is not None
                and c.slide == e.slide
                and abs(c.location[0] - e.location[0]) < side / 2
                and abs(c.location[1] - e.location[1]) < side / 2
                for c in chosen
            ):
                continue
        elif any(float(e.thumb() @ c.thumb()) > DUPLICATE_CORRELATION for c in chosen):
            continue
        chosen.append(e)
    return chosen
