"""``--device``: auto, missing devices refused before any work, the model moved once, batches
normalised on the model's device."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from captum_nmf import NMFConceptAttribution, cli
from captum_nmf.cli import commands
from captum_nmf.cli.parser import build_parser
from captum_nmf.demo.zoo import imagenet_normalize
from captum_nmf.wsi import SlideExplanation, SlideTiles, explain_slide, write_pyramid
from tests.helpers.emulated_cuda import EmulatedCuda
from tests.helpers.synthetic_slides import he_image
from tests.helpers.wsi_models import PoolNet

TILING = ["--tile-size", "64", "--stride", "32", "--batch-size", "32", "--no-progress"]
MOVES: list[tuple[torch.device, bool]] = []


class CountingNet(PoolNet):
    """PoolNet that records every ``.to(...)`` call with its device and training flag."""

    def to(self, *args: object, **kwargs: object) -> CountingNet:  # type: ignore[override]
        MOVES.append((torch.device(args[0]), self.training))  # type: ignore[arg-type]
        return super().to(*args, **kwargs)  # type: ignore[return-value,arg-type]


def counting_net() -> nn.Module:
    return CountingNet()


MODEL = ["--model", "tests.test_cli_device:counting_net", "--layer", "relu"]


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pyramid(he_image()[:192, :256], tmp_path_factory.mktemp("dev") / "s.svs")


@pytest.fixture(scope="module")
def concepts(slide: Path) -> Path:
    net = PoolNet().eval()
    attr = NMFConceptAttribution(net, net.relu, n_concepts=3, random_state=0)
    tiles = SlideTiles(
        slide, tile_size=64, stride=32, tissue_mask=None, transform=imagenet_normalize
    )
    attr.fit(tiles, progress=False)
    return attr.save(slide.parent / "c.safetensors")


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_auto_is_cuda_when_available_else_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cli.resolve_device("auto") == torch.device("cuda")
    assert cli.resolve_device("cpu") == torch.device("cpu")


def _argv(command: str, out: Path, device: str) -> list[str]:
    model = ["--model", "no_such_package.models:net", "--layer", "x", "--normalize", "none"]
    tail = ["--device", device, "--out"]
    if command == "fit":
        return ["fit", *model, *tail, str(out / "c.safetensors"), "missing.svs"]
    if command == "demo":
        return ["demo", *tail, str(out / "o")]
    return [command, *model, "--concepts", "c.safetensors", *tail, str(out / "o"), "missing.svs"]


@pytest.mark.parametrize("command", ["fit", "explain", "analyse", "demo"])
@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_cuda_without_cuda_is_one_line_before_any_work(
    command: str,
    device: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The model module does not exist and the slide is missing: the device is checked first."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = _run(_argv(command, tmp_path, device), capsys)
    assert code == 1
    assert out == ""
    assert err == (
        f"captum-nmf: error: --device {device}: CUDA is not available "
        "(torch.cuda.is_available() is False); use --device cpu, or auto to take CUDA when "
        "there is one.\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_cuda_index_the_machine_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(cli.CLIError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\)"):
        cli.resolve_device("cuda:2")
    assert cli.resolve_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.parametrize("value", ["gpu", "cuda:x", "meta", ""])
def test_not_a_device(value: str) -> None:
    with pytest.raises(cli.CLIError, match=r"use auto, cpu, cuda or cuda:N\."):
        cli.resolve_device(value)


@pytest.mark.parametrize("available", [False, True])
def test_mps_is_refused_the_solver_needs_float64(
    available: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: available)
    with pytest.raises(
        cli.CLIError,
        match=r"--device mps: MPS is not supported: the NMF solver computes in float64, which "
        r"PyTorch's MPS backend lacks; use --device cpu or auto\.",
    ):
        cli.resolve_device("mps")


def test_device_with_ray_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["fit", *MODEL, "--normalize", "none", "--device", "cpu", "--out"]
    code, _, err = _run([*argv, str(tmp_path / "c.safetensors"), "--ray", "a.svs"], capsys)
    assert code == 1
    assert "with --ray each actor uses the GPU Ray gives it" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["fit", "explain", "analyse"])
def test_the_model_is_moved_once_and_left_in_eval_mode(
    command: str,
    slide: Path,
    concepts: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    MOVES.clear()
    common = [*MODEL, *TILING, "--normalize", "imagenet", "--device", "cpu", "--min-tissue", "0"]
    if command == "fit":
        argv = ["fit", *common, "--k", "2", "--out", str(tmp_path / "c.safetensors")]
    else:
        argv = [command, *common, "--concepts", str(concepts), "--out", str(tmp_path / "o")]
    if command == "analyse":
        argv += ["--n-tiles", "8"]
    code, _, err = _run([*argv, str(slide)], capsys)
    assert code == 0, err
    assert [(torch.device("cpu"), False)] == MOVES


def test_explain_normalises_whole_batches_on_the_device(
    slide: Path, concepts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI passes the normalisation as batch_transform: the same maps as per-tile transform."""
    argv = ["explain", *MODEL, *TILING, "--normalize", "imagenet", "--concepts", str(concepts)]
    code, _, err = _run(
        [*argv, "--min-tissue", "0", "--out", str(tmp_path / "run"), str(slide)], capsys
    )
    assert code == 0, err
    net = PoolNet().eval()
    attr = NMFConceptAttribution.load(concepts, net, net.relu)
    reference = explain_slide(
        attr,
        slide,
        tile_size=64,
        stride=32,
        min_tissue=0,
        transform=imagenet_normalize,
        batch_size=32,
        progress=False,
    )
    ours = SlideExplanation.load(tmp_path / "run")
    np.testing.assert_allclose(ours.concept_maps, reference.concept_maps, rtol=1e-5, atol=1e-6)
    assert np.any(ours.concept_maps > 0)


def test_explain_options_use_batch_transform_and_fit_keeps_transform(slide: Path) -> None:
    argv = ["explain", *MODEL, "--normalize", "imagenet", "--concepts", "c", "--out", "o", "s.svs"]
    options = commands._explain_options(build_parser().parse_args(argv))
    assert options["batch_transform"] is imagenet_normalize
    assert "transform" not in options
    argv = ["fit", *MODEL, "--normalize", "imagenet", "--out", "c.safetensors", "s.svs"]
    tiles = commands._slide_tiles(build_parser().parse_args(argv), [str(slide)])
    assert tiles.transform is imagenet_normalize


def test_fit_explain_analyse_on_cuda_match_the_cpu(
    slide: Path,
    concepts: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    cuda: EmulatedCuda | None,
) -> None:
    maps, analyses, tables = {}, {}, {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        common = [*MODEL, *TILING, "--normalize", "imagenet", "--min-tissue", "0"]
        common += ["--device", device]
        fit = ["fit", *common, "--k", "3", "--out", f"{out}.safetensors", str(slide)]
        code, _, err = _run(fit, capsys)
        assert code == 0, err
        with_concepts = [*common, "--concepts", str(concepts)]
        code, _, err = _run(["explain", *with_concepts, "--out", str(out), str(slide)], capsys)
        assert code == 0, err
        maps[device] = SlideExplanation.load(out).concept_maps
        analyse = ["analyse", *with_concepts, "--n-tiles", "12", "--out", str(out / "a")]
        code, analyses[device], err = _run([*analyse, str(slide)], capsys)
        assert code == 0, err
        select = ["select-k", *common, "--stride", "64", "--ks", "2,3", "--n-seeds", "2"]
        select += ["--out", str(out / "k")]  # tiles apart: held-out ones share no pixels
        code, _, err = _run([*select, str(slide)], capsys)
        assert code == 0, err
        tables[device] = json.loads((out / "k" / "select_k.json").read_text())
    np.testing.assert_allclose(maps["cuda"], maps["cpu"], rtol=1e-4, atol=1e-5)
    assert analyses["cuda"].splitlines()[:8] == analyses["cpu"].splitlines()[:8]
    assert tables["cuda"]["recommended"] == tables["cpu"]["recommended"]
    assert tables["cuda"]["sample"]["train_tiles"] == tables["cpu"]["sample"]["train_tiles"]
    errors = [tables[d]["heldout_error"] for d in ("cuda", "cpu")]
    np.testing.assert_allclose(*errors, rtol=1e-3)
