"""``border_effect``: how deep a tile's edge changes a layer's features, by hand and on Lite0."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from captum_nmf import NMFConceptAttribution
from captum_nmf.wsi import BorderEffect, border_effect
from tests.helpers.synthetic_slides import he_image
from tests.helpers.wsi_models import PoolNet


def _ones_net(n_convs: int = 1) -> nn.Sequential:
    """8 px average pooling, then ``n_convs`` 3 x 3 convolutions of ones (zero padding)."""
    layers: list[nn.Module] = [nn.AvgPool2d(8)]
    for i in range(n_convs):
        conv = nn.Conv2d(3 if i == 0 else 1, 1, 3, padding=1, bias=False)
        nn.init.ones_(conv.weight)
        layers.append(conv)
    layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def _he(n: int, size: int) -> torch.Tensor:
    """``n`` real H&E crops of ``size`` px, RGB in [0, 1]."""
    image = torch.from_numpy(he_image()).permute(2, 0, 1).float() / 255
    corners = [(0, 0), (0, 1500 - size), (1500 - size, 0), (1500 - size, 1500 - size)]
    return torch.stack([image[:, y : y + size, x : x + size] for y, x in corners[:n]])


def test_one_convolution_of_ones_changes_only_the_outer_ring_by_hand() -> None:
    net = _ones_net()
    effect = border_effect(net, torch.ones(2, 3, 128, 128), tile_size=64, layer=net[2])
    assert isinstance(effect, BorderEffect)
    assert (effect.cell, effect.tile_size, effect.context, effect.layer) == (8, 64, 32, "2")
    assert effect.depths.tolist() == [0, 1, 2, 3]  # an 8 x 8 cell tile, context of 4 cells
    assert effect.cells.tolist() == [28, 20, 12, 4]
    # a constant image: 27 inside (9 neighbours x 3 channels); the tile alone has 18 on its
    # 24 edge cells and 12 on its 4 corners: (24 x 9 + 4 x 15) / (28 x 27)
    assert effect.change[0] == pytest.approx((24 * 9 + 4 * 15) / (28 * 27), rel=1e-12)
    assert effect.change[1:].tolist() == [0.0, 0.0, 0.0]
    np.testing.assert_allclose(effect.per_image, np.tile(effect.change, (2, 1)), rtol=1e-12)
    assert effect.suggest_border(0.05) == 1
    assert effect.suggest_border(0.5) == 0
    table = effect.to_markdown()
    assert table.splitlines()[0].startswith("| depth (cells) | px from the tile edge |")
    assert "| 0 | 0-8 | 36.5% | 36.5%-36.5% |" in table
    assert table.splitlines()[-1] == "| 3 | 24-32 | 0.0% | 0.0%-0.0% |"


@pytest.mark.parametrize("n_convs", [1, 2, 3])
def test_the_effect_reaches_as_deep_as_the_receptive_field_on_real_he(n_convs: int) -> None:
    net = _ones_net(n_convs)
    effect = border_effect(net, _he(2, 192), tile_size=96, layer=net[-1], context=48)
    assert effect.depths.tolist() == list(range(6))  # 12 x 12 cells, 6 of context
    assert (effect.change[:n_convs] > 0.01).all()  # each 3 x 3 convolution reaches a cell deeper
    np.testing.assert_allclose(effect.change[n_convs:], 0.0, atol=1e-12)
    assert effect.suggest_border(1e-9) == n_convs


def test_a_concept_model_brings_its_own_layer() -> None:
    net = PoolNet().eval()
    attr = NMFConceptAttribution(net, net.relu, n_concepts=2)  # fitting is not needed
    images = _he(1, 256)
    effect = border_effect(attr, images, tile_size=128, max_depth=2)
    assert (effect.layer, effect.cell, effect.depths.tolist()) == ("relu", 8, [0, 1, 2])
    same = border_effect(net, images, tile_size=128, layer=net.relu, max_depth=2)
    assert np.array_equal(effect.change, same.change)
    assert effect.change[0] > 0.01  # PoolNet's 3 x 3 convolution reaches the outer ring only
    np.testing.assert_allclose(effect.change[1:], 0.0, atol=1e-12)
    assert net.training is False
    assert attr.forward_func is net


def test_lite0_head_effect_decreases_with_depth(lite0: nn.Module) -> None:
    from captum_nmf.zoo import normalize

    effect = border_effect(
        lite0, _he(2, 768), tile_size=384, layer=lite0.head_relu, transform=normalize
    )
    assert (effect.cell, effect.depths.tolist()) == (32, [0, 1, 2, 3, 4, 5])
    change = effect.change
    # with real weights the outer cells change by about as much as the features' own size;
    # the change peaks one cell in (the padding of the early layers), then falls with depth
    assert change[0] > 0.5
    assert (np.diff(change[1:]) < 0).all()
    assert change[-1] < change[1] / 2
    assert lite0.training is False


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"images": np.ones((1, 3, 64, 64))}, TypeError, "images must be an N x 3 x H x W tensor"),
        ({"images": torch.ones(3, 64, 64)}, ValueError, r"N x 3 x H x W with N >= 1, got \(3,"),
        ({"images": torch.ones(1, 3, 96, 128)}, ValueError, r"96 x 128 px are smaller than"),
        (  # 0-255 gave other changes than the same images in [0, 1] (69 against 70 %)
            {"images": torch.ones(1, 3, 128, 128, dtype=torch.uint8)},
            TypeError,
            r"floating point in \[0, 1\] .* got torch\.uint8; pass e\.g\. images\.float\(\) / 255",
        ),
        ({"tile_size": 64.0}, TypeError, "tile_size must be an int"),
        ({"tile_size": 60, "context": 34}, ValueError, "not a whole number of square cells"),
        ({"context": 12}, ValueError, "context=12 is not a whole number of 8 px cells"),
        (  # a value the caller did not pass was named as if given
            {"tile_size": 72, "images": torch.ones(1, 3, 160, 160)},
            ValueError,
            r"context=36 \(the default, half of tile_size=72\) is not a whole number of 8 px",
        ),
        ({"context": 16, "max_depth": 3}, ValueError, "context=16 px is 2 cells, not deeper"),
        ({"max_depth": 4}, ValueError, r"max_depth=4 is deeper than the middle"),
        ({"max_depth": -1}, ValueError, "max_depth must be >= 0"),
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
        ({"layer": None}, TypeError, "layer must be the torch.nn.Module"),
        ({"model": 3}, TypeError, "model must be an NMFConceptAttribution or a callable"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    net = _ones_net()
    options: dict[str, object] = {
        "model": net,
        "images": torch.ones(1, 3, 128, 128),
        "tile_size": 64,
        "layer": net[2],
    }
    options.update(kwargs)
    with pytest.raises(error, match=match):
        border_effect(**options)  # type: ignore[arg-type]


def test_layers_that_are_not_fully_convolutional_or_doubled_layers() -> None:
    pooled = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.AdaptiveAvgPool2d(4), nn.ReLU())
    with pytest.raises(ValueError, match=r"a 128 px window gave a \(4, 4\) feature map"):
        border_effect(pooled, torch.ones(1, 3, 128, 128), tile_size=64, layer=pooled[2])
    net = PoolNet().eval()
    attr = NMFConceptAttribution(net, net.relu, n_concepts=2)
    with pytest.raises(ValueError, match="pass layer= only with a forward function"):
        border_effect(attr, torch.ones(1, 3, 128, 128), tile_size=64, layer=net.relu)


def test_suggest_border_needs_a_deep_enough_measurement() -> None:
    net = _ones_net(3)
    effect = border_effect(net, _he(1, 128), tile_size=64, layer=net[-1])  # depths 0-3
    assert effect.suggest_border(1e-9) == 3
    shallow = border_effect(net, _he(1, 128), tile_size=64, layer=net[-1], max_depth=2)
    with pytest.raises(ValueError, match=r"the deepest measured cells \(depth 2\) still change"):
        shallow.suggest_border(0.01)
    with pytest.raises(ValueError, match="tolerance must be a positive fraction"):
        effect.suggest_border(0)


def test_suggest_border_does_not_pass_features_the_context_lacks() -> None:
    """The lone tile's padding makes features where its context has none: the change was NaN
    there, NaN > tolerance is False, and suggest_border said 0."""
    conv = nn.Conv2d(3, 1, 3, padding=1)
    with torch.no_grad():
        conv.weight.fill_(-1.0)
        conv.bias.fill_(20.0)  # 0 wherever the 3 x 3 neighbourhood is image, > 0 at padding
    net = nn.Sequential(nn.AvgPool2d(8), conv, nn.ReLU())
    effect = border_effect(net, torch.ones(2, 3, 128, 128), tile_size=64, layer=net[2])
    assert np.isinf(effect.change[0])
    assert np.isnan(effect.change[1:]).all()  # no features in tile nor context
    assert effect.suggest_border(0.05) == 1  # was 0
    table = effect.to_markdown()
    assert "| 0 | 0-8 | new features (context 0) | new features (context 0) |" in table
    assert "| 1 | 8-16 | no features | - |" in table
    with pytest.raises(TypeError, match="tolerance must be a positive fraction, got True"):
        effect.suggest_border(True)  # type: ignore[arg-type]
