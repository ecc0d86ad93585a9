"""Tissue detection on a slide thumbnail (Otsu + morphology) and per-tile tissue fractions."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray
from skimage import color, filters, morphology

from captum_nmf.wsi.reader import Slide

__all__ = ["TissueMask", "detect_tissue"]


@dataclass(frozen=True)
class TissueMask:
    r"""A boolean tissue mask over the whole slide at a low resolution.

    Any boolean array covering the slide can be used (e.g. a pathologist's
    annotation rasterised at any downsample): build it with
    :meth:`from_array` and pass it to :func:`~captum_nmf.wsi.tile_grid` or
    :func:`~captum_nmf.wsi.explain_slide` in place of :func:`detect_tissue`.

    Args:
        mask (ndarray): H x W boolean, True on tissue.
        downsample (tuple[float, float]): (x, y) level-0 pixels per mask pixel.
        threshold (float, optional): the grey-level threshold used, if any.
                    Default: None

    Raises:
        ValueError: ``mask`` is not 2-D or is empty, or a downsample is not positive.
    """

    mask: NDArray[np.bool_]
    downsample: tuple[float, float]
    threshold: float | None = None
    _integral: NDArray[np.int64] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        mask = np.asarray(self.mask)
        if mask.ndim != 2 or mask.size == 0:
            raise ValueError(f"mask must be a non-empty 2-D array, got shape {mask.shape}.")
        if len(self.downsample) != 2 or not all(
            isinstance(d, numbers.Real) and d > 0 for d in self.downsample
        ):
            raise ValueError(f"downsample must be two positive numbers, got {self.downsample!r}.")
        mask = mask.astype(bool, copy=True)
        mask.setflags(write=False)
        object.__setattr__(self, "mask", mask)
        object.__setattr__(
            self, "downsample", (float(self.downsample[0]), float(self.downsample[1]))
        )
        integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
        integral[1:, 1:] = mask.cumsum(0).cumsum(1)
        object.__setattr__(self, "_integral", integral)

    @classmethod
    def from_array(cls, mask: NDArray[np.bool_], slide_dimensions: tuple[int, int]) -> TissueMask:
        """A mask covering a slide of level-0 size ``slide_dimensions`` (width, height).

        Returns:
            *TissueMask*: with the downsample implied by the two shapes.
        """
        arr = np.asarray(mask)
        if arr.ndim != 2 or arr.size == 0:
            raise ValueError(f"mask must be a non-empty 2-D array, got shape {arr.shape}.")
        w, h = slide_dimensions
        return cls(arr.astype(bool), (w / arr.shape[1], h / arr.shape[0]))

    def fractions(self, boxes: NDArray[np.floating] | NDArray[np.integer]) -> NDArray[np.float64]:
        """Share of tissue in each level-0 box, counted on the mask's pixels.

        Args:
            boxes (ndarray): n x 4 ``(x, y, width, height)`` in level-0 pixels.
                        Parts outside the mask (the slide) are ignored: the
                        fraction is over the box's area inside the slide.

        Returns:
            *ndarray*: n fractions in [0, 1] (0 for a box entirely outside).
        """
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        dx, dy = self.downsample
        h, w = self.mask.shape
        x0 = np.clip(np.floor(b[:, 0] / dx + 1e-9), 0, w).astype(np.int64)
        y0 = np.clip(np.floor(b[:, 1] / dy + 1e-9), 0, h).astype(np.int64)
        x1 = np.clip(np.ceil((b[:, 0] + b[:, 2]) / dx - 1e-9), 0, w).astype(np.int64)
        y1 = np.clip(np.ceil((b[:, 1] + b[:, 3]) / dy - 1e-9), 0, h).astype(np.int64)
        s = self._integral
        inside = s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0]
        area = (x1 - x0) * (y1 - y0)
        return np.where(area > 0, inside / np.maximum(area, 1), 0.0)

    @property
    def tissue_share(self) -> float:
        """Share of the whole slide that is tissue."""
        return float(self.mask.mean())


def _remove_small(mask: NDArray[np.bool_], area: int) -> NDArray[np.bool_]:
    # scikit-image 0.26 renamed min_size (remove objects smaller than) to max_size
    # (remove objects up to this size); support both.
    if area <= 1:
        return mask
    try:
        return morphology.remove_small_objects(mask, max_size=area - 1)  # type: ignore[no-any-return]
    except TypeError:  # scikit-image < 0.26
        return morphology.remove_small_objects(mask, min_size=area)  # type: ignore[no-any-return]


def detect_tissue(
    slide: Slide,
    *,
    mask_mpp: float = 4.0,
    max_size: int = 2048,
    threshold: float | None = None,
    min_threshold: float = 0.8,
    closing_um: float | None = 16.0,
    min_object_um2: float = 10_000.0,
) -> TissueMask:
    r"""Find tissue on a slide thumbnail: Otsu's threshold on grey levels plus morphology.

    Brightfield background is bright; pixels darker than the threshold are
    tissue. The threshold is Otsu's on the thumbnail's grey levels, but never
    below ``min_threshold``: on a thumbnail that is nearly all tissue Otsu
    would otherwise split dark from light tissue (nuclei from stroma). The
    mask is then closed (bridging gaps of about ``closing_um``) and objects
    smaller than ``min_object_um2`` and holes of that size inside tissue are
    removed. The scales fall back to thumbnail pixels (2 and 64) when the
    slide's mpp is unknown.

    Args:
        slide (Slide): an open slide.
        mask_mpp (float, optional): microns per pixel of the thumbnail the
                    mask is computed on (coarser if ``max_size`` requires);
                    slides without mpp use ``max_size``.
                    Default: 4.0
        max_size (int, optional): upper bound on the thumbnail's longer side.
                    Default: 2048
        threshold (float, optional): a fixed grey-level threshold in [0, 1]
                    instead of Otsu's.
                    Default: None
        min_threshold (float, optional): lower bound on Otsu's threshold.
                    Default: 0.8
        closing_um (float, optional): radius of the closing in microns;
                    None skips it.
                    Default: 16.0
        min_object_um2 (float, optional): smallest tissue object and largest
                    hole removed, in square microns.
                    Default: 10000.0

    Returns:
        *TissueMask*: the mask at the thumbnail's resolution.

    Raises:
        ValueError: the slide is closed, or ``threshold`` is outside [0, 1].
        SlideReadError: the thumbnail cannot be read.

    Examples::

        >>> from captum_nmf.wsi import Slide, detect_tissue
        >>> from captum_nmf.data import path
        >>> with Slide(path("hgsc_nest.jpg"), mpp=0.5) as slide:
        ...     tissue = detect_tissue(slide)  # 750 um wide at 4 um per mask pixel
        >>> tissue.mask.shape, round(tissue.downsample[0], 3), tissue.tissue_share > 0.8
        ((188, 188), 7.979, True)
    """
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1] (grey level), got {threshold!r}.")
    if not mask_mpp > 0:
        raise ValueError(f"mask_mpp must be positive, got {mask_mpp!r}.")
    size = max_size
    if slide.mpp is not None:  # enough pixels for mask_mpp, never more than max_size
        longer_um = max(slide.dimensions) * slide.mpp
        size = max(64, min(max_size, round(longer_um / mask_mpp)))
    pixels, downsample = slide.thumbnail(size)
    grey = color.rgb2gray(pixels)
    if threshold is None:
        otsu = 1.0  # a uniform thumbnail has no Otsu split
        if float(np.ptp(grey)) > 0:
            otsu = float(filters.threshold_otsu(grey))  # type: ignore[no-untyped-call]
        threshold = max(otsu, min_threshold)
    mask = grey < threshold
    mpp = slide.mpp
    px_um = None if mpp is None else mpp * math.sqrt(downsample[0] * downsample[1])
    if closing_um is not None:
        radius = 2 if px_um is None else max(1, round(closing_um / px_um))
        mask = morphology.closing(mask, morphology.disk(radius))  # type: ignore[no-untyped-call]
    area = 64 if px_um is None else max(1, round(min_object_um2 / px_um**2))
    mask = _remove_small(mask, area)
    mask = ~_remove_small(~mask, area)
    return TissueMask(mask, downsample, float(threshold))
