"""Real H&E material shipped with the package (see ``SOURCES.md`` beside this file).

>>> from captum_nmf import data
>>> data.path("hgsc_nest.jpg").name
'hgsc_nest.jpg'
>>> data.nuclei_type_mask().shape
(1500, 1500)
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

__all__ = ["FILES", "NUCLEI_TYPES", "nuclei_type_mask", "path", "rgb"]

FILES = ("hgsc_nest.jpg", "hgsc_stromal_he.jpg", "hgsc_nest_type_mask.npz")
#: Values of :func:`nuclei_type_mask`.
NUCLEI_TYPES = {0: "background", 1: "connective", 2: "inflammatory", 3: "neoplastic"}


def path(name: str) -> Path:
    """Path of a packaged file.

    Args:
        name (str): one of :data:`FILES`.

    Returns:
        *Path*: the file's location.

    Raises:
        ValueError: ``name`` is not a packaged file.
    """
    if name not in FILES:
        raise ValueError(f"Unknown data file {name!r}; packaged files are {FILES}.")
    return Path(str(resources.files(__name__).joinpath(name)))


def rgb(name: str) -> NDArray[np.uint8]:
    """A packaged image as an H x W x 3 ``uint8`` array; the file is closed on return.

    Args:
        name (str): one of the packaged ``.jpg`` files of :data:`FILES`.

    Returns:
        *ndarray*: the RGB pixels.

    Raises:
        ValueError: ``name`` is not a packaged file.
        ImportError: Pillow is not installed (the ``demo`` extra).
    """
    from PIL import Image

    with Image.open(path(name)) as image:
        pixels: NDArray[np.uint8] = np.asarray(image.convert("RGB"))
    return pixels


def nuclei_type_mask() -> NDArray[np.int32]:
    """The 1500 x 1500 nuclei type mask of ``hgsc_nest.jpg`` (see :data:`NUCLEI_TYPES`).

    Returns:
        *ndarray*: int32 mask, 3 = neoplastic.
    """
    with np.load(path("hgsc_nest_type_mask.npz"), allow_pickle=False) as archive:
        mask: NDArray[np.int32] = archive["nuc_raster"]
    return mask
