"""``BlockReader``: tiles byte-identical to per-tile reads, each pixel decoded once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from captum_nmf.exceptions import SlideReadError
from captum_nmf.wsi import Slide, tile_grid
from captum_nmf.wsi.blocks import BlockReader
from tests.helpers.synthetic_slides import CMU, cmu_pyramid, flip_tile_markers


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cmu_pyramid(tmp_path_factory.mktemp("blocks") / "cmu4.svs")


def _same_as_single_reads(slide: Slide, **grid_args: object) -> BlockReader:
    grid = tile_grid(slide, **grid_args)  # type: ignore[arg-type]
    assert len(grid) > 4
    reader = BlockReader(slide, grid)
    for i in range(len(grid)):
        expected = slide.read_tile(grid.location(i), grid.resolution, grid.tile_size)
        got = reader.read(i)
        assert got.dtype == np.uint8
        assert np.array_equal(got, expected), (i, grid.location(i))
        slot = np.full_like(expected, 7)  # a batch's slot: the tile is cut straight into it
        assert reader.read(i, slot) is slot
        assert np.array_equal(slot, expected), (i, grid.location(i))
    return reader


def test_level_0_tiles_are_byte_identical_and_read_once() -> None:
    with Slide(CMU) as slide:
        # edge="pad": the last row and column reach past the slide (white padding)
        reader = _same_as_single_reads(
            slide, tile_size=512, stride=256, tissue_mask=None, edge="pad"
        )
        grid = reader.grid
    assert reader.exact
    assert reader.single_reads == 0
    w, h = grid.dimensions
    # each block decoded once: 1.07 decoded pixels per slide pixel (the padded border)
    # where tile-by-tile reads decode 3.5 (88 tiles of 512 px over 2220 x 2967 px)
    assert reader.blocks_read == (grid.n_cols + 1) * (grid.n_rows + 1)
    assert w * h <= reader.pixels_read <= 1.3 * w * h
    assert len(grid) * 512 * 512 >= 3.4 * w * h


def test_tissue_grid_and_odd_stride() -> None:
    with Slide(CMU) as slide:
        reader = _same_as_single_reads(slide, tile_size=240, stride=96, min_tissue=0.5)
    assert reader.single_reads == 0


def test_resampled_level_0_tiles_are_byte_identical() -> None:
    with Slide(CMU) as slide:  # 0.75 um/px from the 0.499 um/px level 0, box-resampled
        reader = _same_as_single_reads(slide, tile_size=128, stride=64, mpp=0.75, tissue_mask=None)
    assert reader.grid.resolution.resample > 1.4
    assert reader.exact
    assert reader.single_reads == 0


def test_levels_with_fractional_downsamples_read_tile_by_tile(pyramid: Path) -> None:
    """OpenSlide interpolates a region that starts between two pixels of the level read.

    Level 1 of the pyramid has downsample 2.0003 (2967 / 1483 rows), so a tile's
    level-0 corner rarely falls on a whole level-1 pixel: such tiles are read on
    their own, exactly as before.
    """
    with Slide(pyramid) as slide:
        assert slide.level_downsamples[1] != 2.0
        reader = _same_as_single_reads(slide, tile_size=256, stride=128, level=1, tissue_mask=None)
    assert not reader.exact
    assert reader.single_reads == 2 * len(reader.grid)  # the helper reads each tile twice


def test_region_grids_with_negative_margins() -> None:
    with Slide(CMU) as slide:
        reader = _same_as_single_reads(
            slide, tile_size=384, stride=256, margin=64, tissue_mask=None
        )
    assert int(reader.grid.locations.min()) < 0


def test_a_failed_block_falls_back_to_the_tiles_own_reads(tmp_path: Path) -> None:
    broken = tmp_path / "broken.svs"
    flip_tile_markers(CMU, broken, [52])  # one 240 px JPEG tile in the tissue
    with Slide(broken) as slide, Slide(CMU) as good:
        grid = tile_grid(slide, tile_size=240, stride=120, tissue_mask=None)
        reader = BlockReader(slide, grid)
        failed, same = 0, 0
        for i in range(len(grid)):
            try:
                expected = slide.read_tile(grid.location(i), grid.resolution, 240)
            except SlideReadError as exc:
                message = str(exc)
                with pytest.raises(SlideReadError, match=r"broken\.svs") as got:
                    reader.read(i)
                assert str(got.value) == message  # the same error as a tile's own read
                failed += 1
                continue
            assert np.array_equal(reader.read(i), expected)
            slot = np.zeros_like(expected)  # the fallback read lands in the slot too
            assert np.array_equal(reader.read(i, slot), expected)
            reference = good.read_tile(grid.location(i), grid.resolution, 240)
            same += int(np.array_equal(expected, reference))
    assert failed >= 1
    assert reader.single_reads >= failed
    assert same == len(grid) - failed  # every other tile of the affected blocks is intact


def test_storage_away_during_a_failed_read_skips_as_tile_by_tile_reads_do(tmp_path: Path) -> None:
    """The file away while a broken block is retried: the same tiles fail, later ones read."""
    from captum_nmf.wsi import SlideTiles
    from captum_nmf.wsi.blocks import TileBatches

    broken = tmp_path / "broken.svs"
    away = tmp_path / "away.svs"
    flip_tile_markers(CMU, broken, [52])
    with Slide(broken) as slide:
        grid = tile_grid(slide, tile_size=240, stride=120, tissue_mask=None)
    first, later = 165, list(range(166, 174))  # tile 165 overlaps the broken JPEG tile
    per_tile = SlideTiles.from_grids([grid], on_tile_error="skip")
    blocks = TileBatches(grid, on_tile_error="skip")
    got = []
    try:
        for read in (lambda b: per_tile.collate_fn([per_tile[i] for i in b]), blocks.batch):
            read(list(range(first)))  # handles open, blocks cached
            broken.rename(away)
            try:
                _, idx, lost = read([first])
            finally:
                away.rename(broken)
            assert (idx.tolist(), lost.tolist()) == ([], [first])
            got.append(read(later))
    finally:
        per_tile.close()
        blocks.close()
    (a_img, a_idx, a_lost), (b_img, b_idx, b_lost) = got
    assert a_idx.tolist() == b_idx.tolist()
    assert len(a_idx) >= 1
    assert a_lost.tolist() == b_lost.tolist()
    assert torch.equal((b_img.permute(0, 3, 1, 2).float() / 255.0), a_img)


@pytest.mark.parametrize(
    ("shape", "dtype"), [((64, 64, 3), np.uint8), ((128, 128, 4), np.uint8), ((128, 128, 3), float)]
)
def test_a_wrong_slot_is_a_value_error(shape: tuple[int, ...], dtype: type) -> None:
    with Slide(CMU) as slide:
        reader = BlockReader(slide, tile_grid(slide, tile_size=128, stride=64))
        with pytest.raises(ValueError, match=r"out must be a 128 x 128 x 3 uint8 array"):
            reader.read(0, np.zeros(shape, dtype))


def test_the_cache_is_bounded() -> None:
    with Slide(CMU) as slide:
        grid = tile_grid(slide, tile_size=256, stride=128, tissue_mask=None)
        reader = BlockReader(slide, grid, max_bytes=3 * 128 * 128 * 3)
        for i in range(len(grid)):
            expected = slide.read_tile(grid.location(i), grid.resolution, 256)
            assert np.array_equal(reader.read(i), expected)
            assert reader._bytes <= 4 * 128 * 128 * 3  # at most one block over while reading


@pytest.mark.parametrize(("threads", "slack"), [(1, 2), (2, 2 + 8)])
def test_a_budget_of_one_block_row_decodes_each_block_once(threads: int, slack: int) -> None:
    # over the budget, the blocks raster order has passed go first (not the oldest, which
    # the next tile row still needs), and a batch prefetches no more than the budget holds;
    # a prefetching batch of 8 tiles needs room for its 8 new blocks too
    from captum_nmf.wsi.blocks import TileBatches

    with Slide(CMU) as slide:
        grid = tile_grid(slide, tile_size=256, stride=128, tissue_mask=None)
        reference = [slide.read_tile(grid.location(i), grid.resolution, 256) for i in range(60)]
    block = 128 * 128 * 3
    batches = TileBatches(grid, threads=threads)
    try:
        batches.reader.max_bytes = (grid.n_cols + 1 + slack) * block  # one block row and slack
        for start in range(0, 60, 8):
            images, idx, _ = batches.batch(list(range(start, min(start + 8, 60))))
            for image, i in zip(images, idx.tolist(), strict=True):
                assert np.array_equal(image.numpy(), reference[i])
            assert batches.reader._bytes <= batches.reader.max_bytes + block
        needed = {
            (by, bx)
            for i in range(60)
            for by in batches.reader._blocks_of(i)[0]
            for bx in batches.reader._blocks_of(i)[1]
        }
        assert batches.reader.blocks_read == len(needed) == 82  # each block once
    finally:
        batches.close()


def test_batches_decoded_in_threads_equal_one_thread(tmp_path: Path) -> None:
    from captum_nmf.wsi.blocks import TileBatches

    broken = tmp_path / "broken.svs"
    flip_tile_markers(CMU, broken, [52])
    with Slide(broken) as slide:
        grid = tile_grid(slide, tile_size=240, stride=120, tissue_mask=None)
    batches = [list(range(i, min(i + 16, len(grid)))) for i in range(0, len(grid), 16)]
    one = TileBatches(grid, on_tile_error="skip")
    many = TileBatches(grid, on_tile_error="skip", threads=3)
    try:
        for b in batches:
            a_img, a_idx, a_lost = one.batch(b)
            b_img, b_idx, b_lost = many.batch(b)
            assert torch.equal(a_idx, b_idx)
            assert torch.equal(a_lost, b_lost)
            assert torch.equal(a_img, b_img)
        assert many.reader.blocks_read == one.reader.blocks_read
        assert len(many._handles) >= 1  # the threads read with their own handles
    finally:
        one.close()
        many.close()
    assert many._handles == []


@pytest.mark.parametrize("where", ["TileBatches(convert=True)", "converted()"])
def test_converted_batches_reuse_free_buffers_and_never_overwrite_a_held_one(where: str) -> None:
    # For a CPU model each batch is converted to float (in TileBatches.batch, or by a slide
    # run's converting stage). Buffers are reused only once nothing holds them: a batch
    # someone keeps (or a view of it) stays intact.
    from captum_nmf.wsi.blocks import TileBatches, converted, to_model_input

    with Slide(CMU) as slide:
        grid = tile_grid(slide, tile_size=128, stride=64, tissue_mask=None)
    batches = [list(range(i, i + 4)) for i in range(0, 44, 4)]
    raw, source = TileBatches(grid), TileBatches(grid, convert=where.startswith("Tile"))
    stage = converted(source.batch(b) for b in batches)  # in the order taken below
    take = (lambda b: source.batch(b)[0]) if source.convert else (lambda b: next(stage)[0])
    try:
        kept = take(batches[0])
        kept_copy = kept.clone()
        # the pool's own tensor is not reachable from a batch (a view's _base would be)
        based = take(batches[1])
        base = based if based._base is None else based._base
        base_copy = base.clone()
        del based
        view = take(batches[2])[1:3]  # only a view of batch 2 survives
        view_copy = view.clone()
        for b in batches[3:]:
            images = take(b)
            assert images.dtype == torch.float32
            assert images.shape == (4, 3, 128, 128)
            expected = to_model_input(raw.batch(b)[0], torch.device("cpu"))
            assert torch.equal(images, expected)  # bit-identical to a fresh conversion
            del images
        assert torch.equal(kept, kept_copy)
        assert torch.equal(base, base_copy)
        assert torch.equal(view, view_copy)
        buffers = source._buffers if source.convert else stage.gi_frame.f_locals["pool"]
        assert buffers.reused >= 5  # the free buffers did go round
    finally:
        raw.close()
        source.close()


@pytest.mark.parametrize("keep", [0, -1])
def test_converted_refuses_keeping_no_buffer(keep: int) -> None:
    from captum_nmf.wsi.blocks import converted

    with pytest.raises(ValueError, match=f"keep must be >= 1, got {keep}"):
        converted(iter([]), keep=keep)  # at the call, not at the first batch


def test_converted_passes_float_and_empty_batches_unchanged() -> None:
    from captum_nmf.wsi.blocks import converted

    floats = torch.rand(2, 3, 4, 4)
    empty = torch.empty(0)
    idx, none = torch.tensor([0, 1]), torch.tensor([], dtype=torch.int64)
    out = list(converted(iter([(floats, idx, none), (empty, none, idx)])))
    assert out[0][0] is floats
    assert out[1][0] is empty
    assert out[1][2] is idx  # the failed tiles go on as they came


def test_persistent_workers_serve_slide_after_slide_even_after_an_early_stop(
    tmp_path: Path,
) -> None:
    # A cohort's DataLoader workers read slide A, stop half-way (an error in the model),
    # then read slide B: B's batches are exactly SlideTiles' and nothing of A leaks in.
    from captum_nmf.wsi import SlideTiles
    from captum_nmf.wsi.tiling import PersistentTileLoader, TileRequests

    with Slide(CMU) as slide:
        a = tile_grid(slide, tile_size=128, stride=64, tissue_mask=None)
        b = tile_grid(slide, tile_size=96, stride=96, tissue_mask=None)
    workers = PersistentTileLoader(1, TileRequests())
    try:
        first = workers.batches(a, [list(range(i, i + 4)) for i in range(0, 40, 4)])
        next(first)
        next(first)  # stop here: the rest of A is still in flight
        batches = [list(range(i, min(i + 5, len(b)))) for i in range(0, 30, 5)]
        reference = SlideTiles.from_grids([b])
        for (images, idx, failed), wanted in zip(workers.batches(b, batches), batches, strict=True):
            assert idx.tolist() == wanted
            assert failed.numel() == 0
            assert torch.equal(images, torch.stack([reference[i][0] for i in wanted]))
        assert workers.slides == 2
        reference.close()
    finally:
        workers.close()


def test_worker_loaders_are_kept_per_transform_even_an_unhashable_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a dataclass transform has no hash: a cohort with num_workers > 0 failed every slide
    import dataclasses

    from captum_nmf.wsi.blocks import ReadingThreads

    @dataclasses.dataclass
    class Shift:
        d: float = 0.0

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.d

    shift = Shift()
    with ReadingThreads() as threads:

        def loader(workers: int, transform: Shift) -> object:
            return threads.tile_loader(
                workers, transform=transform, on_tile_error="skip", slide_mpp=None, pin_memory=False
            )

        first = loader(1, shift)
        assert loader(1, shift) is first
        assert loader(1, Shift()) is not first  # equal, but another object
        assert loader(2, shift) is not first
        closed = []
        monkeypatch.setattr(type(first), "close", lambda self: closed.append(self))
        shift.d = 0.3  # refitted in place: the workers started with d = 0.0
        again = loader(1, shift)
        assert again is not first
        assert closed == [first]  # the old workers are stopped, not left running
        assert again.loader.dataset.transform is shift  # type: ignore[attr-defined]
        assert loader(1, shift) is again
