"""``captum-nmf select-k``: tables, JSON and the figure on real H&E, and its bad input."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from captum_nmf import cli
from captum_nmf.wsi import write_pyramid
from tests.helpers.synthetic_slides import he_image

MODEL = ["--model", "tests.helpers.wsi_models:PoolNet", "--layer", "relu", "--normalize", "none"]
TILING = ["--tile-size", "64", "--stride", "32", "--batch-size", "32", "--no-progress"]


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("selectk")
    return [
        write_pyramid(he_image()[y : y + 192, :256], folder / f"s{i}.svs")
        for i, y in enumerate((0, 600))
    ]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_select_k_writes_tables_and_the_figure(
    tmp_path: Path, slides: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sk"
    argv = ["select-k", *MODEL, *TILING, "--ks", "1-3", "--n-seeds", "2", "--out", str(out)]
    code, printed, err = _run([*argv, *map(str, slides)], capsys)
    assert code == 0, err
    assert "recommended" in printed.lower()
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["select_k.csv", "select_k.json", "select_k.md", "select_k.png", "select_k_concepts.csv"]
    )
    record = json.loads((out / "select_k.json").read_text())
    assert record["ks"] == [1, 2, 3]
    assert len(record["heldout_error"]) == 3
    assert record["rule"] in printed
    assert (out / "select_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--ks", "two"], "is not a range of K"),
        (["--ks", "0-3"], "K"),
        (["--ks", "2-9"], "K"),  # PoolNet's layer has 4 channels
        (["--holdout", "1.5"], "holdout"),
    ],
)
def test_bad_input(
    tmp_path: Path,
    slides: list[Path],
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    match: str,
) -> None:
    argv = ["select-k", *MODEL, *TILING, "--n-seeds", "2", "--out", str(tmp_path / "o"), *extra]
    if extra[1] == "two":
        with pytest.raises(SystemExit):
            cli.main([*argv, *map(str, slides)])
        assert match in capsys.readouterr().err
        return
    code, _, err = _run([*argv, *map(str, slides)], capsys)
    assert code == 1
    assert match in err


def test_slides_without_tissue_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blank = write_pyramid(np.full((192, 256, 3), 245, np.uint8), tmp_path / "blank.svs")
    argv = ["select-k", *MODEL, *TILING, "--ks", "1-2", "--out", str(tmp_path / "o")]
    with warnings.catch_warnings():  # shown as one line (the suite makes them errors)
        warnings.simplefilter("default")
        code, _, err = _run([*argv, str(blank)], capsys)
    assert code == 1
    assert re.search(r"captum-nmf: warning: .*blank\.svs", err)
    assert "captum-nmf: error: " in err
