"""Stitching overlapping tiles' feature maps: counts by hand, border drop, exact geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from captum_nmf.wsi import FeatureStitcher, SlideTiles, write_pyramid
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
        (lambda: FeatureStitcher((4, 4), 1, border=-1), ValueError, "border must be an int >= 0"),
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
