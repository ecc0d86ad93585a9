"""Every tissue cell inside the slide gets a value: slide edges, tissue edges, failed tiles.

Real H&E whose tissue reaches the image's edges, tiles of 256 px every 128 px and the
average-pool network (8 px cells, so a tile has 32 x 32 cells and a 2-cell border). The
paper's 2-cell border drop would leave the slide's outer ring of cells without a value: no
other tile covers it. :func:`~captum_nmf.wsi.stitching.cell_coverage` lets each cell take the
tiles that see it best instead, so the ring gets the edge tiles' values, while every cell some
tile's interior covers keeps the paper's averaging.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from captum_nmf import NMFConceptAttribution
from captum_nmf.exceptions import UnreadableRegionWarning
from captum_nmf.wsi import SlideExplanation, SlideTiles, explain_slide, write_pyramid
from captum_nmf.wsi.regions import tissue_cells
from tests.helpers.synthetic_slides import CMU, flip_tile_marker, he_image, tissue_on_white
from tests.helpers.wsi_models import PoolNet

pytestmark = pytest.mark.filterwarnings("error::UserWarning")


@pytest.fixture(scope="module")
def nest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1280 x 960 px of real H&E, tissue to every edge (the issue's size).

    Tiles of 256 px every 128 px: 9 columns end exactly at the right edge (so its ring lies
    only in tile borders, like the left and top ones); 960 px needs a padded last tile row.
    """
    return write_pyramid(he_image()[:960, :1280], tmp_path_factory.mktemp("nest") / "nest.tiff")


@pytest.fixture(scope="module")
def attr(nest: Path) -> NMFConceptAttribution:
    net = PoolNet().eval()
    model = NMFConceptAttribution(net, net.relu, n_concepts=3, random_state=0)
    return model.fit(SlideTiles(nest, tile_size=64, stride=32), batch_size=64, progress=False)


def _wanted(ex: SlideExplanation) -> np.ndarray:
    """Cells at least half tissue, by the explanation's own mask (the runner's rule)."""
    return tissue_cells(ex.tissue, ex.grid_shape, ex.cell_size)


@pytest.mark.parametrize("mode", ["tile", "region"])
def test_every_tissue_cell_up_to_the_slide_edges_gets_a_value(
    nest: Path, attr: NMFConceptAttribution, mode: str
) -> None:
    ex = explain_slide(
        attr,
        nest,
        tile_size=256,
        stride=128,
        mode=mode,  # type: ignore[arg-type]
        region_size=256,
        region_margin=16,
        progress=False,
    )
    assert ex.grid_shape == (120, 160)
    wanted = _wanted(ex)
    ring = np.ones(ex.grid_shape, bool)
    ring[2:-2, 2:-2] = False  # what the 2-cell border drop used to leave empty
    assert wanted[ring].mean() > 0.9  # the tissue does reach the edges
    assert (ex.counts[wanted] > 0).all()
    assert np.isfinite(ex.concept_maps[:, wanted]).all()
    assert (ex.assignment[wanted] >= 0).all()
    for side in (ex.assignment[0], ex.assignment[-1], ex.assignment[:, 0], ex.assignment[:, -1]):
        assert (side >= 0).mean() > 0.9  # all four sides carry concepts


def test_kept_edges_equal_the_whole_image_and_the_interior_is_unchanged(
    nest: Path, attr: NMFConceptAttribution
) -> None:
    """PoolNet's zero padding reaches one cell: every cell, the slide's ring included, equals
    the concept weights of the whole image's features (the slide's edge is the image's edge)."""
    ex = explain_slide(
        attr, nest, tile_size=256, stride=128, tissue_mask=None, edge="drop", progress=False
    )
    assert len(ex.tile_locations) == 9 * 6  # 960 px: 6 whole tile rows, the last ends at 896
    image = torch.from_numpy(he_image()[:960, :1280]).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        whole = attr.forward_func.features(image)[0].permute(1, 2, 0)  # type: ignore[operator]
    expected = attr.nmf_.transform(whole.reshape(-1, 4)).reshape(120, 160, 3).numpy()
    reached = np.zeros((120, 160), bool)
    reached[:112] = True  # tiles end at 896 px = cell 112 with edge="drop"
    assert (ex.counts[reached] > 0).all()
    assert (ex.counts[~reached] == 0).all()
    # interiors every 16 cells, 28 wide: 1 or 2 per axis, and the edges' tiles on the ring
    per_row = [1] * 18 + ([2] * 12 + [1] * 4) * 4 + [2] * 12 + [1] * 18
    per_col = [1] * 18 + ([2] * 12 + [1] * 4) * 7 + [2] * 12 + [1] * 18
    assert len(per_row) == 112
    np.testing.assert_array_equal(ex.counts[:112], np.outer(per_row, per_col))
    # rows 110-111 lie in the last tile row's bottom border: the image goes on below them, so
    # they carry that border's bias (a tissue edge, not the slide's); every other cell is exact
    exact = reached.copy()
    exact[110:112] = False
    np.testing.assert_allclose(ex.concept_maps[:, exact].T, expected[exact], rtol=1e-4, atol=1e-4)


def test_tissue_edges_next_to_left_out_tiles(tmp_path: Path, attr: NMFConceptAttribution) -> None:
    """Real H&E pasted on white: tiles with too little tissue are left out, and the tissue
    cells next to them lie only in the kept tiles' borders."""
    path = tissue_on_white(tmp_path / "island.svs", (1536, 1280), (300, 260, 900, 700))
    ex = explain_slide(attr, path, tile_size=256, stride=128, min_tissue=0.5, progress=False)
    wanted = _wanted(ex)
    assert wanted.sum() > 0.8 * (900 * 700) / 64  # most of the pasted tissue
    assert (ex.counts[wanted] > 0).all()
    assert np.isfinite(ex.concept_maps[:, wanted]).all()
    assert (ex.assignment[wanted] >= 0).all()


def test_cells_only_failed_tiles_reached_are_nan_at_the_edge_too(
    tmp_path: Path, attr: NMFConceptAttribution
) -> None:
    broken = tmp_path / "corner.svs"
    flip_tile_marker(CMU, broken, tile_index=0)  # the top-left 240 px JPEG tile
    with pytest.warns(UnreadableRegionWarning, match=r"1024 tissue cells that only they"):
        ex = explain_slide(
            attr,
            broken,
            tile_size=240,
            stride=120,
            tissue_mask=None,
            on_tile_error="skip",
            progress=False,
        )
    # every tile whose 240 px window touches the broken JPEG tile fails: (0, 0), (0, 120),
    # (120, 0), (120, 120)
    assert sorted(map(tuple, ex.failed_tiles.tolist())) == [(0, 0), (0, 120), (120, 0), (120, 120)]
    # 30-cell tiles every 15 cells: the next interiors start at cell 32 on each axis, so the
    # failed tiles alone reached cells [0, 32) x [0, 32), the slide's corner and edges included
    empty = ex.counts == 0
    assert empty[:32, :32].all()
    assert empty.sum() == 32 * 32  # the rest of the slide's ring has values
    assert np.isnan(ex.concept_maps[:, empty]).all()  # never silently zero
    assert (ex.assignment[empty] == -1).all()
    assert np.isfinite(ex.concept_maps[:, ~empty]).all()


def test_a_stride_beyond_the_tiles_interiors_is_refused(
    tmp_path: Path, nest: Path, attr: NMFConceptAttribution
) -> None:
    """The cells between interiors that do not meet got the border rings the run was asked to
    drop, all over the slide: at 64/48, border 2, 75 % of mid-slide cells, without a word.
    (PoolNet: 8 px cells; 64 px tiles less 2 cells on each side leave 32 px interiors.)"""
    said = r"stride=48 leaves gaps .* is 32 px\. Pass stride <= 32, a larger tile_size \(>= 80\)"
    with pytest.raises(ValueError, match=said):
        explain_slide(
            attr, nest, tile_size=64, stride=48, border=2, out_dir=tmp_path / "run", progress=False
        )
    assert not (tmp_path / "run").exists()  # refused before anything is written
    explain_slide(attr, nest, tile_size=80, stride=48, border=2, progress=False)  # the fixes
    explain_slide(attr, nest, tile_size=64, stride=48, border=1, progress=False)
    # tiles that do not overlap keep their borders (no other tile covers them), as before
    explain_slide(attr, nest, tile_size=64, stride=64, border=2, progress=False)


def test_numpy_sizes_are_checked_and_recorded_as_python_ints(
    tmp_path: Path, nest: Path, attr: NMFConceptAttribution
) -> None:
    """np.int64 tile_size/stride skipped the stride > tile_size check (72 % of cells without a
    map); np.int64 border crashed the run's hash (or the save after a whole run)."""
    with pytest.raises(ValueError, match="stride=128 is larger than tile_size=64"):
        explain_slide(attr, nest, tile_size=np.int64(64), stride=np.int64(128), progress=False)
    ex = explain_slide(
        attr,
        nest,
        tile_size=np.int64(64),
        stride=np.int64(32),
        border=np.int64(2),
        batch_size=np.int64(64),
        out_dir=tmp_path / "run",
        progress=False,
    )
    assert type(ex.config["border"]) is int
    reference = explain_slide(attr, nest, tile_size=64, stride=32, border=2, progress=False)
    np.testing.assert_array_equal(ex.concept_maps, reference.concept_maps)
