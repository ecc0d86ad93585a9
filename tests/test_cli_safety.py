"""The command line under attack: foreign folders, flipped bytes, failed starts, full disks."""

from __future__ import annotations

import argparse
import errno
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from captum_nmf import cli
from captum_nmf import export as export_module
from captum_nmf.cli.parser import build_parser
from captum_nmf.io import content_digest
from captum_nmf.wsi import SlideExplanation, write_pyramid
from tests.helpers import runs
from tests.helpers.synthetic_slides import he_image

MODEL = ["--model", "tests.helpers.wsi_models:PoolNet", "--layer", "relu", "--normalize", "none"]
TILING = ["--tile-size", "64", "--stride", "32", "--batch-size", "32", "--no-progress"]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


_tree = runs.tree


def _run_warned(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """:func:`_run` with the library's warnings shown (the suite makes them errors)."""
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        return _run(argv, capsys)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A slide of real H&E and 3 concepts fitted on it through the command line."""
    folder = tmp_path_factory.mktemp("cli-safety")
    slide = write_pyramid(he_image()[:192, :256], folder / "s.svs")
    concepts = folder / "concepts.safetensors"
    fit = ["fit", *MODEL, *TILING, "--no-tissue-mask", "--k", "3", "--out", str(concepts)]
    assert cli.main([*fit, str(slide)]) == 0
    return slide, concepts


def _explain(setup: tuple[Path, Path], out: Path, *flags: str) -> list[str]:
    slide, concepts = setup
    return [
        "explain",
        *MODEL,
        *TILING,
        "--no-tissue-mask",
        "--concepts",
        str(concepts),
        "--out",
        str(out),
        *flags,
        str(slide),
    ]


def test_overwrite_keeps_a_web_app_and_the_readme_workflow(
    tmp_path: Path, setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    webapp = tmp_path / "webapp"
    (webapp / "src").mkdir(parents=True)
    (webapp / "manifest.json").write_text('{"name":"my-web-app"}')
    (webapp / "src" / "app.js").write_text("x")
    (webapp / "thesis.txt").write_text("t")
    before = _tree(webapp)
    code, _, err = _run(_explain(setup, webapp, "--overwrite"), capsys)
    assert code == 1
    assert "captum-nmf did not write (manifest.json, src, thesis.txt)" in err
    assert _tree(webapp) == before
    # the README's own workflow: explain, export inside the run, notes, explain --overwrite
    runc = tmp_path / "runc"
    assert _run(_explain(setup, runc), capsys)[0] == 0
    assert _run(["export", str(runc), "--out", str(runc / "export")], capsys)[0] == 0
    (runc / "notes.txt").write_text("n")
    exported = _tree(runc / "export")
    code, _, err = _run(_explain(setup, runc, "--overwrite"), capsys)
    assert code == 0, err
    assert (runc / "notes.txt").read_text() == "n"
    assert _tree(runc / "export") == exported
    assert SlideExplanation.load(runc).config["tile_size"] == 64


def test_flipped_result_bytes_export_nothing(
    tmp_path: Path, setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert _run(_explain(setup, run), capsys)[0] == 0
    data = bytearray((run / "explanation.safetensors").read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    (run / "explanation.safetensors").write_bytes(bytes(data))
    code, _, err = _run(["export", str(run), "--out", str(tmp_path / "export")], capsys)
    assert code == 1
    assert re.search(r"explanation\.safetensors is corrupt", err)
    assert not (tmp_path / "export").exists()
    code, _, err = _run(_explain(setup, run, "--resume"), capsys)
    assert code == 1
    assert "is corrupt: its SHA-256 differs" in err


def test_bad_concept_files_fail_before_out_exists(
    tmp_path: Path, setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    slide, concepts = setup
    with safe_open(str(concepts), framework="pt") as f:
        meta, tensor = dict(f.metadata()), f.get_tensor("concepts").clone()
    huge = tmp_path / "huge.safetensors"
    tensor[0, 0] = 1e30
    save_file({"concepts": tensor}, str(huge), metadata=meta)  # the old digest: corrupt
    out = tmp_path / "run"
    code, _, err = _run(_explain((slide, huge), out), capsys)
    assert code == 1
    assert "huge.safetensors is corrupt" in err
    meta["content_sha256"] = content_digest({"concepts": tensor}, meta)
    save_file({"concepts": tensor}, str(huge), metadata=meta)  # a consistent but absurd file
    code, _, err = _run(_explain((slide, huge), out), capsys)
    assert code == 1
    assert re.search(r"Concept 0 in .*huge\.safetensors has norm 1e\+30", err)
    assert not out.exists()
    # concepts of another layer (the 3-channel pooled image instead of the 4-channel relu)
    other = [*_explain(setup, out)]
    other[other.index("relu")] = "pool"
    code, _, err = _run(other, capsys)  # refused (it was only a warning)
    assert "do not fit this --model / --weights / --layer: Concepts were fitted on layer" in err
    assert "strict" not in err
    assert code == 1
    assert not out.exists()
    assert _run(_explain(setup, out), capsys)[0] == 0  # the corrected rerun just works


def test_export_on_a_full_disk_keeps_the_previous_export(
    tmp_path: Path,
    setup: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run, export = tmp_path / "run", tmp_path / "export"
    assert _run(_explain(setup, run), capsys)[0] == 0
    assert _run(["export", str(run), "--out", str(export)], capsys)[0] == 0
    before = _tree(export)
    real = export_module.write_overlay_tiff
    calls = {"n": 0}

    def disk_fills(*args: object, **kwargs: object) -> Path:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(export_module, "write_overlay_tiff", disk_fills)
    code, _, err = _run(["export", str(run), "--out", str(export)], capsys)
    assert code == 1
    assert "No space left on device" in err
    assert _tree(export) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".export")] == []
    # a first export that fails leaves no folder at all
    calls["n"] = 0
    code, _, _ = _run(["export", str(run), "--out", str(tmp_path / "new")], capsys)
    assert code == 1
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    # an export into a folder holding same-named files it did not write refuses
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "clusters.tif").write_text("mine")
    code, _, err = _run(["export", str(run), "--out", str(foreign)], capsys)
    assert code == 1
    assert "already holds ['clusters.tif'], not written by an export" in err
    assert (foreign / "clusters.tif").read_text() == "mine"


def test_a_factory_that_is_not_a_model_names_model(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = _explain(setup, tmp_path / "run")
    for spec, expected in (
        ("os:system", r"--model 'os:system': calling os\.system\(\) failed \(TypeError"),
        ("builtins:dict", r"--model 'builtins:dict': builtins\.dict\(\) returned a dict, not"),
    ):
        argv = [*base]
        argv[argv.index("tests.helpers.wsi_models:PoolNet")] = spec
        code, _, err = _run(argv, capsys)
        assert code == 1
        assert re.search(expected, err), err
    assert not (tmp_path / "run").exists()


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    flags: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= _flags(sub)
        flags.update(s for s in action.option_strings if s.startswith("--"))
    return flags


def test_messages_use_flag_spellings() -> None:
    cases = {
        "pass resume=True to continue it, overwrite=True to replace it": (
            "pass --resume to continue it, --overwrite to replace it"
        ),
        "pass on_tile_error='skip' to record it": "pass --on-tile-error skip to record it",
        "Lower min_tissue, pass tissue_mask=None, or check": (
            "Lower --min-tissue, pass --no-tissue-mask, or check"
        ),
        "use e.g. stride=48.": "use e.g. --stride 48.",
        "region_size=1000 is not a multiple": "--region-size 1000 is not a multiple",
        "give Slide(path, mpp=...) the resolution": "give --slide-mpp MPP the resolution",
        "use mode='tile'.": "use --mode tile.",
        "out_dir runs/c holds": "--out runs/c holds",
        # before: the Python names of fit's, select-k's, export's and explain's arguments
        "n_epochs must be >= 1, got 0; pass e.g. n_epochs=1.": (
            "--epochs must be >= 1, got 0; pass e.g. --epochs 1."
        ),
        "max_locations_per_batch must be >= 1, got 0.": "--max-locations must be >= 1, got 0.",
        "got -1; pass e.g. random_state=0.": "got -1; pass e.g. --seed 0.",
        "ks is empty; pass at least one K, e.g. ks=range(2, 13).": (
            "--ks is empty; pass at least one K, e.g. --ks 2-12."
        ),
        "a different configuration (n_concepts: recorded 4, now 2)": (
            "a different configuration (K (of --concepts): recorded 4, now 2)"
        ),
        "pass slide='scan.svs' for the crops": "pass --slide 'scan.svs' for the crops",
    }
    known = _flags(build_parser())
    for message, expected in cases.items():
        shown = cli.flag_spelling(message)
        assert shown == expected
        for flag in re.findall(r"--[a-z][a-z-]*", shown):
            assert flag in known, flag


def test_on_tile_error_on_the_command_line(
    tmp_path: Path, setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Zeroed tile data: raise advises the flag; skip explains the rest, warning about it."""
    from tests.helpers.synthetic_slides import CMU, zero_tile_data

    broken = tmp_path / "zeroed.svs"
    zero_tile_data(CMU, broken, [104, 105])  # two 240 px tiles of dermis
    _, concepts = setup
    argv = _explain((broken, concepts), tmp_path / "run")
    argv.remove("--no-tissue-mask")
    code, _, err = _run(argv, capsys)
    assert code == 1
    assert "zeroed.svs" in err
    assert "pass --on-tile-error skip" in err
    assert "on_tile_error=" not in err
    assert not (tmp_path / "run").exists()
    code, _, err = _run_warned([*argv[:-1], "--on-tile-error", "skip", argv[-1]], capsys)
    assert re.search(r"captum-nmf: warning: 2 region\(s\) of zeroed\.svs", err)
    assert code == 0, err
    assert "pass on_tile_error" not in err
    ex = SlideExplanation.load(tmp_path / "run")
    assert len(ex.failed_tiles) > 0
    # found by a hostile review (2026-12-08, exports): unreadable tiles were prototype
    # candidates whose crops failed the whole summary; the slide figure could not be drawn
    summary = export_module.slide_summary(ex, top_n=10_000)  # all candidates (no crops)
    failed = {(int(x), int(y)) for x, y in ex.failed_tiles}
    chosen = [(t["x"], t["y"]) for e in summary["concepts"] for t in e["top_tiles"]]
    assert len(chosen) > 100  # every tile with some weight, but none of the unreadable ones
    assert not failed & set(chosen)
    from captum_nmf.exceptions import SlideReadError, UnreadableRegionWarning
    from captum_nmf.viz import plot_slide

    with pytest.warns(UnreadableRegionWarning, match=r"2 region\(s\) of zeroed\.svs"):
        plot_slide(ex, clusters=True)  # the run skipped them: so does its figure
    with pytest.raises(SlideReadError, match=r"zeroed\.svs"):
        plot_slide(ex, on_tile_error="raise")


# ------------------------------------------ found by a hostile review (2026-12-07, exports)
@pytest.fixture(scope="module")
def explained(setup: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("explained") / "run"
    assert cli.main(_explain(setup, run)) == 0
    return run


def _first_export(tmp_path: Path, explained: Path) -> tuple[SlideExplanation, Path]:
    """The explanation and its export into ``tmp_path / "export"``."""
    ex = SlideExplanation.load(explained)
    out = tmp_path / "export"
    export_module.export_explanation(ex, out)
    return ex, out


def _marker(folder: Path) -> dict[str, object]:
    import json

    return json.loads((folder / export_module.EXPORT_MARKER).read_text())  # type: ignore[no-any-return]


def test_an_export_stopped_while_moving_in_says_so_and_the_next_one_finishes_it(
    tmp_path: Path, explained: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ex, out = _first_export(tmp_path, explained)
    real = Path.replace
    moved = {"n": 0}

    def replace(self: Path, target: Path) -> Path:  # stopped after 2 files moved in
        if ".export-" in str(self) and ".export-" not in str(target):  # into the folder
            moved["n"] += 1
            if moved["n"] == 3:
                raise KeyboardInterrupt
        return real(self, target)

    monkeypatch.setattr(Path, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        export_module.export_explanation(ex, out, top_n=2)
    monkeypatch.undo()
    assert _marker(out)["status"] == "replacing"  # a mixed folder is never shown as complete
    stale = tmp_path / ".export.export-0123456789ab"  # a kill -9's build folder
    (stale / "summary").mkdir(parents=True)
    (stale / "summary" / "summary.json").write_text("{}")
    export_module.export_explanation(ex, out, top_n=2)
    record = _marker(out)
    assert record["status"] == "complete"
    fresh = export_module.export_explanation(ex, tmp_path / "fresh", top_n=2)
    assert record["sha256"] == _marker(fresh)["sha256"]
    for rel in record["files"]:  # type: ignore[attr-defined]
        assert (out / rel).read_bytes() == (fresh / rel).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "fresh"]


def test_a_second_export_into_the_same_folder_is_refused_at_once(
    tmp_path: Path, explained: Path
) -> None:
    from captum_nmf.exceptions import RunLockedError
    from captum_nmf.wsi.store import RunLock

    ex, out = _first_export(tmp_path, explained)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    other = RunLock(out, ".captum-nmf-export.lock", "export")
    try:
        with pytest.raises(RunLockedError, match="being written by another captum-nmf export"):
            export_module.export_explanation(ex, out, top_n=2)
    finally:
        other.release()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_a_file_changed_since_the_last_export_is_never_replaced(
    tmp_path: Path, explained: Path
) -> None:
    ex, out = _first_export(tmp_path, explained)
    corrected = out / "concepts.geojson"
    corrected.write_text('{"reviewed by": "Dr X"}')  # corrected in QuPath, saved back
    with pytest.raises(FileExistsError, match=r"\['concepts.geojson'\] changed since captum-nmf"):
        export_module.export_explanation(ex, out, top_n=2)
    assert corrected.read_text() == '{"reviewed by": "Dr X"}'
    corrected.rename(tmp_path / "reviewed.geojson")  # as the message says: moved away
    export_module.export_explanation(ex, out, top_n=2)
    assert _marker(out)["status"] == "complete"


def test_a_users_file_under_a_name_only_the_new_export_writes_is_kept(
    tmp_path: Path, explained: Path
) -> None:
    """After an export, a user's file under a name the next export writes and the last one
    did not (more prototypes, more concepts) was replaced without a word; in a fresh folder
    the same file is refused."""
    ex = SlideExplanation.load(explained)
    out = export_module.export_explanation(ex, tmp_path / "export", top_n=1)
    listed = set(_marker(out)["files"])  # type: ignore[arg-type]
    assert "summary/prototypes/concept_0/rank_0.png" in listed
    assert "summary/prototypes/concept_0/rank_1.png" not in listed
    mine = out / "summary" / "prototypes" / "concept_0" / "rank_1.png"
    mine.write_bytes(b"my own crop")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match=r"\['summary/prototypes/concept_0/rank_1\.png'\]"):
        export_module.export_explanation(ex, out, top_n=2)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # untouched
    mine.rename(tmp_path / "mine.png")  # as the message says: moved away
    export_module.export_explanation(ex, out, top_n=2)
    assert "summary/prototypes/concept_0/rank_1.png" in _marker(out)["files"]  # type: ignore[operator]


def test_an_export_through_a_link_is_built_beside_its_target(
    tmp_path: Path, explained: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ex = SlideExplanation.load(explained)
    share = tmp_path / "share"
    (share / "exports").mkdir(parents=True)
    link = tmp_path / "link_out"
    link.symlink_to(share / "exports")
    assert export_module.export_explanation(ex, link) == share / "exports"
    assert link.is_symlink()
    assert (share / "exports" / "clusters.tif").is_file()
    with pytest.raises(ValueError, match="names no folder"):
        export_module.export_explanation(ex, "/")
    monkeypatch.chdir(share / "exports")
    assert export_module.export_explanation(ex, ".") == share / "exports"  # a re-export
    with pytest.raises(ValueError, match="top_n must be >= 1, got 0"):
        export_module.export_explanation(ex, tmp_path / "never", top_n=0)
    assert not (tmp_path / "never").exists()


def test_concept_names_beyond_ascii_are_exported(tmp_path: Path, explained: Path) -> None:
    import json

    import openslide

    ex = SlideExplanation.load(explained)
    names = ["Tumör", "中文 stroma", "fat|=x"]
    out = export_module.export_explanation(ex, tmp_path / "export", names=names)
    with openslide.OpenSlide(out / "clusters.tif") as tif:
        described = tif.properties["tiff.ImageDescription"]
    assert "0: Tum\\xf6r; 1: \\u4e2d\\u6587 stroma; 2: fat/-x" in described
    with openslide.OpenSlide(out / "concept_0.tif") as tif:
        assert "Concept = Tum\\xf6r" in tif.properties["tiff.ImageDescription"]
    geojson = json.loads((out / "concepts.geojson").read_text(encoding="utf-8"))
    classes = {f["properties"]["classification"]["name"] for f in geojson["features"]}
    assert classes <= set(names)  # GeoJSON is Unicode: the names as given
    ex.config["concept_names"] = names  # as `captum-nmf name` then `explain` record them
    again = export_module.export_explanation(ex, tmp_path / "recorded")
    with openslide.OpenSlide(again / "clusters.tif") as tif:
        assert "0: Tum\\xf6r" in tif.properties["tiff.ImageDescription"]


def test_an_explanation_of_20_concepts_is_exported(tmp_path: Path, explained: Path) -> None:
    import dataclasses
    import json

    import numpy as np

    ex = SlideExplanation.load(explained)
    k = 20
    h, w = ex.assignment.shape
    maps = np.zeros((k, h, w), np.float32)
    labels = (np.arange(h * w).reshape(h, w) % k).astype(np.int16)
    np.put_along_axis(maps, labels[None].astype(np.int64), 1.0, axis=0)
    big = dataclasses.replace(
        ex,
        concept_maps=maps,
        assignment=np.where(ex.assignment >= 0, labels, -1).astype(np.int16),
        concepts=np.ones((k, ex.concepts.shape[1]), np.float32),
        config={**ex.config, "concept_names": None},
    )
    out = export_module.export_explanation(big, tmp_path / "export", top_n=1)
    assert (out / "concept_19.tif").is_file()
    geojson = json.loads((out / "concepts.geojson").read_text())
    colours = {tuple(f["properties"]["classification"]["color"]) for f in geojson["features"]}
    assert len(colours) == len(geojson["features"]) == k


def test_fit_and_select_k_refuse_an_unwritable_out_before_any_work(
    tmp_path: Path,
    setup: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tempfile

    from captum_nmf import NMFConceptAttribution

    slide, _ = setup

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the work started")

    monkeypatch.setattr(NMFConceptAttribution, "fit", never)
    fit = ["fit", *MODEL, *TILING, "--k", "3", str(slide), "--out"]
    (tmp_path / "d.safetensors").mkdir()
    code, _, err = _run([*fit, str(tmp_path / "d.safetensors"), "--overwrite"], capsys)
    assert code == 1
    assert "d.safetensors is a directory; name the concepts file to write" in err
    (tmp_path / "file").write_text("x")
    code, _, err = _run([*fit, str(tmp_path / "file" / "c.safetensors")], capsys)
    assert code == 1
    assert f"cannot write into {tmp_path / 'file'}" in err

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    code, _, err = _run([*fit, str(tmp_path / "new" / "c.safetensors")], capsys)
    assert code == 1
    assert f"cannot write into {tmp_path} (Read-only file system); choose another --out" in err
    sweep = ["select-k", *MODEL, *TILING, "--ks", "2", "3", str(slide), "--out"]
    code, _, err = _run([*sweep, str(tmp_path / "k")], capsys)
    assert code == 1
    assert "Read-only file system" in err
    assert not (tmp_path / "new").exists()
    assert not (tmp_path / "k").exists()


def test_export_takes_the_names_given_after_explain_from_the_concepts_file(
    tmp_path: Path,
    setup: tuple[Path, Path],
    explained: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json
    import shutil

    _, concepts = setup
    renamed = tmp_path / "concepts.safetensors"
    shutil.copy(concepts, renamed)
    assert _run(["name", str(renamed), "0=stroma", "2=tumour epithelium"], capsys)[0] == 0
    out = tmp_path / "export"
    code, _, err = _run(
        ["export", str(explained), "--out", str(out), "--concepts", str(renamed)], capsys
    )
    assert code == 0, err
    geojson = json.loads((out / "concepts.geojson").read_text())
    classes = {f["properties"]["classification"]["name"] for f in geojson["features"]}
    assert classes <= {"stroma", "concept 1", "tumour epithelium"}
    assert "stroma" in classes
    other = tmp_path / "other.safetensors"  # concepts of another fit: refused
    fit = ["fit", *MODEL, *TILING, "--no-tissue-mask", "--k", "2", "--out", str(other)]
    assert _run([*fit, str(setup[0])], capsys)[0] == 0
    code, _, err = _run(
        ["export", str(explained), "--out", str(tmp_path / "x"), "--concepts", str(other)], capsys
    )
    assert code == 1
    assert "holds other concepts than those the slide was explained with" in err
    assert not (tmp_path / "x").exists()


def test_export_of_an_unfinished_run_says_how_to_finish_it(
    tmp_path: Path, setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    run = tmp_path / "run"
    assert _run(_explain(setup, run), capsys)[0] == 0
    manifest = run / "manifest.json"
    record = json.loads(manifest.read_text())
    record["status"] = "running"  # as a killed explain leaves it
    manifest.write_text(json.dumps(record))
    code, _, err = _run(["export", str(run), "--out", str(tmp_path / "e")], capsys)
    assert code == 1
    assert "is an unfinished explain run" in err
    assert "--resume" in err
    code, _, err = _run(["export", str(run), "--out", str(tmp_path / "e"), "--top-n", "0"], capsys)
    assert code == 1
    assert "--top-n must be >= 1, got 0" in err


def test_library_messages_name_the_flags() -> None:
    from captum_nmf.cli.errors import flag_spelling

    assert flag_spelling("n_concepts must be >= 1, got 0; pass e.g. n_concepts=6") == (
        "--k must be >= 1, got 0; pass e.g. --k 6"
    )
    assert flag_spelling("level=1 out of range") == "--level 1 out of range"
    assert flag_spelling("pass level= or mpp=, not both (got level=1, mpp=1.0).") == (
        "pass --level or --mpp, not both (got --level 1, --mpp 1.0)."
    )
    assert flag_spelling("top_n must be >= 1") == "--top-n must be >= 1"
    assert flag_spelling("the tiles at level 1") == "the tiles at level 1"


def test_export_after_the_slide_moved_writes_everything_but_the_crops_or_takes_slide(
    tmp_path: Path,
    setup: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json
    import shutil

    slide, _ = setup
    scans = tmp_path / "scans"
    scans.mkdir()
    moved = shutil.copy(slide, scans / "s.svs")
    run = tmp_path / "run"
    flags = _explain(setup, run)
    flags[-1] = str(moved)
    assert _run(flags, capsys)[0] == 0
    (scans / "s.svs").rename(tmp_path / "s_moved.svs")  # the run folder on another machine
    code, _, err = _run_warned(["export", str(run), "--out", str(tmp_path / "e")], capsys)
    assert re.search(r"captum-nmf: warning: .*no longer at .*no prototype crops.*--slide", err)
    assert code == 0, err
    summary = json.loads((tmp_path / "e" / "summary" / "summary.json").read_text())
    assert all(t["crop"] is None for c in summary["concepts"] for t in c["top_tiles"])
    assert (tmp_path / "e" / "clusters.tif").is_file()
    at = ["export", str(run), "--out", str(tmp_path / "f"), "--slide"]
    assert _run([*at, str(tmp_path / "s_moved.svs")], capsys)[0] == 0
    summary = json.loads((tmp_path / "f" / "summary" / "summary.json").read_text())
    crops = [t["crop"] for c in summary["concepts"] for t in c["top_tiles"]]
    assert crops
    assert all((tmp_path / "f" / "summary" / c).is_file() for c in crops)
    other = write_pyramid(he_image()[200:392, :256], tmp_path / "other.svs")
    code, _, err = _run([*at[:-2], str(tmp_path / "g"), "--slide", str(other)], capsys)
    assert code == 1
    assert "is not the slide this explanation was made from" in err
    shutil.copy(other, moved)  # a re-scan now sits at the recorded path: no crops of it
    code, _, err = _run_warned(["export", str(run), "--out", str(tmp_path / "h")], capsys)
    assert re.search(r"captum-nmf: warning: .*is not the file now at .*content differs", err)
    assert code == 0, err
    summary = json.loads((tmp_path / "h" / "summary" / "summary.json").read_text())
    assert all(t["crop"] is None for c in summary["concepts"] for t in c["top_tiles"])


def test_prototype_crops_are_read_at_the_coarsest_level_that_gives_their_size() -> None:
    from captum_nmf.export import _crop_level

    downsamples = (1.0, 4.0, 16.0)
    assert _crop_level(downsamples, 2048 / 256) == (1, 4.0)  # a 2048 px tile for 256 px
    assert _crop_level(downsamples, 512 / 256) == (0, 1.0)
    assert _crop_level(downsamples, 16.0) == (2, 16.0)
    assert _crop_level(downsamples, 0.5) == (0, 1.0)


def test_a_concept_absent_from_the_slide_has_no_prototypes(explained: Path) -> None:
    import dataclasses

    import numpy as np

    ex = SlideExplanation.load(explained)
    maps = np.array(ex.concept_maps)
    maps[1] = 0.0  # concept 1 is nowhere on this slide
    summary = export_module.slide_summary(dataclasses.replace(ex, concept_maps=maps), top_n=3)
    assert summary["concepts"][1]["top_tiles"] == []
    assert summary["concepts"][1]["mean_intensity"] == 0.0
    assert len(summary["concepts"][0]["top_tiles"]) == 3


def test_a_filesystem_without_locks_warns_and_still_exports(
    tmp_path: Path, explained: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl

    from captum_nmf.exceptions import CaptumNMFWarning

    def no_locks(fd: int, operation: int) -> None:  # NFSv3 without lockd
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ex = SlideExplanation.load(explained)
    with pytest.warns(CaptumNMFWarning, match="gives no file locks .*No locks available"):
        out = export_module.export_explanation(ex, tmp_path / "export")
    assert (out / "clusters.tif").is_file()
    assert not (out / ".captum-nmf-export.lock").exists()


def test_export_puts_slides_on_one_intensity_scale(
    tmp_path: Path, explained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import tifffile

    out = tmp_path / "e"
    code, _, err = _run(
        ["export", str(explained), "--out", str(out), "--intensity-scale", "4"], capsys
    )
    assert code == 0, err
    with tifffile.TiffFile(out / "concept_1.tif") as tif:
        assert tif.pages[0].description.endswith("|Opaque at weight = 4")
    bad = ["export", str(explained), "--out", str(tmp_path / "x"), "--intensity-scale", "-1"]
    code, _, err = _run(bad, capsys)
    assert code == 1
    assert "--intensity-scale must be a positive number, got -1.0" in err
    assert not (tmp_path / "x").exists()


def test_concepts_of_another_pipeline_are_refused_or_said(
    tmp_path: Path, setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: concepts fitted with --normalize lite explained with imagenet (27 % of cells
    changed concept), other --weights, another layer of the same width, or another
    resolution: rc 0 and no word (a layer warning at most)."""
    import torch

    from tests.helpers.wsi_models import PoolNet

    other_norm = _explain(setup, tmp_path / "a")
    other_norm[other_norm.index("none")] = "imagenet"
    code, _, err = _run(other_norm, capsys)
    assert code == 1
    assert "were fitted with --normalize none (now imagenet)" in err
    assert not (tmp_path / "a").exists()
    weights = PoolNet().state_dict()
    weights["conv.weight"] = weights["conv.weight"] * 1.01  # a fine-tuned copy
    torch.save(weights, tmp_path / "tuned.pt")
    code, _, err = _run(
        [
            *_explain(setup, tmp_path / "b")[:-1],
            "--weights",
            str(tmp_path / "tuned.pt"),
            str(setup[0]),
        ],
        capsys,
    )
    assert code == 1
    assert "do not fit this --model / --weights / --layer" in err
    assert "other weights" in err
    other_tile = _explain(setup, tmp_path / "c")
    other_tile[other_tile.index("64")] = "96"  # --tile-size 96: said, and run
    code, _, err = _run_warned(other_tile, capsys)
    assert code == 0, err
    assert "captum-nmf: warning: --concepts" in err
    assert "were fitted with --tile-size 64 (now 96)" in err


def test_info_says_where_the_scale_comes_from(capsys: pytest.CaptureFixture[str]) -> None:
    """The 72-dpi warning advised --slide-mpp, which `info` did not have; `info` now takes it
    and says whether the scale is the slide's own, the flag's, or unknown."""
    data = Path(__file__).parent / "data"
    code, out, err = _run_warned(["info", str(data / "boxes.tiff")], capsys)
    assert code == 0
    assert "mpp: None (unknown: give the commands --slide-mpp MPP" in out
    assert "Pass --slide-mpp MPP, the slide's real scale." in err  # a flag info now has
    code, out, _ = _run_warned(["info", str(data / "boxes.tiff"), "--slide-mpp", "0.5"], capsys)
    assert "mpp: 0.5 (from --slide-mpp: the slide records none)" in out
    assert "level 1: 150 x 125 px, downsample 2, 1 um/px" in out
    code, out, err = _run_warned(
        ["info", str(data / "cmu_small_region.svs"), "--slide-mpp", "0.25", "--json"], capsys
    )
    found = json.loads(out)
    assert (found["mpp"], found["mpp_source"]) == (0.499, "slide")  # the slide's own wins
    assert "the fallback scale of 0.25 um per pixel is for slides without" in err
    code, out, _ = _run_warned(["info", str(data / "boxes.tiff"), "--json"], capsys)
    assert json.loads(out)["mpp_source"] is None


def test_the_non_square_pixel_advice_is_no_flag_that_would_not_apply() -> None:
    """The warning advised Slide(path, mpp=...), which the command line spelt --slide-mpp: a
    fallback, which a slide recording mpp-x ignores."""
    from captum_nmf.cli.errors import flag_spelling

    said = (
        "Resample the slide to square pixels (in Python, Slide(path, mpp=...) states the scale "
        "to use instead)."
    )
    assert flag_spelling(said) == "Resample the slide to square pixels."


def test_the_greyscale_hint_on_the_command_line_names_a_flag() -> None:
    """It advised tissue_mask=detect_tissue(slide, saturation_threshold=0): a Python call no
    flag gives."""
    from captum_nmf.cli.errors import flag_spelling
    from captum_nmf.wsi.tissue import TissueMask, greyscale_hint

    mask = TissueMask(np.zeros((4, 4), bool), (1.0, 1.0), 1.0, 0.07, greyscale=True)
    said = flag_spelling("No tile has enough tissue." + greyscale_hint(mask))
    assert said.endswith(
        "(no colour to detect tissue by): the command line detects tissue by colour only: "
        "pass --no-tissue-mask to use every tile."
    )
    assert "detect_tissue" not in said
    assert flag_spelling("fallback_mpp must be a positive number") == (
        "--slide-mpp must be a positive number"  # info --slide-mpp 0: Slide's own name for it
    )
