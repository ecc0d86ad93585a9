"""The packaged H&E files; their access functions live in :mod:`captum_nmf.demo.data`."""

from captum_nmf.demo.data import (
    FILES,
    IMAGES,
    NEOPLASTIC,
    NUCLEI_TYPES,
    nuclei_type_mask,
    path,
    rgb,
)

__all__ = ["FILES", "IMAGES", "NEOPLASTIC", "NUCLEI_TYPES", "nuclei_type_mask", "path", "rgb"]
