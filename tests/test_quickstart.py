"""tutorials/00_quickstart.py runs offline on the packaged real material (small configuration)."""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers.emulated_cuda import EmulatedCuda

pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("PIL")

SCRIPT = Path(__file__).resolve().parents[1] / "tutorials" / "00_quickstart.py"


def _quickstart(out: Path) -> tuple[dict[str, Any], str]:
    """Run the script small into ``out``: its summary and everything it printed."""
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setenv("CAPTUM_NMF_TUTORIAL_SMALL", "1")
        mp.setattr(sys, "argv", [str(SCRIPT), str(out)])
        runpy.run_path(str(SCRIPT), run_name="__main__")
    text = printed.getvalue()
    return json.loads(text.strip().splitlines()[-1]), text


@pytest.fixture(scope="module")
def on_cpu(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    out = tmp_path_factory.mktemp("quickstart")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)  # the CPU run, also on a GPU machine
        summary, printed = _quickstart(out)
    return summary, printed, out


def test_quickstart_end_to_end(on_cpu: tuple[dict[str, Any], str, Path]) -> None:
    summary, printed, tmp_path = on_cpu
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert (tmp_path / "concepts.safetensors").is_file()
    assert summary["device"] == "cpu"
    assert summary["reload_identical"] is True
    assert summary["layer"] == "head_relu"
    assert summary["grid"] == [8, 8]
    assert summary["tiles"] == {"nest": 25, "stroma": 25, "size_px": 256}
    assert summary["upsampled_shape"] == [1, 6, 256, 256]
    rows = summary["concepts"]
    assert [row["concept"] for row in rows] == list(range(6))
    shares = [row["share_of_locations"] for row in rows]
    assert sum(shares) == pytest.approx(1.0, abs=1e-6)  # no all-zero location in real tissue
    # Concepts tell the tumour nest from the stroma: some concept is far more
    # present in one image than in the other.
    ratios = [
        max(r["mean_intensity_nest"], 1e-6) / max(r["mean_intensity_stroma"], 1e-6) for r in rows
    ]
    assert max(ratios) > 3
    assert min(ratios) < 1 / 3
    assert 0 < summary["relative_reconstruction_error"] < 1
    correlations = [row["corr_with_neoplastic_share"] for row in rows]
    assert all(-1 <= c <= 1 for c in correlations)
    # Some concept follows the neoplastic nuclei better than GradCAM of the top ImageNet class.
    assert max(correlations) > summary["gradcam_corr_with_neoplastic_share"]
    assert "Agreement of concepts with neoplastic-nuclei share" in printed


def test_quickstart_on_cuda_finds_what_the_cpu_does(
    on_cpu: tuple[dict[str, Any], str, Path], tmp_path: Path, cuda: EmulatedCuda | None
) -> None:
    """The script takes the GPU when there is one (here a GPU, or the emulated device)."""
    summary, _ = _quickstart(tmp_path)
    reference = on_cpu[0]
    assert summary["device"] == "cuda"
    assert summary["reload_identical"] is True
    assert summary["tiles"] == reference["tiles"]
    if cuda is not None:  # the emulated device computes with the CPU's kernels
        assert {**summary, "device": "cpu"} == reference
    else:
        for got, want in zip(summary["concepts"], reference["concepts"], strict=True):
            assert got["mean_intensity_nest"] == pytest.approx(want["mean_intensity_nest"], 1e-3)
