"""A real tumour-tile detector on real H&E, and the labelled tiles it is trained on.

The packaged H&E images (:mod:`captum_nmf.demo.data`) are cut into tiles; a tile is
labelled *tumour* when the central part of the tile holds neoplastic nuclei
according to the packaged nuclei-type mask of ``hgsc_nest.jpg``. The stromal
image ``hgsc_stromal_he.jpg`` has no mask; its tiles are labelled 0 (its source
describes it as stroma with almost no neoplastic nuclei). The detector is
EfficientNet-Lite0 with its ImageNet weights (frozen) and a two-class linear
head fitted by logistic regression on the pooled ``head_relu`` features.

Part of the application layer (it uses :mod:`captum_nmf.demo.zoo`); needs the ``demo`` extra.
``captum_nmf.tumour`` re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from sklearn.linear_model import LogisticRegression
from torch import Tensor

from captum_nmf.demo import data, zoo

__all__ = ["HETiles", "he_tiles", "train_tumour_detector"]


@dataclass
class HETiles:
    """Tiles of the packaged H&E images with tumour labels.

    Attributes:
        images (Tensor): N x 3 x T x T RGB in [0, 1].
        labels (ndarray): N ints, 1 = the tile's central area holds neoplastic nuclei.
        neoplastic (ndarray): N x T x T bool, neoplastic-nuclei pixels (all
                    False for the stromal image, which has no mask).
        has_mask (ndarray): N bools, whether the tile's image has a nuclei mask.
        source (ndarray): N ints, 0 = ``hgsc_nest.jpg``, 1 = ``hgsc_stromal_he.jpg``.
        locations (ndarray): N x 2 (x, y) of each tile in its image.
    """

    images: Tensor
    labels: NDArray[np.int64]
    neoplastic: NDArray[np.bool_]
    has_mask: NDArray[np.bool_]
    source: NDArray[np.int64]
    locations: NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.images.shape[0])


def he_tiles(
    tile_size: int = 224,
    stride: int = 112,
    *,
    central: float = 0.5,
    min_neoplastic: float = 0.02,
) -> HETiles:
    """Cut both packaged H&E images into tiles and label them from the nuclei mask.

    Args:
        tile_size (int, optional): tile side in pixels.
                    Default: 224
        stride (int, optional): step between tiles.
                    Default: 112
        central (float, optional): side of the central square, as a share of
                    the tile, that decides the label.
                    Default: 0.5
        min_neoplastic (float, optional): share of the central square that
                    neoplastic-nuclei pixels must reach for label 1.
                    Default: 0.02

    Returns:
        *HETiles*: tiles, labels and masks.

    Raises:
        ValueError: sizes that do not fit the 1500 px images.
    """
    if not 0 < tile_size <= 1500 or stride < 1:
        raise ValueError(
            f"tile_size must be in [1, 1500] and stride >= 1, got {tile_size}, {stride}."
        )
    mask = data.nuclei_type_mask() == data.NEOPLASTIC
    lo = round(tile_size * (1 - central) / 2)
    hi = tile_size - lo
    images, labels, masks, has_mask, source, locations = [], [], [], [], [], []
    for s, name in enumerate(data.IMAGES):
        pixels = data.rgb(name)
        for y in range(0, pixels.shape[0] - tile_size + 1, stride):
            for x in range(0, pixels.shape[1] - tile_size + 1, stride):
                images.append(pixels[y : y + tile_size, x : x + tile_size])
                tile_mask = (
                    mask[y : y + tile_size, x : x + tile_size]
                    if s == 0
                    else np.zeros((tile_size, tile_size), bool)
                )
                masks.append(tile_mask)
                labels.append(int(tile_mask[lo:hi, lo:hi].mean() >= min_neoplastic))
                has_mask.append(s == 0)
                source.append(s)
                locations.append((x, y))
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return HETiles(
        stacked,
        np.asarray(labels, np.int64),
        np.stack(masks),
        np.asarray(has_mask, bool),
        np.asarray(source, np.int64),
        np.asarray(locations, np.int64),
    )


@torch.no_grad()
def _pooled(model: zoo.EfficientNetLite0, images: Tensor, batch_size: int) -> NDArray[np.float64]:
    """The pooled ``head_relu`` features of ``images``, computed on the model's device."""
    device = next(model.parameters()).device
    feats = []
    for start in range(0, images.shape[0], batch_size):
        x = zoo.normalize(images[start : start + batch_size].to(device))
        feats.append(torch.flatten(model.pool(model.features(x)), 1).double().cpu().numpy())
    return np.concatenate(feats)


def train_tumour_detector(
    tiles: HETiles,
    *,
    batch_size: int = 16,
    c: float = 0.1,
    random_state: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[zoo.EfficientNetLite0, float]:
    """EfficientNet-Lite0 (ImageNet, frozen) with a 2-class head fitted on ``tiles``.

    The head is a logistic regression (L2, ``C=c``) on the 1280 pooled
    ``head_relu`` features, copied into the model's linear layer, so the
    returned model is an ordinary differentiable classifier (class 1 = tumour)
    that expects inputs normalised with :func:`captum_nmf.demo.zoo.normalize`.

    Args:
        tiles (HETiles): training tiles.
        batch_size (int, optional): tiles per forward pass.
                    Default: 16
        c (float, optional): inverse regularisation strength.
                    Default: 0.1
        random_state (int, optional): seed of the solver.
                    Default: 0
        device (str or torch.device, optional): where the model is put and runs.
                    Default: ``"cpu"``

    Returns:
        *tuple*: the model (eval mode, on ``device``) and its training accuracy.

    Raises:
        ValueError: the tiles hold one label only.
    """
    if len(np.unique(tiles.labels)) < 2:
        raise ValueError("the tiles hold one label only; a detector needs both.")
    model = zoo.efficientnet_lite0(num_classes=2).to(device)
    x = _pooled(model, tiles.images, batch_size)
    clf = LogisticRegression(C=c, max_iter=2000, random_state=random_state).fit(x, tiles.labels)
    with torch.no_grad():
        w = torch.from_numpy(clf.coef_[0]).float()
        b = float(clf.intercept_[0])
        model.fc.weight.copy_(torch.stack([-w / 2, w / 2]))
        model.fc.bias.copy_(torch.tensor([-b / 2, b / 2]))
    return model.eval(), float(clf.score(x, tiles.labels))
