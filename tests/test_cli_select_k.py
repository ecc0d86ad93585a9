"""``captum-nmf select-k``: tables, JSON and the figure on real H&E, and its bad input."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from captum_nmf import cli
from captum_nmf.cli.parser import build_parser
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
        [
            "select_k.csv",
            "select_k.json",
            "select_k.md",
            "select_k.png",
            "select_k_concepts.csv",
            "select_k_concepts.safetensors",
        ]
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
        (["--ks", "3-1"], "'3-1' in '3-1' runs backwards; write 1-3"),  # was "--ks is empty"
        (["--ks", "0-3"], "K"),
        (["--ks", "2-9"], "K"),  # PoolNet's layer has 4 channels
        (["--holdout", "1.5"], "--holdout must be in (0, 1), got 1.5; pass e.g. 0.2."),
        (["--n-seeds", "1"], "--n-seeds must be >= 2, got 1; pass e.g. --n-seeds 5."),  # n_seeds
        (["--stable-cosine", "1.5"], "--stable-cosine must be in (0, 1], got 1.5"),
        (["--gain-threshold", "-1"], "--gain-threshold must be >= 0"),
        (["--perturbation", "other"], "invalid choice: 'other'"),
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
    if extra[1] in ("two", "3-1", "other"):  # refused by the parser: usage, exit code 2
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


def test_the_advice_of_select_k_names_flags_it_has(
    tmp_path: Path, slides: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Its messages said n_seeds=5, max_rows, locations_per_tile and perturbation='init':
    Python names, and the last two were options the command did not have."""
    argv = ["select-k", *MODEL, *TILING, "--ks", "1-2", "--n-seeds", "2", "--max-rows", "40"]
    argv += ["--locations-per-tile", "40", "--out", str(tmp_path / "o"), str(slides[0])]
    code, _, err = _run(argv, capsys)  # 40 rows: one tile of 40 locations, or so
    assert code == 1
    assert "--max-rows" in err
    assert "--locations-per-tile" in err
    for python in ("max_rows", "locations_per_tile", "n_seeds", "perturbation=", "random_state"):
        assert python not in err
    parsed = build_parser().parse_args([*argv[:-3], "--perturbation", "init", "--out", "o", "s"])
    assert (parsed.perturbation, parsed.locations_per_tile) == ("init", 40)


def test_select_k_tiles_do_not_overlap_by_default(
    tmp_path: Path, slides: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """The other commands' default stride (half a tile) made every held-out tile share half
    its pixels with training tiles; select-k's default is a whole tile (the suite makes the
    overlap warning an error)."""
    tiling = ["--tile-size", "64", "--batch-size", "32", "--no-progress"]
    argv = ["select-k", *MODEL, *tiling, "--ks", "1-2", "--n-seeds", "2"]
    code, _, err = _run([*argv, "--out", str(tmp_path / "o"), str(slides[0])], capsys)
    assert code == 0, err
    code, _, err = _run(
        [*argv, "--stride", "32", "--out", str(tmp_path / "p"), str(slides[0])], capsys
    )
    assert code == 1
    assert "the tiles overlap (--stride 32 < --tile-size 64 on s0.svs)" in err
