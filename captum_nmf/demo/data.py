"""Access to the real H&E material shipped in ``captum_nmf/data/`` (see its ``SOURCES.md``).

The files stay in the ``captum_nmf.data`` folder (package data); this module reads them.
``captum_nmf.data`` re-exports these functions.

>>> from captum_nmf.demo import data
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

__all__ = ["FILES", "IMAGES", "NEOPLASTIC", "NUCLEI_TYPES", "nuclei_type_mask", "path", "rgb"]

_FOLDER = "captum_nmf.data"  # the package that holds the files
#: The two H&E images: a tumour nest (with a nuclei mask) and tumour stroma (without).
IMAGES = ("hgsc_nest.jpg", "hgsc_stromal_he.jpg")
FILES = (*IMAGES, "hgsc_nest_type_mask.npz")
#: Values of :func:`nuclei_type_mask`.
NUCLEI_TYPES = {0: "background", 1: "connective", 2: "inflammatory", 3: "neoplastic"}
#: The value of neoplastic nuclei in :func:`nuclei_type_mask`.
NEOPLASTIC = 3


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
    return Path(str(resources.files(_FOLDER).joinpath(name)))


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
