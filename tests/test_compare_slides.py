"""The analyses on slides: samples of SlideExplanation tiles, and analyse() over SlideTiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from captum_nmf import NMFConceptAttribution
from captum_nmf.compare import analyse, sample_tiles, weight_correlation
from captum_nmf.wsi import SlideTiles, explain_slide, write_pyramid
from tests.helpers.synthetic_slides import he_image
from tests.helpers.wsi_models import PoolNet


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("two")
    image = he_image()
    return [
        write_pyramid(image[:256, :320], root / "a.svs", mpp=0.5),
        write_pyramid(image[600:856, 700:1020], root / "b.svs", mpp=0.5),
    ]


@pytest.fixture(scope="module")
def attr(two_slides: list[Path]) -> NMFConceptAttribution:
    net = PoolNet().eval()
    tiles = SlideTiles(two_slides, tile_size=64, stride=64, tissue_mask=None)
    return NMFConceptAttribution(net, net.relu, 3, random_state=0).fit(tiles, progress=False)


def test_sample_tiles_from_slide_explanations(
    two_slides: list[Path], attr: NMFConceptAttribution
) -> None:
    explanations = [
        explain_slide(attr, p, tile_size=64, stride=32, tissue_mask=None, progress=False)
        for p in two_slides
    ]
    total = sum(len(e.tile_locations) for e in explanations)
    sample = sample_tiles(explanations, 25, random_state=1)
    assert sample.maps is not None
    assert sample.outputs is not None
    assert sample.groups is not None
    assert sample.locations is not None
    assert sample.maps.shape == (25, 3, 8, 8)  # 64 px tiles of 8 px cells
    assert set(sample.groups.tolist()) == {0, 1}
    for i, (group, (x, y)) in enumerate(zip(sample.groups, sample.locations, strict=True)):
        ex = explanations[int(group)]
        r0, c0 = y // 8, x // 8
        window = ex.concept_maps[:, r0 : r0 + 8, c0 : c0 + 8]
        np.testing.assert_array_equal(
            sample.maps[i, :, : window.shape[1], : window.shape[2]], window
        )
        t = int(np.flatnonzero((ex.tile_locations == [x, y]).all(axis=1))[0])
        assert ex.tile_outputs is not None
        np.testing.assert_array_equal(sample.outputs[i], ex.tile_outputs[t])
    assert len(sample_tiles(explanations, None).indices) == total
    assert np.isfinite(weight_correlation(sample.maps).mean[0, 1])


def test_analyse_over_slide_tiles_groups_by_slide(
    two_slides: list[Path], attr: NMFConceptAttribution
) -> None:
    tiles = SlideTiles(two_slides, tile_size=64, stride=64, tissue_mask=None)
    result = analyse(attr, tiles, n_tiles=30, cam_methods=("gradcam",), progress=False)
    assert result.n_tiles == 30
    sample = sample_tiles(tiles, 30)
    assert sample.groups is not None
    assert set(sample.groups.tolist()) == {0, 1}
    np.testing.assert_array_equal(result.indices, sample.indices)
    assert sample.inputs is not None
    maps = attr.attribute(sample.inputs)
    torch.testing.assert_close(torch.from_numpy(result.concept_maps), maps)
