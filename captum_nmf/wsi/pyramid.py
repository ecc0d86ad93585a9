"""Writing multi-level tiled TIFF pyramids that OpenSlide opens as Aperio slides."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from numpy.typing import NDArray
from PIL import Image

from captum_nmf.io import default_file_mode, temporary_path

__all__ = ["write_pyramid", "write_tiled_levels"]


def write_pyramid(
    image: NDArray[np.uint8],
    path: str | os.PathLike[str],
    *,
    mpp: float = 0.5,
    tile: int = 256,
    levels: int | None = None,
    factor: int = 2,
    compression: str = "zlib",
    app_mag: float | None = None,
) -> Path:
    r"""Write an RGB image as a tiled pyramid that OpenSlide reads as an Aperio slide.

    Level 0 is ``image``; each further level is ``factor`` times smaller
    (area averaging), stored as a reduced-resolution subfile. The first
    page carries an Aperio-style description (size, tile size, ``MPP``,
    ``AppMag``), so OpenSlide reports ``openslide.mpp-x`` and every level.
    Used to build test and demo slides from real images, and for exports.

    Args:
        image (ndarray): H x W x 3 ``uint8``.
        path (str or PathLike): output file (``.svs`` or ``.tif``).
        mpp (float, optional): microns per level-0 pixel.
                    Default: 0.5
        tile (int, optional): TIFF tile side (a multiple of 16).
                    Default: 256
        levels (int, optional): number of levels; None adds levels until the
                    smaller side is below one tile.
                    Default: None
        factor (int, optional): downsample between levels.
                    Default: 2
        compression (str, optional): a tifffile compression that needs no
                    extra codec package (``"zlib"``, ``"lzw"``, ``"none"``), or
                    ``"jpeg"`` when ``imagecodecs`` is installed.
                    Default: ``"zlib"``
        app_mag (float, optional): objective magnification written as
                    ``AppMag``; None derives it from ``mpp`` (10 / mpp).
                    Default: None

    Returns:
        *Path*: the file written.

    Raises:
        ValueError: ``image`` is not H x W x 3 ``uint8``, or a bad ``mpp``, ``tile``,
                    ``levels`` or ``factor``.
    """
    pixels = np.asarray(image)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(
            f"image must be H x W x 3 uint8, got shape {pixels.shape} and dtype {pixels.dtype}."
        )
    if (
        isinstance(mpp, bool)
        or not isinstance(mpp, numbers.Real)
        or not math.isfinite(mpp)
        or mpp <= 0
    ):
        raise ValueError(
            f"mpp must be a positive number of microns per pixel, got {mpp!r}; pass e.g. "
            "mpp=0.5 for a 20x scan."
        )
    if tile < 16 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile}.")
    if factor < 2:
        raise ValueError(f"factor must be >= 2, got {factor}.")
    if levels is not None and levels < 1:
        raise ValueError(f"levels must be >= 1 or None, got {levels}.")
    pyramid = [pixels]
    while (levels is None and min(pyramid[-1].shape[:2]) >= tile * factor) or (
        levels is not None and len(pyramid) < levels
    ):
        h, w = pyramid[-1].shape[:2]
        small = Image.fromarray(pyramid[-1]).resize(
            (max(1, w // factor), max(1, h // factor)), Image.Resampling.BOX
        )
        pyramid.append(np.asarray(small))
    h, w = pixels.shape[:2]
    mag = 10.0 / mpp if app_mag is None else app_mag
    description = (
        f"Aperio Image Library v12.0.0\r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) "
        f"{compression.upper()}/RGB|AppMag = {mag:g}|MPP = {mpp:g}"
    )
    return write_tiled_levels(
        path,
        [(level, level.shape) for level in pyramid],
        tile=tile,
        description=description,
        compression=compression,
        mpp=float(mpp),
    )


def write_tiled_levels(
    path: str | os.PathLike[str],
    levels: Sequence[tuple[Any, tuple[int, ...]]],
    *,
    tile: int,
    description: str,
    compression: str = "zlib",
    extrasamples: Sequence[str] | None = None,
    mpp: float | None = None,
) -> Path:
    """Write ``uint8`` RGB(A) levels as one tiled TIFF, atomically (temporary file + rename).

    Level 0 is a full-resolution subfile carrying ``description``; later ones
    are reduced-resolution subfiles. Each level is an array, or an iterator of
    tiles in TIFF order with its ``(height, width, samples)`` shape, so large
    images are written without holding them in memory. With ``mpp`` (microns
    per level-0 pixel) every level also records its pixel size in the TIFF
    resolution tags (pixels per centimetre), which readers that ignore the
    Aperio description (Bio-Formats, tifffile, image viewers) use; without
    it they say 1 pixel per unit of no unit, as before.

    Returns:
        *Path*: the file written.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(target)
    codec = None if compression == "none" else compression
    try:
        with tifffile.TiffWriter(tmp, bigtiff=math.prod(levels[0][1]) > 2**31) as tif:
            width0 = levels[0][1][1]
            for i, (data, shape) in enumerate(levels):
                array = isinstance(data, np.ndarray)
                # pixels per cm of this level: 10^4 um / (its microns per pixel)
                per_cm = None if mpp is None else 1e4 * shape[1] / (mpp * width0)
                tif.write(
                    data,
                    shape=None if array else shape,
                    dtype=None if array else np.uint8,
                    tile=(tile, tile),
                    photometric="rgb",
                    extrasamples=extrasamples,
                    compression=codec,
                    subfiletype=1 if i else 0,
                    description=description if i == 0 else None,
                    metadata=None,
                    resolution=None if per_cm is None else (per_cm, per_cm),
                    resolutionunit=None if per_cm is None else "CENTIMETER",
                )
        tmp.chmod(default_file_mode())
        fd = os.open(tmp, os.O_RDONLY)  # on disk before it takes the name (a power cut)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
