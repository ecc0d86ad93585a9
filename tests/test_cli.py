"""The ``captum-nmf`` command: each command end to end, and one-line errors with exit codes."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from captum_nmf import cli
from captum_nmf.cli import commands as cli_commands
from captum_nmf.wsi import SlideExplanation, write_pyramid
from tests.helpers.synthetic_slides import CMU, he_image

MODEL = ["--model", "tests.helpers.wsi_models:PoolNet", "--layer", "relu", "--normalize", "none"]
TILING = ["--tile-size", "64", "--stride", "32", "--batch-size", "32", "--no-progress"]


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pyramid(he_image()[:192, :256], tmp_path_factory.mktemp("cli") / "s.svs")


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_info(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["info", str(CMU)], capsys)
    assert code == 0
    assert "aperio, 2220 x 2967 px" in out
    assert "level 0: 2220 x 2967 px, downsample 1, 0.499 um/px" in out
    code, out, _ = _run(["info", str(CMU), "--json"], capsys)
    assert json.loads(out)["fingerprint"].startswith("quickhash-1:")


def test_fit_explain_export_analyse(
    tmp_path: Path, slide: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    concepts = tmp_path / "concepts.safetensors"
    code, out, err = _run(
        [
            "fit",
            *MODEL,
            *TILING,
            "--min-tissue",
            "0",
            "--k",
            "3",
            "--out",
            str(concepts),
            str(slide),
        ],
        capsys,
    )
    assert code == 0, err
    assert "fitted 3 concepts on" in out
    run = tmp_path / "run"
    explain = ["explain", *MODEL, *TILING, "--min-tissue", "0", "--concepts", str(concepts)]
    code, out, err = _run([*explain, "--out", str(run), str(slide)], capsys)
    assert code == 0, err
    ex = SlideExplanation.load(run)
    assert ex.grid_shape == (24, 32)
    code, _, err = _run([*explain, "--out", str(run), str(slide)], capsys)
    assert code == 1
    assert err.strip().startswith("captum-nmf: error: --out")
    assert "pass --resume to continue it, --overwrite to replace it" in err
    assert "resume=True" not in err
    assert "Traceback" not in err
    code, _, err = _run([*explain, "--out", str(run), "--resume", str(slide)], capsys)
    assert code == 0, err  # complete: loaded, not recomputed
    code, out, err = _run(["export", str(run), "--out", str(tmp_path / "export")], capsys)
    assert code == 0, err
    assert (tmp_path / "export" / "concepts.geojson").is_file()
    assert (tmp_path / "export" / "clusters.tif").is_file()
    assert (tmp_path / "export" / "summary" / "summary.json").is_file()
    code, out, err = _run(
        [
            "analyse",
            *MODEL,
            *TILING,
            "--min-tissue",
            "0",
            "--concepts",
            str(concepts),
            "--n-tiles",
            "20",
            "--out",
            str(tmp_path / "analysis"),
            str(slide),
        ],
        capsys,
    )
    assert code == 0, err
    assert "Cosine similarity" in out
    assert (tmp_path / "analysis" / "analysis.json").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["info", "nope.svs"], "captum-nmf: error: Slide file not found: nope.svs"),
        (["info", str(Path(__file__))], "is not a whole-slide image OpenSlide can read"),
        (
            ["fit", "--model", "vgg16", "--layer", "x", "--out", "c.safetensors", "s.svs"],
            "must look like 'torchvision:vgg16'",
        ),
        (
            [
                "fit",
                "--model",
                "torchvision:no_such_net",
                "--layer",
                "x",
                "--out",
                "c.safetensors",
                "s.svs",
            ],
            "has no callable 'no_such_net'",
        ),
        (  # random weights, another network in every command: refused before any work
            [
                "fit",
                "--model",
                "torchvision:resnet18",
                "--layer",
                "l4",
                "--out",
                "c.safetensors",
                "s",
            ],
            "--model torchvision:resnet18 needs --weights FILE (its state dict",
        ),
        (
            ["fit", *MODEL[:2], "--layer", "head", *MODEL[4:], "--out", "c.safetensors", str(CMU)],
            "--layer 'head' is not a submodule of the model",
        ),
        (["export", "missing_dir", "--out", "x"], "missing_dir does not exist: give the folder"),
        (  # the output folder is checked before the model is even built
            [
                "analyse",
                "--model",
                "tv:x",
                "--layer",
                "l",
                "--concepts",
                "c",
                "--out",
                __file__,
                "s",
            ],
            "exists and is not a directory; choose a folder",
        ),
    ],
)
def test_errors_are_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(argv, capsys)
    assert code == 1
    assert message in err
    assert err.count("\n") == 1
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [["--debug", "info", "nope.svs"], ["info", "nope.svs", "--debug"]])
def test_debug_shows_the_traceback(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(argv, capsys)
    assert code == 1
    assert "Traceback" in err
    assert "SlideNotFoundError" in err


def test_fit_checks_out_and_normalisation_before_working(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["fit", "--model", "tests.helpers.wsi_models:PoolNet", "--layer", "relu", str(CMU)]
    code, _, err = _run([*base, "--out", str(tmp_path / "c.pt")], capsys)
    assert "must end in .safetensors" in err
    existing = tmp_path / "c.safetensors"
    existing.write_bytes(b"x")
    code, _, err = _run([*base, "--normalize", "none", "--out", str(existing)], capsys)
    assert "exists; pass --overwrite" in err
    code, _, err = _run([*base, "--out", str(tmp_path / "d.safetensors")], capsys)
    assert code == 1
    assert "pass --normalize imagenet, lite or none" in err


def test_mismatched_weights_are_explained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nested = tmp_path / "nested.pt"
    from tests.helpers.wsi_models import PoolNet

    torch.save({"state_dict": PoolNet().state_dict()}, nested)
    with pytest.raises(cli.CLIError, match="1 missing and 1 unexpected keys.*'state_dict'"):
        cli.load_model("tests.helpers.wsi_models:PoolNet", str(nested))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_weights_are_never_unpickled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[object, ...]:
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"conv.weight": Evil()}))
    code, _, err = _run(
        [
            "fit",
            *MODEL[:2],
            "--weights",
            str(evil),
            "--layer",
            "relu",
            "--normalize",
            "none",
            "--out",
            str(tmp_path / "c.safetensors"),
            str(CMU),
        ],
        capsys,
    )
    assert code == 1
    assert "weights_only=True" in err
    assert not marker.exists()
    good = tmp_path / "w.safetensors"
    from tests.helpers.wsi_models import PoolNet

    save_file({k: v.contiguous() for k, v in PoolNet().state_dict().items()}, str(good))
    model = cli.load_model("tests.helpers.wsi_models:PoolNet", str(good))
    torch.testing.assert_close(
        model.state_dict()["conv.weight"], PoolNet().state_dict()["conv.weight"]
    )


def test_interrupt_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(_: object) -> int:
        raise KeyboardInterrupt

    for name in ("info", "explain"):
        monkeypatch.setitem(cli_commands.COMMANDS, name, interrupted)
    code, _, err = _run(["info", str(CMU)], capsys)
    assert code == 130
    assert err.strip() == "captum-nmf: interrupted"  # nothing to resume
    explain = ["explain", "--concepts", "c", "--model", "m", "--layer", "l", "--out", "o"]
    code, _, err = _run([*explain, str(CMU)], capsys)
    assert code == 130
    assert "finished chunks are kept; rerun with --resume" in err
    code, _, err = _run([*explain, str(CMU), "other.svs"], capsys)  # a cohort refuses --resume
    assert code == 130
    assert "finished slides and chunks are kept; run the same command again" in err
    assert "--resume" not in err


def test_help_shows_an_example_per_command(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("fit", "explain", "analyse", "export", "demo", "info"):
        with pytest.raises(SystemExit) as info:
            cli.main([command, "--help"])
        assert info.value.code == 0
        assert f"Example:\n  captum-nmf {command}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        cli.main(["frobnicate"])
    assert info.value.code == 2


def test_console_script_runs_in_a_subprocess() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "captum_nmf.cli", "info", str(CMU)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "aperio" in done.stdout


def test_explain_several_slides_is_a_restartable_cohort(
    tmp_path: Path, slide: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    concepts = tmp_path / "c.safetensors"
    fit = ["fit", *MODEL, *TILING, "--min-tissue", "0", "--k", "2", "--out", str(concepts)]
    assert _run([*fit, str(slide)], capsys)[0] == 0
    second = write_pyramid(he_image("hgsc_stromal_he.jpg")[:192, :256], tmp_path / "t.svs")
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"no slide")
    explain = ["explain", *MODEL, *TILING, "--min-tissue", "0", "--concepts", str(concepts)]
    out_dir = tmp_path / "cohort"
    code, out, err = _run([*explain, "--out", str(out_dir), str(slide), str(second)], capsys)
    assert code == 0, err
    assert "2 done, 0 skipped, 0 failed" in out
    assert SlideExplanation.load(out_dir / "t").grid_shape == (24, 32)
    code, out, err = _run(
        [*explain, "--out", str(out_dir), str(slide), str(second), str(broken)], capsys
    )
    assert code == 1  # one slide failed: reported, the others skipped
    assert "0 done, 2 skipped, 1 failed" in out
    assert "failed: " in err
    assert "UnsupportedSlideError" in err
    code, _, err = _run(
        [*explain, "--out", str(out_dir), "--resume", str(slide), str(second)], capsys
    )
    assert code == 1
    assert "--resume/--overwrite apply to one slide" in err
    code, _, err = _run([*explain, "--out", str(out_dir), "--workers", "2", str(slide)], capsys)
    assert "--workers needs --ray" in err


def test_explain_ray_unreachable_address_is_one_line(
    tmp_path: Path, slide: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("ray")
    concepts = tmp_path / "c.safetensors"
    fit = ["fit", *MODEL, *TILING, "--min-tissue", "0", "--k", "2", "--out", str(concepts)]
    assert _run([*fit, str(slide)], capsys)[0] == 0
    explain = [
        "explain",
        *MODEL,
        *TILING,
        "--concepts",
        str(concepts),
        "--out",
        str(tmp_path / "o"),
    ]
    code, _, err = _run([*explain, "--ray", "127.0.0.1:9", str(slide)], capsys)
    assert code == 1
    assert err.startswith("captum-nmf: error: Cannot reach a Ray cluster at address='127.0.0.1:9'")
    assert err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_explain_ray_embedded_in_a_fresh_process(tmp_path: Path, slide: Path) -> None:
    pytest.importorskip("ray")
    concepts = tmp_path / "c.safetensors"
    base = [sys.executable, "-m", "captum_nmf.cli"]
    fit = ["fit", *MODEL, *TILING, "--min-tissue", "0", "--k", "2", "--out", str(concepts)]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([*base, *fit, str(slide)], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    second = write_pyramid(he_image("hgsc_stromal_he.jpg")[:192, :256], tmp_path / "t.svs")
    explain = ["explain", *MODEL, *TILING, "--min-tissue", "0", "--concepts", str(concepts)]
    argv = [*base, *explain, "--out", str(tmp_path / "r"), "--workers", "2", "--ray"]  # then slides
    done = subprocess.run(
        [*argv, str(slide), str(second)], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "2 done, 0 skipped, 0 failed; engine='ray', workers=2" in done.stdout
    summary = json.loads((tmp_path / "r" / "cohort.json").read_text())
    assert {r["status"] for r in summary["records"]} == {"done"}


def test_forward_options_on_the_command_line(
    tmp_path: Path, slide: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    concepts = tmp_path / "c.safetensors"
    fit = ["fit", *MODEL, *TILING, "--min-tissue", "0", "--k", "2", "--out", str(concepts)]
    assert _run([*fit, "--channels-last", str(slide)], capsys)[0] == 0
    explain = ["explain", *MODEL, *TILING, "--min-tissue", "0", "--concepts", str(concepts)]
    code, _, err = _run([*explain, "--bf16", "--out", str(tmp_path / "r"), str(slide)], capsys)
    assert code == 0, err
    ex = SlideExplanation.load(tmp_path / "r")
    assert (ex.config["autocast"], ex.config["channels_last"]) == ("torch.bfloat16", False)


def test_fit_on_ray_actors(
    ray_local: object, tmp_path: Path, slide: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "c.safetensors"
    fit = ["fit", *MODEL, *TILING, "--min-tissue", "0", "--k", "2", "--out", str(out)]
    code, stdout, err = _run([*fit, "--workers", "2", "--ray", str(slide)], capsys)
    assert code == 0, err  # '--ray s.svs': the slide is a slide, Ray runs embedded
    assert "fitted 2 concepts on 35 tiles of 1 slide(s)" in stdout
    code, _, err = _run([*fit, "--overwrite", "--workers", "2", str(slide)], capsys)
    assert code == 1
    assert "--workers needs --ray" in err


def test_the_command_line_keeps_freed_memory_unless_told(
    capsys: pytest.CaptureFixture[str], allocator_calls: list[bool]
) -> None:
    assert _run(["info", str(CMU)], capsys)[0] == 0
    assert allocator_calls == [True]
    for argv in (["--return-memory", "info", str(CMU)], ["info", "--return-memory", str(CMU)]):
        assert _run(argv, capsys)[0] == 0
    assert allocator_calls == [True]  # --return-memory, before or after the command


def test_the_command_line_fits_torchs_threads_to_the_cpus(
    capsys: pytest.CaptureFixture[str], thread_calls: list[bool]
) -> None:
    assert _run(["info", str(CMU)], capsys)[0] == 0
    assert _run(["--return-memory", "info", str(CMU)], capsys)[0] == 0
    assert thread_calls == [True, True]


def test_fit_threads_to_cpus_lowers_only_and_defers_to_the_user(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from captum_nmf._utils.cpus import usable_cpus
    from captum_nmf.cli import threads

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(3)
        monkeypatch.setattr(threads, "usable_cpus", lambda: 8)
        assert threads.fit_threads_to_cpus() is None  # fits: never raised
        assert torch.get_num_threads() == 3
        monkeypatch.setattr(threads, "usable_cpus", lambda: 2)  # e.g. a quota of 2 CPUs
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert threads.fit_threads_to_cpus() is None  # the user's own setting wins
        assert torch.get_num_threads() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", " ")
        assert threads.fit_threads_to_cpus() == 2
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(threads, "usable_cpus", usable_cpus)  # the real count again
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the variable is checked all the same
        monkeypatch.setenv("LOKY_MAX_CPU_COUNT", "2.5")
        with pytest.raises(ValueError, match=r"LOKY_MAX_CPU_COUNT='2\.5' is not a whole number"):
            threads.fit_threads_to_cpus()
    finally:
        torch.set_num_threads(before)


_THREADS_AFTER_MAIN = """
import sys, torch
from captum_nmf.cli import main
torch.set_num_threads(2)
code = main(["info", sys.argv[1]])
print("threads", code, torch.get_num_threads())
"""


def test_the_cpus_of_the_process_cap_the_console_commands_threads() -> None:
    """End to end through joblib's count, with ``LOKY_MAX_CPU_COUNT`` standing in for a quota."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    env["LOKY_MAX_CPU_COUNT"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", _THREADS_AFTER_MAIN, str(CMU)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    assert out.splitlines()[-1] == "threads 0 1"
    env["LOKY_MAX_CPU_COUNT"] = "four"
    bad = subprocess.run(
        [sys.executable, "-m", "captum_nmf.cli", "info", str(CMU)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    assert bad.returncode == 1
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("captum-nmf: error: LOKY_MAX_CPU_COUNT='four' is not a whole")
    assert "Traceback" not in bad.stderr


_RSS_AFTER_FREE = """
import sys
from captum_nmf.cli.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096
before = rss()
block = bytearray(256 << 20)  # one 256 MiB allocation, touched
del block
print(applied, (rss() - before) >> 20)
"""


@pytest.mark.skipif(
    not Path("/proc/self/statm").exists() or __import__("platform").libc_ver()[0] != "glibc",
    reason="needs Linux /proc and glibc",
)
@pytest.mark.parametrize("mode", ["keep", "default"])
def test_keep_freed_memory_keeps_a_freed_block_resident(mode: str) -> None:
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", _RSS_AFTER_FREE, mode],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.split()
    if mode == "keep":
        assert out[0] == "True"
        assert int(out[1]) >= 250  # freed, but kept for reuse: no page faults next time
    else:
        assert int(out[1]) < 16  # glibc's default: a large block goes back at once


def test_keep_freed_memory_defers_to_the_users_own_malloc_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from captum_nmf.cli.allocator import keep_freed_memory

    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1000000")
    assert keep_freed_memory() is False


def test_export_of_a_cohort_folder_names_its_slides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: "Captum-nmf/slide-explanation file not found: cohort/explanation.safetensors"."""
    cohort = tmp_path / "cohort"
    (cohort / "slide_a").mkdir(parents=True)
    (cohort / "cohort.json").write_text("{}")
    (cohort / "slide_a" / "manifest.json").write_text("{}")
    code, _, err = _run(["export", str(cohort), "--out", str(tmp_path / "x")], capsys)
    assert code == 1
    assert "is a cohort folder: export one slide at a time" in err
    assert f"(e.g. {cohort / 'slide_a'})" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.filterwarnings("default::captum_nmf.exceptions.CaptumNMFWarning")  # not errors
def test_warnings_are_one_line_each(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: Python's two-line format with the library's file and line."""
    from PIL import Image

    pages = [Image.fromarray(np.full((32, 64, 3), v, np.uint8)) for v in (10, 20)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    code, _, err = _run(["info", str(tmp_path / "stack.tif")], capsys)
    assert code == 0
    assert err.startswith("captum-nmf: warning: ")
    assert "stack.tif has 2 pages; reading page 0" in err
    assert err.count("\n") == 1
    assert ".py:" not in err


@pytest.mark.parametrize("debug", [False, True])
def test_library_log_records_are_one_line_without_debug(
    debug: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: a cohort's failed slides printed their tracebacks (30 lines for two slides)."""
    import logging

    from captum_nmf.cli import commands

    def failing_cohort(args: object) -> int:
        log = logging.getLogger("captum_nmf.wsi.cohort")
        log.error("slide %s failed (attempt %d):\n%s", "a.svs", 1, "Traceback (most recent...)")
        return 1

    monkeypatch.setitem(commands.COMMANDS, "info", failing_cohort)
    code, _, err = _run(["info", "a.svs", *(["--debug"] if debug else [])], capsys)
    assert code == 1
    if debug:
        assert "Traceback (most recent...)" in err
    else:
        assert err == "captum-nmf: slide a.svs failed (attempt 1):\n"


def test_analyse_refuses_a_folder_with_a_users_table_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: the whole analysis ran, then save refused the user's weight_correlation.csv."""
    out = tmp_path / "an"
    out.mkdir()
    (out / "weight_correlation.csv").write_text("mine")
    argv = ["analyse", "--model", "tv:x", "--layer", "l", "--concepts", "c", "--out", str(out), "s"]
    code, _, err = _run(argv, capsys)  # the model spec is bad too: the folder is checked first
    assert code == 1
    assert "weight_correlation.csv was not written by captum-nmf" in err
