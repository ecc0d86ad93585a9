"""Whole-slide explanations: reading, tissue detection, overlap tiling, stitching, resumable runs.

Data flows one way: a :class:`Slide` is cut into overlapping tiles
(:func:`tile_grid`, :class:`SlideTiles`) where :func:`detect_tissue` finds
tissue; the fitted concept model's layer activations of every tile are
averaged per slide location (:class:`FeatureStitcher`), and the concept
weights are solved on the averaged feature vectors (:func:`explain_slide`,
giving a :class:`SlideExplanation`; it averages each vector's products with
the K concepts, all that the solve needs of it, instead of its C channels);
:func:`explain_cohort` runs many slides, in this process or on Ray actors,
and restarts where it stopped.

This subpackage needs the ``wsi`` extra (openslide-python with openslide-bin,
tifffile, scikit-image)::

    pip install 'captum-nmf[wsi]'
"""

from __future__ import annotations

try:
    import openslide  # noqa: F401
    import skimage  # noqa: F401
    import tifffile  # noqa: F401
except ImportError as exc:  # also OpenSlide's "Couldn't locate OpenSlide shared library"
    raise ImportError(
        f"captum_nmf.wsi needs the 'wsi' extra: pip install 'captum-nmf[wsi]' (missing: {exc})"
    ) from exc

from captum_nmf.wsi.blocks import ReadingThreads
from captum_nmf.wsi.border import BorderEffect, border_effect
from captum_nmf.wsi.cohort import CohortResult, SlideRecord, explain_cohort
from captum_nmf.wsi.explanation import SlideExplanation
from captum_nmf.wsi.pyramid import write_pyramid
from captum_nmf.wsi.reader import Resolution, Slide
from captum_nmf.wsi.runner import explain_slide
from captum_nmf.wsi.stitching import FeatureStitcher, StitchedBand, StitchedRows, cell_coverage
from captum_nmf.wsi.tiling import SlideTiles, TileGrid, tile_grid
from captum_nmf.wsi.tissue import TissueMask, detect_tissue

__all__ = [
    "BorderEffect",
    "CohortResult",
    "FeatureStitcher",
    "ReadingThreads",
    "Resolution",
    "Slide",
    "SlideExplanation",
    "SlideRecord",
    "SlideTiles",
    "StitchedBand",
    "StitchedRows",
    "TileGrid",
    "TissueMask",
    "border_effect",
    "cell_coverage",
    "detect_tissue",
    "explain_cohort",
    "explain_slide",
    "tile_grid",
    "write_pyramid",
]
