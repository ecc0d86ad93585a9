"""The end-to-end example runs offline on the packaged real material."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("PIL")

from captum_nmf import quickstart


def test_quickstart_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert quickstart.main(["--out", str(tmp_path), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (tmp_path / "concepts.safetensors").is_file()
    assert summary["reload_identical"] is True
    assert summary["layer"] == "head_relu"
    assert summary["grid"] == [8, 8]
    assert summary["tiles"] == {"nest": 25, "stroma": 25, "size_px": 256}
    assert summary["upsampled_shape"] == [1, 6, 256, 256]
    assert len(summary["concepts"]) == 6
    shares = [row["share_of_locations"] for row in summary["concepts"]]
    assert sum(shares) == pytest.approx(1.0, abs=1e-6)  # no all-zero location in real tissue
    # Concepts tell the tumour nest from the stroma: some concept is far more
    # present in one image than in the other.
    ratios = [
        max(r["mean_intensity_nest"], 1e-6) / max(r["mean_intensity_stroma"], 1e-6)
        for r in summary["concepts"]
    ]
    assert max(ratios) > 3
    assert min(ratios) < 1 / 3
    assert 0 < summary["relative_reconstruction_error"] < 1
    assert "corr. with neoplastic nuclei" in capsys.readouterr().out
