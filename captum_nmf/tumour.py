"""The tumour-tile detector, kept at this path; it lives in :mod:`captum_nmf.demo.detector`."""

from captum_nmf.demo.detector import HETiles, he_tiles, train_tumour_detector

__all__ = ["HETiles", "he_tiles", "train_tumour_detector"]
