"""Where slide work happens: features stay on the model's device, only K-channel maps leave it.

No GPU here: the checks that need none. A ``TorchFunctionMode`` records every
tensor that is brought to the host (``.numpy()``, ``.cpu()``, ``.tolist()``)
during a slide run; none may be a feature tensor (its C channels give it away).
The stitcher's tensor mode (``device=``) is bit-identical to its NumPy mode,
and the shared reading thread survives an early stop without a read in flight.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, cast

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from captum_nmf import NMF, NMFConceptAttribution
from captum_nmf.wsi import (
    FeatureStitcher,
    Slide,
    SlideTiles,
    explain_slide,
    tile_grid,
    write_pyramid,
)
from captum_nmf.wsi.blocks import ReadingThreads, to_model_input
from captum_nmf.wsi.run.assemble import TileAssembler
from captum_nmf.wsi.run.execute import prefetched
from captum_nmf.wsi.stitching import cell_coverage
from captum_nmf.wsi.store import RunStore
from tests.helpers.calls import CallRecorder
from tests.helpers.synthetic_slides import he_image

C = 37  # channels no other tensor of the run has


class WideNet(nn.Module):
    """8 px average pool, then a 1x1 convolution to 37 channels and ReLU; two scores."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(8)
        self.conv = nn.Conv2d(3, C, 1)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(C, 3, 1, 1, generator=gen))
            self.conv.bias.copy_(0.3 * torch.randn(C, generator=gen))  # type: ignore[union-attr]
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        f = self.relu(self.conv(self.pool(x))).mean(dim=(2, 3))
        return torch.stack([f[:, :5].mean(1), f[:, 5:].mean(1)], dim=1)


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pixels = he_image()[:320, :448]
    return write_pyramid(pixels, tmp_path_factory.mktemp("dev") / "s.svs", mpp=0.5)


@pytest.fixture(scope="module")
def attr(slide: Path) -> NMFConceptAttribution:
    net = WideNet().eval()
    model = NMFConceptAttribution(net, net.relu, n_concepts=3, random_state=0)
    tiles = SlideTiles(slide, tile_size=64, stride=32, tissue_mask=None)
    return model.fit(tiles, batch_size=16, progress=False)


def test_features_never_leave_the_device_only_weights_do(
    attr: NMFConceptAttribution, slide: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    solves = []
    solve = NMF._transform_products

    def counted(self: NMF, cross: Tensor, pending: Any = None) -> Tensor:
        solves.append(cross.shape)
        return solve(self, cross, pending)

    monkeypatch.setattr(NMF, "_transform_products", counted)
    with CallRecorder() as calls:
        ex = explain_slide(
            attr, slide, tile_size=64, stride=32, tissue_mask=None, batch_size=5, progress=False
        )
    seen = calls.shapes_of(("numpy", "cpu", "tolist"))  # tensors brought to the host
    assert seen, "the recorder saw nothing: the check would be vacuous"
    k = int(attr.concepts_.shape[0])
    # the K x C concepts go into the explanation; no feature tensor (N x C x h x w, n x C)
    carrying_features = [s for s in seen if C in s and s != (k, C)]
    assert carrying_features == []
    # the weights of the cells with data (n x K) came back, once per solve; the averaged
    # products x H^T (also K wide) stay on the device
    assert solves
    for read in ("cpu", "numpy"):  # weights.cpu().numpy(): one of each per solve, no more
        wide = [s for s in calls.shapes_of((read,)) if len(s) == 2 and s[1] == k]
        assert [s[0] for s in wide] == [s[0] for s in solves], read
    assert np.isfinite(ex.concept_maps).all()


def test_each_batch_is_stitched_before_its_value_check_is_read_back(
    attr: NMFConceptAttribution, slide: Path
) -> None:
    # on a GPU, reading the check back right after the forward made the device wait while
    # the stitcher's per-tile additions were launched; now every batch's first read-back
    # comes after its additions are queued (counted here, on the CPU: the same calls)
    with CallRecorder() as calls:
        ex = explain_slide(
            attr, slide, tile_size=64, stride=32, tissue_mask=None, batch_size=5, progress=False
        )
    names = calls.names
    forwards = [i for i, n in enumerate(names) if n == "conv2d"]
    n_tiles = len(ex.tile_locations)
    assert len(forwards) == 1 + -(-n_tiles // 5)  # the probe of the layer's shape, the batches
    for f in forwards[1:]:
        assert "add_" in names[f : calls.first_read_after(f)]
    # the probe is read back at once: nothing is queued after it
    assert "add_" not in names[forwards[0] : calls.first_read_after(forwards[0])]


class SpreadNet(nn.Module):
    """8 px average pool, a 7 x 7 convolution to 37 channels and ReLU: each cell sees 3 cells
    around it, so a cell in a tile's 2-cell border differs from the same cell deeper in a
    neighbouring tile (the zero padding): overlapping tiles give different vectors to average."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(8)
        self.conv = nn.Conv2d(3, C, 7, padding=3)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            self.conv.weight.copy_(0.2 * torch.randn(C, 3, 7, 7, generator=gen))
            self.conv.bias.copy_(0.3 * torch.randn(C, generator=gen))  # type: ignore[union-attr]
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.conv(self.pool(x))).mean(dim=(2, 3))[:, :2]


class _Saved(NamedTuple):
    index: int
    kind: str  # "chunk" or "carry"
    arrays: dict[str, Any]
    size: int  # bytes of the file, right after it was written


def _saved_chunks(monkeypatch: pytest.MonkeyPatch) -> list[_Saved]:
    """Every chunk file a tile-mode run writes, in order (a run removes them when it ends)."""
    saved: list[_Saved] = []
    save = TileAssembler.save_chunk

    def record(self: TileAssembler, i: int, kind: str, arrays: dict[str, Any]) -> None:
        save(self, i, kind, arrays)
        path = cast(RunStore, self.store).work_dir / self.chunk_name(i, kind)
        saved.append(_Saved(i, kind, arrays, path.stat().st_size))

    monkeypatch.setattr(TileAssembler, "save_chunk", record)
    return saved


def test_averaged_products_give_the_weights_of_the_averaged_features(
    slide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a slide run averages each location's x H^T (K channels), not x (C channels): the solve
    # needs nothing else of x, and the mean of the products is the product of the mean. The
    # reference averages the C-channel features themselves and solves their means.
    net = SpreadNet().eval()
    attr = NMFConceptAttribution(net, net.relu, n_concepts=3, random_state=0)
    attr.fit(SlideTiles(slide, tile_size=64, stride=32, tissue_mask=None), progress=False)
    with Slide(slide) as s:
        grid = tile_grid(s, tile_size=64, stride=16, tissue_mask=None)
    tiles = SlideTiles.from_grids([grid])
    saved = _saved_chunks(monkeypatch)
    ex = explain_slide(
        attr,
        slide,
        tile_size=64,
        stride=16,
        tissue_mask=None,
        batch_size=7,
        out_dir=tmp_path / "run",
        chunk_tiles=40,
        progress=False,
    )
    assert set(np.unique(ex.counts).tolist()) == {1, 2, 4}  # up to 4 tiles per cell
    images = torch.stack([tiles[i][0] for i in range(len(tiles))])
    with torch.no_grad():
        feats = attr.features(images)  # N x C x 8 x 8
    tiles.close()
    cells = grid.stride // 8  # 8 px cells: tiles every 2 cells
    origins = np.stack([grid.rows * cells, grid.cols * cells], axis=1)
    # the averaged vectors differ: cell (10, 10) at depth 2 of one tile and 4 of another
    a = int(np.flatnonzero((origins == (8, 8)).all(axis=1))[0])
    b = int(np.flatnonzero((origins == (6, 6)).all(axis=1))[0])
    assert not torch.allclose(feats[a, :, 2, 2], feats[b, :, 4, 4], rtol=1e-2)
    shape = ex.grid_shape
    coverage = cell_coverage(origins, (8, 8), 2, shape)
    stitcher = FeatureStitcher(shape, C, border=2, coverage=coverage)
    stitcher.add(feats.permute(0, 2, 3, 1).numpy(), origins)
    expected = np.zeros_like(ex.concept_maps)
    for band in stitcher.finish():
        expected[:, band.row] = attr.nmf_.transform(band.features).T
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(ex.concept_maps, expected, rtol=1e-5, atol=1e-5 * scale)
    # the mean of the features is not the mean of the weights: averaging after the solve
    # (or averaging anything but what the solve is linear in) would not pass the line above
    per_tile = attr.nmf_._transform_maps(feats)  # N x K x 8 x 8
    wrong = FeatureStitcher(shape, 3, border=2, coverage=coverage)
    wrong.add(per_tile.permute(0, 2, 3, 1).numpy(), origins)
    averaged_weights = np.zeros_like(expected)
    for band in wrong.finish():
        averaged_weights[:, band.row] = band.features.T
    assert np.abs(averaged_weights - expected).max() > 1e-3 * scale
    # what a chunk carries over to the next (rows x cols x channels) is K channels, not C
    carried = [tuple(s.arrays["sums"].shape) for s in saved if s.kind == "carry"]
    assert carried
    assert {s[-1] for s in carried} == {attr.concepts_.shape[0]} == {3}


def test_the_free_space_needed_counts_k_channels_of_pending_rows(
    attr: NMFConceptAttribution, slide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the disk check before a run sizes the first chunk and its carry: K channels per cell
    # (the averaged products), whatever C is; and it covers what the first chunk writes
    import captum_nmf.wsi.run.explain as explain_module

    plans: list[Any] = []
    make = explain_module.make_plan

    def keep(*args: Any, **kwargs: Any) -> Any:
        plans.append(make(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(explain_module, "make_plan", keep)
    out = tmp_path / "run"
    saved = _saved_chunks(monkeypatch)
    explain_slide(
        attr,
        slide,
        tile_size=64,
        stride=32,
        tissue_mask=None,
        out_dir=out,
        chunk_tiles=30,
        progress=False,
    )
    plan = plans[0]
    needed = plan.first_chunk_bytes(attr)
    assert needed >= sum(s.size for s in saved if s.index == 0) > 0
    wide = type("Wide", (), {"concepts_": attr.concepts_, "n_channels_in_": 10**6})()
    assert plan.first_chunk_bytes(wide) == needed  # C does not enter


def test_transform_returns_on_the_inputs_device_and_solves_there() -> None:
    # A tensor is solved on its own device: H is cast there (cached), nothing moves X.
    h = torch.rand(3, 6)
    model = NMF.from_components(h)
    x = torch.rand(10, 6)
    w = model.transform(x)
    assert w.device == x.device
    assert w.dtype == x.dtype
    key = (str(x.device), x.dtype)
    assert key in model._factor_cache().entries


def _stitch(
    st: FeatureStitcher, feats: Any, origins: np.ndarray, step: int
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    out = []
    for i in range(0, len(origins), step):
        st.add(feats[i : i + step], origins[i : i + step])
        out += [(b.row, np.asarray(b.features), b.counts) for b in st.pop_final()]
    out += [(b.row, np.asarray(b.features), b.counts) for b in st.finish()]
    return out


@pytest.mark.parametrize("step", [1, 5, 40])  # a call may span many tile rows (ring grows)
def test_tensor_mode_is_bit_identical_to_numpy_mode(step: int) -> None:
    rng = np.random.default_rng(3)
    grid = [(r, c) for r in range(0, 26, 3) for c in range(0, 30, 3) if (r * 7 + c) % 5]
    origins = np.asarray(grid, dtype=np.int64)
    maps = torch.from_numpy(rng.random((len(grid), 5, 8, 8), dtype=np.float32))  # N x C x h x w
    coverage = cell_coverage(origins, (8, 8), 2, (34, 38))
    numpy_mode = FeatureStitcher((34, 38), 5, border=2, coverage=coverage)
    tensor_mode = FeatureStitcher((34, 38), 5, border=2, coverage=coverage, device="cpu")
    a = _stitch(numpy_mode, maps.permute(0, 2, 3, 1).numpy(), origins, step)
    b = _stitch(tensor_mode, maps.permute(0, 2, 3, 1), origins, step)  # a channels-first view
    assert [r for r, _, _ in a] == [r for r, _, _ in b]
    for (_, fa, ca), (_, fb, cb) in zip(a, b, strict=True):
        assert np.array_equal(fa, fb)
        assert np.array_equal(ca, cb)


def test_tensor_mode_rows_and_state_round_trip() -> None:
    rng = np.random.default_rng(4)
    origins = np.asarray([(r, c) for r in range(0, 20, 2) for c in range(0, 12, 4)])
    feats = torch.from_numpy(rng.random((len(origins), 6, 6, 3), dtype=np.float32))
    whole = FeatureStitcher((26, 18), 3, border=1, device="cpu")
    whole.add(feats, origins)
    rows = whole.finish_rows()
    assert isinstance(rows.features, Tensor)
    assert rows.features.shape == (len(rows.rows), 18, 3)
    first = FeatureStitcher((26, 18), 3, border=1, device="cpu")
    first.add(feats[:13], origins[:13])
    head = first.pop_final_rows()
    state = first.state()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    second = FeatureStitcher.from_state(state, 3, device="cpu")
    second.add(feats[13:], origins[13:])
    tail = second.finish_rows()
    assert np.array_equal(np.concatenate([head.rows, tail.rows]), rows.rows)
    joined = torch.cat([head.features, tail.features])
    assert torch.equal(joined, rows.features)
    assert np.array_equal(np.concatenate([head.counts, tail.counts]), rows.counts)


def test_an_early_stop_waits_for_the_read_in_flight() -> None:
    # The shared reading thread must not still be reading when the run closes its slide.
    finished: list[int] = []

    def slow() -> Iterator[int]:
        for i in range(5):
            time.sleep(0.05)
            finished.append(i)
            yield i

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        gen = prefetched(slow(), pool)
        assert next(gen) == 0  # item 1 is being read now
        gen.close()
        assert finished == [0, 1]  # close() returned only after the read in flight
        assert not any(t.name.startswith("captum-nmf-read") for t in threading.enumerate())
        assert list(prefetched(iter([7, 8]), pool)) == [7, 8]  # the thread is still usable


def _record_conversions(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, torch.dtype, int]]:
    """(thread name, input dtype, batch size) of every ``to_model_input`` of a slide run."""
    from captum_nmf.wsi import blocks
    from captum_nmf.wsi.run import execute

    seen: list[tuple[str, torch.dtype, int]] = []

    def recording(real: Any) -> Any:
        def wrapper(images: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            seen.append((threading.current_thread().name, images.dtype, len(images)))
            return real(images, *args, **kwargs)

        return wrapper

    for module in (blocks, execute):
        monkeypatch.setattr(module, "to_model_input", recording(module.to_model_input))
    return seen


def test_a_cpu_run_converts_in_a_thread_of_its_own_with_the_same_maps(
    attr: NMFConceptAttribution, slide: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # reading thread -> converting thread -> the model's thread: the uint8 batches become
    # float in the converting stage only, and the maps are bit-identical to converting in
    # the model's thread (as for a model on a GPU)
    from captum_nmf.wsi.run import execute

    monkeypatch.setattr(execute, "_spare_core", lambda: True)  # read ahead from the first batch
    args = {"tile_size": 64, "stride": 32, "tissue_mask": None, "batch_size": 4}
    seen = _record_conversions(monkeypatch)
    staged = explain_slide(attr, slide, progress=False, **args)  # type: ignore[arg-type]
    with Slide(slide) as s:
        n = len(tile_grid(s, tile_size=64, stride=32, tissue_mask=None))
    uint8 = [(name, size) for name, dtype, size in seen if dtype == torch.uint8]
    assert sum(size for _, size in uint8) == n  # every tile, once
    assert all(name.startswith("captum-nmf-convert") for name, _ in uint8)
    here = [dtype for name, dtype, _ in seen if name == threading.current_thread().name]
    assert here
    assert set(here) == {torch.float32}
    seen.clear()
    monkeypatch.setattr(execute, "_converted_ahead", lambda read, threads: read)
    inline = explain_slide(attr, slide, progress=False, **args)  # type: ignore[arg-type]
    assert {name for name, dtype, _ in seen if dtype == torch.uint8} == {
        threading.current_thread().name
    }
    assert torch.equal(torch.as_tensor(staged.concept_maps), torch.as_tensor(inline.concept_maps))


def test_a_slow_cpu_model_with_every_core_reads_in_the_models_thread_with_the_same_maps(
    attr: NMFConceptAttribution, slide: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a CPU forward that takes all the cores and much longer than the reading: reading beside
    # it would take a core from its OpenMP team, so the model's thread reads and converts
    # each batch itself; the maps are those of a run that reads ahead
    from captum_nmf.wsi.run import execute

    args = {"tile_size": 64, "stride": 32, "tissue_mask": None, "batch_size": 4}
    monkeypatch.setattr(execute, "_spare_core", lambda: True)
    ahead = explain_slide(attr, slide, progress=False, **args)  # type: ignore[arg-type]
    monkeypatch.setattr(execute, "_spare_core", lambda: False)
    seen = _record_conversions(monkeypatch)
    handle = attr.forward_func.register_forward_hook(  # type: ignore[union-attr]
        lambda *_: time.sleep(0.05)  # 50 x the reading of 4 tiles of 64 px
    )
    try:
        inline = explain_slide(attr, slide, progress=False, **args)  # type: ignore[arg-type]
    finally:
        handle.remove()
    with Slide(slide) as s:
        n = len(tile_grid(s, tile_size=64, stride=32, tissue_mask=None))
    uint8 = [(name, size) for name, dtype, size in seen if dtype == torch.uint8]
    assert sum(size for _, size in uint8) == n
    assert {name for name, _ in uint8} == {threading.current_thread().name}
    assert torch.equal(torch.as_tensor(ahead.concept_maps), torch.as_tensor(inline.concept_maps))
    np.testing.assert_array_equal(ahead.counts, inline.counts)


def _timed_reads(
    n: int, seconds: float, names: list[str], fail_at: int = -1
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """``n`` uint8 batches of one 2 x 2 tile, each read in ``seconds``; reading threads named."""
    for i in range(n):
        time.sleep(seconds)
        names.append(threading.current_thread().name)
        if i == fail_at:
            raise ValueError(f"tile {i} is unreadable")
        images = torch.full((1, 2, 2, 3), i, dtype=torch.uint8)
        yield images, torch.tensor([i]), torch.empty(0, dtype=torch.long)


@pytest.mark.parametrize("convert", [False, True])
def test_a_cheap_cpu_model_reads_ahead_from_its_second_batch(convert: bool) -> None:
    from captum_nmf.wsi.run.execute import _inline_while_slow

    names: list[str] = []
    with ReadingThreads() as threads:
        batches = _inline_while_slow(_timed_reads(6, 0.01, names), threads, convert)
        got = [(images.clone(), int(idx[0])) for images, idx, _ in batches]  # buffers are reused
    assert [i for _, i in got] == list(range(6))
    for images, i in got:
        expected = torch.full((1, 2, 2, 3), i, dtype=torch.uint8)
        if convert:  # float N x 3 x T x T in [0, 1], as the model's thread would convert
            expected = to_model_input(expected, torch.device("cpu"))
        assert torch.equal(images, expected)
    me = threading.current_thread().name
    assert names[0] == me  # the first batch shows that the work is cheap ...
    assert all(n.startswith("captum-nmf-read") for n in names[1:])  # ... then it reads ahead


def test_slow_work_keeps_the_reading_in_its_thread_and_the_switch_is_one_way() -> None:
    from captum_nmf.wsi.run.execute import _inline_while_slow

    me = threading.current_thread().name
    names: list[str] = []
    with ReadingThreads() as threads:
        batches = _inline_while_slow(_timed_reads(6, 0.0, names), threads, False)
        for _ in batches:
            time.sleep(0.1)  # a forward far slower than the reading
        assert names == [me] * 6
        names.clear()
        batches = _inline_while_slow(_timed_reads(6, 0.01, names), threads, False)
        next(batches)  # cheap work on the first batch: the rest is read ahead ...
        for _ in batches:
            time.sleep(0.05)  # ... and stays so when the work becomes slow
        assert names[0] == me
        assert len(names) == 6
        assert all(n.startswith("captum-nmf-read") for n in names[1:])


def test_a_core_is_spare_only_when_torch_leaves_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from captum_nmf.wsi.run import execute

    monkeypatch.setattr(execute, "usable_cpus", lambda: 2)
    for threads, spare in ((1, True), (2, False), (4, False)):
        monkeypatch.setattr(execute.torch, "get_num_threads", lambda n=threads: n)
        assert execute._spare_core() is spare


def test_a_containers_cpu_quota_and_the_affinity_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """16 CPUs seen, a quota of 2 (cgroup CFS bandwidth): torch's 8 threads leave none spare."""
    from joblib.externals.loky.backend import context

    if not hasattr(context, "_cpu_count_cgroup"):  # loky's quota reader, private
        pytest.skip("this joblib's loky reads the quota elsewhere")

    from captum_nmf.wsi.run import execute

    monkeypatch.delenv("LOKY_MAX_CPU_COUNT", raising=False)
    monkeypatch.setattr(context.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(context.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(context, "_cpu_count_cgroup", lambda n: n)
    monkeypatch.setattr(execute.torch, "get_num_threads", lambda: 8)
    assert execute._spare_core() is True  # no quota: 8 of 16 busy
    assert execute.decoders_for(torch.device("cuda")) == 8
    monkeypatch.setattr(context, "_cpu_count_cgroup", lambda n: 2)  # e.g. --cpus=1.5, rounded up
    assert execute._spare_core() is False
    assert execute.decoders_for(torch.device("cuda")) == 2
    assert execute.decoders_for(torch.device("cpu")) == 1
    monkeypatch.setattr(context, "_cpu_count_cgroup", lambda n: n)
    monkeypatch.setattr(context.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert execute._spare_core() is False  # taskset -c 0-2
    monkeypatch.setenv("LOKY_MAX_CPU_COUNT", "4")
    monkeypatch.setattr(context.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert execute._spare_core() is False


def test_a_read_error_in_the_models_thread_reaches_the_caller_at_its_batch() -> None:
    from captum_nmf.wsi.run.execute import _inline_while_slow

    me = threading.current_thread().name
    names: list[str] = []
    got = []
    with ReadingThreads() as threads:
        batches = _inline_while_slow(_timed_reads(6, 0.0, names, fail_at=3), threads, False)
        for _ in range(3):
            got.append(int(next(batches)[1][0]))
            time.sleep(0.1)
        with pytest.raises(ValueError, match="tile 3 is unreadable"):
            next(batches)
        assert got == [0, 1, 2]
        assert names == [me] * 4
        batches = _inline_while_slow(_timed_reads(6, 0.0, names), threads, False)
        next(batches)
        time.sleep(0.1)
        batches.close()  # closed between batches in the model's thread: no read after
        time.sleep(0.05)
        assert names == [me] * 5
        names.clear()
        batches = _inline_while_slow(_timed_reads(6, 0.05, names), threads, False)
        next(batches)  # cheap work: batch 2 is read ahead ...
        next(batches)  # ... and batch 3 is being read in the reading thread now
        batches.close()  # waits for that read, then none follows
        read = list(names)
        time.sleep(0.2)
        assert names == read
        assert len(read) == 3
        assert read[0] == me
        assert all(n.startswith("captum-nmf-read") for n in read[1:])


def _at_forward(attr: NMFConceptAttribution, n: int, action: Callable[[], None]) -> Any:
    """Hook ``attr``'s model to run ``action`` after its ``n``-th forward; the hook's handle."""
    calls = [0]

    def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
        calls[0] += 1
        if calls[0] == n:
            action()

    return attr.forward_func.register_forward_hook(hook)  # type: ignore[union-attr]


def test_an_error_in_the_model_stops_reading_and_converting_before_the_slide_closes(
    attr: NMFConceptAttribution, slide: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Shared threads (a cohort's) outlive a run that fails at its third batch: when
    # explain_slide raises, no conversion or read of that run is still going on, and
    # the same threads then run the slide to the same maps as a fresh run.
    from captum_nmf.wsi import ReadingThreads, blocks

    args = {"tile_size": 64, "stride": 32, "tissue_mask": None, "batch_size": 2}
    reference = explain_slide(attr, slide, progress=False, **args)  # type: ignore[arg-type]
    done: list[int] = []
    real = blocks.to_model_input

    def slow(images: Tensor, *a: Any, **k: Any) -> Tensor:
        time.sleep(0.03)  # the converting stage is still busy when the model fails
        out = real(images, *a, **k)
        done.append(len(images))
        return out

    read: list[int] = []
    batch = blocks.TileBatches.batch

    def slow_read(self: Any, indices: list[int]) -> Any:
        time.sleep(0.03)  # and so is the reading thread
        out = batch(self, indices)
        read.append(len(indices))
        return out

    def boom() -> None:
        raise RuntimeError("boom in batch 3")

    monkeypatch.setattr(blocks, "to_model_input", slow)
    monkeypatch.setattr(blocks.TileBatches, "batch", slow_read)
    with ReadingThreads() as threads:
        hook = _at_forward(attr, 4, boom)  # the plan's probe tile, then batches 1 and 2
        try:
            with pytest.raises(RuntimeError, match="boom in batch 3"):
                explain_slide(attr, slide, progress=False, **args)  # type: ignore[arg-type]
        finally:
            hook.remove()
        after = len(done), len(read)
        time.sleep(0.2)
        assert (len(done), len(read)) == after  # nothing of the failed run goes on after it
        assert 3 <= after[0] <= after[1] <= 6  # it worked ahead of the model, a batch or two
        again = explain_slide(attr, slide, progress=False, **args)  # type: ignore[arg-type]
        assert threads.runs == 2
    assert threads.converter._shutdown  # type: ignore[attr-defined]
    np.testing.assert_array_equal(again.concept_maps, reference.concept_maps)


def test_a_batchs_activations_are_freed_before_the_next_forward(
    attr: NMFConceptAttribution, slide: Path
) -> None:
    # the layer's output of batch i is stitched and dropped before batch i + 1 runs the
    # model: one batch of activations alive at a time, not two (memory, and on the CPU a
    # heap that reuses the same block)
    import weakref

    outputs: list[weakref.ref[Tensor]] = []
    alive_at_forward: list[bool] = []

    def before(module: nn.Module, inputs: Any) -> None:
        alive_at_forward.append(bool(outputs) and outputs[-1]() is not None)

    def after(module: nn.Module, inputs: Any, output: Tensor) -> None:
        outputs.append(weakref.ref(output))

    net = cast(nn.Module, attr.forward_func)
    handles = [net.register_forward_pre_hook(before), attr.layer.register_forward_hook(after)]
    try:
        explain_slide(
            attr, slide, tile_size=64, stride=32, tissue_mask=None, batch_size=4, progress=False
        )
    finally:
        for handle in handles:
            handle.remove()
    assert len(alive_at_forward) >= 5  # the plan's probe tile, then batches of 4
    assert not any(alive_at_forward)


def test_reading_threads_closed_under_a_run_name_the_cause(
    attr: NMFConceptAttribution, slide: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # another thread ends the `with` of the threads a run is using: the run stops with
    # an error that says so, not "cannot schedule new futures after shutdown"
    from captum_nmf.wsi import ReadingThreads
    from captum_nmf.wsi.run import execute

    monkeypatch.setattr(execute, "_spare_core", lambda: True)  # read ahead from the first batch

    threads = ReadingThreads()
    hook = _at_forward(attr, 3, threads.close)  # the plan's probe tile, then batches 1 and 2
    try:
        with (
            threads.activated(),
            pytest.raises(RuntimeError, match="reading threads were closed while a slide run"),
        ):
            explain_slide(
                attr, slide, tile_size=64, stride=32, tissue_mask=None, batch_size=2, progress=False
            )
    finally:
        hook.remove()
    assert not any(t.name.startswith("captum-nmf-") for t in threading.enumerate())


def test_a_gap_without_tiles_takes_no_memory() -> None:
    # One batch ends above a stretch of glass and the next piece of tissue starts 2000
    # rows lower: only the bands the tiles touch are held, never the gap.
    st = FeatureStitcher((2100, 16), 4, border=1, device="cpu")
    feats = torch.ones(2, 6, 6, 4)
    st.add(feats, np.array([[0, 0], [2000, 8]]))
    assert st.active_rows == 8  # 4 interior rows of each tile
    assert st.allocated_rows <= 24
    rows = st.pop_final_rows()
    assert rows.rows.tolist() == [1, 2, 3, 4]  # the first tile's rows are final
    assert st.allocated_rows <= 16
    rest = st.finish_rows()
    assert rest.rows.tolist() == [2001, 2002, 2003, 2004]
    assert st.allocated_rows == 0
    assert torch.equal(rest.features, torch.ones(4, 16, 4) * (rest.features > 0))


def test_a_device_this_machine_lacks_is_refused_before_any_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    x = torch.rand(30, 4)
    with pytest.raises(ValueError, match=r"device='cuda': CUDA is not available .* use 'cpu'"):
        NMF(2, device="cuda").fit(x)
    model = NMF.from_components(torch.rand(2, 4))
    model.set_params(device="cuda:0")
    with pytest.raises(ValueError, match=r"device='cuda:0': CUDA is not available"):
        model.transform(x)
    with pytest.raises(ValueError, match=r"device='cuda': CUDA is not available"):
        FeatureStitcher((4, 4), 2, device="cuda")
    with pytest.raises(ValueError, match=r"device='gpu' is not a device; use 'cpu', 'cuda'"):
        NMF(2, device="gpu").fit(x)
    with pytest.raises(TypeError, match="device must be a str or torch.device, got int"):
        NMF(2, device=0).fit(x)  # type: ignore[arg-type]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"device='cuda:1': this machine has 1 CUDA device\(s\)"):
        FeatureStitcher((4, 4), 2, device="cuda:1")


class _OnMps(TorchFunctionMode):
    """Every tensor says it is on ``mps`` (no Mac here): what the checks look at."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        owner = getattr(getattr(func, "__self__", None), "__name__", "")
        if getattr(func, "__name__", "") == "__get__" and owner == "device":
            return torch.device("mps", 0)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("available", [False, True])
def test_mps_is_refused_with_the_reason_the_solver_needs_float64(
    available: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: available)
    why = r"MPS is not supported: the NMF solver computes in float64, which PyTorch's MPS backend"
    x = torch.rand(30, 4)
    with pytest.raises(ValueError, match=rf"device='mps': {why}"):
        NMF(2, device="mps").fit(x)
    with pytest.raises(ValueError, match=rf"device='mps': {why}"):
        FeatureStitcher((4, 4), 2, device="mps")
    on_mps = r"NMF cannot compute on an MPS device.*run the model on the CPU or CUDA"
    fitted = NMF(2, random_state=0).fit(x)
    with _OnMps():
        with pytest.raises(ValueError, match=on_mps):
            NMF(2).fit(x)  # rows already on an MPS device
        with pytest.raises(ValueError, match=on_mps):
            fitted.transform(x)
        with pytest.raises(ValueError, match=on_mps):
            fitted._transform_products(x @ fitted.components_.T)  # a slide run's solve


def test_a_slide_run_stitches_each_batch_holding_the_models_lock(
    attr: NMFConceptAttribution, slide: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the run keeps the layer's own tensor (no clone): no other thread's forward of the model
    # may run before that tensor is stitched
    from captum_nmf._utils.activations import model_lock
    from captum_nmf.wsi.run.assemble import TileAssembler

    lock = model_lock(attr.forward_func, attr.layer)
    free: list[bool] = []
    original = TileAssembler.add

    def add(self: TileAssembler, *args: Any) -> None:
        probe = threading.Thread(target=lambda: free.append(_try(lock)))
        probe.start()
        probe.join()
        original(self, *args)

    monkeypatch.setattr(TileAssembler, "add", add)
    explain_slide(
        attr, slide, tile_size=64, stride=32, tissue_mask=None, batch_size=5, progress=False
    )
    assert free
    assert not any(free)  # another thread never got the model while a batch was stitched


def _try(lock: Any) -> bool:
    if lock.acquire(blocking=False):
        lock.release()
        return True
    return False


def test_masked_out_non_finite_features_add_nothing() -> None:
    # an edge tile's dropped cells inside its kept box add 0 whatever they hold (NaN, inf),
    # as the cell-by-cell loop does
    rng = np.random.default_rng(5)
    shape = (27, 31)
    tiles = [(4 * i - 2, 4 * j - 1) for i in range(8) for j in range(9) if rng.random() < 0.6]
    origins = np.array(tiles)
    coverage = cell_coverage(origins, (8, 8), 2, shape)
    st = FeatureStitcher(shape, 1, border=2, coverage=coverage, device="cpu")
    feats = torch.ones(len(tiles), 8, 8, 1)
    poisoned = 0
    for t, (r0, c0) in enumerate(tiles):
        rows, cols, keep = st.footprint((r0, c0), (8, 8))
        if not keep.any():
            continue
        ys, xs = np.nonzero(keep)
        box = keep[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        for y, x in zip(*np.nonzero(~box), strict=True):  # dropped, inside the kept box
            r, c = rows.start + ys.min() + y, cols.start + xs.min() + x
            feats[t, r - r0, c - c0, 0] = float("nan") if (r + c) % 2 else float("inf")
            poisoned += 1
    assert poisoned > 10  # the masked path is exercised
    st.add(feats, origins)
    taken = st.finish_rows()
    values = taken.features[:, :, 0].numpy()
    assert np.isfinite(values).all()
    np.testing.assert_array_equal(values, (taken.counts > 0).astype(np.float32))  # means of 1


def test_a_bad_cpu_count_variable_is_named(
    monkeypatch: pytest.MonkeyPatch, attr: NMFConceptAttribution, slide: Path, tmp_path: Path
) -> None:
    from captum_nmf._utils.cpus import usable_cpus
    from captum_nmf.wsi import explain_cohort
    from captum_nmf.wsi.run import execute

    monkeypatch.setenv("LOKY_MAX_CPU_COUNT", "four")
    with pytest.raises(ValueError, match=r"LOKY_MAX_CPU_COUNT='four' is not a whole number"):
        usable_cpus()
    with pytest.raises(ValueError, match="LOKY_MAX_CPU_COUNT='four'"):
        execute._spare_core()
    with pytest.raises(ValueError, match="LOKY_MAX_CPU_COUNT='four'"):  # before any work
        explain_slide(attr, slide, tile_size=64, stride=32, out_dir=tmp_path / "run")
    with pytest.raises(ValueError, match="LOKY_MAX_CPU_COUNT='four'"):
        explain_cohort(attr, [slide], tmp_path / "cohort", tile_size=64, stride=32)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("LOKY_MAX_CPU_COUNT", "0")  # loky's floor: at least one
    assert usable_cpus() == 1


def test_the_cpu_count_does_not_fall_to_one_without_joblibs_multiprocessing() -> None:
    """``joblib.cpu_count()`` says 1 with ``JOBLIB_MULTIPROCESSING=0``; ours counts the CPUs."""
    import os
    import subprocess
    import sys

    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("needs Linux's affinity")
    code = (
        "import os; from captum_nmf._utils.cpus import usable_cpus; "
        "print(usable_cpus(), len(os.sched_getaffinity(0)))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOKY_")}
    env["JOBLIB_MULTIPROCESSING"] = "0"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    assert out[0] == out[1]
