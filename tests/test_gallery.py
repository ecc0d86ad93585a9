"""Prototype galleries: the strongest tiles per concept, near-duplicates out, saved as images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from captum_nmf import NMFConceptAttribution
from captum_nmf.exceptions import NotFittedError
from captum_nmf.gallery import concept_gallery
from captum_nmf.wsi import SlideTiles
from tests.helpers import runs
from tests.helpers.wsi_models import PoolNet


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return runs.he_slide(tmp_path_factory.mktemp("gallery"))


@pytest.fixture(scope="module")
def attr(slide: Path) -> NMFConceptAttribution:
    return runs.pool_concepts(slide)


def test_tensor_source_scores_order_and_duplicates(
    slide: Path, attr: NMFConceptAttribution
) -> None:
    tiles = SlideTiles(slide, tile_size=64, stride=32, tissue_mask=None)
    x = torch.stack([tiles[i][0] for i in range(12)])
    x = torch.cat([x, x[:1]])  # tile 12 repeats tile 0 exactly
    gallery = concept_gallery(attr, x, top_n=4, batch_size=5, progress=False)
    with torch.no_grad():
        expected = attr.attribute(x).double().mean(dim=(2, 3)).numpy()
    assert gallery.names == attr.concept_names
    for j, entries in enumerate(gallery.entries):
        assert 1 <= len(entries) <= 4
        scores = [e.score for e in entries]
        assert scores == sorted(scores, reverse=True)
        best = int(np.argmax(expected[:, j]))
        assert entries[0].score == pytest.approx(float(expected[:, j].max()))
        assert entries[0].tile in (best, 0 if best == 12 else best)
        assert not {0, 12} <= {e.tile for e in entries}  # the repeat is a near-duplicate


def test_slide_tiles_source_locations_and_save(
    tmp_path: Path, slide: Path, attr: NMFConceptAttribution
) -> None:
    tiles = SlideTiles(slide, tile_size=64, stride=32, tissue_mask=None)
    attr.rename({0: "stroma"})
    gallery = concept_gallery(attr, tiles, top_n=3, progress=False)
    for entries in gallery.entries:
        assert len(entries) == 3
        locations = [e.location for e in entries]
        assert all(loc is not None for loc in locations)
        for a in range(3):
            for b in range(a + 1, 3):
                dx = abs(locations[a][0] - locations[b][0])  # type: ignore[index]
                dy = abs(locations[a][1] - locations[b][1])  # type: ignore[index]
                assert max(dx, dy) >= 32  # never more than half a tile of overlap
        first = entries[0]
        assert first.image.shape == (64, 64, 3)
        assert np.array_equal(first.image * 255, np.asarray(tiles.read(first.tile), np.float64))
    out = gallery.save(tmp_path / "g")
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "gallery.csv",
        "gallery_concept_0.png",
        "gallery_concept_1.png",
        "gallery_concept_2.png",
    ]
    assert "stroma" in (out / "gallery.csv").read_text()


def test_bad_input(attr: NMFConceptAttribution) -> None:
    x = torch.rand(2, 3, 64, 64)
    with pytest.raises(ValueError, match="top_n must be >= 1"):
        concept_gallery(attr, x, top_n=0, progress=False)
    with pytest.raises(TypeError, match="top_n must be an int"):
        concept_gallery(attr, x, top_n=1.5, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="labels must hold 3 names"):
        concept_gallery(attr, x, labels=["a"], progress=False)
    with pytest.raises(ValueError, match="source holds no tiles"):
        concept_gallery(attr, [], progress=False)
    net = PoolNet()
    with pytest.raises(NotFittedError, match="not fitted"):
        concept_gallery(NMFConceptAttribution(net, net.relu, 3), x, progress=False)
    with pytest.raises(IndexError, match="no concept 5"):
        concept_gallery(attr, x, progress=False).figure(5)


def test_a_gallery_over_several_slides_names_each_tiles_slide(
    tmp_path: Path, slide: Path, attr: NMFConceptAttribution
) -> None:
    import csv
    import shutil

    twin = Path(shutil.copy(slide, tmp_path / "twin.svs"))  # the same pixels at the same places
    tiles = SlideTiles([slide, twin], tile_size=64, stride=32, tissue_mask=None)
    gallery = concept_gallery(attr, tiles, top_n=2, progress=False)
    for entries in gallery.entries:
        # a tile and its twin at the same place are not near repeats of each other:
        # they are on two slides, and both are shown
        assert entries[0].score == pytest.approx(entries[1].score)
        assert {e.slide for e in entries} == {str(slide.resolve()), str(twin.resolve())}
        assert entries[0].location == entries[1].location
    with (gallery.save(tmp_path / "g") / "gallery.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {Path(r["slide"]).name for r in rows} == {"he.svs", "twin.svs"}
