"""CPU/CUDA parity of every path that touches a device (skipped without CUDA; run on a GPU).

Each test runs the same call with the model and inputs on the CPU and on CUDA and
compares the results; every returned tensor must be on the input's device.
``CAPTUM_NMF_PARITY_DEVICE=cpu`` runs them with the CPU as the "device" (a check
of the calls themselves where no GPU is lent).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from captum_nmf import NMF, NMFConceptAttribution
from captum_nmf.wsi import SlideTiles, explain_cohort, explain_slide, write_pyramid
from tests.helpers.synthetic_slides import he_image
from tests.helpers.wsi_models import PoolNet

CUDA = torch.device(os.environ.get("CAPTUM_NMF_PARITY_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(
    CUDA.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
)


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
    kwargs = {
        "tile_size": 64,
        "stride": 32,
        "tissue_mask": None,
        "progress": False,
        "chunk_tiles": 32,
    }
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
