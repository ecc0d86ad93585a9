"""``explain_cohort``: Ray equals local, restarts skip finished slides, faults stay local."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from captum_nmf import NMFConceptAttribution
from captum_nmf.exceptions import NotFittedError
from captum_nmf.wsi import (
    SlideExplanation,
    SlideTiles,
    explain_cohort,
    explain_slide,
    write_pyramid,
)
from captum_nmf.wsi.cohort import COHORT_FILE, _SlideWorker, slide_dirs
from tests.helpers.cohort_faults import DieOnce, DieOnRed, InterruptAfter, MarksItsClose
from tests.helpers.synthetic_slides import he_image
from tests.helpers.wsi_models import PoolNet

OPTIONS = {"tile_size": 64, "stride": 32, "tissue_mask": None, "batch_size": 7, "chunk_tiles": 14}


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three small real-H&E slides (256 x 192 px: 7 x 5 tiles of 64 px every 32 px)."""
    root = tmp_path_factory.mktemp("cohort_slides")
    out = []
    for i, (name, y, x) in enumerate(
        [("hgsc_nest.jpg", 0, 0), ("hgsc_stromal_he.jpg", 300, 300), ("hgsc_nest.jpg", 900, 600)]
    ):
        pixels = he_image(name)[y : y + 192, x : x + 256]
        out.append(write_pyramid(pixels, root / f"slide{i}.svs", mpp=0.5))
    return out


@pytest.fixture(scope="module")
def red_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """H&E with a pure red block at the top-left: DieOnRed kills the process reading it."""
    pixels = he_image()[:192, :256].copy()
    pixels[:24, :24] = (255, 0, 0)
    return write_pyramid(pixels, tmp_path_factory.mktemp("red") / "red.svs", mpp=0.5)


@pytest.fixture(scope="module")
def attr(slides: list[Path]) -> NMFConceptAttribution:
    net = PoolNet().eval()
    model = NMFConceptAttribution(net, net.relu, n_concepts=3, random_state=0)
    tiles = SlideTiles(slides, tile_size=64, stride=32, tissue_mask=None)
    return model.fit(tiles, batch_size=32, progress=False)


@pytest.fixture(scope="module")
def reference(attr: NMFConceptAttribution, slides: list[Path]) -> dict[str, SlideExplanation]:
    """Each slide explained on its own by explain_slide, in memory."""
    opts = {k: v for k, v in OPTIONS.items() if k != "chunk_tiles"}
    return {s.stem: explain_slide(attr, s, progress=False, **opts) for s in slides}  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def reference_one_thread(
    attr: NMFConceptAttribution, slides: list[Path]
) -> dict[str, SlideExplanation]:
    """As ``reference``, with one torch thread: what each Ray actor uses on 2 CPUs."""
    opts = {k: v for k, v in OPTIONS.items() if k != "chunk_tiles"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {s.stem: explain_slide(attr, s, progress=False, **opts) for s in slides}  # type: ignore[arg-type]
    finally:
        torch.set_num_threads(threads)


def _maps(out: Path, name: str) -> SlideExplanation:
    return SlideExplanation.load(out / name)


def _same(a: SlideExplanation, b: SlideExplanation) -> None:
    np.testing.assert_allclose(a.concept_maps, b.concept_maps, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a.assignment, b.assignment)
    np.testing.assert_array_equal(a.counts, b.counts)


def test_local_cohort_equals_single_slides_and_skips_on_restart(
    tmp_path: Path, attr: NMFConceptAttribution, slides: list[Path], reference: dict
) -> None:
    result = explain_cohort(attr, slides, tmp_path / "c", progress=False, **OPTIONS)
    assert result.ok
    assert result.counts() == {"done": 3, "skipped": 0, "failed": 0, "pending": 0}
    assert [r.n_tiles for r in result.records] == [35, 35, 35]
    for s in slides:
        ex = _maps(tmp_path / "c", s.stem)
        np.testing.assert_array_equal(ex.concept_maps, reference[s.stem].concept_maps)
    summary = json.loads((tmp_path / "c" / COHORT_FILE).read_text())
    assert summary["counts"]["done"] == 3
    assert (tmp_path / "c" / "cohort.csv").read_text().count("\n") == 4
    stamp = (tmp_path / "c" / "slide1" / "explanation.safetensors").stat().st_mtime_ns
    again = explain_cohort(attr, slides, tmp_path / "c", progress=False, **OPTIONS)
    assert again.counts() == {"done": 0, "skipped": 3, "failed": 0, "pending": 0}
    assert (tmp_path / "c" / "slide1" / "explanation.safetensors").stat().st_mtime_ns == stamp
    assert "3 skipped" in repr(again)


def test_one_set_of_reading_threads_serves_every_slide(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    attr: NMFConceptAttribution,
    slides: list[Path],
    reference: dict,
) -> None:
    # The cohort starts its reading threads once; no slide run starts its own.
    from captum_nmf.wsi import blocks

    made: list[blocks.ReadingThreads] = []

    class Counting(blocks.ReadingThreads):
        def __init__(self, decoders: int = 1) -> None:
            super().__init__(decoders)
            made.append(self)

    monkeypatch.setattr("captum_nmf.wsi.cohort.ReadingThreads", Counting)
    monkeypatch.setattr("captum_nmf.wsi.run.execute.ReadingThreads", Counting)
    result = explain_cohort(attr, slides, tmp_path / "c", progress=False, **OPTIONS)
    assert result.counts() == {"done": 3, "skipped": 0, "failed": 0, "pending": 0}
    assert len(made) == 1
    assert made[0].runs == 3
    for s in slides:
        np.testing.assert_array_equal(
            _maps(tmp_path / "c", s.stem).concept_maps, reference[s.stem].concept_maps
        )
    made.clear()  # a slide on its own starts (and stops) its own threads
    opts = {k: v for k, v in OPTIONS.items() if k != "chunk_tiles"}
    explain_slide(attr, slides[0], progress=False, **opts)  # type: ignore[arg-type]
    assert len(made) == 1
    assert made[0].reader._shutdown  # type: ignore[attr-defined]


def test_worker_processes_start_once_for_the_whole_cohort(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    attr: NMFConceptAttribution,
    slides: list[Path],
    reference: dict,
) -> None:
    # num_workers > 0: one set of DataLoader worker processes reads every slide's tiles.
    from captum_nmf.wsi import tiling

    made: list[tiling.PersistentTileLoader] = []

    class Counting(tiling.PersistentTileLoader):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            made.append(self)

    monkeypatch.setattr("captum_nmf.wsi.blocks.PersistentTileLoader", Counting)
    result = explain_cohort(attr, slides, tmp_path / "c", progress=False, num_workers=1, **OPTIONS)
    assert result.counts() == {"done": 3, "skipped": 0, "failed": 0, "pending": 0}
    assert len(made) == 1
    assert made[0].slides == 3
    assert made[0].loader._iterator is None  # the workers were stopped with the cohort
    for s in slides:
        np.testing.assert_array_equal(
            _maps(tmp_path / "c", s.stem).concept_maps, reference[s.stem].concept_maps
        )


def test_reading_threads_shared_by_hand_give_the_same_maps(
    attr: NMFConceptAttribution, slides: list[Path], reference: dict
) -> None:
    from captum_nmf.wsi import ReadingThreads

    opts = {k: v for k, v in OPTIONS.items() if k != "chunk_tiles"}
    with ReadingThreads(decoders=3) as threads:
        for s in slides:
            ex = explain_slide(attr, s, progress=False, **opts)  # type: ignore[arg-type]
            np.testing.assert_array_equal(ex.concept_maps, reference[s.stem].concept_maps)
        assert ReadingThreads.active() is threads
    assert threads.runs == 3
    assert ReadingThreads.active() is None
    assert threads.reader._shutdown  # type: ignore[attr-defined]
    assert threads.converter._shutdown  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="decoders must be >= 1"):
        ReadingThreads(decoders=0)
    with ReadingThreads() as outer:  # nested `with`: only the outer one closes
        with outer:
            pass
        assert not outer.closed
        assert ReadingThreads.active() is outer
    assert outer.closed
    with pytest.raises(RuntimeError, match="ReadingThreads were closed"):  # noqa: SIM117
        with threads.activated():
            pass


def test_interrupted_cohort_resumes_where_it_stopped(
    tmp_path: Path, attr: NMFConceptAttribution, slides: list[Path], reference: dict
) -> None:
    # 35 tiles per slide, plus one probe tile through the transform before each slide's
    # run and, before the first slide only, the probe's image of twice the size (the cell
    # size's check, made once per geometry): the 53rd call is the 15th tile of the second
    # slide, in its second chunk
    with pytest.raises(KeyboardInterrupt):
        explain_cohort(
            attr, slides, tmp_path, progress=False, transform=InterruptAfter(53), **OPTIONS
        )
    manifest = json.loads((tmp_path / "slide1" / "manifest.json").read_text())
    assert manifest["status"] == "running"
    assert manifest["done"] == 1  # its first chunk (2 tile rows) was finished and kept
    result = explain_cohort(
        attr, slides, tmp_path, progress=False, transform=InterruptAfter(10**9), **OPTIONS
    )
    assert [r.status for r in result.records] == ["skipped", "done", "done"]
    for s in slides:
        _same(_maps(tmp_path, s.stem), reference[s.stem])


def test_a_failing_slide_does_not_stop_the_cohort(
    tmp_path: Path, attr: NMFConceptAttribution, slides: list[Path]
) -> None:
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"not a slide at all")
    result = explain_cohort(
        attr, [slides[0], broken, slides[2]], tmp_path / "out", progress=False, **OPTIONS
    )
    assert [r.status for r in result.records] == ["done", "failed", "done"]
    assert "UnsupportedSlideError" in (result.failed[0].error or "")
    assert not result.ok


def test_a_slide_without_tissue_is_recorded_and_the_cohort_goes_on(
    tmp_path: Path, attr: NMFConceptAttribution, slides: list[Path]
) -> None:
    blank = write_pyramid(np.full((192, 256, 3), 245, np.uint8), tmp_path / "blank.svs", mpp=0.5)
    options = {**OPTIONS, "tissue_mask": "otsu"}
    result = explain_cohort(
        attr, [slides[0], blank, slides[1]], tmp_path / "out", progress=False, **options
    )
    assert [r.status for r in result.records] == ["done", "failed", "done"]
    error = result.failed[0].error or ""
    assert "NoTissueError" in error
    assert "blank.svs (tissue share 0.00%)" in error
    assert not (tmp_path / "out" / "blank").exists()  # nothing written for it


def test_colliding_names_get_distinct_directories(tmp_path: Path) -> None:
    a, b = tmp_path / "x" / "s.svs", tmp_path / "y" / "s.svs"
    dirs = slide_dirs([a, b, tmp_path / "t.tif"], tmp_path / "out")
    assert len(set(dirs)) == 3
    assert dirs[2].name == "t"
    assert all(d.name.startswith("s-") for d in dirs[:2])


def test_bad_arguments(tmp_path: Path, attr: NMFConceptAttribution, slides: list[Path]) -> None:
    net = PoolNet()
    with pytest.raises(NotFittedError, match="explain_cohort"):
        explain_cohort(NMFConceptAttribution(net, net.relu, 2), slides, tmp_path)
    with pytest.raises(ValueError, match="engine must be one of .*got 'spark'"):
        explain_cohort(attr, slides, tmp_path, engine="spark")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="paths is empty"):
        explain_cohort(attr, [], tmp_path)
    with pytest.raises(ValueError, match="more than once"):
        explain_cohort(attr, [slides[0], slides[0]], tmp_path)
    with pytest.raises(ValueError, match=r"\['resume'\].*remove them"):
        explain_cohort(attr, slides, tmp_path, resume=True)
    with pytest.raises(ValueError, match=r"\['tile_sise'\] are not arguments of explain_slide"):
        explain_cohort(attr, slides, tmp_path, tile_sise=64)
    with pytest.raises(ValueError, match="workers=2 applies to engine='ray' only"):
        explain_cohort(attr, slides, tmp_path, workers=2)
    with pytest.raises(ValueError, match="address='h:1' applies to engine='ray' only"):
        explain_cohort(attr, slides, tmp_path, address="h:1")
    with pytest.raises(TypeError, match="address must be a str"):
        explain_cohort(attr, slides, tmp_path, engine="ray", address=6379)  # type: ignore[arg-type]
    # per-slide options are checked before any slide (or Ray) starts
    with pytest.raises(ValueError, match="mode must be 'tile' or 'region', got 'fast'"):
        explain_cohort(attr, slides, tmp_path / "never", engine="ray", mode="fast")
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        explain_cohort(attr, slides, tmp_path / "never", batch_size=0)
    assert not (tmp_path / "never").exists()
    with pytest.raises(ValueError, match="retries must be >= 0"):
        explain_cohort(attr, slides, tmp_path, retries=-1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        explain_cohort(attr, slides, tmp_path / "file")


def test_ray_missing_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, attr: NMFConceptAttribution, slides: list
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'captum-nmf\[ray\]'"):
        explain_cohort(attr, slides, tmp_path / "out", engine="ray", progress=False)
    assert not (tmp_path / "out").exists()


def test_unreachable_ray_address_fails_before_any_work(
    tmp_path: Path, attr: NMFConceptAttribution, slides: list[Path]
) -> None:
    pytest.importorskip("ray")
    with pytest.raises(
        ConnectionError, match=r"Cannot reach a Ray cluster at address='127.0.0.1:9'"
    ):
        explain_cohort(
            attr, slides, tmp_path / "out", engine="ray", address="127.0.0.1:9", progress=False
        )
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="is not a Ray address"):
        explain_cohort(attr, slides, tmp_path / "out", engine="ray", address="://", progress=False)


def test_ray_two_workers_equal_the_local_engine(
    ray_local: object,
    tmp_path: Path,
    attr: NMFConceptAttribution,
    slides: list[Path],
    reference: dict,
    reference_one_thread: dict,
) -> None:
    result = explain_cohort(
        attr, slides, tmp_path, engine="ray", workers=2, progress=False, **OPTIONS
    )
    assert result.ok
    assert result.workers == 2
    assert result.counts()["done"] == 3
    assert len({r.worker for r in result.records}) == 2
    assert all(r.worker.startswith("ray:") for r in result.records)
    for s in slides:
        ex = _maps(tmp_path, s.stem)
        _same(ex, reference[s.stem])
        for name in ("concept_maps", "assignment", "counts", "tile_outputs"):  # same threads
            assert np.array_equal(getattr(ex, name), getattr(reference_one_thread[s.stem], name))
    again = explain_cohort(
        attr, slides, tmp_path, engine="ray", workers=2, progress=False, **OPTIONS
    )
    assert again.counts() == {"done": 0, "skipped": 3, "failed": 0, "pending": 0}


def test_a_pool_lets_its_actors_release_what_they_hold_before_killing_them(
    ray_local: object, tmp_path: Path
) -> None:
    from captum_nmf.engines.ray_actors import ActorPool

    pool = ActorPool(ray_local, MarksItsClose, (str(tmp_path),), workers=2, cap=2)
    seen: list[int] = []
    pool.map([(1,), (2,), (3,)], lambda o: seen.append(o.value), progress=False)
    assert sorted(seen) == [1, 2, 3]
    pool.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"closed_{p}" for p in pool.pids)
    pool.close()  # the actors are gone: closing again only skips them


def test_a_slide_worker_stops_its_reading_threads_on_close(attr: NMFConceptAttribution) -> None:
    worker = _SlideWorker(attr, 1, False)
    assert not worker.reading.closed
    worker.close()
    assert worker.reading.closed
    with pytest.raises(RuntimeError, match="closed"), worker.reading.activated():
        pass


def test_ray_worker_death_is_retried_once_then_reported(
    ray_local: object,
    tmp_path: Path,
    attr: NMFConceptAttribution,
    slides: list[Path],
    red_slide: Path,
    reference: dict,
) -> None:
    # one actor dies once, 20 tiles into its first slide (after its first chunk): that slide
    # resumes on a fresh actor
    result = explain_cohort(
        attr,
        slides,
        tmp_path / "once",
        engine="ray",
        workers=2,
        progress=False,
        transform=DieOnce(tmp_path / "died", after=20),
        **OPTIONS,
    )
    assert (tmp_path / "died").exists()
    assert result.ok
    assert sorted(r.attempts for r in result.records) == [1, 1, 2]
    for s in slides:
        _same(_maps(tmp_path / "once", s.stem), reference[s.stem])
    # a slide that kills every worker reading it fails after one retry, a corrupt slide fails
    # at once (its own error, not retried); the others complete
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"not a slide")
    result = explain_cohort(
        attr,
        [slides[0], red_slide, broken, slides[1]],
        tmp_path / "always",
        engine="ray",
        workers=2,
        progress=False,
        transform=DieOnRed(),
        **OPTIONS,
    )
    assert [r.status for r in result.records] == ["done", "failed", "failed", "done"]
    red, corrupt = result.failed
    assert red.attempts == 2
    assert "worker died 2 time(s)" in (red.error or "")
    assert corrupt.attempts == 1
    assert (corrupt.error or "").startswith("UnsupportedSlideError")
    assert corrupt.worker.startswith("ray:")
    summary = json.loads((tmp_path / "always" / COHORT_FILE).read_text())
    assert summary["counts"] == {"done": 2, "skipped": 0, "failed": 2, "pending": 0}


class _FakeRay:
    def __init__(self, resources: dict[str, float]) -> None:
        self.resources = resources

    def cluster_resources(self) -> dict[str, float]:
        return self.resources


def test_actor_resources_follow_the_cluster() -> None:
    from captum_nmf.engines.ray_cluster import actor_options

    cpus = _FakeRay({"CPU": 16})
    assert actor_options(cpus, None) == (16, {"num_cpus": 1})
    assert actor_options(cpus, None, cap=2) == (2, {"num_cpus": 8})  # no idle CPU shares
    assert actor_options(cpus, 32) == (32, {"num_cpus": 0.5})
    gpus = _FakeRay({"CPU": 16, "GPU": 4})
    assert actor_options(gpus, None) == (4, {"num_cpus": 4, "num_gpus": 1})  # one per GPU
    assert actor_options(gpus, 8) == (8, {"num_cpus": 2, "num_gpus": 0.5})  # shared, never stuck
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        actor_options(cpus, 0)


def test_address_probe_uses_the_right_default_port() -> None:
    from captum_nmf.engines.ray_cluster import check_address

    with pytest.raises(ConnectionError, match=r"127\.0\.0\.1:10001"):
        check_address("ray://127.0.0.1", timeout=1.0)  # the Ray client port
    with pytest.raises(ConnectionError, match=r"127\.0\.0\.1:6379"):
        check_address("127.0.0.1", timeout=1.0)  # the GCS port
    check_address("auto")  # left to Ray


def test_a_failure_keeps_its_traceback_in_the_record_and_the_log(
    tmp_path: Path,
    attr: NMFConceptAttribution,
    slides: list[Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from captum_nmf.wsi import cohort

    def buggy(*args: object, **kwargs: object) -> None:
        raise KeyError("first line\nsecond line of a bug in our code")

    monkeypatch.setattr(cohort, "_explain_one", buggy)
    with caplog.at_level("ERROR", logger="captum_nmf.wsi.cohort"):
        result = explain_cohort(attr, slides[:1], tmp_path / "c", progress=False, **OPTIONS)
    record = result.records[0]
    assert record.status == "failed"
    assert "second line of a bug in our code" in (record.error or "")
    assert "Traceback (most recent call last)" in (record.traceback or "")
    assert "in buggy" in (record.traceback or "")
    assert "in buggy" in caplog.text
    summary = json.loads((tmp_path / "c" / COHORT_FILE).read_text())
    assert "in buggy" in summary["records"][0]["traceback"]


def test_cohort_json_and_csv_are_written_as_a_pair(
    tmp_path: Path, attr: NMFConceptAttribution, slides: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    from captum_nmf.wsi import cohort

    out = tmp_path / "c"
    result = explain_cohort(attr, slides[:1], out, progress=False, **OPTIONS)
    table = (out / "cohort.csv").read_bytes()
    record = json.loads((out / COHORT_FILE).read_text())
    assert record["csv_sha256"] == hashlib.sha256(table).hexdigest()
    before = (table, (out / COHORT_FILE).read_bytes())

    def full_disk(*args: object, **kwargs: object) -> str:
        raise OSError(28, "No space left on device")

    result.records[0].status = "failed"  # a changed summary that cannot be written
    monkeypatch.setattr(cohort.json, "dumps", full_disk)
    with pytest.raises(OSError, match="No space left"):
        result.save()
    assert ((out / "cohort.csv").read_bytes(), (out / COHORT_FILE).read_bytes()) == before
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_model_fingerprint_is_cached_until_the_weights_change(
    attr: NMFConceptAttribution, monkeypatch: pytest.MonkeyPatch
) -> None:
    from captum_nmf._core import persistence

    first = attr.model_fingerprint()
    calls = []
    original = persistence.hashlib.sha256

    def counting(*args: object) -> object:
        calls.append(1)
        return original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(persistence.hashlib, "sha256", counting)
    assert attr.model_fingerprint() == first
    assert calls == []  # served from the cache: no hashing per slide
    model = attr.forward_func
    param = next(model.parameters())  # type: ignore[union-attr]
    saved = param.detach().clone()
    with torch.no_grad():
        param.add_(1.0)
    try:
        changed = attr.model_fingerprint()
        assert changed != first
        assert calls == [1]
    finally:
        with torch.no_grad():
            param.copy_(saved)
    assert attr.model_fingerprint() == first  # the weights are back (in-place: a new version)
    assert calls == [1, 1]


# ------------------------------------------ found by a hostile review (2026-12-07, cohort)
def test_a_users_cohort_csv_or_json_in_out_dir_is_never_replaced(
    tmp_path: Path, attr: NMFConceptAttribution, slides: list[Path]
) -> None:
    for name, text in (
        ("cohort.csv", "patient,grade\nP1,3\n"),
        ("cohort.json", '{"patients": ["P1"]}'),
    ):
        out = tmp_path / name.replace(".", "_")
        out.mkdir()
        (out / name).write_text(text)
        with pytest.raises(FileExistsError, match=rf"holds {name} that captum-nmf did not write"):
            explain_cohort(attr, slides[:1], out, progress=False, **OPTIONS)
        assert (out / name).read_text() == text
        assert [p.name for p in out.iterdir()] == [name]  # no slide was started


def test_a_summary_left_by_a_stopped_cohort_says_what_is_pending(
    tmp_path: Path, attr: NMFConceptAttribution, slides: list[Path]
) -> None:
    with pytest.raises(KeyboardInterrupt):  # in the second slide (see the test above)
        explain_cohort(
            attr, slides, tmp_path, progress=False, transform=InterruptAfter(52), **OPTIONS
        )
    summary = json.loads((tmp_path / COHORT_FILE).read_text())
    assert summary["complete"] is False
    assert summary["n_slides"] == 3
    assert summary["counts"] == {"done": 1, "skipped": 0, "failed": 0, "pending": 2}
    assert [r["status"] for r in summary["records"]] == ["done", "pending", "pending"]
    assert [Path(r["slide"]).name for r in summary["records"]] == [s.name for s in slides]
    with (tmp_path / "cohort.csv").open() as fh:
        assert len(fh.readlines()) == 4  # a header and every slide
    assert not (tmp_path / ".captum-nmf-cohort.lock").exists()
    result = explain_cohort(
        attr, slides, tmp_path, progress=False, transform=InterruptAfter(10**9), **OPTIONS
    )
    assert result.complete
    assert json.loads((tmp_path / COHORT_FILE).read_text())["complete"] is True
    assert "pending" not in repr(result)


def test_a_second_cohort_on_the_same_out_dir_is_refused_at_once(
    tmp_path: Path, attr: NMFConceptAttribution, slides: list[Path]
) -> None:
    from captum_nmf.exceptions import RunLockedError
    from captum_nmf.wsi.cohort import COHORT_LOCK
    from captum_nmf.wsi.store import RunLock

    out = tmp_path / "out"
    out.mkdir()
    other = RunLock(out, COHORT_LOCK, "cohort")  # another cohort's (another open file)
    try:
        with pytest.raises(RunLockedError, match=r"being written by another captum-nmf cohort"):
            explain_cohort(attr, slides, out, progress=False, **OPTIONS)
    finally:
        other.release()
    assert sorted(p.name for p in out.iterdir()) == []  # no slide, no summary
    (out / slides[0].stem).mkdir()
    busy = RunLock(out / slides[0].stem)  # one slide written by another (single) run
    try:
        result = explain_cohort(attr, slides[:2], out, progress=False, **OPTIONS)
    finally:
        busy.release()
    assert [r.status for r in result.records] == ["failed", "done"]
    error = result.records[0].error or ""
    assert "RunLockedError" in error
    assert "run the cohort again once that process has finished" in error
    assert "delete" not in error  # the folder is another live process's work


def test_a_forked_child_does_not_keep_a_dead_parents_lock(tmp_path: Path) -> None:
    import os
    import signal

    from captum_nmf.wsi.store import RunLock

    lock = RunLock(tmp_path)
    read, write = os.pipe()
    pid = os.fork()  # as a persistent DataLoader worker is forked during a run
    if pid == 0:  # pragma: no cover - the child
        os.write(write, b"x")
        signal.pause()
        os._exit(0)
    try:
        assert os.read(read, 1) == b"x"
        assert lock._fd is not None
        os.close(lock._fd)  # the parent's descriptor gone, as when it is killed
        lock._fd = None
        RunLock(tmp_path).release()  # the next run takes the lock at once
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read)
        os.close(write)


def test_a_slide_added_to_a_restarted_cohort_never_moves_the_finished_ones(
    tmp_path: Path, attr: NMFConceptAttribution, slides: list[Path]
) -> None:
    import shutil

    first, second = tmp_path / "site1" / "a.svs", tmp_path / "site2" / "a.svs"
    for path, source in ((first, slides[0]), (second, slides[1])):
        path.parent.mkdir()
        shutil.copy(source, path)
    out = tmp_path / "out"
    alone = explain_cohort(attr, [first], out, progress=False, **OPTIONS)
    assert Path(alone.records[0].out_dir).name == "a"
    both = explain_cohort(attr, [first, second], out, progress=False, **OPTIONS)
    assert [r.status for r in both.records] == ["skipped", "done"]
    assert Path(both.records[0].out_dir).name == "a"  # kept, not renamed and run again
    assert Path(both.records[1].out_dir).name.startswith("a-")
    again = explain_cohort(attr, [second], out, progress=False, **OPTIONS)
    assert again.records[0].status == "skipped"  # its folder found under its hashed name
    assert again.records[0].out_dir == both.records[1].out_dir
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(
        ["a", Path(both.records[1].out_dir).name]
    )
    upper = slide_dirs([tmp_path / "x" / "A.svs", tmp_path / "y" / "a.svs"], out / "new")
    assert all(d.name.lower().startswith("a-") for d in upper)  # a case-insensitive disk


def test_the_same_slide_under_two_names_and_a_single_path_are_refused(
    tmp_path: Path, attr: NMFConceptAttribution, slides: list[Path]
) -> None:
    link = tmp_path / "link.svs"
    link.symlink_to(slides[0])
    dotted = slides[0].parent / "sub_missing" / ".." / slides[0].name
    for paths in ([slides[0], link], [slides[0], dotted]):
        with pytest.raises(ValueError, match="the same slide more than once"):
            explain_cohort(attr, paths, tmp_path / "out", progress=False, **OPTIONS)
    with pytest.raises(TypeError, match=r"got the single path .*; pass \[path\]"):
        explain_cohort(attr, str(slides[0]), tmp_path / "out", progress=False, **OPTIONS)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("option", "error", "match"),
    [
        ({"tile_size": 0}, ValueError, "tile_size must be >= 1, got 0"),
        ({"tile_size": "64"}, TypeError, "tile_size must be an int"),
        ({"stride": -32}, ValueError, "stride must be >= 1"),
        ({"tissue_mask": "otsu "}, ValueError, "tissue_mask must be a TissueMask, 'otsu' or None"),
        ({"tissue_mask": np.ones((2, 2))}, TypeError, "wrap an array with TissueMask.from_array"),
        ({"min_tissue": 2}, ValueError, r"min_tissue must be a fraction in \[0, 1\]"),
        ({"edge": "crop"}, ValueError, "edge must be 'pad' or 'drop', got 'crop'"),
        ({"mpp": -1.0}, ValueError, "mpp must be a positive number, got -1.0"),
        ({"level": 1, "mpp": 1.0}, ValueError, "pass level= or mpp=, not both"),
        ({"level": "1"}, TypeError, "level must be an int"),
        ({"slide_mpp": 0}, ValueError, "slide_mpp must be a positive number"),
    ],
)
def test_bad_tiling_options_are_refused_before_any_slide(
    tmp_path: Path,
    attr: NMFConceptAttribution,
    slides: list[Path],
    option: dict[str, object],
    error: type[Exception],
    match: str,
) -> None:
    options = {**OPTIONS, **option}
    with pytest.raises(error, match=match):
        explain_cohort(attr, slides, tmp_path / "never", progress=False, **options)
    assert not (tmp_path / "never").exists()


def test_a_relative_out_dir_is_made_absolute_for_every_worker(
    tmp_path: Path,
    attr: NMFConceptAttribution,
    slides: list[Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    result = explain_cohort(attr, slides[:1], "rel", progress=False, **OPTIONS)
    assert result.out_dir == str(tmp_path / "rel")
    assert result.records[0].out_dir == str(tmp_path / "rel" / slides[0].stem)


def test_a_killed_summary_writes_temporary_files_are_removed_by_the_next_cohort(
    tmp_path: Path, attr: NMFConceptAttribution, slides: list[Path]
) -> None:
    tmp_path.joinpath(".cohort.json.4242.tmp").write_text("{")  # killed mid-write
    tmp_path.joinpath(".cohort.csv.4242.tmp").write_text("slide")
    tmp_path.joinpath(".cohort.json.backup.tmp").write_text("mine")  # not a name we write
    explain_cohort(attr, slides[:1], tmp_path, progress=False, **OPTIONS)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [
        ".cohort.json.backup.tmp"
    ]


def test_a_cohort_whose_slides_were_moved_keeps_its_folders(
    tmp_path: Path, attr: NMFConceptAttribution, slides: list[Path]
) -> None:
    import shutil

    old = tmp_path / "mnt_old"
    old.mkdir()
    first = [Path(shutil.copy(s, old / s.name)) for s in slides[:2]]
    out = tmp_path / "out"
    explain_cohort(attr, first, out, progress=False, **OPTIONS)
    new = old.rename(tmp_path / "mnt_new")  # the share mounted elsewhere
    moved = [new / s.name for s in first]
    again = explain_cohort(attr, moved, out, progress=False, **OPTIONS)
    assert [r.status for r in again.records] == ["skipped", "skipped"]  # not computed again
    assert [Path(r.out_dir).name for r in again.records] == [s.stem for s in first]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(s.stem for s in first)


def test_a_cohort_stopped_in_its_first_slide_leaves_no_older_summary_behind(
    tmp_path: Path, attr: NMFConceptAttribution, slides: list[Path]
) -> None:
    explain_cohort(attr, slides[:2], tmp_path, progress=False, **OPTIONS)
    assert json.loads((tmp_path / COHORT_FILE).read_text())["complete"] is True
    with pytest.raises(KeyboardInterrupt):  # in the first slide of a longer list
        explain_cohort(
            attr, slides[::-1], tmp_path, progress=False, transform=InterruptAfter(5), **OPTIONS
        )
    summary = json.loads((tmp_path / COHORT_FILE).read_text())
    assert summary["complete"] is False
    assert summary["n_slides"] == 3
    assert summary["counts"]["pending"] == 3


def test_a_ray_cohort_on_a_locked_out_dir_is_refused_before_ray_starts(
    tmp_path: Path,
    attr: NMFConceptAttribution,
    slides: list[Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from captum_nmf.exceptions import RunLockedError
    from captum_nmf.wsi import cohort
    from captum_nmf.wsi.store import RunLock

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray was started")

    monkeypatch.setattr(cohort, "ray_session", never)
    other = RunLock(tmp_path, cohort.COHORT_LOCK, "cohort")
    try:
        with pytest.raises(RunLockedError, match="another captum-nmf cohort"):
            explain_cohort(attr, slides, tmp_path, engine="ray", progress=False, **OPTIONS)
    finally:
        other.release()


def test_slide_mpp_may_be_a_numpy_number(
    tmp_path: Path, attr: NMFConceptAttribution, slides: list[Path]
) -> None:
    result = explain_cohort(
        attr, slides[:1], tmp_path, progress=False, slide_mpp=np.float32(0.5), **OPTIONS
    )
    assert result.ok


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_kept(tmp_path: Path) -> None:
    from captum_nmf.exceptions import RunStateError
    from captum_nmf.wsi.store import LOCK_FILE, RunLock

    precious = tmp_path / "thesis.txt"
    precious.write_text("four years")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).symlink_to(precious)
    with pytest.raises(RunStateError, match="is a symbolic link, not a lock file"):
        RunLock(tmp_path / "run")
    assert precious.read_text() == "four years"


def test_slide_names_that_are_not_utf8_get_folders(tmp_path: Path) -> None:
    import os

    odd = Path(os.fsdecode(b"/scans/a/slide\xff.svs"))
    dirs = slide_dirs([odd, Path("/scans/b/slide\xff.svs")], tmp_path)
    assert len(set(dirs)) == 2


def test_a_run_folder_renamed_by_hand_is_found_by_the_slide_it_names(
    tmp_path: Path, attr: NMFConceptAttribution, slides: list[Path]
) -> None:
    out = tmp_path / "out"
    first = explain_cohort(attr, slides[:2], out, progress=False, **OPTIONS)
    Path(first.records[0].out_dir).rename(out / "patient_A")
    again = explain_cohort(attr, slides[:2], out, progress=False, **OPTIONS)
    assert [r.status for r in again.records] == ["skipped", "skipped"]
    assert Path(again.records[0].out_dir).name == "patient_A"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["patient_A", slides[1].stem]


@pytest.mark.parametrize(
    ("message", "kept"),
    [
        (
            "out_dir c/s was produced with a different configuration (n_concepts: recorded 4, "
            "now 2); pass resume=False with another directory, or overwrite=True. A transform "
            "is compared by its code.",
            "(n_concepts: recorded 4, now 2). A transform is compared by its code.",
        ),
        (
            "out_dir c/s was interrupted during its swap and cannot be resumed; pass "
            "overwrite=True to start it over (other files there are kept).",
            "out_dir c/s was interrupted during its swap and cannot be resumed.",
        ),
        (
            "The chunk was damaged. The run cannot be resumed from it; pass overwrite=True to "
            "start over.",
            "The run cannot be resumed from it.",
        ),
    ],
)
def test_a_failed_slide_gets_the_cohorts_advice_only(message: str, kept: str) -> None:
    """Before: a single run's "pass resume=False ... or overwrite=True" (--overwrite on the
    command line), which a cohort does not take, before the cohort's own advice."""
    from captum_nmf.exceptions import RunStateError
    from captum_nmf.wsi.cohort import _failure

    said = _failure(RunStateError(message))
    assert "resume=" not in said
    assert "overwrite=" not in said
    assert kept in said
    assert said.endswith(
        "In a cohort: use a new out_dir, or delete this slide's directory to explain it again."
    )
