"""``explain_slide``: exact maps, the paper's geometry, failures, resumable runs, persistence."""

from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from captum_nmf import NMFConceptAttribution
from captum_nmf.data import path as data_path
from captum_nmf.exceptions import (
    CaptumNMFWarning,
    ConceptModelFormatError,
    NotFittedError,
    NoTissueError,
    RunStateError,
    SlideNotFoundError,
    SlideReadError,
    UnreadableRegionWarning,
)
from captum_nmf.export import slide_summary
from captum_nmf.wsi import SlideExplanation, SlideTiles, explain_slide, write_pyramid
from tests.helpers import runs
from tests.helpers.synthetic_slides import (
    CMU,
    blank_slide,
    cmu_pixels,
    flip_tile_marker,
    flip_tile_markers,
    he_image,
)
from tests.helpers.wsi_models import PoolNet, halve

pytestmark = pytest.mark.filterwarnings("error::UserWarning")


@pytest.fixture(scope="module")
def he_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 512 x 384 px of real H&E: tiles of 64 px every 16 px fit exactly (29 x 21 tiles)
    return runs.he_slide(tmp_path_factory.mktemp("he"))


@pytest.fixture(scope="module")
def pool_attr(he_slide: Path) -> NMFConceptAttribution:
    return runs.pool_concepts(he_slide)


def _explain(attr: NMFConceptAttribution, path: Path, **kwargs: object) -> SlideExplanation:
    options: dict[str, object] = {
        "tile_size": 64,
        "stride": 16,
        "tissue_mask": None,
        "batch_size": 32,
        "progress": False,
    }
    options.update(kwargs)
    return explain_slide(attr, path, **options)  # type: ignore[arg-type]


def test_maps_equal_nnls_of_whole_image_features(
    he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    ex = _explain(pool_attr, he_slide)
    assert ex.grid_shape == (48, 64)
    assert ex.cell_size == 8.0
    assert ex.origin == (0.0, 0.0)
    assert len(ex.tile_locations) == 21 * 29
    net = pool_attr.forward_func
    image = torch.from_numpy(he_image()[:384, :512]).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        whole = net.features(image)[0].permute(1, 2, 0).reshape(-1, 4)  # type: ignore[operator]
    expected = pool_attr.nmf_.transform(whole).reshape(48, 64, 3).permute(2, 0, 1).numpy()
    # every cell has a value, the slide's 2-cell ring too (only its edge tiles' borders reach
    # it); PoolNet's padding reaches one cell, and the slide's edge is the image's edge
    assert (ex.counts > 0).all()
    np.testing.assert_allclose(ex.concept_maps, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(ex.assignment, np.argmax(ex.concept_maps, axis=0))
    # the model's output of each tile is kept, in tile order
    x, y = ex.tile_locations[100]
    tile = torch.from_numpy(he_image()[y : y + 64, x : x + 64]).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        np.testing.assert_allclose(ex.tile_outputs[100], net(tile)[0].numpy(), rtol=1e-5)  # type: ignore[index, operator]


def test_workers_give_the_same_result(he_slide: Path, pool_attr: NMFConceptAttribution) -> None:
    single = _explain(pool_attr, he_slide, stride=32)
    multi = _explain(pool_attr, he_slide, stride=32, num_workers=2)
    assert np.array_equal(single.concept_maps, multi.concept_maps)
    assert np.array_equal(single.tile_outputs, multi.tile_outputs)  # type: ignore[arg-type]


def test_paper_geometry_vgg16_features_29(tmp_path: Path) -> None:
    """VGG16 (random weights), features[29], 512 px tiles every 256 px -> 16 px cells."""
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None).eval()
    attr = NMFConceptAttribution(vgg, vgg.features[29], n_concepts=4, random_state=0)
    region = cmu_pixels()[1100:1868, 600:1624]  # 1024 x 768 px of real tissue
    path = write_pyramid(region, tmp_path / "vgg.svs")
    first = torch.from_numpy(region[:512, :512].copy()).permute(2, 0, 1)[None].float() / 255
    attr.fit(first, progress=False)
    ex = explain_slide(
        attr, path, tile_size=512, stride=256, tissue_mask=None, batch_size=3, progress=False
    )
    assert ex.cell_size == 16.0
    assert ex.grid_shape == (48, 64)
    assert len(ex.tile_locations) == 6
    assert ex.tile_outputs is not None
    assert ex.tile_outputs.shape == (6, 1000)
    # the outer 2-cell ring: the edge tiles' borders (one tile per axis there)
    rows = [1] * 18 + [2] * 12 + [1] * 18
    cols = [1] * 18 + [2] * 12 + [1] * 4 + [2] * 12 + [1] * 18
    np.testing.assert_array_equal(ex.counts, np.outer(rows, cols))
    # cells only the first tile covers carry exactly its own concept weights
    tile_maps = attr.attribute(first)[0].numpy()  # 4 x 32 x 32
    only_first = (ex.counts[:18, :18] == 1)[None]
    np.testing.assert_allclose(
        np.where(only_first, ex.concept_maps[:, :18, :18], 0),
        np.where(only_first, tile_maps[:, :18, :18], 0),
        rtol=1e-4,
        atol=1e-5,
    )
    assert (ex.assignment[ex.counts > 0] >= 0).mean() > 0.9


def test_real_svs_with_tissue_detection(pool_attr: NMFConceptAttribution) -> None:
    ex = explain_slide(pool_attr, CMU, tile_size=256, stride=128, level=0, progress=False)
    assert ex.tissue is not None
    assert ex.slide_fingerprint.startswith("quickhash-1:")
    share = ex.tissue_mask.mean()
    assert 0.2 < share < 0.7  # the CMU region is about 40 % tissue
    # tissue cells are where the thumbnail mask says tissue
    centres = ex.cell_to_level0(*np.nonzero(ex.tissue_mask))
    dx, dy = ex.tissue.downsample
    ij = (centres[:, 1] / dy).astype(int), (centres[:, 0] / dx).astype(int)
    assert ex.tissue.mask[ij].mean() > 0.9
    assert (ex.assignment[~ex.tissue_mask] == -1).all()
    assert (ex.counts[~ex.tissue_cells] > 0).any()  # background inside tissue tiles keeps weights


def test_slide_mpp_is_for_slides_without_one() -> None:
    """Before: slide_mpp=0.25 (--slide-mpp) replaced the 0.499 um/px an Aperio slide records,
    without a word: read at twice the resolution asked, and exported at the wrong scale."""
    from captum_nmf.wsi import Slide

    said = r"records 0\.499 um per pixel, which is used: the fallback scale of 0\.25"
    with pytest.warns(CaptumNMFWarning, match=said):
        tiles = SlideTiles(CMU, tile_size=256, mpp=0.5, slide_mpp=0.25, tissue_mask=None)
    with warnings.catch_warnings():  # another handle of the same slide: said once a process
        warnings.simplefilter("error")
        Slide(CMU, fallback_mpp=0.25).close()
    assert tiles.grids[0].resolution.scale == 1.0  # its own 0.499 um/px: within 2 % of 0.5
    with Slide(data_path("hgsc_nest.jpg"), fallback_mpp=0.25) as plain:
        assert plain.mpp == 0.25  # a slide without one takes it
    with Slide(CMU, fallback_mpp=0.5) as close:  # within 2 %: nothing to say
        assert close.mpp == pytest.approx(0.499)
    with pytest.raises(ValueError, match="fallback_mpp must be a positive number"):
        Slide(CMU, fallback_mpp=0)


def test_plain_jpeg_at_a_target_mpp(pool_attr: NMFConceptAttribution) -> None:
    ex = explain_slide(
        pool_attr,
        data_path("hgsc_stromal_he.jpg"),
        slide_mpp=0.5,
        mpp=1.0,
        tile_size=128,
        stride=64,
        progress=False,
    )
    # 1500 px at 0.5 um/px read at 1 um/px: 750 output px, cells of 8 output px = 16 level-0 px
    assert ex.cell_size == 16.0
    assert ex.grid_shape == (94, 94)
    assert len(ex.tile_locations) == 11 * 11  # ceil((750 - 128) / 64) + 1 per axis
    assert ex.tile_locations[1].tolist() == [128, 0]
    assert (ex.config["mpp"], ex.config["resample"]) == (1.0, 2.0)
    assert ex.slide_fingerprint.startswith("sha256:")
    assert ex.tissue_mask[2:92, 2:92].all()


# ---------------------------------------------------------------- bad input (rows 1-6)
def test_missing_slide(tmp_path: Path, pool_attr: NMFConceptAttribution) -> None:
    out = tmp_path / "out"
    with pytest.raises(SlideNotFoundError, match=r"Slide file not found: .*nope\.svs"):
        explain_slide(pool_attr, tmp_path / "nope.svs", out_dir=out, progress=False)
    assert not out.exists()


def test_blank_slide_is_no_tissue_and_writes_nothing(
    tmp_path: Path, pool_attr: NMFConceptAttribution
) -> None:
    path = blank_slide(tmp_path / "blank.svs")
    out = tmp_path / "out"
    expected = r"No tissue found in blank\.svs \(tissue share 0\.00%\) at level 0: 0 of"
    with pytest.raises(NoTissueError, match=expected):
        _explain(pool_attr, path, tissue_mask="otsu", out_dir=out)
    assert not out.exists()


def test_slide_smaller_than_a_tile(tmp_path: Path, pool_attr: NMFConceptAttribution) -> None:
    path = write_pyramid(he_image()[:80, :100], tmp_path / "tiny.svs", mpp=0.5)
    ex = _explain(pool_attr, path, tile_size=224, stride=112)
    assert len(ex.tile_locations) == 1
    assert ex.grid_shape == (10, 13)  # ceil(80 / 8) x ceil(100 / 8) cells of 8 px
    assert ex.counts[2:10, 2:13].min() == 1  # the tile's inner cells, cropped to the slide
    with pytest.raises(NoTissueError, match=r"tiny\.svs is smaller than one tile.*edge='pad'"):
        _explain(pool_attr, path, tile_size=224, stride=112, edge="drop")


def test_level_the_slide_does_not_have(he_slide: Path, pool_attr: NMFConceptAttribution) -> None:
    with pytest.raises(ValueError, match=r"level=9 out of range; slide he\.svs has 1 level"):
        _explain(pool_attr, he_slide, level=9)
    with pytest.raises(ValueError, match="finer than level 0"):
        _explain(pool_attr, he_slide, mpp=0.1)


def test_tile_and_stride_must_fit_the_cells(
    he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    with pytest.raises(
        ValueError, match=r"tile_size=60 is not a whole number of the layer's 7 x 7"
    ):
        _explain(pool_attr, he_slide, tile_size=60, stride=30)
    with pytest.raises(ValueError, match=r"stride=20 is not a multiple of the cell size 8 px"):
        _explain(pool_attr, he_slide, stride=20)


def test_unfitted_and_bad_arguments(he_slide: Path, pool_attr: NMFConceptAttribution) -> None:
    net = PoolNet()
    with pytest.raises(NotFittedError, match="before 'explain_slide'"):
        explain_slide(NMFConceptAttribution(net, net.relu, 2), he_slide)
    for kwargs, error, match in [
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1, got 0"),
        ({"num_workers": -1}, ValueError, "num_workers must be >= 0"),
        ({"border": 1.5}, TypeError, "border must be an int"),
        ({"on_tile_error": "log"}, ValueError, "on_tile_error must be 'raise' or 'skip'"),
        ({"resume": True, "overwrite": True, "out_dir": "x"}, ValueError, "not both"),
        ({"resume": True}, ValueError, "need out_dir"),
    ]:
        with pytest.raises(error, match=match):
            _explain(pool_attr, he_slide, **kwargs)


def test_unreadable_tiles_raise_or_become_nan(
    tmp_path: Path, pool_attr: NMFConceptAttribution
) -> None:
    broken = tmp_path / "broken.svs"
    bx, by = flip_tile_marker(CMU, broken, tile_index=52)  # 240 px JPEG tile at (960, 1200)
    kwargs = {"tile_size": 240, "stride": 240, "border": 0, "tissue_mask": None}
    with pytest.raises(SlideReadError, match=r"broken\.svs"):
        _explain(pool_attr, broken, **kwargs)
    with pytest.warns(  # said, not silent: before, only failed_tiles held it
        UnreadableRegionWarning,
        match=r"broken\.svs: 1 of \d+ tiles could not be read .* 900 tissue cells that only "
        r"they covered are not explained",
    ):
        ex = _explain(pool_attr, broken, on_tile_error="skip", **kwargs)
    assert ex.failed_tiles.tolist() == [[bx, by]]
    r0, c0 = by // 8, bx // 8
    lost = ex.concept_maps[:, r0 : r0 + 30, c0 : c0 + 30]
    assert np.isnan(lost).all()  # never silently zero
    assert ex.unexplained_cells.sum() == 900  # the broken tile's 30 x 30 cells
    assert ex.unexplained_cells[r0 : r0 + 30, c0 : c0 + 30].all()
    summary = slide_summary(ex)  # the summary says so too, beside the tissue it counts
    assert (summary["failed_tiles"], summary["unexplained_tissue_cells"]) == (1, 900)
    assert summary["tissue_cells"] == int(ex.tissue_mask.sum())
    assert (ex.assignment[r0 : r0 + 30, c0 : c0 + 30] == -1).all()
    assert np.isnan(ex.tile_outputs).any(axis=1).sum() == 1  # type: ignore[union-attr]
    assert np.isfinite(np.delete(ex.concept_maps, np.s_[r0 : r0 + 30], axis=1)).all()


def test_missing_wsi_extra_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m.startswith("captum_nmf.wsi")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "openslide", None)
    with pytest.raises(
        ImportError, match=r"needs the 'wsi' extra: pip install 'captum-nmf\[wsi\]'"
    ):
        importlib.import_module("captum_nmf.wsi")


# ---------------------------------------------------------------- persistence (row 14)
def test_save_and_load_round_trip(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    ex = _explain(pool_attr, he_slide, stride=32, tissue_mask="otsu", min_tissue=0.0)
    ex.save(tmp_path / "ex")
    back = SlideExplanation.load(tmp_path / "ex")
    for name in ("concept_maps", "assignment", "counts", "tile_locations", "concepts"):
        assert np.array_equal(getattr(ex, name), getattr(back, name))
    assert np.array_equal(ex.tile_outputs, back.tile_outputs)  # type: ignore[arg-type]
    assert back.config == ex.config
    assert back.tissue is not None
    assert ex.tissue is not None
    assert np.array_equal(back.tissue.mask, ex.tissue.mask)
    assert back.tissue.glass is None
    tinted = dataclasses.replace(ex, tissue=dataclasses.replace(ex.tissue, glass=(205, 195, 170)))
    tinted.save(tmp_path / "tinted")  # the glass colour detection measured against is kept
    assert SlideExplanation.load(tmp_path / "tinted").tissue.glass == (205, 195, 170)  # type: ignore[union-attr]
    summary = json.loads((tmp_path / "ex" / "explanation.json").read_text())
    assert (summary["grid_shape"], summary["n_concepts"]) == ([48, 64], 3)
    pool_attr.save(tmp_path / "concepts.safetensors")
    with pytest.raises(ConceptModelFormatError, match="not a captum-nmf/slide-explanation file"):
        SlideExplanation.load(tmp_path / "concepts.safetensors")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "explanation.safetensors").write_bytes(b"\x10\x00garbage")
    with pytest.raises(ConceptModelFormatError, match="not a valid .safetensors"):
        SlideExplanation.load(tmp_path / "bad")


_Interrupt = runs.InterruptReads


def test_interrupted_run_resumes_bit_identical(
    tmp_path: Path,
    he_slide: Path,
    pool_attr: NMFConceptAttribution,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reference = _explain(pool_attr, he_slide, chunk_tiles=50)  # chunks of 2 tile rows = 58 tiles
    out = tmp_path / "run"
    counter = _Interrupt(monkeypatch, at=100)  # inside the second chunk (tiles 58-115)
    with pytest.raises(KeyboardInterrupt):
        _explain(pool_attr, he_slide, chunk_tiles=50, out_dir=out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["done"], manifest["status"]) == (1, "running")
    assert sorted(p.name for p in (out / "chunks").iterdir()) == [
        "carry_00000.safetensors",
        "chunk_00000.safetensors",
    ]  # the interrupted chunk left nothing half-written
    with pytest.raises(FileExistsError, match="pass resume=True"):
        _explain(pool_attr, he_slide, chunk_tiles=50, out_dir=out)
    other = NMFConceptAttribution(pool_attr.forward_func, pool_attr.layer, 2, random_state=0)
    other.fit(SlideTiles(he_slide, tile_size=64, stride=64, tissue_mask=None), progress=False)
    with pytest.raises(RunStateError, match="different configuration"):
        _explain(other, he_slide, chunk_tiles=50, out_dir=out, resume=True)
    with pytest.raises(RunStateError, match="different configuration"):
        _explain(pool_attr, he_slide, chunk_tiles=50, out_dir=out, resume=True, border=1)
    counter.calls, counter.at = 0, None
    resumed = _explain(pool_attr, he_slide, chunk_tiles=50, out_dir=out, resume=True)
    assert counter.calls == 21 * 29 - 58  # the finished chunk was not recomputed
    for name in ("concept_maps", "assignment", "counts", "tile_outputs"):
        assert np.array_equal(getattr(resumed, name), getattr(reference, name)), name
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    assert not (out / "chunks").exists()
    counter.calls = 0
    again = _explain(pool_attr, he_slide, chunk_tiles=50, out_dir=out, resume=True)
    assert counter.calls == 0  # a complete run is loaded, not recomputed
    assert np.array_equal(again.concept_maps, reference.concept_maps)


def test_a_run_that_averaged_features_is_not_resumed_with_averaged_products(
    tmp_path: Path,
    he_slide: Path,
    pool_attr: NMFConceptAttribution,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # earlier versions carried C-channel feature sums from chunk to chunk; now they are the
    # K-channel products x H^T. The run's configuration says which, so such a folder is
    # refused with advice instead of mixing the two (or failing on the carry's shape).
    import captum_nmf.wsi.run.explain as explain_module

    real = explain_module.run_config

    def before(*args: object, **kwargs: object) -> dict[str, object]:
        config = real(*args, **kwargs)  # type: ignore[arg-type]
        del config["averaged"]  # what an earlier version recorded
        return config

    out = tmp_path / "run"
    monkeypatch.setattr(explain_module, "run_config", before)
    _Interrupt(monkeypatch, at=100)
    with pytest.raises(KeyboardInterrupt):
        _explain(pool_attr, he_slide, chunk_tiles=50, out_dir=out)
    monkeypatch.setattr(explain_module, "run_config", real)
    with pytest.raises(RunStateError, match="different configuration.*overwrite=True"):
        _explain(pool_attr, he_slide, chunk_tiles=50, out_dir=out, resume=True)


def test_resume_refuses_another_slide_and_foreign_dirs(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    out = tmp_path / "run"
    _explain(pool_attr, he_slide, stride=32, out_dir=out)
    other = write_pyramid(he_image()[:384, :512][::-1].copy(), tmp_path / "other.svs", mpp=0.5)
    with pytest.raises(RunStateError, match="another slide"):
        _explain(pool_attr, other, stride=32, out_dir=out, resume=True)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for flags in ({"resume": True}, {"overwrite": True}, {}):
        with pytest.raises(FileExistsError, match=r"captum-nmf did not write \(notes\.txt\)"):
            _explain(pool_attr, he_slide, out_dir=foreign, **flags)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    assert (foreign / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_only_after_completion(
    tmp_path: Path,
    he_slide: Path,
    pool_attr: NMFConceptAttribution,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "run"
    first = _explain(pool_attr, he_slide, stride=32, out_dir=out)
    _Interrupt(monkeypatch, at=5)
    with pytest.raises(KeyboardInterrupt):
        _explain(pool_attr, he_slide, stride=16, out_dir=out, overwrite=True)
    kept = SlideExplanation.load(out)  # the old result survives the failed overwrite
    assert np.array_equal(kept.concept_maps, first.concept_maps)
    monkeypatch.undo()
    second = _explain(pool_attr, he_slide, stride=16, out_dir=out, overwrite=True)
    assert SlideExplanation.load(out).config["stride"] == 16
    assert np.array_equal(SlideExplanation.load(out).concept_maps, second.concept_maps)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]  # no debris


def test_resume_when_the_first_chunks_could_not_be_read(
    tmp_path: Path, pool_attr: NMFConceptAttribution, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "top_row_broken.svs"
    flip_tile_markers(CMU, broken, list(range(10)))  # every 240 px JPEG tile of the top row
    kwargs = {
        "tile_size": 240,
        "stride": 240,
        "border": 0,
        "on_tile_error": "skip",
        "chunk_tiles": 1,  # one tile row (10 tiles) per chunk
    }
    with pytest.warns(UnreadableRegionWarning, match="10 of 130 tiles could not be read"):
        reference = _explain(pool_attr, broken, **kwargs)
    assert len(reference.failed_tiles) == 10
    out = tmp_path / "run"
    _Interrupt(monkeypatch, at=25)  # in the third chunk: the first holds only failed tiles
    with pytest.raises(KeyboardInterrupt):
        _explain(pool_attr, broken, out_dir=out, **kwargs)
    monkeypatch.undo()
    with pytest.warns(UnreadableRegionWarning, match="10 of 130 tiles could not be read"):
        resumed = _explain(pool_attr, broken, out_dir=out, resume=True, **kwargs)
    assert np.array_equal(resumed.failed_tiles, reference.failed_tiles)
    assert np.array_equal(resumed.concept_maps, reference.concept_maps, equal_nan=True)
    assert np.isnan(resumed.concept_maps[:, :30]).all()
    assert np.array_equal(resumed.tile_outputs, reference.tile_outputs, equal_nan=True)  # type: ignore[arg-type]


def test_resume_in_a_new_process_with_a_function_transform(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    out = tmp_path / "run"
    concepts = tmp_path / "pool.safetensors"
    pool_attr.save(concepts)
    code = f"""
import pytest
from captum_nmf import NMFConceptAttribution
from captum_nmf.wsi import explain_slide
from captum_nmf.wsi.reader import Slide
from tests.helpers import runs
from tests.helpers.wsi_models import PoolNet, halve
net = PoolNet().eval()
attr = NMFConceptAttribution.load({str(concepts)!r}, net, net.relu)
from captum_nmf.wsi.blocks import BlockReader
calls = [0]
original = BlockReader.read
def read(self, index, out=None):
    calls[0] += 1
    if calls[0] == 80:
        raise KeyboardInterrupt
    return original(self, index, out)
BlockReader.read = read
try:
    explain_slide(attr, {str(he_slide)!r}, tile_size=64, stride=32, tissue_mask=None,
                  transform=halve, chunk_tiles=30, batch_size=32, out_dir={str(out)!r},
                  progress=False)
except KeyboardInterrupt:
    raise SystemExit(130)
"""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False
    )
    assert done.returncode == 130, done.stderr
    assert json.loads((out / "manifest.json").read_text())["done"] == 2
    resumed = _explain(
        pool_attr, he_slide, stride=32, transform=halve, chunk_tiles=30, out_dir=out, resume=True
    )
    reference = _explain(pool_attr, he_slide, stride=32, transform=halve, chunk_tiles=30)
    assert np.array_equal(resumed.concept_maps, reference.concept_maps)
    # the function's code digest is the same in the new process
    assert resumed.config["transform"].startswith("tests.helpers.wsi_models.halve [code ")


def test_overwrite_refuses_a_directory_it_did_not_write(
    tmp_path: Path, he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="did not write"):
        _explain(pool_attr, he_slide, stride=32, out_dir=mine, overwrite=True)
    assert (mine / "thesis.tex").read_text() == "precious"


def test_region_mode_covers_every_cell_once_with_whole_image_features(
    he_slide: Path, pool_attr: NMFConceptAttribution
) -> None:
    ex = explain_slide(
        pool_attr,
        he_slide,
        mode="region",
        region_size=128,
        region_margin=16,
        tissue_mask=None,
        batch_size=4,
        progress=False,
    )
    assert ex.grid_shape == (48, 64)
    assert len(ex.tile_locations) == 3 * 4  # ceil(384 / 128) x ceil(512 / 128) regions
    assert ex.tile_locations[0].tolist() == [-16, -16]  # context reaches before the slide
    assert (ex.counts == 1).all()  # interiors tile the slide exactly once
    assert (ex.config["mode"], ex.config["border"]) == ("region", 2)  # 16 px / 8 px cells
    net = pool_attr.forward_func
    image = torch.from_numpy(he_image()[:384, :512]).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        whole = net.features(image)[0].permute(1, 2, 0).reshape(-1, 4)  # type: ignore[operator]
    expected = pool_attr.nmf_.transform(whole).reshape(48, 64, 3).permute(2, 0, 1).numpy()
    inner = np.s_[:, 1:-1, 1:-1]  # the slide's outermost cells see white, not zero padding
    np.testing.assert_allclose(ex.concept_maps[inner], expected[inner], rtol=1e-4, atol=1e-4)


def test_region_mode_arguments(he_slide: Path, pool_attr: NMFConceptAttribution) -> None:
    with pytest.raises(ValueError, match="mode must be 'tile' or 'region'"):
        _explain(pool_attr, he_slide, mode="fast")
    with pytest.raises(ValueError, match=r"region_margin=12 is not a multiple of the cell size 8"):
        _explain(pool_attr, he_slide, mode="region", region_size=128, region_margin=12)
    with pytest.raises(ValueError, match="region_size must be >= 1"):
        _explain(pool_attr, he_slide, mode="region", region_size=0)


def test_rows_without_tiles_are_not_tissue(
    tmp_path: Path, pool_attr: NMFConceptAttribution
) -> None:
    """Tissue cells follow the mask everywhere, also in rows no tile reached."""
    from tests.helpers.synthetic_slides import tissue_on_white

    path = tissue_on_white(tmp_path / "top.svs", (512, 1024), (0, 0, 512, 256))
    ex = explain_slide(pool_attr, path, tile_size=64, stride=32, batch_size=32, progress=False)
    no_tiles = ~ex.counts.any(axis=1)
    assert no_tiles.sum() > 40  # the white lower part: no tile has tissue there
    assert not ex.tissue_cells[no_tiles].any()
    assert ex.tissue_cells[:30].mean() > 0.9


def test_an_explanations_two_files_are_replaced_together(
    tmp_path: Path,
    he_slide: Path,
    pool_attr: NMFConceptAttribution,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import errno
    import hashlib
    import json
    import os

    ex = _explain(pool_attr, he_slide, stride=32)
    path = ex.save(tmp_path / "e")
    summary = json.loads((tmp_path / "e" / "explanation.json").read_text())
    assert summary["explanation_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    before = {p.name: p.read_bytes() for p in (tmp_path / "e").iterdir()}

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    other = _explain(pool_attr, he_slide, stride=16)
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        other.save(tmp_path / "e")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "e").iterdir()} == before  # both old
