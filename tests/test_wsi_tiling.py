"""Tile grids and the ``SlideTiles`` dataset (tissue detection: ``test_wsi_tissue.py``)."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from captum_nmf import NMFConceptAttribution
from captum_nmf.exceptions import EmptyTileGridWarning, SlideReadError
from captum_nmf.wsi import Slide, SlideTiles, TissueMask, tile_grid, write_pyramid
from tests.helpers.synthetic_slides import (
    CMU,
    blank_slide,
    cmu_pixels,
    flip_tile_marker,
    he_image,
    tissue_on_white,
)


@pytest.fixture(scope="module")
def slide_1000x700(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("s") / "s.svs"
    return write_pyramid(he_image()[:700, :1000], path, mpp=0.5)


# --------------------------------------------------------------------------- grid
@pytest.mark.parametrize(("edge", "rows", "cols"), [("pad", 5, 7), ("drop", 4, 6)])
def test_grid_counts_by_hand(slide_1000x700: Path, edge: str, rows: int, cols: int) -> None:
    # 1000 x 700, tile 256, stride 128: pad -> ceil((1000-256)/128)+1 = 7 columns,
    # ceil((700-256)/128)+1 = 5 rows; drop -> floor(744/128)+1 = 6, floor(444/128)+1 = 4.
    with Slide(slide_1000x700) as slide:
        grid = tile_grid(slide, tile_size=256, stride=128, edge=edge, tissue_mask=None)  # type: ignore[arg-type]
    assert (grid.n_rows, grid.n_cols, len(grid)) == (rows, cols, rows * cols)
    assert grid.locations[:3].tolist() == [[0, 0], [128, 0], [256, 0]]
    assert grid.locations[-1].tolist() == [128 * (cols - 1), 128 * (rows - 1)]
    assert np.all(np.diff(grid.rows) >= 0)  # raster order


def test_grid_at_level_1_is_in_level0_coordinates(slide_1000x700: Path) -> None:
    with Slide(slide_1000x700) as slide:
        grid = tile_grid(slide, tile_size=128, stride=64, level=1, tissue_mask=None)
    # level 1 is 500 x 350: ceil((500-128)/64)+1 = 7 columns, ceil((350-128)/64)+1 = 5 rows
    assert (grid.n_rows, grid.n_cols) == (5, 7)
    assert grid.locations[1].tolist() == [128, 0]  # 64 level-1 px = 128 level-0 px
    assert grid.tile_size_level0 == 256


def test_slide_smaller_than_a_tile(tmp_path: Path) -> None:
    tiny = write_pyramid(he_image()[:80, :100], tmp_path / "tiny.svs", mpp=0.5)
    with Slide(tiny) as slide:
        padded = tile_grid(slide, tile_size=224, stride=112, edge="pad")
        assert len(padded) == 1
        assert padded.tissue[0] == pytest.approx(1.0)  # fraction over the part inside
        with pytest.warns(EmptyTileGridWarning, match=r"No tile of tiny\.svs"):
            dropped = tile_grid(slide, tile_size=224, stride=112, edge="drop")
        assert len(dropped) == 0
    tiles = SlideTiles.from_grids([padded])
    image, _ = tiles[0]
    assert image is not None
    assert image.shape == (3, 224, 224)
    assert torch.all(image[:, 80:, :] == 1.0)  # padded with white
    assert torch.all(image[:, :, 100:] == 1.0)


def test_tissue_filter_keeps_tiles_on_tissue(tmp_path: Path) -> None:
    path = tissue_on_white(tmp_path / "t.svs", (1024, 1024), (512, 512, 512, 512))
    with Slide(path) as slide:
        grid = tile_grid(slide, tile_size=256, stride=256, min_tissue=0.5)
    # only the bottom-right 2 x 2 tiles hold the H&E block
    assert sorted(zip(grid.rows.tolist(), grid.cols.tolist(), strict=True)) == [
        (2, 2),
        (2, 3),
        (3, 2),
        (3, 3),
    ]
    assert np.all(grid.tissue > 0.9)


def test_blank_slide_gives_an_empty_grid_and_a_warning(tmp_path: Path) -> None:
    with (
        Slide(blank_slide(tmp_path / "b.svs")) as slide,
        pytest.warns(EmptyTileGridWarning, match="tissue fraction >= 0.25"),
    ):
        grid = tile_grid(slide, tile_size=256, stride=128)
    assert len(grid) == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"tile_size": 0}, ValueError, "tile_size must be >= 1, got 0"),
        ({"tile_size": 25.5}, TypeError, "tile_size must be an int"),
        ({"stride": -3}, ValueError, "stride must be >= 1"),
        ({"edge": "wrap"}, ValueError, "edge must be 'pad' or 'drop', got 'wrap'"),
        ({"min_tissue": 1.5}, ValueError, r"min_tissue must be a fraction in \[0, 1\]"),
        ({"tissue_mask": "li"}, ValueError, "tissue_mask must be a TissueMask, 'otsu' or None"),
        ({"tissue_mask": np.ones((4, 4), bool)}, TypeError, "TissueMask.from_array"),
        (
            {"on_tile_error": "log"},
            ValueError,
            "on_tile_error must be 'raise' or 'skip', got 'log'",
        ),
        ({"level": 7}, ValueError, "level=7 out of range"),
        ({"mpp": 0.2}, ValueError, "finer than level 0"),
    ],
)
def test_bad_grid_arguments(
    slide_1000x700: Path, kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with Slide(slide_1000x700) as slide, pytest.raises(error, match=match):
        tile_grid(slide, **kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------------ dataset
def test_slide_tiles_items_match_direct_reads(slide_1000x700: Path) -> None:
    tiles = SlideTiles(slide_1000x700, tile_size=256, stride=128, tissue_mask=None)
    assert len(tiles) == 35
    image, index = tiles[8]
    assert index == 8
    x, y = tiles.grids[0].locations[8]
    with Slide(slide_1000x700) as slide:
        raw = slide.read_region((int(x), int(y)), 0, (256, 256))
    assert image is not None
    assert image.dtype == torch.float32
    torch.testing.assert_close(image, torch.from_numpy(raw).permute(2, 0, 1).float() / 255)
    assert tiles.locate(-1) == (0, 34)
    with pytest.raises(IndexError, match="out of range for 35 tiles"):
        tiles[35]


def test_slide_tiles_pickle_without_handles(slide_1000x700: Path) -> None:
    tiles = SlideTiles(slide_1000x700, tile_size=256, stride=128, tissue_mask=None)
    first = tiles[0][0]
    assert len(tiles._handles) == 1  # this process opened one
    copy = pickle.loads(pickle.dumps(tiles))
    assert len(copy._handles) == 0
    assert torch.equal(copy[0][0], first)
    tiles.close()
    copy.close()


def _halve(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5


def test_two_worker_loader_equals_single_process(slide_1000x700: Path) -> None:
    tiles = SlideTiles(
        [slide_1000x700, CMU], tile_size=256, stride=256, transform=_halve, min_tissue=0.5
    )
    assert len(tiles.grids) == 2
    single = list(tiles.loader(batch_size=5, num_workers=0))
    multi = list(tiles.loader(batch_size=5, num_workers=2))
    assert len(single) == len(multi) == -(-len(tiles) // 5)
    for (a, ia, fa), (b, ib, fb) in zip(single, multi, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(ia, ib)
        assert fa.numel() == fb.numel() == 0
    assert float(single[0][0].max()) <= 0.5


def test_spawned_workers_open_their_own_handles(slide_1000x700: Path) -> None:
    tiles = SlideTiles(
        slide_1000x700, tile_size=256, stride=256, transform=_halve, tissue_mask=None
    )
    single = list(tiles.loader(batch_size=4))
    spawned = list(tiles.loader(batch_size=4, num_workers=2, multiprocessing_context="spawn"))
    for (a, ia, _), (b, ib, _) in zip(single, spawned, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(ia, ib)


def test_fit_takes_slide_tiles_directly(slide_1000x700: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.AvgPool2d(16), nn.Conv2d(3, 4, 1), nn.ReLU())
    tiles = SlideTiles(slide_1000x700, tile_size=128, stride=128, tissue_mask=None)
    attr = NMFConceptAttribution(net, net[2], n_concepts=2, random_state=0)
    attr.fit(tiles, batch_size=7, progress=False)
    assert attr.n_samples_seen_ == len(tiles) * 8 * 8
    reference = NMFConceptAttribution(net, net[2], n_concepts=2, random_state=0)
    reference.fit(DataLoader(tiles, batch_size=7), progress=False)
    torch.testing.assert_close(attr.concepts_, reference.concepts_)


def test_unreadable_tiles_raise_or_are_skipped(tmp_path: Path) -> None:
    broken = tmp_path / "broken.svs"
    bx, by = flip_tile_marker(CMU, broken, tile_index=52)  # a 240 px JPEG tile
    kwargs = {"tile_size": 240, "stride": 240, "tissue_mask": None}
    strict = SlideTiles(broken, **kwargs)  # type: ignore[arg-type]
    bad = int(np.flatnonzero((strict.grids[0].locations == [bx, by]).all(axis=1))[0])
    with pytest.raises(SlideReadError, match=r"broken\.svs") as info:
        strict[bad]
    assert info.value.location == (bx, by)
    lenient = SlideTiles(broken, on_tile_error="skip", **kwargs)  # type: ignore[arg-type]
    assert lenient[bad] == (None, bad)
    images, indices, failed = SlideTiles.collate_fn([lenient[bad - 1], lenient[bad]])
    assert images.shape == (1, 3, 240, 240)
    assert indices.tolist() == [bad - 1]
    assert failed.tolist() == [bad]
    batches = list(lenient.loader(batch_size=8, num_workers=2))
    assert sum(int(f.numel()) for _, _, f in batches) == 1
    assert sum(int(i.numel()) for _, i, _ in batches) == len(lenient) - 1
    torch.testing.assert_close(
        lenient[0][0], torch.from_numpy(cmu_pixels()[:240, :240]).permute(2, 0, 1).float() / 255
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"on_tile_error": "ignore"}, ValueError, "on_tile_error must be 'raise' or 'skip'"),
        ({"transform": 3}, TypeError, "transform must be callable"),
    ],
)
def test_bad_dataset_arguments(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        SlideTiles(CMU, **kwargs)  # type: ignore[arg-type]


def test_dataset_needs_paths_and_one_mask_per_slide() -> None:
    with pytest.raises(ValueError, match="paths is empty"):
        SlideTiles([])
    mask = TissueMask(np.ones((4, 4), bool), (600.0, 800.0))
    with pytest.raises(ValueError, match="one TissueMask cannot serve several slides"):
        SlideTiles([CMU, CMU], tissue_mask=mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # 2220 x 2967 px, pad: (ceil(1708 / 512) + 1) x (ceil(2455 / 512) + 1) = 5 x 6 tiles
        assert len(SlideTiles(CMU, tissue_mask=mask, tile_size=512, stride=512)) == 30


def test_handles_are_bounded_per_process(slide_1000x700: Path) -> None:
    tiles = SlideTiles(
        [slide_1000x700, CMU, slide_1000x700],
        tile_size=512,
        stride=512,
        tissue_mask=None,
        max_open_slides=2,
    )
    for i in range(len(tiles)):
        tiles[i]
    # one handle per file (grids 0 and 2 share one), least recently used first
    assert list(tiles._handles) == [tiles.grids[1].path, tiles.grids[2].path]
    one = SlideTiles.from_grids(tiles.grids, max_open_slides=1)
    for i in range(len(one)):
        one[i]
    assert list(one._handles) == [tiles.grids[2].path]  # the others were closed
    one.close()
    tiles.close()
    with pytest.raises(ValueError, match="max_open_slides must be >= 1"):
        SlideTiles(CMU, max_open_slides=0)


def test_grid_with_a_margin(slide_1000x700: Path) -> None:
    with Slide(slide_1000x700) as slide:
        grid = tile_grid(slide, tile_size=320, stride=256, margin=32, tissue_mask=None)
        assert (grid.n_rows, grid.n_cols) == (3, 4)  # ceil(700 / 256), ceil(1000 / 256)
        assert grid.locations[:2].tolist() == [[-32, -32], [224, -32]]
        assert grid.location(5) == (224, 224)
        with pytest.raises(ValueError, match="needs tile_size == stride \\+ 2 \\* margin"):
            tile_grid(slide, tile_size=300, stride=256, margin=32, tissue_mask=None)
        with pytest.raises(ValueError, match="margin must be >= 0, got -1"):
            tile_grid(slide, margin=-1, tissue_mask=None)
