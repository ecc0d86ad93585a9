"""CPU/CUDA parity of every path that touches a device.

Each test runs the same call with the model and inputs on the CPU and on CUDA and
compares the results; every returned tensor must be on the input's device.

On a machine with a GPU they run on it. Without one (CI) they run on an
emulated CUDA device (:mod:`tests.helpers.emulated_cuda`): CPU tensors marked as
on the device, with CUDA's rules enforced on every torch call (no mixing of
devices, no ``.numpy()`` of a device tensor, no integer matmul, no CPU generator
for device random numbers). That catches the crashes of a first CUDA call, not
CUDA's speed or numerics. ``CAPTUM_NMF_PARITY_DEVICE`` picks one: ``cuda``,
``emulated`` or ``cpu`` (the CPU as the "device": the calls without any rule).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from captum_nmf import NMF, NMFConceptAttribution
from captum_nmf.wsi import SlideTiles, explain_cohort, explain_slide, write_pyramid
from captum_nmf.wsi.run.assemble import TileAssembler
from tests.helpers.emulated_cuda import EmulatedCuda, emulated_cuda
from tests.helpers.synthetic_slides import he_image
from tests.helpers.wsi_models import PoolNet

MODE = os.environ.get(
    "CAPTUM_NMF_PARITY_DEVICE", "cuda" if torch.cuda.is_available() else "emulated"
)
CUDA = torch.device("cpu" if MODE == "cpu" else "cuda")
#: the slide runs' tiling: 64 px tiles every 32 px of the whole slide, no progress bar
TILING: dict[str, Any] = {"tile_size": 64, "stride": 32, "tissue_mask": None, "progress": False}
pytestmark = pytest.mark.skipif(
    MODE == "cuda" and not torch.cuda.is_available(), reason="CAPTUM_NMF_PARITY_DEVICE=cuda"
)


@pytest.fixture(scope="module", autouse=True)
def device() -> Iterator[EmulatedCuda | None]:
    """The emulated device for the whole module (its fixtures too), or None on a real one."""
    if MODE != "emulated":
        yield None
        return
    with emulated_cuda() as mode:
        yield mode
    assert mode.calls > 0, "the module never touched the emulated device"


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pyramid(he_image()[:384, :512], tmp_path_factory.mktemp("cuda") / "he.svs")


@pytest.fixture(scope="module")
def pair(slide: Path) -> tuple[NMFConceptAttribution, NMFConceptAttribution]:
    """The same fitted concepts bound to a CPU model and to its CUDA copy."""
    net = PoolNet().eval()
    cpu = NMFConceptAttribution(net, net.relu, n_concepts=3, random_state=0)
    cpu.fit(SlideTiles(slide, tile_size=64, stride=32, tissue_mask=None), progress=False)
    path = slide.parent / "c.safetensors"
    cpu.save(path)
    gpu_net = copy.deepcopy(net).to(CUDA)
    gpu = NMFConceptAttribution.load(path, gpu_net, gpu_net.relu)
    return cpu, gpu


def test_nmf_fit_partial_fit_transform_statistics_update() -> None:
    gen = torch.Generator().manual_seed(0)
    v = torch.rand(4000, 32, generator=gen, dtype=torch.float64)
    a = NMF(4, random_state=0, max_iter=50).fit(v)
    b = NMF(4, random_state=0, max_iter=50).fit(v.to(CUDA))
    assert b.components_.device.type == CUDA.type
    torch.testing.assert_close(b.components_.cpu(), a.components_, rtol=1e-6, atol=1e-8)
    w_cpu, w_gpu = a.transform(v), b.transform(v.to(CUDA))
    assert w_gpu.device.type == CUDA.type
    torch.testing.assert_close(w_gpu.cpu(), w_cpu, rtol=1e-6, atol=1e-8)
    s1, s2 = NMF(4, random_state=0), NMF(4, random_state=0)
    for chunk in v.split(1000):
        s1.partial_fit(chunk)
        s2.partial_fit(chunk.to(CUDA))
    torch.testing.assert_close(s2.components_.cpu(), s1.components_, rtol=1e-5, atol=1e-7)
    stats = s2.statistics(v[:500].to(CUDA))
    s2.update(stats)
    assert s2.components_.device.type == CUDA.type


def test_attribute_assign_features(pair: tuple[NMFConceptAttribution, ...]) -> None:
    cpu, gpu = pair
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    maps_cpu, maps_gpu = cpu.attribute(x), gpu.attribute(x.to(CUDA))
    assert maps_gpu.device.type == CUDA.type
    torch.testing.assert_close(maps_gpu.cpu(), maps_cpu, rtol=1e-4, atol=1e-5)
    assert torch.equal(gpu.assign(x.to(CUDA)).cpu(), cpu.assign(x))
    act, out = gpu.features(x.to(CUDA), return_output=True)
    assert act.device.type == CUDA.type
    assert out.device.type == CUDA.type


def test_fit_from_tensors_loaders_and_slide_tiles(slide: Path) -> None:
    tiles = SlideTiles(slide, tile_size=64, stride=32, tissue_mask=None)
    x = torch.stack([tiles[i][0] for i in range(16)])
    for source in (x, [x[:8], x[8:]], tiles):
        net = PoolNet().eval()
        a = NMFConceptAttribution(net, net.relu, 3, random_state=0).fit(source, progress=False)
        g = copy.deepcopy(net).to(CUDA)
        b = NMFConceptAttribution(g, g.relu, 3, random_state=0).fit(source, progress=False)
        torch.testing.assert_close(b.concepts_.cpu(), a.concepts_.cpu(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["tile", "region"])
def test_explain_slide_and_resume(
    tmp_path: Path, slide: Path, pair: tuple[NMFConceptAttribution, ...], mode: str
) -> None:
    cpu, gpu = pair
    kwargs: dict[str, Any] = {**TILING, "chunk_tiles": 32}
    if mode == "region":
        kwargs = {"mode": "region", "region_size": 128, "region_margin": 16, **kwargs}
    a = explain_slide(cpu, slide, **kwargs)  # type: ignore[arg-type]
    b = explain_slide(gpu, slide, out_dir=tmp_path / "run", **kwargs)  # type: ignore[arg-type]
    np.testing.assert_allclose(b.concept_maps, a.concept_maps, rtol=1e-4, atol=1e-5)
    again = explain_slide(gpu, slide, out_dir=tmp_path / "run", resume=True, **kwargs)  # type: ignore[arg-type]
    assert np.array_equal(again.concept_maps, b.concept_maps)


def test_explain_cohort_local(
    tmp_path: Path, slide: Path, pair: tuple[NMFConceptAttribution, ...]
) -> None:
    _, gpu = pair
    result = explain_cohort(
        gpu, [slide], tmp_path, tile_size=64, stride=32, tissue_mask=None, progress=False
    )
    assert result.ok


def test_cams_analyses_viz_and_export_of_cuda_results(
    tmp_path: Path, slide: Path, pair: tuple[NMFConceptAttribution, ...]
) -> None:
    from captum_nmf.compare import analyse, cam_maps
    from captum_nmf.export import export_explanation
    from captum_nmf.viz import plot_overlay

    cpu, gpu = pair
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    cam_cpu = cam_maps(cpu.forward_func, cpu.layer, x, "gradcam", target=1)
    cam_gpu = cam_maps(gpu.forward_func, gpu.layer, x.to(CUDA), "gradcam", target=1)
    torch.testing.assert_close(torch.as_tensor(cam_gpu).cpu(), torch.as_tensor(cam_cpu).cpu())
    result = analyse(gpu, x.to(CUDA), target=1)
    assert result.to_markdown()
    fig = plot_overlay(x[:1].to(CUDA), gpu.attribute(x[:1].to(CUDA)))
    assert fig is not None
    ex = explain_slide(gpu, slide, tile_size=64, stride=32, tissue_mask=None, progress=False)
    export_explanation(ex, tmp_path / "export")
    assert (tmp_path / "export" / "concepts.geojson").is_file()


def _on_device(t: torch.Tensor) -> bool:
    return t.device.type == CUDA.type


def test_solver_paths_inits_and_numpy_inputs() -> None:
    """The K > 12 pattern path, the exact fallback, every init, NumPy in with ``device=``."""
    from captum_nmf._utils import solvers

    gen = torch.Generator().manual_seed(3)
    v = torch.rand(600, 24, generator=gen, dtype=torch.float64)
    inits: tuple[tuple[int, Any], ...] = ((14, "nndsvda"), (5, "nndsvd"), (5, "random"))
    for k, init in inits:
        a = NMF(k, init=init, random_state=0, max_iter=30).fit(v)
        b = NMF(k, init=init, random_state=0, max_iter=30).fit(v.to(CUDA))
        assert _on_device(b.components_)
        torch.testing.assert_close(b.components_.cpu(), a.components_, rtol=1e-5, atol=1e-8)
        w = b.transform(v.to(CUDA))
        assert _on_device(w)
        torch.testing.assert_close(w.cpu(), a.transform(v), rtol=1e-5, atol=1e-8)
    h = a.components_
    gram, cross = h @ h.T, v @ h.T
    for compact in (False, True):
        got = solvers.nnls(gram.to(CUDA), cross.to(CUDA), compact=compact)
        assert _on_device(got)
        torch.testing.assert_close(got.cpu(), solvers.nnls(gram, cross, compact=compact))
    wide = NMF(14, random_state=0, max_iter=5).fit(v).components_  # 14 concepts: pattern path
    g14, c14 = wide @ wide.T, v @ wide.T
    exact = solvers._nnls_bpp(g14.to(CUDA), c14.to(CUDA))
    assert _on_device(exact)
    torch.testing.assert_close(exact.cpu(), solvers._nnls_bpp(g14, c14))
    x = v.numpy()
    model = NMF(4, random_state=0, max_iter=30, device=CUDA).fit(x)
    assert isinstance(model.components_, np.ndarray)
    assert isinstance(model.transform(x), np.ndarray)
    np.testing.assert_allclose(
        model.components_, NMF(4, random_state=0, max_iter=30).fit(x).components_, rtol=1e-5
    )


def test_fit_with_sampled_locations_and_device_options(slide: Path) -> None:
    tiles = SlideTiles(slide, tile_size=64, stride=32, tissue_mask=None)
    options: dict[str, Any] = {"max_locations_per_batch": 20, "batch_size": 8, "progress": False}
    net = PoolNet().eval()
    a = NMFConceptAttribution(net, net.relu, 3, random_state=0).fit(tiles, **options)
    g = copy.deepcopy(net).to(CUDA)
    b = NMFConceptAttribution(g, g.relu, 3, random_state=0).fit(tiles, **options)
    assert _on_device(b.concepts_)
    torch.testing.assert_close(b.concepts_.cpu(), a.concepts_.cpu(), rtol=1e-4, atol=1e-5)
    c = NMFConceptAttribution(g, g.relu, 3, random_state=0)
    c.fit(tiles, channels_last=True, **options)
    torch.testing.assert_close(c.concepts_.cpu(), a.concepts_.cpu(), rtol=1e-4, atol=1e-5)
    x = torch.stack([tiles[i][0] for i in range(4)]).to(CUDA)
    maps = c.attribute(x, channels_last=True)
    assert _on_device(maps)
    assert maps.is_contiguous()


def test_explain_slide_with_workers_device_options_and_two_slides(
    tmp_path: Path, slide: Path, pair: tuple[NMFConceptAttribution, ...]
) -> None:
    cpu, gpu = pair
    kwargs: dict[str, Any] = dict(TILING)
    reference = explain_slide(cpu, slide, **kwargs).concept_maps
    workers = explain_slide(gpu, slide, num_workers=2, batch_size=8, **kwargs)
    np.testing.assert_allclose(workers.concept_maps, reference, rtol=1e-4, atol=1e-5)
    fast = explain_slide(gpu, slide, channels_last=True, **kwargs)
    np.testing.assert_allclose(fast.concept_maps, reference, rtol=1e-4, atol=1e-5)
    half = explain_slide(gpu, slide, autocast=torch.bfloat16, **kwargs)
    assert half.concept_maps.dtype == np.float32
    np.testing.assert_allclose(half.concept_maps, reference, rtol=0.05, atol=0.05 * reference.max())
    second = write_pyramid(he_image()[384:640, :384], tmp_path / "second.svs")
    cohort = explain_cohort(gpu, [slide, second], tmp_path / "cohort", num_workers=0, **kwargs)
    assert cohort.ok
    again = explain_cohort(gpu, [slide, second], tmp_path / "cohort2", num_workers=1, **kwargs)
    assert again.ok


def test_every_cam_method_and_the_paper_analyses(pair: tuple[NMFConceptAttribution, ...]) -> None:
    from captum_nmf.compare import CAM_METHODS, analyse, cam_maps

    cpu, gpu = pair
    x = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    for method in CAM_METHODS:
        on_cpu = cam_maps(cpu.forward_func, cpu.layer, x, method, target=1)
        on_device = cam_maps(gpu.forward_func, gpu.layer, x.to(CUDA), method, target=1)
        assert _on_device(on_device), method
        torch.testing.assert_close(on_device.cpu(), on_cpu, rtol=1e-4, atol=1e-6)
    a = analyse(cpu, x, target=1, progress=False, batch_size=4)
    b = analyse(gpu, x.to(CUDA), target=1, progress=False, batch_size=4)
    assert b.to_markdown() == a.to_markdown()


def test_plots_and_exports_take_device_tensors(
    tmp_path: Path, slide: Path, pair: tuple[NMFConceptAttribution, ...]
) -> None:
    import matplotlib.pyplot as plt

    from captum_nmf.compare import cam_maps, concept_similarity, weight_correlation
    from captum_nmf.viz import overlay, plot_comparison, plot_concepts, plot_structure

    cpu, gpu = pair
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    maps_cpu, maps = cpu.attribute(x), gpu.attribute(x.to(CUDA))
    np.testing.assert_allclose(
        overlay(x[0].to(CUDA), maps[0]), overlay(x[0], maps_cpu[0]), rtol=1e-4, atol=1e-5
    )
    cam = cam_maps(gpu.forward_func, gpu.layer, x.to(CUDA), "gradcam", target=1)
    for fig in (
        plot_concepts(x[0].to(CUDA), maps[0]),
        plot_comparison(x[0].to(CUDA), cam[0], maps[0]),
        plot_structure(concept_similarity(gpu.concepts_), weight_correlation(maps)),
    ):
        plt.close(fig)
    from captum_nmf.export import export_explanation

    ex = explain_slide(gpu, slide, tile_size=64, stride=32, tissue_mask=None, progress=False)
    export_explanation(ex, tmp_path / "export")
    assert (tmp_path / "export" / "concepts.geojson").is_file()


@pytest.mark.parametrize("where", ["forward", "solve", "last rows"])
def test_out_of_memory_on_the_device_keeps_chunks_and_resume_finishes(
    tmp_path: Path, slide: Path, pair: tuple[NMFConceptAttribution, ...], where: str
) -> None:
    """Also in the stitching and solve, which hold device memory too: before, an out of
    memory there was torch's bare error, without the batch size to lower."""
    cpu, gpu = pair
    kwargs: dict[str, Any] = {**TILING, "chunk_tiles": 32, "batch_size": 8}
    original = NMFConceptAttribution._activations  # the slide run's forward
    calls = {"n": 0}

    def forward(self: NMFConceptAttribution, *args: Any, **options: Any) -> Any:
        if options.get("return_output"):
            calls["n"] += 1
            if calls["n"] == 8:  # a batch after the first chunk (45 tiles: 6 batches) is in
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args, **options)

    solve = NMF._transform_products

    def solved(self: NMF, *args: Any, **options: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 8:  # a solve after the first chunk is in
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return solve(self, *args, **options)

    def finish(self: TileAssembler) -> None:  # the last rows' solve, after every chunk
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    said = r"cuda ran out of memory on a batch of 8 tile\(s\)"
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        if where == "forward":
            mp.setattr(NMFConceptAttribution, "_activations", forward)
        elif where == "solve":
            mp.setattr(NMF, "_transform_products", solved)
        else:
            mp.setattr(TileAssembler, "finish", finish)
            said = r"out of memory solving the slide's last rows .* every chunk is kept"
        with pytest.raises(torch.OutOfMemoryError, match=said):
            explain_slide(gpu, slide, out_dir=out, **kwargs)
    assert json.loads((out / "manifest.json").read_text())["done"] >= 1
    resumed = explain_slide(gpu, slide, out_dir=out, resume=True, **kwargs)
    assert [p["device"][:4] for p in resumed.config["parts"]] == ["cuda", "cuda"]
    reference = explain_slide(cpu, slide, **kwargs)
    np.testing.assert_allclose(resumed.concept_maps, reference.concept_maps, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("per_tile", [False, True])
def test_the_slide_loop_uploads_nothing_per_batch_that_waits_for_the_device(
    pair: tuple[NMFConceptAttribution, ...],
    slide: Path,
    device: EmulatedCuda | None,
    per_tile: bool,
) -> None:
    """A blocking host-to-device copy (or a non_blocking one from pageable memory) makes the
    host wait for the device's queued work. The stitcher's row indices and divisors went up
    so at every batch that finished rows (20 per run here), and the per-tile transform's
    batches came from pageable memory (41 at batch 4). Counted on the emulated device."""
    if device is None:
        pytest.skip("counted on the emulated device only")
    _, gpu = pair
    kwargs: dict[str, Any] = {**TILING, "transform": (lambda t: t * 1.0) if per_tile else None}
    explain_slide(gpu, slide, batch_size=4, **kwargs)  # caches filled (the probe, factors)
    seen = {}
    for batch in (4, 12):
        device.waiting_uploads.clear()
        explain_slide(gpu, slide, batch_size=batch, **kwargs)
        seen[batch] = list(device.waiting_uploads)
    assert seen[4] == seen[12]  # what a run uploads so does not depend on its batches
    assert all(shape[0] not in (4, 12) for _, shape in seen[4])
