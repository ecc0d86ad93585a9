"""Opening slides: OpenSlide formats and plain images, always in the level-0 frame.

:class:`Slide` wraps :class:`openslide.OpenSlide` (SVS, NDPI, MRXS, generic
tiled TIFF, DICOM, ...) and, for plain JPEG/PNG/TIFF images, OpenSlide's own
:class:`openslide.ImageSlide` as a one-level slide, behind one small API:

- file existence is checked before OpenSlide is called (a missing file is a
  :class:`~captum_nmf.exceptions.SlideNotFoundError`, not "unsupported");
- levels and target resolutions are validated against the slide's metadata
  before anything is read (OpenSlide itself returns blank pixels for a level
  the slide does not have);
- pixels come back as ``uint8`` RGB arrays with OpenSlide's transparent
  out-of-slide pixels composited onto a white background, never black;
- OpenSlide errors are sticky (after one failed read every later call on the
  handle fails), so a failed read closes and reopens the handle and retries
  once before raising :class:`~captum_nmf.exceptions.SlideReadError`;
- :meth:`Slide.thumbnail` (:mod:`captum_nmf.wsi.thumbnail`) never decodes the
  empty tiles of a sparse TIFF (byte count 0: background by definition), shows
  a progress bar and warns :class:`~captum_nmf.exceptions.LargeThumbnailWarning`
  when it must decode more than about 10^9 pixels, and with
  ``on_tile_error="skip"`` treats parts it cannot read as background, warning
  :class:`~captum_nmf.exceptions.UnreadableRegionWarning`.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import numbers
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import openslide
from numpy.typing import NDArray
from openslide import ImageSlide, OpenSlide, OpenSlideError
from PIL import Image, UnidentifiedImageError

from captum_nmf._utils.validation import check_int, is_positive_number
from captum_nmf.exceptions import (
    CaptumNMFWarning,
    MultiPageImageWarning,
    SlideError,
    SlideNotFoundError,
    SlideReadError,
    UnsupportedSlideError,
)
from captum_nmf.wsi.thumbnail import Thumbnail, TileLayout, read_thumbnail, tiff_layout

__all__ = [
    "LARGE_THUMBNAIL_PIXELS",
    "PLAIN_IMAGE_SUFFIXES",
    "Resolution",
    "Slide",
    "Thumbnail",
    "TileLayout",
]

PLAIN_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
#: A generic TIFF recording a coarser scale than this (1,016 dpi) has an image program's
#: resolution tags (72 dpi is 352.8 um per pixel), not a scanner's: taken as unknown.
_TIFF_MAX_MPP = 25.0
_PLAIN_NAME = {"JPEG": ".jpg", "PNG": ".png", "TIFF": ".tif", "BMP": ".bmp"}


_SAID: set[tuple[str, str]] = set()  # (slide, what): warnings said in this process
_SAID_LOCK = threading.Lock()


def _first_time(path: Path, what: str) -> bool:
    """Whether a warning of kind ``what`` about the slide at ``path`` is new to this process.

    The reading threads and worker processes of one run each open their own
    :class:`Slide`: a slide's warning is said once per process, not per handle.
    """
    key = (str(Path(path).resolve()), what)
    with _SAID_LOCK:
        if key in _SAID:
            return False
        _SAID.add(key)
        return True


def _image_format(path: Path) -> str | None:
    """PIL's name for the image format of ``path`` (from its first bytes), or None."""
    try:
        with warnings.catch_warnings():  # a damaged file's complaints: not ours to pass on
            warnings.simplefilter("ignore")
            with Image.open(path) as image:  # identifies the format; decodes nothing
                return str(image.format) if image.format else None
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError):
        return None


_SUPPORTED = (
    ".svs, .tif/.tiff (tiled pyramids), .ndpi, .vms, .vmu, .scn, .mrxs, .svslide, .bif, "
    ".dcm, and plain .jpg/.jpeg/.png/.tif/.tiff/.bmp images"
)
_MPP_TOLERANCE = 0.02  # relative: a level within 2 % of the asked mpp is used as is
LARGE_THUMBNAIL_PIXELS = 10**9  # decoded pixels above which a thumbnail warns and shows progress

RGB = NDArray[np.uint8]


@dataclass(frozen=True)
class Resolution:
    """Where tiles are read from and how they are resampled.

    Attributes:
        level (int): pyramid level read.
        downsample (float): level-0 pixels per pixel of ``level``.
        resample (float): extra downsampling applied after reading (1 = none;
                    > 1 when the asked mpp lies between two levels).
        mpp (float or None): microns per output pixel, when the slide's mpp is known.
    """

    level: int
    downsample: float
    resample: float
    mpp: float | None

    @property
    def scale(self) -> float:
        """Level-0 pixels per output pixel."""
        return self.downsample * self.resample


class Slide:
    r"""A whole-slide image (or plain image) opened for reading, in level-0 coordinates.

    Use it as a context manager, or call :meth:`close`. After ``close`` every
    method raises ``ValueError("slide is closed")``. A read that fails is
    retried once on a new handle; when even that reopen fails (the file
    briefly unreachable), the next read tries to reopen again, so one lost
    moment of storage costs that read, not the slide. A handle must not be
    shared between processes: :class:`~captum_nmf.wsi.SlideTiles` opens one
    per DataLoader worker.

    Args:
        path (str or PathLike): slide file.
        mpp (float, optional): microns per level-0 pixel, overriding (or, for
                    plain images, supplying) the slide's ``openslide.mpp-x``.
                    Default: None
        allow_plain_images (bool, optional): open JPEG/PNG/TIFF/BMP files that
                    OpenSlide does not read as one-level slides (through
                    :class:`openslide.ImageSlide`). With False they raise
                    :class:`~captum_nmf.exceptions.UnsupportedSlideError`.
                    Default: True
        background (tuple[int, int, int], optional): RGB colour that
                    transparent (out-of-slide) pixels are composited onto.
                    Default: ``(255, 255, 255)``
        fallback_mpp (float, optional): microns per level-0 pixel for a slide
                    that does not record them (``slide_mpp`` of the slide
                    functions); a slide that does keeps its own, and a
                    different value is warned about (``mpp`` overrides).
                    Default: None

    Attributes:
        path (Path): the slide file.
        vendor (str): OpenSlide's format name (e.g. ``"aperio"``), or
                    ``"image"`` for a plain image.
        read_retries (int): reads that failed once and were retried on a
                    reopened handle.

    Raises:
        SlideNotFoundError: ``path`` does not exist (checked before OpenSlide is called).
        UnsupportedSlideError: the file is a directory, not a slide or image
                    format that can be read, or corrupt beyond opening.
        ValueError: ``mpp`` is not a positive number or ``background`` is not RGB.

    Examples::

        >>> from captum_nmf.wsi import Slide
        >>> from captum_nmf.data import path
        >>> with Slide(path("hgsc_nest.jpg"), mpp=0.5) as slide:
        ...     pixels = slide.read_region((0, 0), 0, (4, 2))
        ...     print(slide.dimensions, slide.level_count, pixels.shape)
        (1500, 1500) 1 (2, 4, 3)
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        mpp: float | None = None,
        allow_plain_images: bool = True,
        background: tuple[int, int, int] = (255, 255, 255),
        fallback_mpp: float | None = None,
    ) -> None:
        self.path = Path(path)
        self._check_file()
        if self.path.is_dir():
            raise UnsupportedSlideError(
                f"{self.path} is a directory; pass the slide file itself (for MRXS the .mrxs "
                "file beside its data directory)."
            )
        if mpp is not None and not is_positive_number(mpp):
            raise ValueError(f"mpp must be a positive number of microns per pixel, got {mpp!r}.")
        if fallback_mpp is not None and not is_positive_number(fallback_mpp):
            raise ValueError(
                "fallback_mpp must be a positive number of microns per pixel, got "
                f"{fallback_mpp!r}."
            )
        self._fallback_mpp = None if fallback_mpp is None else float(fallback_mpp)
        if len(background) != 3 or not all(
            isinstance(v, numbers.Integral) and 0 <= int(v) <= 255 for v in background
        ):
            raise ValueError(f"background must be three ints in [0, 255], got {background!r}.")
        self._mpp_override = None if mpp is None else float(mpp)
        self._allow_plain = bool(allow_plain_images)
        self.background = tuple(int(v) for v in background)
        self.read_retries = 0
        self._layouts: dict[int, TileLayout | None] = {}
        self._handle: OpenSlide | ImageSlide | None = None
        self._lost = False  # a failed read's reopen failed too: the next read reopens
        self.vendor = self._open()
        if self._fallback_mpp is not None and self._mpp_override is None:
            self._check_fallback()

    def _own_mpp(self) -> float | None:
        """``openslide.mpp-x``, or None when absent or not a microscope's scale.

        A generic TIFF's scale comes from its resolution tags, which image
        programs set to a screen or print resolution (72, 96, 300 dpi: 352.8,
        264.6, 84.7 um per pixel). Such a scale (coarser than
        ``_TIFF_MAX_MPP``) is taken as unknown, with a warning once.
        """
        mpp = _positive(self._osr().properties.get(openslide.PROPERTY_NAME_MPP_X))
        if mpp is None or self.vendor != "generic-tiff" or mpp <= _TIFF_MAX_MPP:
            return mpp
        if self._fallback_mpp is None and _first_time(self.path, "dpi"):  # with one: it is used
            warnings.warn(
                f"{self.path.name} records {mpp:g} um per pixel ({25400 / mpp:.4g} dpi in its "
                "TIFF resolution tags): an image program's screen or print resolution, not a "
                "scan's; it is taken as unknown. Pass slide_mpp=MPP, the slide's real scale.",
                CaptumNMFWarning,
                stacklevel=3,
            )
        return None

    def _check_fallback(self) -> None:
        """Warn when ``fallback_mpp`` differs from the slide's own mpp (which wins)."""
        own = self._own_mpp()
        fallback = self._fallback_mpp
        if (
            own is not None
            and fallback is not None
            and abs(own - fallback) > 0.02 * own
            and _first_time(self.path, "fallback")
        ):
            warnings.warn(
                f"{self.path.name} records {own:g} um per pixel, which is used: the "
                f"fallback scale of {fallback:g} um per pixel is for slides without that "
                "metadata.",
                CaptumNMFWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------ opening
    def _open(self) -> str:
        vendor = OpenSlide.detect_format(str(self.path))
        if vendor is not None:
            try:
                self._handle = OpenSlide(str(self.path))
            except OpenSlideError as exc:
                raise UnsupportedSlideError(
                    f"{self.path} looks like a {vendor!r} slide but OpenSlide cannot open it "
                    f"({exc}); the file is corrupt or uses an unsupported encoding."
                ) from exc
            return str(vendor)
        if self._allow_plain and self.path.suffix.lower() in PLAIN_IMAGE_SUFFIXES:
            try:
                with Image.open(self.path) as image:
                    self._largest_page(image)
                    image.load()  # decode now: a truncated file fails here, naming the file
                    self._handle = ImageSlide(self._eight_bit(image))
            except Image.DecompressionBombError as exc:
                raise UnsupportedSlideError(
                    f"{self.path} is too large to decode whole as a plain image ({exc}). "
                    "Convert it to a tiled pyramid (captum_nmf.wsi.write_pyramid, or vips "
                    "tiffsave --tile --pyramid) so that it is read tile by tile."
                ) from exc
            except (OSError, UnidentifiedImageError) as exc:
                raise UnsupportedSlideError(
                    f"{self.path} is not a readable image ({exc}). Supported: {_SUPPORTED}."
                ) from exc
            return "image"
        plain_name = self.path.suffix.lower() in PLAIN_IMAGE_SUFFIXES  # only not allowed
        kind = None if plain_name else _image_format(self.path)
        if kind is not None:  # an image under another name: said so, not "not a slide"
            plain = _PLAIN_NAME.get(kind, ".png")
            if kind not in _PLAIN_NAME:  # GIF, WebP, ...: not one of the plain formats
                raise UnsupportedSlideError(
                    f"{self.path} is a {kind} image, not a slide OpenSlide can read. To read "
                    "it as a plain image (whole, one level; give mpp=), save it as PNG or TIFF "
                    "(e.g. PIL: Image.open(path).convert('RGB').save('slide.png'))."
                )
            what = (  # a slide's own container: a damaged slide looks the same
                f"a TIFF file that OpenSlide cannot read as a slide: a damaged or truncated "
                f"slide, or a plain (untiled) TIFF image under a slide's name "
                f"({self.path.suffix or 'no suffix'}). If it is a plain image"
                if kind == "TIFF"
                else f"a {kind} image, not a slide OpenSlide can read under its name "
                f"({self.path.suffix or 'no suffix'}). To read it as a plain image"
            )
            raise UnsupportedSlideError(
                f"{self.path} is {what} (whole, one level; give mpp=), name it {plain}"
                + ("." if self._allow_plain else " and pass allow_plain_images=True.")
            )
        raise UnsupportedSlideError(
            f"{self.path} is not a whole-slide image OpenSlide can read (detected vendor: None). "
            f"Supported: {_SUPPORTED}."
            + ("" if self._allow_plain else " Plain images need allow_plain_images=True.")
        )

    def _largest_page(self, image: Image.Image) -> None:
        """Seek a multi-page image to its largest page; warn when other pages hold data.

        A TIFF may hold several images. Pages that are smaller copies of the
        largest (a stripped pyramid's levels, a thumbnail) are left out without
        a word; pages of the same size or other proportions (channels, focal
        planes, time points, masks) are data this one-image reader ignores, and
        that is said with :class:`~captum_nmf.exceptions.MultiPageImageWarning`,
        once per slide in a process (:func:`_first_time`).
        """
        pages = int(getattr(image, "n_frames", 1))
        if pages <= 1:
            return
        sizes = []
        for i in range(pages):
            image.seek(i)
            sizes.append(image.size)
        page = max(range(pages), key=lambda i: (sizes[i][0] * sizes[i][1], -i))
        image.seek(page)
        w, h = sizes[page]
        limit = Image.MAX_IMAGE_PIXELS  # PIL checked page 0 only, when it opened the file
        if limit is not None and w * h > 2 * limit:
            raise Image.DecompressionBombError(
                f"page {page} has {w * h} pixels, over twice PIL's limit of {limit}"
            )
        ignored = [
            i
            for i, (pw, ph) in enumerate(sizes)
            if i != page and not (pw < w and ph < h and abs(pw / w - ph / h) <= 0.02 + 2 / ph)
        ]
        if ignored and _first_time(self.path, "pages"):
            listed = ", ".join(f"{i} ({sizes[i][0]} x {sizes[i][1]})" for i in ignored[:5])
            more = f" and {len(ignored) - 5} more" if len(ignored) > 5 else ""
            warnings.warn(
                f"{self.path} has {pages} pages; reading page {page} ({w} x {h} px, the "
                f"largest) and ignoring page(s) {listed}{more}, which are not smaller copies "
                "of it (channels, focal planes or masks?). To read another page, write it to "
                "a file of its own (e.g. PIL: Image.open(path).seek(i), then save).",
                MultiPageImageWarning,
                stacklevel=4,
            )

    def _check_file(self) -> None:
        if not self.path.exists():
            raise SlideNotFoundError(f"Slide file not found: {self.path}")
        if not os.access(self.path, os.R_OK):
            raise PermissionError(f"Slide file {self.path} is not readable (permission denied).")

    def _reopen(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()
        self._check_file()  # gone or locked is said so, not "not a whole-slide image"
        self.vendor = self._open()
        self._lost = False

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._handle is None and not self._lost

    def _osr(self) -> OpenSlide | ImageSlide:
        if self._handle is None and self._lost:  # the last read's reopen failed: try again
            try:
                self._reopen()
            except (OpenSlideError, OSError, SlideError) as exc:
                raise SlideError(
                    f"{self.path} could not be reopened after a failed read ({exc}); "
                    "check that the file is still there and readable."
                ) from exc
        if self._handle is None:
            raise ValueError(f"slide is closed: {self.path}; open a new Slide to read it again.")
        return self._handle

    def close(self) -> None:
        """Release the file handle (idempotent)."""
        self._lost = False
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._handle is None:  # never reopened here: a repr must not raise
            state = "unreachable since a failed read" if self._lost else "closed"
        else:
            state = f"{self.dimensions[0]} x {self.dimensions[1]} px"
        return f"Slide({str(self.path)!r}, vendor={self.vendor!r}, {state})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Handles cannot cross processes; a copy reopens the file.
        return (
            _reopen_slide,
            (
                str(self.path),
                self._mpp_override,
                self._allow_plain,
                self.background,
                self._fallback_mpp,
            ),
        )

    # ----------------------------------------------------------------- metadata
    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0 in pixels."""
        w, h = self._osr().dimensions
        return int(w), int(h)

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return int(self._osr().level_count)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of every level."""
        return tuple((int(w), int(h)) for w, h in self._osr().level_dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Level-0 pixels per pixel of every level."""
        return tuple(float(d) for d in self._osr().level_downsamples)

    @property
    def properties(self) -> dict[str, str]:
        """OpenSlide's metadata properties (empty for plain images)."""
        return dict(self._osr().properties)

    @property
    def recorded_mpp(self) -> float | None:
        """The microns per level-0 pixel the slide records itself (``openslide.mpp-x``), or None.

        None also for a generic TIFF whose resolution tags hold an image
        program's screen or print resolution (see :attr:`mpp`). Neither the
        ``mpp`` override nor ``fallback_mpp`` is looked at.
        """
        return self._own_mpp()

    @property
    def mpp(self) -> float | None:
        """Microns per level-0 pixel (the override, else ``openslide.mpp-x``), or None."""
        if self._mpp_override is not None:
            return self._mpp_override
        properties = self._osr().properties
        mpp = self._own_mpp()
        if mpp is None:  # none recorded: the fallback, if any
            return self._fallback_mpp
        mpp_y = _positive(properties.get(openslide.PROPERTY_NAME_MPP_Y))
        if (
            mpp is not None
            and mpp_y is not None
            and abs(mpp_y - mpp) > 0.02 * mpp
            and _first_time(self.path, "pixels")
        ):
            warnings.warn(
                f"{self.path.name} has pixels of {mpp:g} x {mpp_y:g} um (openslide.mpp-x, "
                "mpp-y): not square. captum-nmf takes mpp-x, so a tile covers "
                f"{mpp_y / mpp:.3g} times as many microns down as across, and a level "
                "chosen by mpp matches it across only. Resample the slide to square "
                "pixels (in Python, Slide(path, mpp=...) states the scale to use instead).",
                CaptumNMFWarning,
                stacklevel=2,
            )
        return mpp

    def _eight_bit(self, image: Image.Image) -> Image.Image:
        """A plain image with 8-bit channels, as OpenSlide reads pyramids.

        16-bit greyscale keeps its high byte (what OpenSlide gives for a tiled
        16-bit TIFF); pasting it into RGBA as it is would clip every value above
        255 to white.

        Raises:
            UnsupportedSlideError: 32-bit integer or floating-point pixels, whose
                        range to 8 bits is not known.
        """
        if image.mode.startswith("I;16"):
            high = np.asarray(image, dtype=np.uint16) >> 8
            return Image.fromarray(high.astype(np.uint8), mode="L")
        if image.mode in ("I", "F"):
            raise UnsupportedSlideError(
                f"{self.path} holds {image.mode!r} pixels (32-bit integers or floats), whose "
                "range in 8 bits is unknown; convert it to an 8-bit RGB image (or a tiled "
                "pyramid with captum_nmf.wsi.write_pyramid)."
            )
        return image.copy()

    def level_mpps(self) -> tuple[float, ...] | None:
        """Microns per pixel of every level, or None when the slide's mpp is unknown."""
        mpp = self.mpp
        return None if mpp is None else tuple(mpp * d for d in self.level_downsamples)

    def fingerprint(self) -> str:
        """A content hash identifying the slide (OpenSlide's quickhash-1, else SHA-256).

        Returns:
            *str*: ``"quickhash-1:<hex>"`` for OpenSlide formats that have it,
            else ``"sha256:<hex>"`` of the whole file (plain images).
        """
        quick = self._osr().properties.get(openslide.PROPERTY_NAME_QUICKHASH1)
        if quick:
            return f"quickhash-1:{quick}"
        digest = hashlib.sha256()
        with self.path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return f"sha256:{digest.hexdigest()}"

    def _levels_text(self) -> str:
        downs = ", ".join(f"{d:.4g}" for d in self.level_downsamples)
        n = self.level_count
        text = f"slide {self.path.name} has {n} level{'s' if n != 1 else ''} (0-{n - 1}) with "
        text += f"downsamples ({downs})"
        mpps = self.level_mpps()
        if mpps is not None:
            text += " and mpp (" + ", ".join(f"{m:.4g}" for m in mpps) + ")"
        return text

    def check_level(self, level: Any) -> int:
        """Validate a level index against this slide.

        Returns:
            *int*: ``level``.

        Raises:
            TypeError: ``level`` is not an int.
            ValueError: ``level`` is out of range (the message lists the levels).
        """
        if isinstance(level, bool) or not isinstance(level, numbers.Integral):
            raise TypeError(
                f"level must be an int, got {level!r} ({type(level).__name__}); "
                f"{self._levels_text()}."
            )
        if not 0 <= int(level) < self.level_count:
            raise ValueError(f"level={level} out of range; {self._levels_text()}.")
        return int(level)

    def resolve(self, *, level: int | None = None, mpp: float | None = None) -> Resolution:
        """The level to read and the resampling that give the asked resolution.

        With ``mpp``, the coarsest level whose mpp is at or finer than ``mpp``
        (within 2 %) is read and then downsampled by the remaining factor; a
        level within 2 % of ``mpp`` is read without resampling (the returned
        ``mpp`` is then the level's). With neither, level 0 is used.

        Args:
            level (int, optional): a pyramid level.
                        Default: None
            mpp (float, optional): microns per output pixel.
                        Default: None

        Returns:
            *Resolution*: level, its downsample, the extra resampling and the mpp.

        Raises:
            TypeError: ``level`` is not an int.
            ValueError: both given; ``level`` out of range; ``mpp`` not
                        positive, finer than level 0, or the slide has no mpp
                        metadata (the message lists what the slide has).
        """
        if level is not None and mpp is not None:
            raise ValueError(f"pass level= or mpp=, not both (got level={level}, mpp={mpp}).")
        mpps = self.level_mpps()
        if mpp is None:
            lv = self.check_level(0 if level is None else level)
            down = self.level_downsamples[lv]
            return Resolution(lv, down, 1.0, None if mpps is None else mpps[lv])
        if not is_positive_number(mpp):
            raise ValueError(f"mpp must be a positive number, got {mpp!r}.")
        if mpps is None:
            raise ValueError(
                f"{self.path.name} has no microns-per-pixel metadata (openslide.mpp-x), so "
                f"mpp={mpp} cannot be resolved; pass level=N instead, or declare the slide's "
                f"resolution with slide_mpp=MPP (or Slide(path, mpp=MPP)). {self._levels_text()}."
            )
        if mpp < mpps[0] * (1 - _MPP_TOLERANCE):
            raise ValueError(
                f"mpp={mpp} is finer than level 0; {self._levels_text()}. Pass mpp >= "
                f"{mpps[0]:.4g}."
            )
        candidates = [i for i, m in enumerate(mpps) if m <= mpp * (1 + _MPP_TOLERANCE)]
        lv = max(candidates, key=lambda i: mpps[i])
        resample = float(mpp) / mpps[lv]
        if abs(resample - 1) <= _MPP_TOLERANCE:  # close enough: read the level as it is
            return Resolution(lv, self.level_downsamples[lv], 1.0, mpps[lv])
        return Resolution(lv, self.level_downsamples[lv], resample, float(mpp))

    def tile_layout(self, level: int) -> TileLayout | None:
        """The TIFF tiles of ``level`` and which of them are empty, when the slide is a TIFF.

        Read with tifffile from the tiled TIFF page whose size is the level's;
        tiles with byte count 0 (a sparse TIFF) hold no data: OpenSlide returns
        them transparent, i.e. background.

        Args:
            level (int): pyramid level.

        Returns:
            *TileLayout or None*: the tile size and the empty tiles, or None
            for non-TIFF formats, plain images and pages tifffile cannot read.

        Raises:
            TypeError: ``level`` is not an int.
            ValueError: the slide is closed or ``level`` is out of range.
        """
        self._osr()
        level = self.check_level(level)
        if level not in self._layouts:
            self._layouts[level] = (
                None
                if self.vendor == "image"
                else tiff_layout(self.path, self.level_dimensions[level])
            )
        return self._layouts[level]

    # -------------------------------------------------------------------- reading
    def _rgb(self, image: Image.Image) -> RGB:
        """OpenSlide's RGBA region as RGB on the background (read-only when it is opaque).

        An opaque region (the usual case inside a slide) only drops its alpha,
        in PIL's C code: half the time of a NumPy pass over the RGBA pixels.
        """
        if image.mode != "RGBA" or image.getchannel("A").getextrema()[0] == 255:
            return np.asarray(image.convert("RGB"))
        rgba = np.asarray(image)
        a = rgba[..., 3:4].astype(np.uint16)
        bg = np.asarray(self.background, dtype=np.uint16)
        out = (rgba[..., :3].astype(np.uint16) * a + bg * (255 - a) + 127) // 255
        return out.astype(np.uint8)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> RGB:
        """Read a region as RGB, out-of-slide pixels composited onto the background.

        Args:
            location (tuple[int, int]): (x, y) of the top-left pixel in the
                        level-0 frame (may be negative or beyond the slide).
            level (int): pyramid level.
            size (tuple[int, int]): (width, height) in pixels of ``level``.

        Returns:
            *ndarray*: height x width x 3 ``uint8``.

        Raises:
            ValueError: the slide is closed, ``level`` is out of range or
                        ``size`` is not two positive ints.
            TypeError: ``level`` is not an int.
            SlideReadError: the read failed twice (once more on a reopened
                        handle); carries ``path``, ``level``, ``location``,
                        ``size`` and is chained from the reader's error.
        """
        pixels = self.read_pixels(location, level, size)
        return pixels if pixels.flags.writeable else pixels.copy()

    def read_pixels(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> RGB:
        """:meth:`read_region` without its final copy: the array may be read-only.

        For readers that only copy out of the region (the block reader cuts
        tiles from it), saving one pass over its pixels. Arguments, result and
        errors as :meth:`read_region`.
        """
        if len(size) != 2 or not all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in size
        ):
            raise ValueError(f"size must be two positive ints (width, height), got {size!r}.")
        loc = (int(location[0]), int(location[1]))
        dims = (int(size[0]), int(size[1]))
        try:  # after a read whose reopen failed, this one reopens; failing, it is a read error
            osr = self._osr()
        except SlideError as exc:
            raise _read_error(self.path, level, loc, dims, exc) from exc
        level = self.check_level(level)
        try:
            image = osr.read_region(loc, level, dims)
        except (OpenSlideError, OSError):
            self.read_retries += 1
            try:  # OpenSlide errors are sticky: only a fresh handle can read again
                self._reopen()
                image = self._osr().read_region(loc, level, dims)
            except (OpenSlideError, OSError, SlideError, ValueError) as exc:
                with contextlib.suppress(OpenSlideError, OSError, SlideError):
                    self._reopen()  # leave the slide usable for the next tile
                self._lost = self._handle is None  # unreachable now: the next read reopens
                raise _read_error(self.path, level, loc, dims, exc) from exc
        return self._rgb(image)

    def read_tile(
        self, location: tuple[int, int], resolution: Resolution, size: int | tuple[int, int]
    ) -> RGB:
        """Read a tile of ``size`` output pixels at ``resolution``.

        Reads ``size * resolution.resample`` pixels of ``resolution.level`` and,
        when ``resample != 1``, downsamples them to ``size`` by area averaging
        (PIL's box filter).

        Args:
            location (tuple[int, int]): (x, y) of the tile's corner in level 0.
            resolution (Resolution): from :meth:`resolve`.
            size (int or tuple[int, int]): output (width, height); an int is square.

        Returns:
            *ndarray*: height x width x 3 ``uint8``.

        Raises:
            SlideReadError: as :meth:`read_region`.
        """
        out: tuple[int, int] = (int(size), int(size)) if isinstance(size, int) else size
        if resolution.resample == 1.0:
            return self.read_region(location, resolution.level, (int(out[0]), int(out[1])))
        read = tuple(max(1, round(v * resolution.resample)) for v in out)
        pixels = self.read_pixels(location, resolution.level, (read[0], read[1]))
        image = Image.fromarray(pixels).resize((int(out[0]), int(out[1])), Image.Resampling.BOX)
        return np.array(image)  # a writable copy

    def thumbnail(
        self,
        max_size: int = 2048,
        *,
        on_tile_error: str = "raise",
        progress: bool | None = None,
    ) -> tuple[RGB, tuple[float, float]]:
        """A downsampled RGB view of the whole slide, composited onto the background.

        :meth:`read_thumbnail` without the list of unreadable regions.

        Args:
            max_size (int, optional): the longer side of the thumbnail in
                        pixels (a smaller slide is returned at level 0).
                        Default: 2048
            on_tile_error (str, optional): ``"raise"`` or ``"skip"`` (see
                        :meth:`read_thumbnail`).
                        Default: ``"raise"``
            progress (bool, optional): show a progress bar; None shows one only
                        for thumbnails that decode more than 10^9 pixels.
                        Default: None

        Returns:
            *tuple*: the height x width x 3 ``uint8`` thumbnail and its
            (x, y) downsample: level-0 pixels per thumbnail pixel.

        Raises:
            ValueError: the slide is closed, ``max_size`` < 1 or an unknown
                        ``on_tile_error``.
            SlideReadError: the pixels cannot be read and ``on_tile_error="raise"``.
        """
        thumb = self.read_thumbnail(max_size, on_tile_error=on_tile_error, progress=progress)
        return thumb.pixels, thumb.downsample

    def read_thumbnail(
        self,
        max_size: int = 2048,
        *,
        on_tile_error: str = "raise",
        progress: bool | None = None,
    ) -> Thumbnail:
        """A downsampled RGB view of the whole slide, and the regions that could not be read.

        The pyramid level nearest the thumbnail's resolution is read in
        horizontal strips and shrunk by area averaging. Empty tiles of a sparse
        TIFF (byte count 0, see :meth:`tile_layout`) are background and are not
        read at all, so a huge, mostly empty slide costs only its tissue. When
        the slide has no level near the thumbnail's resolution and more than
        ``LARGE_THUMBNAIL_PIXELS`` (10^9) pixels must be decoded, a progress
        bar is shown and :class:`~captum_nmf.exceptions.LargeThumbnailWarning`
        gives an estimate of the time.

        Args:
            max_size (int, optional): the longer side of the thumbnail in
                        pixels (a smaller slide is returned at level 0).
                        Default: 2048
            on_tile_error (str, optional): ``"raise"`` or ``"skip"``: with
                        ``"skip"``, parts that cannot be read (after a retry)
                        are background, read again block by block so that only
                        the broken blocks are lost, and listed in an
                        :class:`~captum_nmf.exceptions.UnreadableRegionWarning`.
                        Default: ``"raise"``
            progress (bool, optional): show a progress bar; None shows one only
                        for thumbnails that decode more than 10^9 pixels.
                        Default: None

        Returns:
            *Thumbnail*: the pixels, their downsample and the level-0 boxes
            that could not be read (empty unless ``on_tile_error="skip"``).

        Raises:
            ValueError: the slide is closed, ``max_size`` < 1 or an unknown
                        ``on_tile_error``.
            SlideReadError: the pixels cannot be read and ``on_tile_error="raise"``.
        """
        osr = self._osr()
        check_int("max_size", max_size, minimum=1)
        if on_tile_error not in ("raise", "skip"):
            raise ValueError(f"on_tile_error must be 'raise' or 'skip', got {on_tile_error!r}.")
        return read_thumbnail(
            self,
            osr.get_best_level_for_downsample,
            max_size,
            on_tile_error=on_tile_error,
            progress=progress,
            large_pixels=LARGE_THUMBNAIL_PIXELS,
        )


def _read_error(
    path: Path,
    level: int | None,
    location: tuple[int, int],
    size: tuple[int, int],
    exc: BaseException,
) -> SlideReadError:
    return SlideReadError(
        f"Cannot read {size[0]} x {size[1]} px at level-0 location {location} (level "
        f"{level}) of {path}: {exc}. The file may be corrupt; pass on_tile_error='skip' to "
        "record and skip unreadable tiles.",
        path=str(path),
        level=level,
        location=location,
        size=size,
    )


def _reopen_slide(
    path: str,
    mpp: float | None,
    allow_plain: bool,
    background: tuple[int, int, int],
    fallback_mpp: float | None = None,
) -> Slide:
    # the opening's warnings were said when this slide was first opened: recorded as said,
    # not silenced with catch_warnings, which would change every thread's warning filters
    for what in ("fallback", "pages"):
        _first_time(Path(path), what)
    return Slide(
        path,
        mpp=mpp,
        allow_plain_images=allow_plain,
        background=background,
        fallback_mpp=fallback_mpp,
    )


def _positive(value: str | None) -> float | None:
    """A positive, finite number from a slide property, else None."""
    try:
        number = float(value) if value is not None else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) and number > 0 else None
