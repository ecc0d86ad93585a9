"""Tissue detection on a slide thumbnail (colour and brightness, then morphology).

Brightfield stains are coloured; glass, dust, empty scans and shadows are grey.
:func:`detect_tissue` therefore keeps thumbnail pixels that are both coloured
(HSV saturation above Otsu's threshold, bounded) and not bright (grey level
below Otsu's threshold, bounded), closes small gaps, drops specks and fills
small holes, and removes pen marks (strongly saturated blue or green strokes,
and black ones).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from skimage import color, filters, measure, morphology

from captum_nmf.wsi.reader import Slide

__all__ = ["TissueMask", "detect_tissue", "pen_marks"]


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
        saturation_threshold (float, optional): the saturation threshold
                    used, if any.
                    Default: None
        greyscale (bool, optional): the slide looked colourless (a greyscale
                    or unstained scan), so detection by colour found nothing
                    to go on; messages then say how to detect by brightness.
                    Default: False
        glass (tuple[int, int, int], optional): the tinted glass colour that
                    :func:`detect_tissue` measured colours against (RGB), or
                    None when they were taken as they are.
                    Default: None

    Raises:
        ValueError: ``mask`` is not 2-D or is empty, or a downsample is not positive.
    """

    mask: NDArray[np.bool_]
    downsample: tuple[float, float]
    threshold: float | None = None
    saturation_threshold: float | None = None
    greyscale: bool = False
    glass: tuple[int, int, int] | None = None
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

        Raises:
            ValueError: ``mask`` is not 2-D, is empty, or is transposed (its
                        transpose has the slide's proportions, it has not).
        """
        arr = np.asarray(mask)
        if arr.ndim != 2 or arr.size == 0:
            raise ValueError(f"mask must be a non-empty 2-D array, got shape {arr.shape}.")
        w, h = slide_dimensions
        dx, dy = w / arr.shape[1], h / arr.shape[0]
        # rows and columns mixed up (mask.T): two scales, where the transpose would have one
        # (to within the rounding of its shape); masks of other proportions are taken as given
        tx, ty = w / arr.shape[0], h / arr.shape[1]
        tolerance = tx / (2 * arr.shape[0]) + ty / (2 * arr.shape[1]) + 1.0
        if abs(tx - ty) <= tolerance < abs(dx - dy):
            raise ValueError(
                f"mask of shape {arr.shape} (rows, columns) has the proportions of the slide "
                f"({w} x {h} px, width x height) transposed: it would be stretched by "
                f"{dx:.4g} x {dy:.4g} level-0 px per mask pixel. Pass mask.T: rows along the "
                "slide's height, columns along its width."
            )
        return cls(arr.astype(bool), (dx, dy))

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

    @property
    def extent(self) -> tuple[float, float]:
        """(width, height) in level-0 pixels that the mask covers."""
        return self.mask.shape[1] * self.downsample[0], self.mask.shape[0] * self.downsample[1]

    def check_dimensions(self, dimensions: tuple[int, int], name: str = "the slide") -> None:
        """Check that the mask covers a slide of level-0 size ``dimensions`` (width, height).

        A mask covers the slide when its extent (shape times downsample)
        equals the slide's size to within one mask pixel on each axis.

        Args:
            dimensions (tuple[int, int]): the slide's level-0 (width, height).
            name (str, optional): the slide's name, for the message.
                        Default: ``"the slide"``

        Raises:
            ValueError: the mask was made for a slide of another size.
        """
        ew, eh = self.extent
        w, h = dimensions
        dx, dy = self.downsample
        if abs(ew - w) <= dx + 1e-6 * w and abs(eh - h) <= dy + 1e-6 * h:
            return
        rows, cols = self.mask.shape
        raise ValueError(
            f"tissue_mask does not match {name}: the mask ({cols} x {rows} px at downsample "
            f"({dx:.4g}, {dy:.4g})) covers {ew:.0f} x {eh:.0f} level-0 px, but {name} is {w} x "
            f"{h} px. Build the mask for this slide: TissueMask.from_array(mask, "
            "slide.dimensions) or detect_tissue(slide)."
        )


def _remove_small(mask: NDArray[np.bool_], area: int) -> NDArray[np.bool_]:
    # scikit-image 0.26 renamed min_size (remove objects smaller than) to max_size
    # (remove objects up to this size); support both.
    if area <= 1:
        return mask
    try:
        return morphology.remove_small_objects(mask, max_size=area - 1)  # type: ignore[no-any-return]
    except TypeError:  # scikit-image < 0.26
        return morphology.remove_small_objects(mask, min_size=area)  # type: ignore[no-any-return]


# Pen marks: strongly saturated hues that H&E never has (yellow-green through blue,
# 72 to 245 degrees; haematoxylin starts near 250), and near-black grey strokes.
_PEN_HUE = (0.2, 0.68)
_PEN_SATURATION = 0.25
_BLACK_VALUE = 0.3
_BLACK_SATURATION = 0.4
_INK_VALUE = 0.22
_INK_CHROMA = 0.1
#: Below this HSV value (brightest channel 38 of 255) a pixel's colour cannot be measured:
#: one count of difference between channels gives it saturation up to 1, so black padding
#: of (1, 0, 2) would be "coloured". Such pixels are uncoloured, hence never tissue.
_DARK_VALUE = 0.15
#: Objects are removed, and background at the thumbnail's border filled, up to
#: ``min_object_um2`` but never more than this share of the thumbnail: the tissue or the
#: glass of a small image (a 100 um patch) is not a speck to remove or a hole to fill.
_MAX_OBJECT_SHARE = 0.05
_FALLBACK_MPP = 0.5  # slides without mpp: scales as for a 20x scan
#: Glass: smooth (grey-level std over 5 x 5 thumbnail pixels below this) and bright
#: (brightest channel at least ``_GLASS_VALUE``) pixels of one colour (within
#: ``_GLASS_SPREAD`` per channel) covering at least ``_GLASS_SHARE`` of the thumbnail...
_GLASS_TEXTURE = 0.02
_GLASS_VALUE = 0.5
_GLASS_SPREAD = 0.04
_GLASS_SHARE = 0.05
#: ... and at least this share of a frame along the border, this share of the thumbnail wide.
_GLASS_BORDER = 0.5
_GLASS_FRAME = 0.02
_GLASS_PIXELS = 250_000  # thumbnail pixels looked at for the glass, at most
#: Tinted glass is made this neutral grey (240 of 255, the glass of an untinted scan):
#: a white balance to 1.0 would brighten the tissue too, and lose its palest parts.
_GLASS_GREY = 240 / 255
#: A glass colour more saturated than this is not a tint of the glass (a pen stroke, a label).
_GLASS_MAX_SATURATION = 0.35
#: Hues of the stains themselves (violet through pink to red, HSV hue >= 0.69 or < 0.03):
#: glass of such a tint cannot be told from pale eosin, so it is never corrected for.
_STAIN_HUES = (0.03, 0.69)


def _otsu(values: NDArray[np.floating]) -> float | None:
    """Otsu's threshold, or None when ``values`` are (nearly) uniform."""
    if float(np.ptp(values)) < 1e-6:
        return None
    return float(filters.threshold_otsu(values))  # type: ignore[no-untyped-call]


def _tinted_glass(rgb: NDArray[np.floating], low: float) -> NDArray[np.float64] | None:
    """The colour of tinted glass on an RGB thumbnail in [0, 1], or None (none, or not tinted).

    Glass surrounds the sections, so it is looked for on the thumbnail's
    border: the commonest colour of the smooth, bright pixels of a frame
    ``_GLASS_FRAME`` of the thumbnail wide (texture, brightness and spread as
    set by ``_GLASS_*``). Those of that colour must cover at least
    ``_GLASS_BORDER`` of the frame and ``_GLASS_SHARE`` of the thumbnail; a
    smooth region of tissue (a pool of mucin, cartilage) inside the slide, or
    along one side of a crop, is not glass. The colour is returned only when
    it is tinted (HSV saturation at least ``low``, the lower bound of the
    saturation threshold, so that it would count as coloured), but not
    strongly (``_GLASS_MAX_SATURATION``), and not in the stains' own hues.
    A thumbnail of more than ``_GLASS_PIXELS`` pixels is looked at on every
    n-th row and column (glass is large): 0.04 s instead of 0.56 s at 2048 x 1600.
    """
    step = max(1, math.ceil(math.sqrt(rgb.shape[0] * rgb.shape[1] / _GLASS_PIXELS)))
    rgb = rgb[::step, ::step]
    grey = rgb.mean(axis=2)
    mean = ndimage.uniform_filter(grey, 5)
    texture = np.sqrt(np.clip(ndimage.uniform_filter(grey * grey, 5) - mean * mean, 0, None))
    smooth = (texture < _GLASS_TEXTURE) & (rgb.max(axis=2) >= _GLASS_VALUE)
    frame = np.zeros(grey.shape, dtype=bool)
    width = max(1, round(_GLASS_FRAME * min(grey.shape)))
    frame[:width], frame[-width:], frame[:, :width], frame[:, -width:] = True, True, True, True
    edge = rgb[smooth & frame]
    if len(edge) < _GLASS_BORDER * frame.sum():
        return None
    bins = np.minimum(np.floor(edge * 32), 31).astype(np.int64)  # 8 counts a step
    keys = (bins[:, 0] * 32 + bins[:, 1]) * 32 + bins[:, 2]
    centre = edge[keys == np.bincount(keys).argmax()].mean(axis=0)
    near = smooth & (np.abs(rgb - centre).max(axis=2) <= _GLASS_SPREAD)
    if near[frame].sum() < _GLASS_BORDER * frame.sum() or near.sum() < _GLASS_SHARE * grey.size:
        return None
    glass: NDArray[np.float64] = np.median(rgb[near], axis=0)
    hue, sat, _ = color.rgb2hsv(glass[None, None])[0, 0]
    if not low <= sat <= _GLASS_MAX_SATURATION or not _STAIN_HUES[0] <= hue < _STAIN_HUES[1]:
        return None
    return glass


def pen_marks(pixels: NDArray[np.uint8]) -> NDArray[np.bool_]:
    """Pixels of pen marks: strongly saturated blue, cyan or green, or near black.

    Blue and green are hues H&E does not have (HSV hue 0.2 to 0.68 with
    saturation >= 0.25: yellow-green through blue; haematoxylin is violet,
    hue >= 0.69); black marks are dark (value < 0.3) and not strongly
    coloured (saturation < 0.4), unlike dense nuclei, which are dark violet.

    Args:
        pixels (ndarray): H x W x 3 ``uint8`` RGB.

    Returns:
        *ndarray*: H x W boolean, True on pen.
    """
    return _pen(color.rgb2hsv(np.asarray(pixels)))


def _pen(hsv: NDArray[np.floating]) -> NDArray[np.bool_]:
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    coloured = (hue >= _PEN_HUE[0]) & (hue < _PEN_HUE[1]) & (sat >= _PEN_SATURATION)
    # black: dark and not strongly coloured; darker still, little chroma (max - min of the
    # channels, = saturation x value) is enough: near black, saturation is noise, and tinted
    # black ink such as (45, 30, 55) has saturation 0.45 with a chroma of 25 counts
    black = (val < _BLACK_VALUE) & (sat < _BLACK_SATURATION)
    black |= (val < _INK_VALUE) & (sat * val < _INK_CHROMA)
    out: NDArray[np.bool_] = coloured | black
    return out


def _fill_holes(mask: NDArray[np.bool_], area: int, edge_area: int) -> NDArray[np.bool_]:
    """``mask`` with its holes filled: background of fewer than ``area`` pixels.

    Background that touches the thumbnail's border may be the glass around
    the tissue rather than a hole in it: it is filled only when it is also
    smaller than ``edge_area`` (a small share of the thumbnail), so that the
    glass of a small image is never "filled" into tissue.
    """
    background = measure.label(~mask, connectivity=1)  # type: ignore[no-untyped-call]
    sizes = np.bincount(background.ravel())
    edge = np.unique(
        np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])
    )
    fill = sizes < area
    fill[edge] &= sizes[edge] < edge_area
    fill[0] = False  # label 0: the tissue itself
    out: NDArray[np.bool_] = mask | fill[background]
    return out


def _check_fraction(name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(float(value))
        or not 0.0 <= float(value) <= 1.0
    ):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}.")
    return float(value)


def detect_tissue(
    slide: Slide,
    *,
    mask_mpp: float = 4.0,
    max_size: int = 2048,
    threshold: float | None = None,
    min_threshold: float = 0.8,
    saturation_threshold: float | None = None,
    saturation_bounds: tuple[float, float] = (0.07, 0.15),
    exclude_pen: bool = True,
    closing_um: float | None = 16.0,
    min_object_um2: float = 10_000.0,
    on_tile_error: str = "raise",
    progress: bool | None = None,
) -> TissueMask:
    r"""Find tissue on a slide thumbnail: coloured and not bright, then morphology.

    Stained tissue is coloured; glass, dust, shadows and empty scans are grey.
    A thumbnail pixel is tissue when it is both

    - **coloured**: HSV saturation at least Otsu's threshold on the
      thumbnail's saturations, bounded to ``saturation_bounds`` (the lower
      bound keeps the threshold out of the noise of blank glass; the upper
      one stops Otsu from splitting pale stroma from nuclei on a thumbnail
      that is nearly all tissue), and
    - **not bright**: grey level below Otsu's threshold on grey levels, but
      never below ``min_threshold``.

    Both are measured against the glass when it is tinted: where smooth,
    bright pixels of one colour cover at least half of the thumbnail's border
    (glass surrounds the sections) and 5 % of the thumbnail, and that
    colour is itself coloured (saturation at least the lower bound, at most
    0.35, in a hue the stains do not have: yellow, brown, green or blue),
    every pixel is first scaled, channel by channel, so that the glass
    becomes the neutral grey of untinted glass (240 of 255; a white
    balance): yellowed mounting medium or a scanner's colour cast is then
    glass, not tissue, and the tissue on it is found as on clear glass. The
    colour is recorded as :attr:`TissueMask.glass`. Glass tinted in the
    stains' own hues (violet to red) cannot be told from pale eosin and is
    taken as it is.

    A uniform or nearly uniform thumbnail has no Otsu split and only the
    bounds apply, so a blank or near-blank slide, and a grey or black one
    however dark, has no tissue. The mask is then closed (bridging gaps of
    about ``closing_um``), objects smaller than ``min_object_um2`` and holes
    of that size inside tissue are removed, and with ``exclude_pen`` pen
    marks (:func:`pen_marks` objects of at least ``min_object_um2``, widened
    by half the closing radius) are taken out last, so that closing and hole
    filling cannot put them back. A slide without mpp (a plain image, unless
    ``Slide(path, mpp=...)`` declares it) is taken to be 0.5 um per pixel (a
    20x scan) for the thumbnail's size and the morphology's scales.

    Args:
        slide (Slide): an open slide.
        mask_mpp (float, optional): microns per pixel of the thumbnail the
                    mask is computed on (coarser if ``max_size`` requires,
                    never finer than level 0).
                    Default: 4.0
        max_size (int, optional): upper bound on the thumbnail's longer side.
                    Default: 2048
        threshold (float, optional): a fixed grey-level threshold in [0, 1]
                    instead of Otsu's.
                    Default: None
        min_threshold (float, optional): lower bound on Otsu's grey-level
                    threshold.
                    Default: 0.8
        saturation_threshold (float, optional): a fixed saturation threshold
                    in [0, 1] instead of Otsu's; 0 uses brightness alone
                    (e.g. for unstained or greyscale scans).
                    Default: None
        saturation_bounds (tuple[float, float], optional): (lower, upper)
                    bounds on Otsu's saturation threshold.
                    Default: ``(0.07, 0.15)``
        exclude_pen (bool, optional): remove pen marks from the mask.
                    Default: True
        closing_um (float, optional): radius of the closing in microns;
                    None skips it.
                    Default: 16.0
        min_object_um2 (float, optional): smallest tissue object and largest
                    hole removed, in square microns.
                    Default: 10000.0
        on_tile_error (str, optional): ``"raise"`` or ``"skip"``: with
                    ``"skip"`` the parts of the slide that cannot be read are
                    no tissue (every mask pixel touching them), and are listed
                    in an :class:`~captum_nmf.exceptions.UnreadableRegionWarning`.
                    Default: ``"raise"``
        progress (bool, optional): progress bar for the thumbnail (see
                    :meth:`Slide.thumbnail <captum_nmf.wsi.Slide.thumbnail>`);
                    None shows one only for huge reads.
                    Default: None

    Returns:
        *TissueMask*: the mask at the thumbnail's resolution, with the grey
        and saturation thresholds used and the tinted glass colour, if any.

    Raises:
        ValueError: the slide is closed; ``threshold``, ``saturation_threshold``,
                    ``min_threshold`` or a bound is outside [0, 1]; bounds out
                    of order; a non-positive ``mask_mpp``; ``max_size`` < 64;
                    a negative or non-finite ``closing_um`` or
                    ``min_object_um2``; an unknown ``on_tile_error``.
        SlideReadError: the thumbnail cannot be read and ``on_tile_error="raise"``.

    Examples::

        >>> from captum_nmf.wsi import Slide, detect_tissue
        >>> from captum_nmf.data import path
        >>> with Slide(path("hgsc_nest.jpg"), mpp=0.5) as slide:
        ...     tissue = detect_tissue(slide)  # 750 um wide at 4 um per mask pixel
        >>> tissue.mask.shape, round(tissue.downsample[0], 3), tissue.tissue_share > 0.95
        ((188, 188), 7.979, True)
    """
    if threshold is not None:
        threshold = _check_fraction("threshold", threshold)
    if saturation_threshold is not None:
        saturation_threshold = _check_fraction("saturation_threshold", saturation_threshold)
    if len(saturation_bounds) != 2:
        raise ValueError(f"saturation_bounds must be (lower, upper), got {saturation_bounds!r}.")
    low = _check_fraction("saturation_bounds[0]", saturation_bounds[0])
    high = _check_fraction("saturation_bounds[1]", saturation_bounds[1])
    if low > high:
        raise ValueError(f"saturation_bounds must be (lower, upper), got {saturation_bounds!r}.")
    if not isinstance(mask_mpp, numbers.Real) or not mask_mpp > 0:
        raise ValueError(f"mask_mpp must be positive, got {mask_mpp!r}.")
    if isinstance(max_size, bool) or not isinstance(max_size, numbers.Integral) or max_size < 64:
        raise ValueError(f"max_size must be an int >= 64 (thumbnail pixels), got {max_size!r}.")
    min_threshold = _check_fraction("min_threshold", min_threshold)
    if closing_um is not None and not (
        isinstance(closing_um, numbers.Real) and math.isfinite(closing_um) and closing_um >= 0
    ):
        raise ValueError(f"closing_um must be a finite number >= 0 or None, got {closing_um!r}.")
    if not (
        isinstance(min_object_um2, numbers.Real)
        and math.isfinite(min_object_um2)
        and min_object_um2 >= 0
    ):
        raise ValueError(f"min_object_um2 must be a finite number >= 0, got {min_object_um2!r}.")
    mpp = _FALLBACK_MPP if slide.mpp is None else slide.mpp
    longer_um = max(slide.dimensions) * mpp  # enough pixels for mask_mpp, at most max_size
    size = max(64, min(max_size, round(longer_um / mask_mpp)))
    thumb = slide.read_thumbnail(size, on_tile_error=on_tile_error, progress=progress)
    pixels, downsample = thumb.pixels, thumb.downsample
    rgb = pixels.astype(np.float64) / 255.0
    glass = _tinted_glass(rgb, low)
    if glass is not None:  # colours and brightness measured against the glass (white balance)
        rgb = np.minimum(rgb * (_GLASS_GREY / glass), 1.0)
    grey = color.rgb2gray(rgb)
    hsv = color.rgb2hsv(rgb)
    sat = np.where(hsv[..., 2] < _DARK_VALUE, 0.0, hsv[..., 1])  # near black: no colour
    if threshold is None:
        otsu = _otsu(grey)
        threshold = max(1.0 if otsu is None else otsu, min_threshold)
    automatic = saturation_threshold is None
    if saturation_threshold is None:
        otsu = _otsu(sat)
        saturation_threshold = min(max(low if otsu is None else otsu, low), high)
    mask = (grey < threshold) & (sat >= saturation_threshold)
    # hysteresis (Otsu's threshold only): pixels coloured above the lower bound join tissue
    # they touch, so a faint section keeps its pale parts when a well-stained one raised
    # the threshold (its nuclei seed it); glass, below the lower bound, never joins
    if automatic and saturation_threshold > low and mask.any():
        parts = measure.label((grey < threshold) & (sat >= low), connectivity=2)
        seeded = np.unique(parts[mask])
        mask = np.isin(parts, seeded[seeded > 0])
    px_um = mpp * math.sqrt(downsample[0] * downsample[1])
    radius = 1 if closing_um is None else max(1, round(closing_um / px_um))
    if closing_um is not None:
        mask = morphology.closing(mask, morphology.disk(radius))
    area = max(1, round(min_object_um2 / px_um**2))
    small = max(1, min(area, round(_MAX_OBJECT_SHARE * mask.size)))  # a small image's share
    mask = _remove_small(mask, small)
    mask = _fill_holes(mask, area, small)
    if exclude_pen:
        pen = _remove_small(_pen(hsv), area)  # strokes, not specks of ink or dark nuclei
        if pen.any():
            pen = morphology.dilation(pen, morphology.disk(max(1, radius // 2)))
            mask = _remove_small(mask & ~pen, small)
    if thumb.unreadable:  # every mask pixel that touches an unreadable region is no tissue
        mask = mask.copy()
        dx, dy = downsample
        for x, y, w, h in thumb.unreadable:
            c0, r0 = math.floor(x / dx), math.floor(y / dy)
            mask[r0 : math.ceil((y + h) / dy), c0 : math.ceil((x + w) / dx)] = False
    colourless = bool(np.percentile(sat, 99) < _GREYSCALE_SATURATION)
    return TissueMask(
        mask,
        downsample,
        float(threshold),
        float(saturation_threshold),
        greyscale=colourless,
        glass=None if glass is None else tuple(int(v) for v in np.round(glass * 255)),
    )


#: A thumbnail whose 99th percentile of saturation is below this is colourless (greyscale).
_GREYSCALE_SATURATION = 0.02


def greyscale_hint(mask: TissueMask | None) -> str:
    """For the messages that find no tissue: how to detect it on a greyscale slide, else ""."""
    if mask is None or not mask.greyscale:
        return ""
    return (
        " The slide looks greyscale (no colour to detect tissue by): detect it by brightness, "
        "tissue_mask=detect_tissue(slide, saturation_threshold=0), or pass tissue_mask=None."
    )
