"""The offline model zoo, kept at this path; it lives in :mod:`captum_nmf.demo.zoo`."""

from captum_nmf.demo.zoo import (
    NORMALISATIONS,
    EfficientNetLite0,
    efficientnet_lite0,
    imagenet_normalize,
    normalize,
)

__all__ = [
    "NORMALISATIONS",
    "EfficientNetLite0",
    "efficientnet_lite0",
    "imagenet_normalize",
    "normalize",
]
