"""tutorials/00_quickstart.py runs offline on the packaged real material (small configuration)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("PIL")

SCRIPT = Path(__file__).resolve().parents[1] / "tutorials" / "00_quickstart.py"


def test_quickstart_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CAPTUM_NMF_TUTORIAL_SMALL", "1")
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), str(tmp_path)])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    printed = capsys.readouterr().out
    summary = json.loads(printed.strip().splitlines()[-1])
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert (tmp_path / "concepts.safetensors").is_file()
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
