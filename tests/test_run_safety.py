"""Nothing lost, nothing silently wrong: run folders, integrity, failed starts, one writer."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captum_nmf import NMFConceptAttribution
from captum_nmf.exceptions import (
    ConceptModelFormatError,
    ConceptModelMismatchError,
    LayerNameMismatchWarning,
    NonFiniteActivationError,
    NoTissueError,
    RunStateError,
)
from captum_nmf.io import default_file_mode
from captum_nmf.wsi import SlideExplanation, explain_slide
from captum_nmf.wsi import store as store_module
from captum_nmf.wsi.store import LOCK_FILE, MARKER_FILE, RunLock, inspect_folder
from tests.helpers import runs
from tests.helpers.wsi_models import PoolNet

pytestmark = pytest.mark.filterwarnings("error::UserWarning")


@pytest.fixture(scope="module")
def he_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return runs.he_slide(tmp_path_factory.mktemp("he"))


@pytest.fixture(scope="module")
def pool_attr(he_slide: Path) -> NMFConceptAttribution:
    return runs.pool_concepts(he_slide)


def _explain(attr: NMFConceptAttribution, path: Path, **kwargs: object) -> SlideExplanation:
    options: dict[str, object] = {
        "tile_size": 64,
        "stride": 32,
        "tissue_mask": None,
        "batch_size": 32,
        "progress": False,
        "chunk_tiles": 40,
    }
    options.update(kwargs)
    return explain_slide(attr, path, **options)  # type: ignore[arg-type]


_tree, _flip = runs.tree, runs.flip


def _interrupted(attr: NMFConceptAttribution, path: Path, out: Path, **kwargs: object) -> None:
    """A run into ``out`` stopped by KeyboardInterrupt at its 100th tile read (chunks kept)."""
    with pytest.MonkeyPatch.context() as mp:
        runs.InterruptReads(mp, at=100)
        with pytest.raises(KeyboardInterrupt):
            _explain(attr, path, out_dir=out, **kwargs)


_WRITE_JSON = store_module._write_json


def _overwrite_gives_a_fresh_runs_maps(attr: NMFConceptAttribution, slide: Path, out: Path) -> None:
    """As a refusal advises: ``overwrite=True`` starts over, with the maps of a fresh run."""
    got = _explain(attr, slide, out_dir=out, overwrite=True)
    assert np.array_equal(got.concept_maps, _explain(attr, slide).concept_maps)


def _full_disk_when(
    monkeypatch: pytest.MonkeyPatch, when: Callable[[Path, dict[str, object]], bool]
) -> None:
    """The run store's JSON writes fail with ENOSPC where ``when(path, data)`` holds."""

    def write(path: Path, data: dict[str, object]) -> None:
        if when(path, data):
            raise OSError(errno.ENOSPC, "No space left on device")
        _WRITE_JSON(path, data)

    monkeypatch.setattr(store_module, "_write_json", write)


# ------------------------------------------------------------------ 1. ownership
def test_overwrite_keeps_user_files_and_an_export_inside_the_run(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    out = tmp_path / "runc"
    _explain(pool_attr, he_slide, out_dir=out)
    (out / "export").mkdir()
    (out / "export" / "concepts.geojson").write_text("{}")
    (out / "notes.txt").write_text("my notes")
    second = _explain(pool_attr, he_slide, stride=16, out_dir=out, overwrite=True)
    assert (out / "notes.txt").read_text() == "my notes"
    assert (out / "export" / "concepts.geojson").read_text() == "{}"
    assert SlideExplanation.load(out).config["stride"] == 16
    assert np.array_equal(SlideExplanation.load(out).concept_maps, second.concept_maps)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            MARKER_FILE,
            "explanation.json",
            "explanation.safetensors",
            "export",
            "manifest.json",
            "notes.txt",
        ]
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".runc")]  # no sibling left
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == {MARKER_FILE, "explanation.json", "explanation.safetensors"}


def test_a_foreign_manifest_is_never_taken_for_ours(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    webapp = tmp_path / "webapp"
    (webapp / "src").mkdir(parents=True)
    (webapp / "manifest.json").write_text('{"name": "my-web-app"}')
    (webapp / "src" / "app.js").write_text("x")
    (webapp / "thesis.txt").write_text("t")
    before = _tree(webapp)
    for flags in ({}, {"resume": True}, {"overwrite": True}):
        with pytest.raises(FileExistsError, match=r"did not write \(manifest\.json, src, thesis"):
            _explain(pool_attr, he_slide, out_dir=webapp, **flags)
        assert _tree(webapp) == before
    # a look-alike of our run manifest without our marker is foreign too
    (webapp / "manifest.json").write_text('{"format": "captum-nmf/slide-run", "status": "x"}')
    with pytest.raises(FileExistsError, match="did not write"):
        _explain(pool_attr, he_slide, out_dir=webapp, overwrite=True)
    assert (webapp / "src" / "app.js").read_text() == "x"


def test_a_run_without_flags_refuses_an_existing_run(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    out = tmp_path / "run"
    _explain(pool_attr, he_slide, out_dir=out)
    before = _tree(out)
    with pytest.raises(FileExistsError, match="already holds a captum-nmf run; pass resume=True"):
        _explain(pool_attr, he_slide, out_dir=out)
    assert _tree(out) == before


def test_an_interrupted_swap_is_redone_by_overwrite(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    out = tmp_path / "run"
    _explain(pool_attr, he_slide, out_dir=out)
    manifest = json.loads((out / "manifest.json").read_text())
    replacing = store_module.sealed({**manifest, "status": "replacing"})
    (out / "manifest.json").write_text(json.dumps(replacing))
    with pytest.raises(RunStateError, match="overwrite of .* was interrupted"):
        _explain(pool_attr, he_slide, out_dir=out, resume=True)
    again = _explain(pool_attr, he_slide, out_dir=out, overwrite=True)
    assert np.array_equal(SlideExplanation.load(out).concept_maps, again.concept_maps)


# ------------------------------------------------------------------ 2. integrity
def test_flipped_bytes_in_the_result_are_refused(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    out = tmp_path / "run"
    _explain(pool_attr, he_slide, out_dir=out)
    _flip(out / "explanation.safetensors", at=0.6)
    with pytest.raises(ConceptModelFormatError, match=r"explanation\.safetensors is corrupt"):
        SlideExplanation.load(out)
    with pytest.raises(RunStateError, match=r"explanation\.safetensors is corrupt: its SHA-256"):
        _explain(pool_attr, he_slide, out_dir=out, resume=True)


def test_flipped_bytes_in_a_chunk_are_refused_on_resume(
    tmp_path: Path,
    he_slide: Path,
    pool_attr: NMFConceptAttribution,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "run"
    runs.InterruptReads(monkeypatch, at=100)
    with pytest.raises(KeyboardInterrupt):
        _explain(pool_attr, he_slide, out_dir=out)
    monkeypatch.undo()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["done"] >= 2
    chunk = out / "chunks" / "chunk_00000.safetensors"
    assert manifest["files"]["chunks/chunk_00000.safetensors"]
    _flip(chunk, at=0.8)
    with pytest.raises(RunStateError, match=r"chunk_00000\.safetensors is corrupt"):
        _explain(pool_attr, he_slide, out_dir=out, resume=True)
    chunk.unlink()
    with pytest.raises(RunStateError, match=r"chunk_00000\.safetensors is missing"):
        _explain(pool_attr, he_slide, out_dir=out, resume=True)
    # the folder is still ours: overwrite starts over and cleans the old chunks
    ref = _explain(pool_attr, he_slide)
    again = _explain(pool_attr, he_slide, out_dir=out, overwrite=True)
    assert np.array_equal(again.concept_maps, ref.concept_maps)
    assert not (out / "chunks").exists()


class _SpoilsOneBatch(PoolNet):
    """PoolNet whose ``at``-th forward gets a NaN input pixel block (NaN in its features)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at:
            x = x.clone()
            x[-1, :, :8, :8] = float("nan")
        return super().forward(x)


def test_nan_features_mid_run_stop_it_and_the_finished_chunks_resume(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    # the value check of a batch is read back after its stitching is queued: a bad batch
    # still stops the run before any of its cells is solved or committed
    net = _SpoilsOneBatch(at=7).eval()  # the probe and its twice-size check, then the 5th batch
    spoiled = NMFConceptAttribution.load(pool_attr.save(tmp_path / "c.safetensors"), net, net.relu)
    out = tmp_path / "run"
    # an 8 px NaN block: one NaN cell, spread by the 3 x 3 conv to 4 cells x 4 channels
    with pytest.raises(
        NonFiniteActivationError,
        match=r"'relu' produced 16 NaN and 0 Inf values \(batch items \[31\]\)",
    ):
        _explain(spoiled, he_slide, out_dir=out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert 1 <= manifest["done"] < len(manifest["chunks"])
    resumed = _explain(pool_attr, he_slide, out_dir=out, resume=True)
    assert np.array_equal(resumed.concept_maps, _explain(pool_attr, he_slide).concept_maps)


# --------------------------------------------------------------- 3. failed starts
def test_concepts_of_another_layer_fail_before_out_dir_exists(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    net = PoolNet().eval()
    with pytest.warns(LayerNameMismatchWarning):
        other = NMFConceptAttribution.load(
            pool_attr.save(tmp_path / "c.safetensors"), net, net.pool
        )
    out = tmp_path / "run"
    expected = "expect 4 channels from layer 'relu' but layer 'pool' produced 3"
    with pytest.raises(ConceptModelMismatchError, match=expected):
        _explain(other, he_slide, out_dir=out)
    assert not out.exists()
    _explain(pool_attr, he_slide, out_dir=out)  # the corrected rerun just works


def test_huge_concept_entries_are_refused_naming_the_file(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from captum_nmf.io import content_digest

    path = pool_attr.save(tmp_path / "c.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta, concepts = dict(f.metadata()), f.get_tensor("concepts").clone()
    concepts[0, 0] = 1e30
    meta["content_sha256"] = content_digest({"concepts": concepts}, meta)  # a valid digest
    save_file({"concepts": concepts}, str(path), metadata=meta)
    net = PoolNet().eval()
    with pytest.raises(ConceptModelFormatError, match=r"Concept 0 in .*c\.safetensors has norm 1e"):
        NMFConceptAttribution.load(path, net, net.relu)
    edited = NMFConceptAttribution.load(pool_attr.save(tmp_path / "d.safetensors"), net, net.relu)
    edited.concepts_ = edited.concepts_.clone()
    edited.concepts_[1, 2] = float("nan")
    out = tmp_path / "run"
    with pytest.raises(ConceptModelFormatError, match="hold NaN or Inf"):
        _explain(edited, he_slide, out_dir=out)
    assert not out.exists()


def test_a_full_disk_at_the_start_leaves_nothing(
    tmp_path: Path,
    he_slide: Path,
    pool_attr: NMFConceptAttribution,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "run"
    for target in ("marker", "manifest"):
        _full_disk_when(
            monkeypatch, lambda path, _, t=target: (t == "marker") == (path.name == MARKER_FILE)
        )
        with pytest.raises(OSError, match="No space left"):
            _explain(pool_attr, he_slide, out_dir=out)
        assert not out.exists(), target
    monkeypatch.undo()
    # an existing empty folder stays, empty
    out.mkdir()
    _full_disk_when(monkeypatch, lambda path, data: True)
    with pytest.raises(OSError, match="No space left"):
        _explain(pool_attr, he_slide, out_dir=out)
    assert list(out.iterdir()) == []


def test_too_little_free_space_is_refused_before_work(
    tmp_path: Path,
    he_slide: Path,
    pool_attr: NMFConceptAttribution,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import shutil

    class Usage:
        total, used, free = 10**9, 10**9 - 1000, 1000

    monkeypatch.setattr(shutil, "disk_usage", lambda _: Usage())
    out = tmp_path / "run"
    with pytest.raises(OSError, match=r"0\.0 MiB free .* first chunk of the run needs about") as e:
        _explain(pool_attr, he_slide, out_dir=out)
    assert e.value.errno == errno.ENOSPC
    assert not out.exists()


@pytest.mark.parametrize("flags", [{}, {"resume": True}, {"overwrite": True}])
def test_debris_of_a_killed_start_is_reused(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution, flags: dict[str, bool]
) -> None:
    out = tmp_path / "run"
    (out / "chunks").mkdir(parents=True)
    (out / MARKER_FILE).write_text(
        json.dumps({"key": "captum-nmf/slide-run-folder", "run_id": "dead", "library": "x"})
    )
    (out / ".manifest.json.12345.tmp").write_bytes(b"")
    (out / LOCK_FILE).write_text("pid 12345 on elsewhere")
    assert inspect_folder(out).kind == "debris"
    ref = _explain(pool_attr, he_slide)
    got = _explain(pool_attr, he_slide, out_dir=out, **flags)
    assert np.array_equal(got.concept_maps, ref.concept_maps)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MARKER_FILE, "explanation.json", "explanation.safetensors", "manifest.json"]
    )


# ------------------------------------------------------------------ one writer
def test_a_second_writer_is_refused_naming_the_first(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    out = tmp_path / "run"
    _explain(pool_attr, he_slide, out_dir=out)
    lock = RunLock(out)  # another writer in this process (another thread's open file)
    try:
        errors: list[BaseException] = []

        def second() -> None:
            try:
                _explain(pool_attr, he_slide, out_dir=out, overwrite=True)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=second)
        thread.start()
        thread.join()
        assert len(errors) == 1
        assert isinstance(errors[0], RunStateError)
        assert f"being written by another captum-nmf run (pid {os.getpid()} on" in str(errors[0])
    finally:
        lock.release()
    assert not (out / LOCK_FILE).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]


def test_the_lock_of_a_killed_process_is_taken_over(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    code = (
        "import sys, time; from pathlib import Path\n"
        "from captum_nmf.wsi.store import RunLock\n"
        f"RunLock(Path({str(out)!r})); print('locked', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunStateError, match=f"pid {proc.pid} on"):
            _explain(pool_attr, he_slide, out_dir=out)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (out / LOCK_FILE).exists()  # the stale lock file is still there...
    _explain(pool_attr, he_slide, out_dir=out)  # ...and is taken over
    assert not (out / LOCK_FILE).exists()


# ------------------------------------------------------------------ 6. small things
def test_a_one_pixel_jpeg_is_no_tissue_and_writes_nothing(
    tmp_path: Path, pool_attr: NMFConceptAttribution
) -> None:
    path = tmp_path / "dot.jpg"
    Image.fromarray(np.full((1, 1, 3), (180, 60, 150), np.uint8)).save(path)
    out = tmp_path / "run"
    with pytest.raises(NoTissueError, match=r"dot\.jpg is 1 x 1 px .* smaller than one 8 px"):
        explain_slide(pool_attr, path, tile_size=64, stride=32, out_dir=out, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_run_files_follow_the_umask(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution, umask: int
) -> None:
    old = os.umask(umask)
    try:
        _explain(pool_attr, he_slide, out_dir=tmp_path / "run")
        expected = default_file_mode()
    finally:
        os.umask(old)
    assert expected == 0o666 & ~umask
    for p in (tmp_path / "run").iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == expected, p.name


def test_nothing_is_left_behind_by_a_rejected_concept_tensor(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    net = PoolNet().eval()
    attr = NMFConceptAttribution.load(pool_attr.save(tmp_path / "c.safetensors"), net, net.relu)
    attr.concepts_ = -torch.ones_like(attr.concepts_)
    with pytest.raises(ConceptModelFormatError, match="negative entries"):
        _explain(attr, he_slide, out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _out_of_memory_at(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """The slide run's ``n``-th forward (not the plan's probe) runs out of device memory."""
    original = NMFConceptAttribution._activations
    calls = {"n": 0}

    def forward(self: NMFConceptAttribution, *args: object, **kwargs: object) -> object:
        if kwargs.get("return_output"):  # the run's forward, not the plan's probe
            calls["n"] += 1
            if calls["n"] == n:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(NMFConceptAttribution, "_activations", forward)


def test_out_of_memory_names_the_batch_size_and_keeps_finished_chunks(
    tmp_path: Path,
    he_slide: Path,
    pool_attr: NMFConceptAttribution,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "run"
    _out_of_memory_at(monkeypatch, 6)  # a batch after the first chunk was committed
    with pytest.raises(
        torch.OutOfMemoryError,
        match=r"batch of 16 tile\(s\) of 64 px .* lower batch_size \(now 16\) and run again "
        r"with resume=True",
    ):
        _explain(pool_attr, he_slide, out_dir=out, batch_size=16)
    monkeypatch.undo()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "running"
    assert manifest["done"] >= 1
    # as the message says: smaller batches finish the run (the batch size is not hashed)
    resumed = _explain(pool_attr, he_slide, out_dir=out, batch_size=5, resume=True)
    reference = _explain(pool_attr, he_slide, batch_size=16)
    np.testing.assert_allclose(resumed.concept_maps, reference.concept_maps, rtol=1e-6, atol=1e-6)
    assert np.array_equal(resumed.assignment, reference.assignment)
    parts = [  # what each part of the run used
        {"from_chunk": 0, "batch_size": 16, "device": "cpu"},
        {"from_chunk": manifest["done"], "batch_size": 5, "device": "cpu"},
    ]
    assert resumed.config["parts"] == parts
    assert json.loads((out / "manifest.json").read_text())["parts"] == parts
    assert SlideExplanation.load(out).config["parts"] == parts
    again = _explain(pool_attr, he_slide, out_dir=out, batch_size=3, resume=True)  # complete
    assert np.array_equal(again.concept_maps, resumed.concept_maps)
    with pytest.raises(RunStateError, match="different configuration"):  # the rest still counts
        _explain(pool_attr, he_slide, out_dir=out, stride=16, resume=True)


def test_out_of_memory_in_region_mode_says_what_can_resume(
    tmp_path: Path,
    he_slide: Path,
    pool_attr: NMFConceptAttribution,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _out_of_memory_at(monkeypatch, 1)
    with pytest.raises(
        torch.OutOfMemoryError,
        match=r"one region of 160 px .* resume=True once the device has more free memory\. "
        r"Otherwise lower region_size \(now 128\) and run again with overwrite=True",
    ):
        _explain(
            pool_attr,
            he_slide,
            mode="region",
            region_size=128,
            region_margin=16,
            out_dir=tmp_path / "run",
        )


@pytest.mark.parametrize("mode", ["tile", "region"])
def test_out_of_memory_in_the_plans_probe_writes_nothing_and_does_not_advise_batches(
    tmp_path: Path,
    he_slide: Path,
    pool_attr: NMFConceptAttribution,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    original = NMFConceptAttribution._activations

    def forward(self: NMFConceptAttribution, *args: object, **kwargs: object) -> object:
        if not kwargs.get("return_output"):  # the plan's probe: one image
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(NMFConceptAttribution, "_activations", forward)
    out = tmp_path / "run"
    side = 64 if mode == "tile" else 512  # the tile, or the region mode's probe image
    smaller = "a smaller tile_size, " if mode == "tile" else ""
    regions = {"mode": "region", "region_size": 128, "region_margin": 16}
    kwargs: dict[str, object] = regions if mode == "region" else {}
    with pytest.raises(
        torch.OutOfMemoryError,
        match=rf"cpu ran out of memory on the plan's forward of one {side} px image \(CUDA out "
        rf"of memory\. Tried to allocate 9\.00 GiB\); nothing was written\. A smaller "
        rf"batch_size cannot help .* use {smaller}a smaller model, or run the model on the CPU",
    ) as caught:
        _explain(pool_attr, he_slide, out_dir=out, batch_size=16, **kwargs)
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_out_of_memory_in_the_probes_batch_transform_gets_the_same_message(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    def normalise_on_device(batch: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    with pytest.raises(torch.OutOfMemoryError, match="on the plan's forward of one 64 px image"):
        _explain(pool_attr, he_slide, out_dir=tmp_path / "r", batch_transform=normalise_on_device)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------- found by a hostile review (2026-12-07)
def test_a_kill_after_the_commit_leaves_a_complete_run_and_its_chunks_are_cleaned(
    tmp_path: Path,
    he_slide: Path,
    pool_attr: NMFConceptAttribution,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "run"
    real = store_module._remove

    def killed(path: Path) -> None:  # killed as the first chunk file goes, after the commit
        manifest = json.loads((out / "manifest.json").read_text())
        if manifest["status"] == "complete" and path.parent.name == "chunks":
            raise KeyboardInterrupt
        real(path)

    monkeypatch.setattr(store_module, "_remove", killed)
    with pytest.raises(KeyboardInterrupt):
        _explain(pool_attr, he_slide, out_dir=out)
    monkeypatch.undo()
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    assert any((out / "chunks").iterdir())  # chunk files left behind
    got = _explain(pool_attr, he_slide, out_dir=out, resume=True)
    assert np.array_equal(got.concept_maps, _explain(pool_attr, he_slide).concept_maps)
    assert not (out / "chunks").exists()  # removed by the resume that found them


def test_a_full_disk_at_the_commit_keeps_the_run_resumable(
    tmp_path: Path,
    he_slide: Path,
    pool_attr: NMFConceptAttribution,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "run"
    _full_disk_when(monkeypatch, lambda path, data: data.get("status") == "complete")
    with pytest.raises(OSError, match="No space left"):
        _explain(pool_attr, he_slide, out_dir=out)
    monkeypatch.undo()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "running"
    assert all((out / rel).is_file() for rel in manifest["files"])  # no chunk removed
    got = _explain(pool_attr, he_slide, out_dir=out, resume=True)
    assert np.array_equal(got.concept_maps, _explain(pool_attr, he_slide).concept_maps)


@pytest.mark.parametrize(("key", "value"), [("n_outputs", 0), ("done", 0), ("status", "complete")])
def test_a_changed_manifest_is_refused_on_resume(
    tmp_path: Path,
    he_slide: Path,
    pool_attr: NMFConceptAttribution,
    monkeypatch: pytest.MonkeyPatch,
    key: str,
    value: object,
) -> None:
    out = tmp_path / "run"
    _interrupted(pool_attr, he_slide, out)  # chunks 0-1 are in
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["done"] >= 1
    assert manifest[key] != value
    (out / "manifest.json").write_text(json.dumps({**manifest, key: value}, indent=2))
    with pytest.raises(RunStateError, match=r"changed since it was written \(its digest"):
        _explain(pool_attr, he_slide, out_dir=out, resume=True)
    _overwrite_gives_a_fresh_runs_maps(pool_attr, he_slide, out)


def test_an_overwrite_removes_only_its_own_stale_working_folders(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    marker = json.dumps({"key": "captum-nmf/slide-run-folder", "run_id": "x", "library": "y"})
    stale = tmp_path / ".res.new-0123456789ab"  # a killed overwrite of res
    other = tmp_path / ".res.new-norm.new-0123456789ab"  # a running overwrite of res.new-norm
    for folder in (stale, other):
        folder.mkdir()
        (folder / MARKER_FILE).write_text(marker)
    _explain(pool_attr, he_slide, out_dir=tmp_path / "res", overwrite=True)
    assert not stale.exists()
    assert (other / MARKER_FILE).read_text() == marker


def test_a_resume_removes_the_folder_of_a_killed_overwrite(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    out = tmp_path / "run"
    _explain(pool_attr, he_slide, out_dir=out)
    stale = tmp_path / ".run.new-0123456789ab"
    (stale / "chunks").mkdir(parents=True)
    (stale / MARKER_FILE).write_text(
        json.dumps({"key": "captum-nmf/slide-run-folder", "run_id": "x", "library": "y"})
    )
    _explain(pool_attr, he_slide, out_dir=out, resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_user_files_named_like_temporary_files_are_not_debris(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    out = tmp_path / "scan"
    (out / "chunks").mkdir(parents=True)
    (out / ".scan.2024.tmp").write_text("mine")
    (out / "chunks" / ".notes.1.tmp").write_text("mine too")
    before = _tree(out)
    assert inspect_folder(out).kind == "foreign"
    for flags in ({}, {"resume": True}, {"overwrite": True}):
        with pytest.raises(FileExistsError, match=r"did not write \(\.scan\.2024\.tmp, chunks\)"):
            _explain(pool_attr, he_slide, out_dir=out, **flags)
    assert _tree(out) == before


def test_a_swap_killed_between_the_marker_and_the_manifest_says_so(
    tmp_path: Path,
    he_slide: Path,
    pool_attr: NMFConceptAttribution,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "run"
    _explain(pool_attr, he_slide, out_dir=out)
    real = Path.replace

    def replace(self: Path, target: Path) -> Path:  # killed as the new manifest moves in
        if self.name == "manifest.json" and self.parent.name.startswith(".run.new-"):
            raise KeyboardInterrupt
        return real(self, target)

    monkeypatch.setattr(Path, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        _explain(pool_attr, he_slide, stride=16, out_dir=out, overwrite=True)
    monkeypatch.undo()
    with pytest.raises(RunStateError, match="overwrite of .* was interrupted"):
        _explain(pool_attr, he_slide, out_dir=out, resume=True)
    again = _explain(pool_attr, he_slide, stride=16, out_dir=out, overwrite=True)
    assert np.array_equal(SlideExplanation.load(out).concept_maps, again.concept_maps)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def _scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    return x * factor


def _scaler(factor: float) -> object:
    return lambda x: x * factor


def test_transforms_are_described_by_what_decides_their_result() -> None:
    import functools

    from captum_nmf.wsi.run.config import describe

    different = [
        (functools.partial(_scale, factor=0.5), functools.partial(_scale, factor=1.0)),
        (lambda x: x * 0.5, lambda x: x * 1.0),
        (_scaler(0.5), _scaler(1.0)),
        (torch.nn.Conv2d(3, 3, 1), torch.nn.Conv2d(3, 3, 1)),  # same repr, other weights
    ]
    for a, b in different:
        assert describe(a) != describe(b)  # type: ignore[arg-type]
    assert describe(_scaler(0.5)) == describe(_scaler(0.5))  # type: ignore[arg-type]
    assert describe(functools.partial(_scale, factor=0.5)) == (
        describe(functools.partial(_scale, factor=0.5))
    )
    for transform in (*[t for pair in different for t in pair], _scale):
        assert " at 0x" not in (describe(transform) or "")  # type: ignore[arg-type]


_NOTEBOOK = """
import os
from os.path import join
MEAN = 0.5
def helper(x):
    return x - MEAN
class Norm:
    def __init__(self, alpha):
        self.alpha = alpha
    def __call__(self, x):
        return x * self.alpha
norm = Norm(2.0)
def transform(x):
    return norm(helper(x)) if join and os else x
"""


def test_a_transform_is_described_with_the_helpers_and_objects_of_its_own_module() -> None:
    from captum_nmf.wsi.run.config import describe

    cell: dict[str, object] = {"__name__": "__main__"}  # a notebook's namespace
    exec(_NOTEBOOK, cell)
    transform = cell["transform"]
    before = describe(transform)  # type: ignore[arg-type]
    assert before is not None
    assert "helper=__main__.helper [code" in before
    assert "MEAN=0.5" in before  # the helper's own globals, in turn
    assert "norm=__main__.Norm: {'alpha': 2.0}" in before
    assert "join" not in before  # library code: by name
    assert "os=" not in before
    exec("def helper(x):\n    return x + MEAN\n", cell)  # the helper edited, re-run
    edited = describe(transform)  # type: ignore[arg-type]
    assert edited != before
    cell["norm"].alpha = 3.0  # type: ignore[attr-defined]  # the normaliser refitted
    assert describe(transform) not in (before, edited)  # type: ignore[arg-type]
    exec("def a(x):\n    return b(x)\ndef b(x):\n    return a(x) if x is None else x\n", cell)
    cycle = describe(cell["a"])  # type: ignore[arg-type]  # mutual recursion ends
    assert cycle is not None
    assert "globals [b=__main__.b [code " in cycle
    assert cycle.endswith("; globals [a=<cycle __main__.a>]]]]")


def test_a_resume_after_editing_a_helper_the_transform_calls_is_refused(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    cell: dict[str, object] = {"__name__": "__main__"}
    exec("def helper(x):\n    return x * 0.5\ndef transform(x):\n    return helper(x)\n", cell)
    out = tmp_path / "run"
    _interrupted(pool_attr, he_slide, out, transform=cell["transform"])
    exec("def helper(x):\n    return x * 1.0\n", cell)  # edited in the notebook
    with pytest.raises(RunStateError, match="different configuration.*transform"):
        _explain(pool_attr, he_slide, out_dir=out, resume=True, transform=cell["transform"])
    exec("def helper(x):\n    return x * 0.5\n", cell)  # put back: the same code again
    got = _explain(pool_attr, he_slide, out_dir=out, resume=True, transform=cell["transform"])
    reference = _explain(pool_attr, he_slide, transform=lambda x: x * 0.5)
    assert np.array_equal(got.concept_maps, reference.concept_maps)


def test_a_resume_with_another_partial_transform_is_refused(
    tmp_path: Path,
    he_slide: Path,
    pool_attr: NMFConceptAttribution,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import functools

    out = tmp_path / "run"
    _interrupted(pool_attr, he_slide, out, transform=functools.partial(_scale, factor=0.5))
    with pytest.raises(RunStateError, match="different configuration"):
        _explain(
            pool_attr,
            he_slide,
            out_dir=out,
            resume=True,
            transform=functools.partial(_scale, factor=1.0),
        )
    same = functools.partial(_scale, factor=0.5)
    got = _explain(pool_attr, he_slide, out_dir=out, resume=True, transform=same)
    reference = _explain(pool_attr, he_slide, transform=same)
    assert np.array_equal(got.concept_maps, reference.concept_maps)


def test_a_resume_sees_weights_changed_through_data(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    net = PoolNet().eval()
    attr = NMFConceptAttribution.load(pool_attr.save(tmp_path / "c.safetensors"), net, net.relu)
    out = tmp_path / "run"
    _interrupted(attr, he_slide, out)
    weight = net.conv.weight
    saved = weight.detach().clone()
    weight.data.mul_(3)  # torch's version counter does not see this
    with pytest.raises(RunStateError, match="different configuration"):
        _explain(attr, he_slide, out_dir=out, resume=True)
    weight.data.copy_(saved)
    got = _explain(attr, he_slide, out_dir=out, resume=True)
    assert np.array_equal(got.concept_maps, _explain(attr, he_slide).concept_maps)


def test_a_fresh_run_records_the_weights_it_computes_with(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    net = PoolNet().eval()
    attr = NMFConceptAttribution.load(pool_attr.save(tmp_path / "c.safetensors"), net, net.relu)
    _explain(attr, he_slide, out_dir=tmp_path / "first")  # caches the fingerprint
    weight = net.conv.weight
    saved = weight.detach().clone()
    weight.data.mul_(3)  # torch's version counter does not see this: the cache stays
    out = tmp_path / "run"
    _interrupted(attr, he_slide, out)  # its chunks are computed with the tripled weights
    weight.data.copy_(saved)
    # the weights now differ from those of the chunks: no mix of the two
    with pytest.raises(RunStateError, match="different configuration"):
        _explain(attr, he_slide, out_dir=out, resume=True)
    weight.data.mul_(3)
    got = _explain(attr, he_slide, out_dir=out, resume=True)
    assert np.array_equal(got.concept_maps, _explain(attr, he_slide).concept_maps)


def _glass_on_the_right() -> object:
    """A mask of the 512 x 384 px slide: 32 px of glass on the right (in tiles, cells unsolved)."""
    from captum_nmf.wsi import TissueMask

    mask = np.ones((48, 64), dtype=bool)  # 8 px of the slide per mask pixel
    mask[:, 60:] = False
    return TissueMask.from_array(mask, (512, 384))


def test_a_complete_run_with_another_tissue_mask_and_the_same_tiles_is_refused(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    given = _glass_on_the_right()
    out = tmp_path / "run"
    # min_tissue=0: every tile is kept either way, so only the mask differs
    first = _explain(pool_attr, he_slide, out_dir=out, tissue_mask=None, min_tissue=0.0)
    for other in (given, "otsu"):
        with pytest.raises(RunStateError, match=r"different configuration.*tissue_mask"):
            _explain(
                pool_attr, he_slide, out_dir=out, resume=True, tissue_mask=other, min_tissue=0.0
            )
    again = _explain(
        pool_attr, he_slide, out_dir=out, resume=True, tissue_mask=None, min_tissue=0.0
    )
    assert np.array_equal(again.assignment, first.assignment)
    masked = _explain(
        pool_attr, he_slide, out_dir=tmp_path / "masked", tissue_mask=given, min_tissue=0.0
    )
    assert np.array_equal(masked.tile_locations, first.tile_locations)  # the same tiles
    assert (masked.assignment[:, 60:] < 0).all()  # but the glass's cells are not assigned
    assert (first.assignment[:, 60:] >= 0).all()
    assert masked.config["tissue_mask"].startswith("48 x 64, downsample (8, 8), sha256 ")
    assert first.config["tissue_mask"] is None


def _as_before_the_mask_was_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs written as captum-nmf wrote them before 2026-12-07 (no tissue mask in the config)."""
    from captum_nmf.wsi.run import explain as explain_module

    real = explain_module.run_config

    def old(*args: object, **kwargs: object) -> dict[str, object]:
        config = real(*args, **kwargs)  # type: ignore[arg-type]
        del config["tissue_mask"]
        return config

    monkeypatch.setattr(explain_module, "run_config", old)


@pytest.mark.parametrize("mask", [None, "otsu"])
def test_a_finished_run_of_an_older_version_is_still_loaded_when_its_mask_is_the_same(
    tmp_path: Path,
    he_slide: Path,
    pool_attr: NMFConceptAttribution,
    monkeypatch: pytest.MonkeyPatch,
    mask: str | None,
) -> None:
    out = tmp_path / "run"
    options = {"tissue_mask": mask, "min_tissue": 0.0}
    with monkeypatch.context() as old:
        _as_before_the_mask_was_recorded(old)
        first = _explain(pool_attr, he_slide, out_dir=out, **options)
    assert "tissue_mask" not in json.loads((out / "manifest.json").read_text())["config"]
    again = _explain(pool_attr, he_slide, out_dir=out, resume=True, **options)
    assert np.array_equal(again.concept_maps, first.concept_maps, equal_nan=True)
    other = _glass_on_the_right()
    with pytest.raises(RunStateError, match=r"different configuration \(tissue_mask: recorded"):
        _explain(pool_attr, he_slide, out_dir=out, resume=True, tissue_mask=other, min_tissue=0.0)


def test_an_unfinished_run_of_an_older_version_asks_for_overwrite(
    tmp_path: Path,
    he_slide: Path,
    pool_attr: NMFConceptAttribution,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "run"
    with monkeypatch.context() as old:
        _as_before_the_mask_was_recorded(old)
        _interrupted(pool_attr, he_slide, out)
    with pytest.raises(
        RunStateError, match="unfinished run of an older captum-nmf.*overwrite=True"
    ):
        _explain(pool_attr, he_slide, out_dir=out, resume=True)
    _overwrite_gives_a_fresh_runs_maps(pool_attr, he_slide, out)


def test_a_finished_run_is_loaded_whatever_its_chunk_size_but_an_unfinished_one_is_not(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    done = _explain(pool_attr, he_slide, out_dir=tmp_path / "done", chunk_tiles=40)
    again = _explain(pool_attr, he_slide, out_dir=tmp_path / "done", resume=True, chunk_tiles=7)
    assert np.array_equal(again.concept_maps, done.concept_maps)  # the chunks change no map
    assert np.array_equal(
        _explain(pool_attr, he_slide, chunk_tiles=7).concept_maps, done.concept_maps
    )
    out = tmp_path / "running"
    _interrupted(pool_attr, he_slide, out)  # its finished chunks are cut at chunk_tiles=40
    with pytest.raises(RunStateError, match="different configuration .*chunk_tiles: recorded 40"):
        _explain(pool_attr, he_slide, out_dir=out, resume=True, chunk_tiles=7)


def test_a_stale_working_folder_with_a_file_not_ours_never_blocks_a_run(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    out = tmp_path / "run"
    _interrupted(pool_attr, he_slide, out)
    stale = tmp_path / ".run.new-0123456789ab"  # a killed overwrite's, and a Finder file
    (stale / "chunks").mkdir(parents=True)
    (stale / MARKER_FILE).write_text(
        json.dumps({"key": "captum-nmf/slide-run-folder", "run_id": "x", "library": "y"})
    )
    (stale / ".DS_Store").write_bytes(b"finder")
    got = _explain(pool_attr, he_slide, out_dir=out, resume=True)
    assert np.array_equal(got.concept_maps, _explain(pool_attr, he_slide).concept_maps)
    assert sorted(p.name for p in stale.iterdir()) == [".DS_Store"]  # ours gone, theirs kept


def test_a_manifest_of_the_previous_format_is_named_as_such(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    out = tmp_path / "run"
    _interrupted(pool_attr, he_slide, out)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["manifest_sha256"]
    (out / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(RunStateError, match=r"older captum-nmf \(run format 2, without a digest"):
        _explain(pool_attr, he_slide, out_dir=out, resume=True)


def test_a_complete_run_is_loaded_without_hashing_the_weights_again(
    tmp_path: Path,
    he_slide: Path,
    pool_attr: NMFConceptAttribution,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a restarted cohort resumes every finished slide: each must not re-hash the model
    out = tmp_path / "run"
    first = _explain(pool_attr, he_slide, out_dir=out)
    calls: list[bool] = []
    original = NMFConceptAttribution.model_fingerprint

    def spy(self: NMFConceptAttribution, *, cached: bool = True) -> str:
        calls.append(cached)
        return original(self, cached=cached)

    monkeypatch.setattr(NMFConceptAttribution, "model_fingerprint", spy)
    again = _explain(pool_attr, he_slide, out_dir=out, resume=True)
    assert np.array_equal(again.concept_maps, first.concept_maps)
    assert calls == [True]


def test_a_resume_that_computed_nothing_leaves_no_part_behind(
    tmp_path: Path,
    he_slide: Path,
    pool_attr: NMFConceptAttribution,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "run"
    _out_of_memory_at(monkeypatch, 4)
    with pytest.raises(torch.OutOfMemoryError):
        _explain(pool_attr, he_slide, out_dir=out)
    monkeypatch.undo()
    done = json.loads((out / "manifest.json").read_text())["done"]
    _out_of_memory_at(monkeypatch, 1)  # this resume stops at once
    with pytest.raises(torch.OutOfMemoryError):
        _explain(pool_attr, he_slide, out_dir=out, resume=True)
    monkeypatch.undo()
    got = _explain(pool_attr, he_slide, out_dir=out, resume=True, batch_size=8)
    assert [p["from_chunk"] for p in got.config["parts"]] == [0, done]
    assert got.config["parts"][-1]["batch_size"] == 8


def test_transform_descriptions_do_not_depend_on_the_hash_seed_or_print_options() -> None:
    code = """
import dataclasses, functools, torch
from captum_nmf.wsi.run.config import describe
@dataclasses.dataclass
class Stains:
    names: frozenset
    def __call__(self, x):
        return x
def mode(x, order="rgb"):
    return x.flip(0) if order in {"bgr", "gbr", "brg"} else x
def closure(chans):
    return lambda x: x if chans & {"he"} else x
import argparse, logging, os, types
import torchvision.transforms as tv
torch.set_printoptions(precision=int(os.environ["PRECISION"]))
logging.getLogger("norm").setLevel(int(os.environ["PRECISION"]))
mean = torch.tensor([0.48501, 0.456, 0.406])
class Norm:
    def __init__(self):
        self.log = logging.getLogger("norm")
        self.alpha = 0.5
    def __call__(self, x):
        return x
stains = Stains(frozenset({"he", "dab", "ihc", "pas"}))
def calls(x):
    return stains(closure({"x1", "y2"})(mode(x)))
for t in (calls, mode, closure({"dab", "he", "ihc"}), Stains(frozenset({"h", "e", "dab", "x"})),
          functools.partial(mode, order="gbr"), (lambda x: x - mean), Norm(),
          functools.partial(mode, order=argparse.Namespace(s={"fat", "tumor", "lymph"})),
          functools.partial(mode, order=types.SimpleNamespace(k={"a1", "b2", "c3"})),
          tv.Normalize(mean, torch.tensor([0.2, 0.2, 0.2]))):
    print(describe(t))
"""
    root = Path(__file__).resolve().parents[1]
    outputs = set()
    for seed, precision in (("1", "4"), ("2", "8")):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PRECISION": precision}
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        outputs.add(done.stdout)
    assert len(outputs) == 1
    assert " at 0x" not in next(iter(outputs))


def test_transform_descriptions_see_values_a_repr_rounds_or_hides() -> None:
    import torchvision.transforms as tv
    import torchvision.transforms.v2  # noqa: F401  (tv.v2)

    from captum_nmf.wsi.run.config import describe

    a, b = torch.full((2048,), 0.5), torch.full((2048,), 0.5)
    b[1000] = 0.50001  # under the print precision, inside the "..." of a long tensor
    assert describe(lambda x: x * a) != describe(lambda x: x * b)  # type: ignore[arg-type]
    compose_a = tv.Compose([lambda x: x, tv.Normalize([0.485], [0.229])])
    compose_b = tv.Compose([lambda x: x, tv.Normalize([0.486], [0.229])])
    assert describe(compose_a) != describe(compose_b)  # type: ignore[arg-type]
    sparse = torch.nn.Module()
    sparse.register_buffer("s", torch.eye(3).to_sparse())
    assert "state" in (describe(sparse) or "")  # type: ignore[arg-type]

    class Refit(torch.nn.Module):  # a normaliser keeping its fitted stats as plain attributes
        def __init__(self, mean: float) -> None:
            super().__init__()
            self.mean = torch.tensor([mean])

    assert describe(Refit(0.5)) != describe(Refit(0.6))  # type: ignore[arg-type]
    assert describe(tv.v2.Lambda(lambda x: x * 2)) != describe(tv.v2.Lambda(lambda x: x * 3))  # type: ignore[arg-type]
    assert describe(tv.v2.RandomApply([tv.v2.Lambda(abs)], p=0.5)) != describe(  # type: ignore[arg-type]
        tv.v2.RandomApply([tv.v2.Lambda(abs)], p=0.9)
    )


class _ExtraState(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stats = {"mean": [0.5, 0.5, 0.5]}

    def get_extra_state(self) -> object:
        return self.stats

    def set_extra_state(self, state: object) -> None:
        self.stats = state  # type: ignore[assignment]


class _BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("not initialised yet")


class _KeyErrorAttributes:
    def __getattr__(self, key: str) -> object:
        raise KeyError(key)


def test_describing_a_transform_never_raises() -> None:
    import dataclasses
    import functools

    from captum_nmf.wsi.run.config import describe

    @dataclasses.dataclass
    class Lazy:
        factor: float = 1.0
        cache: dict[str, float] = dataclasses.field(init=False)

    looped: list[object] = [1]
    looped.append(looped)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        csr = torch.eye(3).to_sparse_csr()
    refs = [
        _BadRepr(),
        _KeyErrorAttributes(),
        torch.empty(3, device="meta"),
        csr,
        torch.tensor([1 + 2j, 3 - 1j]).conj(),
        looped,
    ]
    for ref in refs:
        assert describe(functools.partial(_scale, factor=ref))  # type: ignore[arg-type]
    for transform in (_ExtraState(), _BadRepr(), Lazy()):
        assert describe(transform)  # type: ignore[arg-type]
    assert describe(_ExtraState()) == describe(_ExtraState())  # type: ignore[arg-type]


def test_a_symlink_named_like_a_working_folder_is_never_followed(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    other = tmp_path / "elsewhere" / "run"
    _explain(pool_attr, he_slide, out_dir=other)
    before = _tree(other)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / ".res.new-0123456789ab").symlink_to(other, target_is_directory=True)
    _explain(pool_attr, he_slide, out_dir=tmp_path / "work" / "res")
    assert _tree(other) == before


class _Counting:
    """Scales tiles; also counts its calls (state that does not decide its result)."""

    __captum_nmf_description__ = "scale 0.5"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * 0.5


def test_a_changed_transform_is_named_and_a_class_can_state_what_decides_its_result(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    import functools

    out = tmp_path / "run"
    half, whole = functools.partial(_scale, factor=0.5), functools.partial(_scale, factor=1.0)
    _interrupted(pool_attr, he_slide, out, transform=half)
    with pytest.raises(
        RunStateError,
        match=r"different configuration \(transform: recorded 'functools\.partial\(.*"
        r"factor=0\.5\)', now 'functools\.partial\(.*factor=1\.0\)'\).*__captum_nmf_description__",
    ):
        _explain(pool_attr, he_slide, out_dir=out, resume=True, transform=whole)
    counting = tmp_path / "counting"
    transform = _Counting()
    _interrupted(pool_attr, he_slide, counting, transform=transform)
    assert transform.calls > 0  # its counter changed; what it states did not
    got = _explain(pool_attr, he_slide, out_dir=counting, resume=True, transform=transform)
    reference = _explain(pool_attr, he_slide, transform=_Counting())
    assert np.array_equal(got.concept_maps, reference.concept_maps)
    assert got.config["transform"].endswith("_Counting: scale 0.5")


# ---------------------------------- review of 2026-12-07 (fourth session): claims that fail
@pytest.mark.parametrize("flags", [{"resume": True}, {"overwrite": True}])
def test_a_claim_interrupted_before_it_decides_keeps_the_existing_run(
    tmp_path: Path,
    he_slide: Path,
    pool_attr: NMFConceptAttribution,
    monkeypatch: pytest.MonkeyPatch,
    flags: dict[str, bool],
) -> None:
    """A Ctrl-C while the claim removed a killed overwrite's folder deleted every chunk."""
    out = tmp_path / "run"
    _interrupted(pool_attr, he_slide, out)
    before = _tree(out)

    def interrupted(self: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(store_module.RunStore, "_clean_stale_siblings", interrupted)
        with pytest.raises(KeyboardInterrupt):
            _explain(pool_attr, he_slide, out_dir=out, **flags)
    assert _tree(out) == before  # chunks, manifest and marker as they were
    resumed = _explain(pool_attr, he_slide, out_dir=out, resume=True)
    fresh = _explain(pool_attr, he_slide, out_dir=tmp_path / "fresh")
    assert np.array_equal(resumed.concept_maps, fresh.concept_maps)


def test_overwrite_of_the_current_folder_replaces_the_run(
    tmp_path: Path,
    he_slide: Path,
    pool_attr: NMFConceptAttribution,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``out_dir="."`` (``--out .``): "'.' has an empty name" deleted the unfinished run."""
    out = tmp_path / "run"
    _interrupted(pool_attr, he_slide, out)
    monkeypatch.chdir(out)
    got = _explain(pool_attr, he_slide, out_dir=".", overwrite=True)
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    assert np.array_equal(SlideExplanation.load(out).concept_maps, got.concept_maps)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no working folder left


def test_overwrite_across_filesystems_is_refused_before_any_work(
    tmp_path: Path,
    he_slide: Path,
    pool_attr: NMFConceptAttribution,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A mount point (``-v host:/out``): the swap's rename failed after the whole computation,
    and the old run was left marked ``replacing``, refused by ``resume`` for good."""
    out = tmp_path / "run"
    _explain(pool_attr, he_slide, out_dir=out)
    before = _tree(out)
    real_stat = Path.stat

    def fake_stat(self: Path, **kwargs: object) -> os.stat_result:
        got = real_stat(self, **kwargs)  # type: ignore[arg-type]
        if self.name.startswith(".run.new-"):  # the working folder: another device
            values = list(got)
            values[stat.ST_DEV] += 1
            return os.stat_result(values)
        return got

    with monkeypatch.context() as mp:
        mp.setattr(Path, "stat", fake_stat)
        mp.setattr(store_module.RunStore, "_clean_stale_siblings", lambda self: None)
        with pytest.raises(OSError, match="on another filesystem than its parent") as info:
            _explain(pool_attr, he_slide, out_dir=out, overwrite=True)
        assert info.value.errno == errno.EXDEV
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def _swap_hw(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(2, 3)


def test_a_resume_with_another_forward_func_reshape_or_bound_layer_is_refused(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    """Each was resumed silently, mixing two computations in one slide's maps: Captum's
    ``lambda x: net(x).softmax(1)`` (372 of 961 tiles' outputs not probabilities), a fixed
    ``reshape_transform`` (4,910 of 16,384 cells differing), concepts first bound to the
    wrong layer with ``strict=False``."""
    saved = tmp_path / "concepts.safetensors"
    pool_attr.save(saved)
    net = pool_attr.forward_func
    assert isinstance(net, PoolNet)
    cases = [
        NMFConceptAttribution.load(saved, lambda x: net(x).softmax(1), net.relu),
        NMFConceptAttribution.load(saved, net, net.relu, reshape_transform=_swap_hw),
    ]
    for i, other in enumerate(cases):
        out = tmp_path / f"run{i}"
        _interrupted(pool_attr, he_slide, out)
        before = _tree(out)
        what = ("forward_func" if i == 0 else "reshape_transform") + ": recorded"
        with pytest.raises(RunStateError, match=f"different configuration \\({what}"):
            _explain(other, he_slide, out_dir=out, resume=True)
        assert _tree(out) == before
    config = _explain(pool_attr, he_slide, out_dir=tmp_path / "fresh").config
    assert config["bound_layer"] == "relu"
    assert config["forward_func"] == "the model"
    assert config["reshape_transform"] is None
    assert config["attribute_to_layer_input"] is False


def test_a_refit_during_a_slide_run_neither_stops_it_nor_mixes_concepts(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    """A notebook refits the object a background run explains with: the run died with
    ``AttributeError: no attribute 'nmf_'``, or could mix the two fits' concepts."""
    attr = NMFConceptAttribution.load(
        pool_attr.save(tmp_path / "c.safetensors"), pool_attr.forward_func, pool_attr.layer
    )
    expected = _explain(attr, he_slide).concept_maps
    other = torch.rand(8, 3, 64, 64)
    reads: list[int] = []

    def refitting(tile: torch.Tensor) -> torch.Tensor:
        reads.append(1)
        if len(reads) == 40:  # mid-run, "another thread" refits the same object
            attr.random_state = 7
            attr.fit(other, progress=False)
        return tile

    got = _explain(attr, he_slide, transform=refitting)
    assert len(reads) > 40
    assert not torch.equal(attr.concepts_, pool_attr.concepts_)  # the refit took place
    np.testing.assert_array_equal(got.concept_maps, expected)  # the run kept its concepts
    np.testing.assert_array_equal(got.concepts, pool_attr.concepts_.numpy())


def test_a_working_folder_left_with_only_its_manifest_is_removed(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    """A kill between moving the marker and the manifest out of the working folder left it
    holding an intact manifest only: "foreign", kept for good by every later run."""
    out = tmp_path / "run"
    _explain(pool_attr, he_slide, out_dir=out)
    stale = tmp_path / ".run.new-0123456789ab"
    stale.mkdir()
    (stale / "manifest.json").write_bytes((out / "manifest.json").read_bytes())
    mine = tmp_path / ".run.new-abcdef012345"  # a look-alike holding a file of the user's
    mine.mkdir()
    (mine / "manifest.json").write_text('{"name": "my-web-app"}')
    _explain(pool_attr, he_slide, out_dir=out, resume=True)
    assert not stale.exists()
    assert (mine / "manifest.json").read_text() == '{"name": "my-web-app"}'


def test_a_damaged_marker_says_so_and_touches_nothing(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    """One flipped bit in the marker's key: "holds files that captum-nmf did not write
    (.captum-nmf-run, chunks, manifest.json) ... use an empty or new directory"."""
    out = tmp_path / "run"
    _interrupted(pool_attr, he_slide, out)
    marker = bytearray((out / MARKER_FILE).read_bytes())
    marker[marker.index(b"slide-run-folder")] ^= 0x01
    (out / MARKER_FILE).write_bytes(bytes(marker))
    before = _tree(out)
    for flags in ({"resume": True}, {"overwrite": True}, {}):
        with pytest.raises(RunStateError, match=r"whose marker file \.captum-nmf-run is damaged"):
            _explain(pool_attr, he_slide, out_dir=out, **flags)
        assert _tree(out) == before


_ADDED = ("bound_layer", "attribute_to_layer_input", "forward_func", "reshape_transform")


def test_runs_recorded_before_the_model_keys_still_resume_and_load(
    tmp_path: Path,
    he_slide: Path,
    pool_attr: NMFConceptAttribution,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The keys added to the configuration made every older run, finished ones included,
    "a different configuration": a restarted cohort failed on every slide."""
    from captum_nmf.wsi.run import explain as explain_module

    real = explain_module.run_config

    def before(*args: object, **kwargs: object) -> dict[str, object]:
        config = real(*args, **kwargs)  # type: ignore[arg-type]
        return {k: v for k, v in config.items() if k not in _ADDED}

    for finished in (True, False):
        out = tmp_path / f"run{finished}"
        with monkeypatch.context() as old:
            old.setattr(explain_module, "run_config", before)
            if finished:
                _explain(pool_attr, he_slide, out_dir=out)
            else:
                _interrupted(pool_attr, he_slide, out)
        recorded = json.loads((out / "manifest.json").read_text())["config"]
        assert not set(_ADDED) & set(recorded)
        again = _explain(pool_attr, he_slide, out_dir=out, resume=True)
        np.testing.assert_array_equal(
            again.concept_maps, _explain(pool_attr, he_slide).concept_maps
        )
    net = pool_attr.forward_func
    other = NMFConceptAttribution.load(
        pool_attr.save(tmp_path / "c.safetensors"), lambda x: net(x).softmax(1), net.relu
    )
    with pytest.raises(RunStateError, match=r"forward_func: not recorded \(an older captum-nmf\)"):
        _explain(other, he_slide, out_dir=tmp_path / "runTrue", resume=True)
