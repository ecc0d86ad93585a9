"""Stitching overlapping tiles' feature maps: counts by hand, border drop, exact geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from captum_nmf.wsi import FeatureStitcher, SlideTiles, write_pyramid
from captum_nmf.wsi.stitching import cell_coverage
from tests.helpers.synthetic_slides import he_image
from tests.helpers.wsi_models import PoolNet

# Tiles of 8 x 8 cells every 2 cells with a 2-cell border: tile i covers cells [2i + 2, 2i + 6).
AXIS_COUNTS = [0, 0, 1, 1, 2, 2, 2, 2, 1, 1, 0, 0]  # 3 tiles per axis on a 12-cell axis


def _run(st: FeatureStitcher, tiles: list[tuple[int, int, float]]) -> dict[int, np.ndarray]:
    rows: dict[int, np.ndarray] = {}
    counts: dict[int, np.ndarray] = {}
    for r, c, value in tiles:
        st.add(np.full((1, 8, 8, 1), value, np.float32), np.array([[r, c]]))
        for band in st.pop_final():
            rows[band.row], counts[band.row] = band.features[:, 0], band.counts
    for band in st.finish():
        rows[band.row], counts[band.row] = band.features[:, 0], band.counts
    return {"means": rows, "counts": counts}  # type: ignore[return-value]


def test_counts_and_means_by_hand() -> None:
    st = FeatureStitcher((12, 12), 1, border=2)
    tiles = [(2 * i, 2 * j, float(3 * i + j + 1)) for i in range(3) for j in range(3)]
    out = _run(st, tiles)
    counts = np.zeros((12, 12), int)
    for r, c in out["counts"].items():
        counts[r] = c
    np.testing.assert_array_equal(counts, np.outer(AXIS_COUNTS, AXIS_COUNTS))
    means = out["means"]
    assert means[2][2] == 1.0  # only tile (0, 0)
    assert means[4][4] == pytest.approx((1 + 2 + 4 + 5) / 4)  # tiles (0,0) (0,1) (1,0) (1,1)
    assert means[3][6] == pytest.approx((2 + 3) / 2)  # row 3: tile row 0 only; col 6: tiles 1, 2
    assert means[4][0] == 0.0  # never covered
    assert sorted(means) == list(range(2, 10))  # rows without data are never handed out


def test_memory_holds_one_band_of_rows() -> None:
    st = FeatureStitcher((200, 4), 3, border=2)
    peak = 0
    for i in range(96):  # tile rows at cell rows 0, 2, 4, ...
        st.add(np.ones((1, 8, 8, 3), np.float32), np.array([[2 * i, 0]]))
        peak = max(peak, st.active_rows)
        st.pop_final()
    assert peak == 6  # (8 - 2 * 2) cells of a tile + the 2-cell stride, whatever the length
    assert len(st.finish()) == 4


def test_state_round_trip_continues_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    feats = rng.random((12, 8, 8, 5), dtype=np.float32)
    origins = np.array([[2 * (i // 4), 2 * (i % 4)] for i in range(12)])
    whole = FeatureStitcher((14, 14), 5, border=1)
    done = []
    for i in range(12):
        whole.add(feats[i : i + 1], origins[i : i + 1])
        done += whole.pop_final()
    done += whole.finish()
    first = FeatureStitcher((14, 14), 5, border=1)
    resumed_bands = []
    for i in range(5):
        first.add(feats[i : i + 1], origins[i : i + 1])
        resumed_bands += first.pop_final()
    state = first.state()
    assert state["cols"].tolist() == list(range(1, 13))  # only columns holding data
    second = FeatureStitcher.from_state(state, 5)
    for i in range(5, 12):
        second.add(feats[i : i + 1], origins[i : i + 1])
        resumed_bands += second.pop_final()
    resumed_bands += second.finish()
    assert [b.row for b in done] == [b.row for b in resumed_bands]
    for a, b in zip(done, resumed_bands, strict=True):
        assert np.array_equal(a.features, b.features)
        assert np.array_equal(a.counts, b.counts)


def test_tiles_past_the_grid_are_clipped() -> None:
    st = FeatureStitcher((5, 5), 1, border=0)
    st.add(np.ones((1, 4, 4, 1), np.float32), np.array([[3, 3]]))
    bands = st.finish()
    assert [b.row for b in bands] == [3, 4]
    assert bands[0].counts.tolist() == [0, 0, 0, 1, 1]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: FeatureStitcher((0, 4), 1), ValueError, "grid_shape must be two positive ints"),
        (lambda: FeatureStitcher((4, 4), 0), ValueError, "n_channels must be >= 1"),
        (lambda: FeatureStitcher((4, 4), 1.0), TypeError, "n_channels must be an int"),  # type: ignore[arg-type]
        (lambda: FeatureStitcher((4, 4), 1, border=-1), ValueError, "border must be >= 0, got -1"),
        (lambda: FeatureStitcher((4, 4), 1, border=1.5), TypeError, "border must be an int >= 0"),  # type: ignore[arg-type]
    ],
)
def test_bad_stitcher_arguments(call: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()  # type: ignore[operator]


def test_bad_additions() -> None:
    st = FeatureStitcher((20, 20), 2, border=2)
    with pytest.raises(ValueError, match="features have 3 channels, the stitcher 2"):
        st.add(np.ones((1, 8, 8, 3), np.float32), np.array([[0, 0]]))
    with pytest.raises(ValueError, match=r"border=2 drops every cell of a 4 x 4 feature map"):
        st.add(np.ones((1, 4, 4, 2), np.float32), np.array([[0, 0]]))
    with pytest.raises(ValueError, match="one origin per tile"):
        st.add(np.ones((2, 8, 8, 2), np.float32), np.array([[0, 0]]))
    st.add(np.ones((1, 8, 8, 2), np.float32), np.array([[4, 0]]))
    with pytest.raises(ValueError, match="tiles must arrive in raster order"):
        st.add(np.ones((1, 8, 8, 2), np.float32), np.array([[2, 0]]))


# ----------------------------------------------------------- geometry on a real image
def test_stitched_features_equal_whole_image_features(tmp_path: Path) -> None:
    """Tiles read from a slide, stitched, equal the features of the whole image at once."""
    image = he_image()[:384, :512]  # (512 - 64) / 16 and (384 - 64) / 16 are whole numbers
    path = write_pyramid(image, tmp_path / "he.svs", mpp=0.5)
    net = PoolNet().eval()
    tiles = SlideTiles(path, tile_size=64, stride=16, tissue_mask=None)
    grid = tiles.grids[0]
    assert (grid.n_rows, grid.n_cols) == (21, 29)
    st = FeatureStitcher((48, 64), 4, border=2)
    means = np.zeros((48, 64, 4), np.float32)
    counts = np.zeros((48, 64), np.int32)
    with torch.no_grad():
        for images, idx, _ in tiles.loader(batch_size=64):
            feats = net.features(images).permute(0, 2, 3, 1).numpy()
            st.add(feats, np.stack([grid.rows[idx] * 2, grid.cols[idx] * 2], axis=1))
            for band in st.pop_final():
                means[band.row], counts[band.row] = band.features, band.counts
        for band in st.finish():
            means[band.row], counts[band.row] = band.features, band.counts
        whole = net.features(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)
    whole = whole[0].permute(1, 2, 0).numpy()
    # counts: per axis 0, 0, 1, 1, then 2 everywhere two tiles overlap, then 1, 1, 0, 0
    row_counts = [0, 0, 1, 1] + [2] * 40 + [1, 1, 0, 0]
    col_counts = [0, 0, 1, 1] + [2] * 56 + [1, 1, 0, 0]
    np.testing.assert_array_equal(counts, np.outer(row_counts, col_counts))
    covered = counts > 0
    np.testing.assert_allclose(means[covered], whole[covered], rtol=1e-5, atol=1e-6)
    # without the border drop, the tiles' zero-padded outer cells would not match
    st0 = FeatureStitcher((48, 64), 4, border=0)
    with torch.no_grad():
        images, idx, _ = next(iter(tiles.loader(batch_size=1)))
        st0.add(net.features(images).permute(0, 2, 3, 1).numpy(), np.array([[0, 0]]))
    edge_row = next(b for b in st0.finish() if b.row == 7)
    assert not np.allclose(edge_row.features[:8], whole[7, :8], rtol=1e-3)


# ------------------------------------------------- slide and tissue edges (cell_coverage)
# Tiles of 8 x 8 cells every 4 cells (256 px tiles every 128 px at 32 px cells) with a 2-cell
# border: interiors [4i + 2, 4i + 6) tile the axis from cell 2 on; cells 0-1 and the last two
# lie only in the outer tiles' borders.
def _grid_run(
    tiles: list[tuple[int, int]],
    shape: tuple[int, int],
    coverage: np.ndarray | None,
    feats: np.ndarray | None = None,
    pop_each: bool = True,
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Stitch 8 x 8 tiles one by one; return means (Hc x Wc x C), counts and the pop order."""
    c = 1 if feats is None else feats.shape[-1]
    st = FeatureStitcher(shape, c, border=2, coverage=coverage)
    means = np.zeros((*shape, c), np.float32)
    counts = np.zeros(shape, np.int32)
    order: list[int] = []

    def take(bands: list) -> None:  # type: ignore[type-arg]
        for band in bands:
            means[band.row], counts[band.row] = band.features, band.counts
            order.append(band.row)

    for i, (r, col) in enumerate(tiles):
        tile = (
            np.full((1, 8, 8, 1), float(i + 1), np.float32) if feats is None else feats[i : i + 1]
        )
        st.add(tile, np.array([[r, col]]))
        if pop_each:
            take(st.pop_final())
    take(st.finish())
    return means, counts, order


def _brute_coverage(tiles: list[tuple[int, int]], shape: tuple[int, int]) -> np.ndarray:
    """Reference: for each cell, the fewest sides of a tile's border it lies in (3: no tile)."""
    level = np.full(shape, 3, np.uint8)
    for r0, c0 in tiles:
        for r in range(max(r0, 0), min(r0 + 8, shape[0])):
            for c in range(max(c0, 0), min(c0 + 8, shape[1])):
                sides = int(not 2 <= r - r0 < 6) + int(not 2 <= c - c0 < 6)
                level[r, c] = min(level[r, c], sides)
    return level


THREE_BY_THREE = [(4 * i, 4 * j) for i in range(3) for j in range(3)]  # values 1..9 row-major


def test_cell_coverage_by_hand() -> None:
    level = cell_coverage(np.array(THREE_BY_THREE), (8, 8), 2, (16, 18))
    edge = [1, 1] + [0] * 12 + [1, 1]  # a column of the 16 x 18 grid, away from the corners
    assert level[:, 5].tolist() == edge
    assert level[7, :].tolist() == [*edge, 3, 3]  # columns 16-17: no tile reaches them
    assert level[:2, :2].tolist() == [[2, 2], [2, 2]]  # only tile (0, 0)'s corner
    assert level[0, 2:14].tolist() == [1] * 12  # the top edge: beside some interior
    assert level[14:, 14:16].tolist() == [[2, 2], [2, 2]]
    assert (level[:, 16:] == 3).all()
    # tiles reaching past the grid are clipped; a tile wholly outside changes nothing
    clipped = cell_coverage(np.array([[-2, -2], [40, 40]]), (8, 8), 2, (6, 6))
    assert clipped.tolist() == [[0] * 4 + [1, 1]] * 4 + [[1] * 4 + [2, 2]] * 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cell_coverage_matches_a_cell_by_cell_count(seed: int) -> None:
    rng = np.random.default_rng(seed)
    tiles = [(int(r), int(c)) for r, c in rng.integers(-6, 30, size=(25, 2))]
    level = cell_coverage(np.array(tiles), (8, 8), 2, (31, 27))
    np.testing.assert_array_equal(level, _brute_coverage(tiles, (31, 27)))
    assert cell_coverage(np.zeros((0, 2), np.int64), (8, 8), 2, (3, 3)).tolist() == [[3] * 3] * 3


def test_edges_kept_on_all_four_sides_by_hand() -> None:
    shape = (16, 16)
    coverage = cell_coverage(np.array(THREE_BY_THREE), (8, 8), 2, shape)
    assert (coverage < 3).all()
    means, counts, _ = _grid_run(THREE_BY_THREE, shape, coverage)
    old_means, old_counts, _ = _grid_run(THREE_BY_THREE, shape, None)
    assert (counts > 0).all()  # every cell of the slide has a value, the edges included
    assert (old_counts[[0, 1, 14, 15], :] == 0).all()  # today: a 2-cell ring without one
    assert (old_counts[:, [0, 1, 14, 15]] == 0).all()
    # interiors tile the slide from cell 2 to 14 without overlap: one tile per inner cell
    assert (counts[2:14, 2:14] == 1).all()
    inner = coverage == 0
    np.testing.assert_array_equal(counts[inner], old_counts[inner])
    np.testing.assert_array_equal(means[inner], old_means[inner])
    # top edge, column 5: tile 1 (columns [0, 8), interior [2, 6)) sees it on one side only;
    # tile 2 (columns [4, 12)) has it in its corner and does not count
    assert (counts[0, 5], means[0, 5, 0]) == (1, 1.0)
    assert (counts[1, 6], means[1, 6, 0]) == (1, 2.0)  # column 6: tile 2's interior columns
    assert (counts[5, 0], means[5, 0, 0]) == (1, 1.0)  # left edge: tile 1 (rows [2, 6))
    assert (counts[9, 15], means[9, 15, 0]) == (1, 6.0)  # right edge: tile 6 (rows [6, 10))
    assert (counts[15, 7], means[15, 7, 0]) == (1, 8.0)  # bottom edge: tile 8
    # slide corners: only the corner tile reaches them (on two sides)
    for r, c, value in ((0, 0, 1), (1, 15, 3), (15, 0, 7), (14, 14, 9)):
        assert (counts[r, c], means[r, c, 0]) == (1, value)


def test_kept_border_cells_average_the_tiles_that_see_them_best() -> None:
    # tiles every 2 cells: the top edge rows lie in the border (one side) of several tiles
    tiles = [(0, 0), (0, 2), (0, 4)]
    coverage = cell_coverage(np.array(tiles), (8, 8), 2, (8, 12))
    means, counts, _ = _grid_run(tiles, (8, 12), coverage)
    # row 0 lies in every tile's top border; each cell takes the tiles whose interior columns
    # hold it (one side), the slide's corners the corner tile (two sides)
    assert coverage[0].tolist() == [2, 2] + [1] * 8 + [2, 2]
    assert counts[0].tolist() == [1, 1, 1, 1, 2, 2, 2, 2, 1, 1, 1, 1]
    assert means[0, :4, 0].tolist() == [1.0] * 4
    assert means[0, 5, 0] == pytest.approx((1 + 2) / 2)  # tiles 1 and 2, not tile 3's corner
    assert means[6, 7, 0] == pytest.approx((2 + 3) / 2)  # the bottom edge likewise
    assert counts[:, 0].tolist() == [1] * 8  # the left edge: tile 1 alone


def test_tissue_edge_next_to_a_left_out_tile() -> None:
    tiles = [t for t in THREE_BY_THREE if t != (4, 4)]  # the middle tile had too little tissue
    values = {t: float(3 * (t[0] // 4) + t[1] // 4 + 1) for t in tiles}
    shape = (16, 16)
    coverage = cell_coverage(np.array(tiles), (8, 8), 2, shape)
    feats = np.stack([np.full((8, 8, 1), values[t], np.float32) for t in tiles])
    means, counts, _ = _grid_run(tiles, shape, coverage, feats)
    old_means, old_counts, _ = _grid_run(tiles, shape, None, feats)
    hole = np.zeros(shape, bool)
    hole[6:10, 6:10] = True  # the left-out tile's interior
    assert (old_counts[hole] == 0).all()  # today: no value where the tile was left out
    assert (old_counts[2:14, 2:14][~hole[2:14, 2:14]] > 0).all()
    assert (coverage[hole] == 1).all()  # its neighbours see every cell of it from one side
    assert (counts[hole] == 2).all()
    # (6, 6): tile 2 above (its bottom border, interior columns) and tile 4 on the left;
    # tile 1's corner does not count
    assert means[6, 6, 0] == pytest.approx((2 + 4) / 2)
    assert means[6, 9, 0] == pytest.approx((2 + 6) / 2)  # tiles 2 and 6
    assert means[9, 9, 0] == pytest.approx((8 + 6) / 2)  # tiles 8 and 6
    np.testing.assert_array_equal(
        means[~hole & (coverage == 0)], old_means[~hole & (coverage == 0)]
    )
    np.testing.assert_array_equal(counts[coverage == 0], old_counts[coverage == 0])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kept_borders_match_a_cell_by_cell_reference_in_raster_order(seed: int) -> None:
    """Random tissue-like tile sets, popped after every tile: each row is handed out once,
    after its last contribution (a premature hand-out raises), with the reference means."""
    rng = np.random.default_rng(seed)
    shape = (27, 31)
    grid = [(4 * i - 2, 4 * j - 1) for i in range(8) for j in range(9)]
    tiles = [t for t in grid if rng.random() < 0.6]
    coverage = cell_coverage(np.array(tiles), (8, 8), 2, shape)
    np.testing.assert_array_equal(coverage, _brute_coverage(tiles, shape))
    feats = rng.random((len(tiles), 8, 8, 3), dtype=np.float32)
    means, counts, order = _grid_run(tiles, shape, coverage, feats)
    assert order == sorted(set(order))  # raster order, each row once
    sums = np.zeros((*shape, 3), np.float32)  # float32, added tile after tile: bit for bit
    want = np.zeros(shape, int)
    for t, (r0, c0) in enumerate(tiles):
        for r in range(max(r0, 0), min(r0 + 8, shape[0])):
            for c in range(max(c0, 0), min(c0 + 8, shape[1])):
                if int(not 2 <= r - r0 < 6) + int(not 2 <= c - c0 < 6) == coverage[r, c]:
                    sums[r, c] += feats[t, r - r0, c - c0]
                    want[r, c] += 1
    np.testing.assert_array_equal(counts, want)
    assert ((counts > 0) == (coverage < 3)).all()  # every cell some tile reaches has a value
    divisor = np.maximum(want, 1).astype(np.float32)[..., None]
    np.testing.assert_array_equal(means, sums / divisor)  # edge masks included: exact
    whole, whole_counts, _ = _grid_run(tiles, shape, coverage, feats, pop_each=False)
    assert np.array_equal(whole, means)
    assert np.array_equal(whole_counts, counts)


def test_rows_under_a_kept_top_border_are_held_until_final() -> None:
    tiles = [(0, 0), (0, 4), (4, 0)]
    st = FeatureStitcher(
        (12, 8), 1, border=2, coverage=cell_coverage(np.array(tiles), (8, 8), 2, (12, 8))
    )
    st.add(np.ones((1, 8, 8, 1), np.float32), np.array([[0, 0]]))
    # rows 0-1 hold kept top-border cells that tile (0, 4) still adds to: nothing is final
    # (without coverage, rows below 0 + border = 2 would be handed out)
    assert st.pop_final() == []
    st.add(np.ones((1, 8, 8, 1), np.float32), np.array([[0, 4]]))
    assert st.pop_final() == []
    st.add(np.ones((1, 8, 8, 1), np.float32), np.array([[4, 0]]))
    # a tile from row 4 on may still add its top border to rows 4-5 (the left edge)
    assert [b.row for b in st.pop_final()] == [0, 1, 2, 3]
    assert [b.row for b in st.finish()] == list(range(4, 12))


@pytest.mark.parametrize(("kept", "band", "peak"), [(False, 8, 8), (True, 10, 12)])
def test_memory_with_kept_borders_stays_a_band(kept: bool, band: int, peak: int) -> None:
    tiles = [(4 * i, 4 * j) for i in range(48) for j in range(3)]
    coverage = cell_coverage(np.array(tiles), (8, 8), 2, (200, 16)) if kept else None
    st = FeatureStitcher((200, 16), 3, border=2, coverage=coverage)
    held = []
    for r, c in tiles:
        st.add(np.ones((1, 8, 8, 3), np.float32), np.array([[r, c]]))
        held.append(st.active_rows)
        st.pop_final()
    # (8 - 2 * 2) interior rows + the 4-cell stride, whatever the slide's length; kept borders
    # add the 2 rows a later tile's top border may reach (the slide's left and right edges run
    # through every row), and the last tile row its 2 bottom-border rows at the slide's edge
    assert max(held[:-3]) == band
    assert max(held) == peak


def test_state_round_trip_with_kept_borders_is_bit_identical() -> None:
    rng = np.random.default_rng(3)
    tiles = [(4 * i, 4 * j) for i in range(4) for j in range(4) if (i, j) != (1, 2)]
    shape = (20, 20)
    coverage = cell_coverage(np.array(tiles), (8, 8), 2, shape)
    feats = rng.random((len(tiles), 8, 8, 4), dtype=np.float32)
    origins = np.array(tiles)
    whole = FeatureStitcher(shape, 4, border=2, coverage=coverage)
    done = []
    for i in range(len(tiles)):
        whole.add(feats[i : i + 1], origins[i : i + 1])
        done += whole.pop_final()
    done += whole.finish()
    for cut in (1, 5, 9):  # inside a tile row (rows held under kept top borders) and at its end
        first = FeatureStitcher(shape, 4, border=2, coverage=coverage)
        bands = []
        for i in range(cut):
            first.add(feats[i : i + 1], origins[i : i + 1])
            bands += first.pop_final()
        state = first.state()
        again = cell_coverage(origins, (8, 8), 2, shape)  # recomputed from the plan
        second = FeatureStitcher.from_state(state, 4, coverage=again)
        for i in range(cut, len(tiles)):
            second.add(feats[i : i + 1], origins[i : i + 1])
            bands += second.pop_final()
        bands += second.finish()
        assert [b.row for b in bands] == [b.row for b in done]
        for a, b in zip(done, bands, strict=True):
            assert np.array_equal(a.features, b.features)
            assert np.array_equal(a.counts, b.counts)
    state = whole.state()
    assert state["position"][5:].tolist() == [1, *np.bincount(coverage.ravel(), minlength=4)]
    with pytest.raises(ValueError, match="this state was saved with coverage"):
        FeatureStitcher.from_state(state, 4)
    with pytest.raises(ValueError, match="this state was saved without coverage"):
        FeatureStitcher.from_state(FeatureStitcher(shape, 4).state(), 4, coverage=coverage)
    other = cell_coverage(origins[:-1], (8, 8), 2, shape)  # a different tile set
    with pytest.raises(ValueError, match="recompute it from the same tiles"):
        FeatureStitcher.from_state(state, 4, coverage=other)
    old = {**FeatureStitcher(shape, 4).state()}
    old["position"] = old["position"][:5]  # a carry written before kept borders existed
    assert FeatureStitcher.from_state(old, 4).coverage is None


def test_footprints_are_the_cells_each_tile_reaches() -> None:
    tiles = [t for t in THREE_BY_THREE if t != (4, 4)]
    shape = (16, 16)
    coverage = cell_coverage(np.array(tiles), (8, 8), 2, shape)
    _, counts, _ = _grid_run(tiles, shape, coverage)
    st = FeatureStitcher(shape, 1, border=2, coverage=coverage)
    total = np.zeros(shape, int)
    for t in tiles:
        rows, cols, keep = st.footprint(t, (8, 8))
        total[rows, cols] += keep
    np.testing.assert_array_equal(total, counts)
    rows, cols, keep = st.footprint((0, 0), (8, 8))
    assert (rows, cols) == (slice(0, 8), slice(0, 8))
    assert keep.sum() == 4 * 4 + 4 * 2 * 2 + 2 * 2  # interior, two outer sides, the corner
    assert not keep[6:, :].any()  # its bottom border: tile (4, 0)'s interior
    plain = FeatureStitcher(shape, 1, border=2)  # without coverage: the interior only
    rows, cols, keep = plain.footprint((-2, 12), (8, 8))
    assert (rows, cols, keep.shape) == (slice(0, 4), slice(14, 16), (4, 2))


@pytest.mark.parametrize(
    ("coverage", "error", "match"),
    [
        (np.zeros((4, 4), bool), TypeError, "coverage must be the uint8 array of cell_coverage"),
        ([[0] * 4] * 4, TypeError, r"coverage must be the uint8 array .* got list"),
        (np.zeros((4, 5), np.uint8), ValueError, r"coverage has shape \(4, 5\) but the grid"),
        (np.full((4, 4), 7, np.uint8), ValueError, "coverage holds 7; cell_coverage gives 0 to 3"),
    ],
)
def test_bad_coverage(coverage: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        FeatureStitcher((4, 4), 1, coverage=coverage)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((np.zeros((1, 2)), (8, 8), 2, (4, 4)), TypeError, "origins must hold integer"),
        ((np.zeros((2, 3), int), (8, 8), 2, (4, 4)), ValueError, r"N x 2 .* shape \(2, 3\)"),
        ((np.zeros((1, 2), int), 8, 2, (4, 4)), TypeError, "tile_cells must be a pair of ints"),
        ((np.zeros((1, 2), int), (8, 0), 2, (4, 4)), ValueError, r"tile_cells\[1\] must be >= 1"),
        ((np.zeros((1, 2), int), (8, 8), -1, (4, 4)), ValueError, "border must be >= 0"),
        ((np.zeros((1, 2), int), (8, 8), 1.5, (4, 4)), TypeError, "border must be an int"),
        ((np.zeros((1, 2), int), (8, 8), 4, (4, 4)), ValueError, "border=4 leaves no interior"),
        ((np.zeros((1, 2), int), (8, 8), 2, (0, 4)), ValueError, r"grid_shape\[0\] must be >= 1"),
    ],
)
def test_bad_cell_coverage_arguments(args: tuple, error: type[Exception], match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(error, match=match):
        cell_coverage(*args)


def test_kept_edges_equal_whole_image_features_on_a_real_image(tmp_path: Path) -> None:
    """PoolNet's padding reaches one cell: with the slide's edges kept, every cell of the
    slide, its outer ring included, equals the features of the whole image at once."""
    image = he_image()[:384, :512]
    path = write_pyramid(image, tmp_path / "he.svs", mpp=0.5)
    net = PoolNet().eval()
    tiles = SlideTiles(path, tile_size=64, stride=32, tissue_mask=None)
    grid = tiles.grids[0]
    origins = np.stack([grid.rows * 4, grid.cols * 4], axis=1)
    coverage = cell_coverage(origins, (8, 8), 2, (48, 64))
    assert int((coverage > 0).sum()) == 48 * 64 - 44 * 60  # the slide's 2-cell ring
    st = FeatureStitcher((48, 64), 4, border=2, coverage=coverage)
    means = np.zeros((48, 64, 4), np.float32)
    counts = np.zeros((48, 64), np.int32)
    with torch.no_grad():
        for images, idx, _ in tiles.loader(batch_size=64):
            st.add(net.features(images).permute(0, 2, 3, 1).numpy(), origins[idx])
            for band in st.pop_final():
                means[band.row], counts[band.row] = band.features, band.counts
        for band in st.finish():
            means[band.row], counts[band.row] = band.features, band.counts
        whole = net.features(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)
    whole = whole[0].permute(1, 2, 0).numpy()
    assert (counts == 1).all()  # interiors tile the slide; each edge cell from one tile
    np.testing.assert_allclose(means, whole, rtol=1e-5, atol=1e-6)
