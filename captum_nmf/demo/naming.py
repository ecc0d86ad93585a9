"""The demo's concept step: choose K, check stability, name concepts from the nuclei masks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from captum_nmf import NMFConceptAttribution
from captum_nmf.compare.selection import KSelection, concept_stability, select_k
from captum_nmf.compare.stability import ConceptStability
from captum_nmf.demo import data
from captum_nmf.demo.detector import HETiles
from captum_nmf.gallery import ConceptGallery, concept_gallery

__all__ = ["ConceptStep", "name_from_masks", "run_concept_step"]

#: A concept is named after a nuclei type when that type holds at least this share of the
#: typed nuclei pixels in the cells assigned to it.
MAJORITY = 0.5


@dataclass
class ConceptStep:
    """What the demo learns about its concepts before explaining the slide.

    Attributes:
        selection (KSelection): held-out error and stability against K.
        stability (ConceptStability): the fitted concepts' stability (stored with them).
        names (dict[int, str]): the names given, and ``shares`` the majority shares behind them.
        gallery (ConceptGallery): the top tiles of every concept.
    """

    selection: KSelection
    stability: ConceptStability
    names: dict[int, str]
    shares: dict[int, float]
    gallery: ConceptGallery


def name_from_masks(
    attr: NMFConceptAttribution, tiles: HETiles, x: Tensor
) -> tuple[dict[int, str], dict[int, float]]:
    """Name each concept after the nuclei type that holds most of its cells' typed nuclei pixels.

    Only tiles of the image with a nuclei-type mask count. A concept is named
    ``"<type>-rich"`` when that type is a majority (:data:`MAJORITY`) of the
    typed nuclei pixels in the cells assigned to it; a second concept with the
    same majority type gets ``"<type>-rich 2"``; the others keep their names.

    Returns:
        *tuple[dict[int, str], dict[int, float]]*: names and the majority shares.
    """
    mask = data.nuclei_type_mask()
    k = int(attr.concepts_.shape[0])
    counts = np.zeros((k, len(data.NUCLEI_TYPES)), np.int64)
    rows = np.flatnonzero(tiles.source == 0)
    with torch.no_grad():
        for start in range(0, len(rows), 32):
            part = rows[start : start + 32]
            assigned = attr.assign(x[part]).cpu().numpy()  # n x h x w
            for i, cells in zip(part, assigned, strict=True):
                x0, y0 = (int(v) for v in tiles.locations[i])
                side = tiles.images.shape[-1]
                crop = mask[y0 : y0 + side, x0 : x0 + side]
                cell = side // cells.shape[0]
                up = np.repeat(np.repeat(cells, cell, axis=0), cell, axis=1)
                for j in range(k):
                    types = crop[up == j]
                    counts[j] += np.bincount(types, minlength=counts.shape[1])
    typed = counts[:, 1:]
    shares = typed / np.maximum(typed.sum(axis=1, keepdims=True), 1)
    names: dict[int, str] = {}
    best_share: dict[int, float] = {}
    used: dict[str, int] = {}
    for j in np.argsort(-shares.max(axis=1), kind="stable"):
        t = int(np.argmax(shares[j])) + 1
        if typed[j].sum() == 0 or shares[j, t - 1] < MAJORITY:
            continue
        base = f"{data.NUCLEI_TYPES[t]}-rich"
        used[base] = used.get(base, 0) + 1
        names[int(j)] = base if used[base] == 1 else f"{base} {used[base]}"
        best_share[int(j)] = float(shares[j, t - 1])
    return names, best_share


def run_concept_step(
    attr: NMFConceptAttribution, tiles: HETiles, x: Tensor, *, small: bool
) -> ConceptStep:
    """Choose K on the demo's tiles, store the fitted concepts' stability, name them, gallery.

    Returns:
        *ConceptStep*: the selection, stability, names and gallery.
    """
    batches: list[Any] = [x[i : i + 32] for i in range(0, len(x), 32)]
    ks = range(2, 5) if small else range(2, 9)
    selection = select_k(attr, batches, ks=ks, n_seeds=3, max_rows=4000, progress=False)
    stability = concept_stability(attr, batches, n_seeds=3, max_rows=4000, progress=False)
    stability.attach(attr)
    names, shares = name_from_masks(attr, tiles, x)
    attr.rename(names)
    gallery = concept_gallery(attr, x, images=tiles.images, top_n=4, progress=False)
    return ConceptStep(selection, stability, names, shares, gallery)
