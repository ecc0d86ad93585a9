"""Region mode: tissue-aware region plans, exact features, resumable runs, failed regions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from captum_nmf import NMFConceptAttribution
from captum_nmf.exceptions import RunStateError, SlideReadError, UnreadableRegionWarning
from captum_nmf.wsi import Slide, SlideTiles, detect_tissue, explain_slide, write_pyramid
from captum_nmf.wsi.regions import plan_regions, tissue_cells
from tests.helpers.cohort_faults import InterruptAfter
from tests.helpers.synthetic_slides import CMU, flip_tile_marker, he_image, tissue_on_white
from tests.helpers.wsi_models import PoolNet


def _cover(leaves: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    cover = np.zeros(shape, int)
    for r, c, h, w in leaves:
        cover[r : r + h, c : c + w] += 1
    return cover


def test_plan_regions_by_hand() -> None:
    full = np.ones((8, 8), bool)  # splitting saves nothing: the four roots as they are
    assert plan_regions(full, 4).tolist() == [
        [0, 0, 4, 4],
        [0, 4, 4, 4],
        [4, 0, 4, 4],
        [4, 4, 4, 4],
    ]
    sparse = np.zeros((8, 8), bool)
    sparse[1:3, 5:8] = True  # one root shrunk to the 2 x 3 bounding box of its tissue
    assert plan_regions(sparse, 8).tolist() == [[1, 5, 2, 3]]
    assert plan_regions(sparse, 8, margin_cells=1).tolist() == [[1, 5, 2, 3]]
    corners = np.zeros((8, 8), bool)
    corners[0, 0] = corners[7, 7] = True  # one box: 10 x 10 = 100 cells; two: 3 x 3 + 3 x 3
    assert plan_regions(corners, 8, margin_cells=1).tolist() == [[0, 0, 1, 1], [7, 7, 1, 1]]
    dense = np.zeros((8, 8), bool)
    dense[0:5, 0:5] = True  # quarters: 16 + 4 + 4 + 1 = 25 cells, no fewer than the 5 x 5 box
    assert plan_regions(dense, 8).tolist() == [[0, 0, 5, 5]]
    assert plan_regions(np.zeros((3, 3), bool), 2).shape == (0, 4)


@pytest.mark.parametrize(("seed", "root"), [(0, 16), (1, 5), (2, 9), (3, 36), (4, 125), (5, 7)])
def test_plan_regions_cover_every_tissue_cell_once(seed: int, root: int) -> None:
    rng = np.random.default_rng(seed)
    tissue = rng.random((37, 53)) < rng.uniform(0.05, 0.9)
    leaves = plan_regions(tissue, root, margin_cells=2, min_cells=1)
    cover = _cover(leaves, tissue.shape)
    assert cover.max() == 1  # no overlap
    assert (cover[tissue] == 1).all()  # every tissue cell once
    assert (leaves[:, 0] + leaves[:, 2] <= 37).all()
    assert (leaves[:, 1] + leaves[:, 3] <= 53).all()


def test_plan_regions_bad_input() -> None:
    with pytest.raises(ValueError, match="tissue must be a 2-D bool array"):
        plan_regions(np.ones(4, bool), 2)
    with pytest.raises(ValueError, match="root_cells must be >= 1, got 0"):
        plan_regions(np.ones((4, 4), bool), 0)
    with pytest.raises(ValueError, match="margin_cells must be >= 0, got -1"):
        plan_regions(np.ones((4, 4), bool), 2, margin_cells=-1)


@pytest.fixture(scope="module")
def islands(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real H&E (320 x 256 px) near a corner of an 800 x 608 px white slide."""
    return tissue_on_white(
        tmp_path_factory.mktemp("islands") / "islands.svs", (800, 608), (40, 40, 320, 256)
    )


@pytest.fixture(scope="module")
def attr(islands: Path) -> NMFConceptAttribution:
    net = PoolNet().eval()
    model = NMFConceptAttribution(net, net.relu, n_concepts=3, random_state=0)
    return model.fit(SlideTiles(islands, tile_size=64, stride=32), batch_size=32, progress=False)


def _regions(attr: NMFConceptAttribution, path: Path, **kwargs: object):  # type: ignore[no-untyped-def]
    options: dict[str, object] = {
        "mode": "region",
        "region_size": 256,
        "region_margin": 16,
        "progress": False,
    }
    options.update(kwargs)
    return explain_slide(attr, path, **options)  # type: ignore[arg-type]


def test_regions_cover_the_tissue_once_with_whole_image_features(
    islands: Path, attr: NMFConceptAttribution
) -> None:
    ex = _regions(attr, islands)
    with Slide(islands) as slide:
        mask = detect_tissue(slide)
        pixels = slide.read_region((0, 0), 0, slide.dimensions)
    wanted = tissue_cells(mask, ex.grid_shape, 8.0)
    assert wanted.any()
    assert (ex.counts[wanted] == 1).all()  # every cell with tissue, exactly once
    assert ex.counts.max() == 1
    regions = np.asarray(ex.config["regions"])
    assert ex.counts.sum() == int((regions[:, 2] * regions[:, 3]).sum())  # no overlap
    read = sum((h * 8 + 32) * (w * 8 + 32) for _, _, h, w in regions)
    assert read < 0.5 * 4 * 288 * 288  # under half of the 4 fixed 256 px regions with tissue
    assert ex.tile_locations.tolist()[0] == [
        int(regions[0, 1]) * 8 - 16,
        int(regions[0, 0]) * 8 - 16,
    ]
    net = attr.forward_func
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        whole = net.features(image)[0].permute(1, 2, 0)  # type: ignore[operator]
    covered = ex.counts == 1
    expected = attr.nmf_.transform(whole[torch.from_numpy(covered)]).numpy()
    np.testing.assert_allclose(ex.concept_maps[:, covered].T, expected, rtol=1e-4, atol=1e-4)
    assert (ex.concept_maps[:, ~covered] == 0).all()
    with pytest.raises(ValueError, match="regions of different sizes"):
        ex.tile_window(0)


def test_region_run_resumes_bit_identical(
    tmp_path: Path, islands: Path, attr: NMFConceptAttribution
) -> None:
    reference = _regions(attr, islands, chunk_tiles=16)  # one region per chunk
    n = len(reference.tile_locations)
    assert n >= 4
    out = tmp_path / "run"
    # the transform also sees one probe tile before each run starts (call 1)
    with pytest.raises(KeyboardInterrupt):
        _regions(attr, islands, chunk_tiles=16, out_dir=out, transform=InterruptAfter(4))
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["done"], manifest["status"]) == (2, "running")
    counter = InterruptAfter(10**9)
    resumed = _regions(attr, islands, chunk_tiles=16, out_dir=out, resume=True, transform=counter)
    assert counter.seen == 1 + n - 2  # the probe; the two finished regions were not read again
    for name in ("concept_maps", "assignment", "counts"):
        assert np.array_equal(getattr(resumed, name), getattr(reference, name)), name


def test_region_runs_resume_whatever_the_border_and_name_region_size(
    tmp_path: Path,
    islands: Path,
    attr: NMFConceptAttribution,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``border`` is unused in region mode, yet a resume with another one was refused;
    a changed ``region_size`` was named only by the regions, ``tile_size`` and ``stride``
    it gives (the caller passed none of them), with a hint about transforms."""
    from captum_nmf.wsi.run import explain as explain_module

    reference = _regions(attr, islands, chunk_tiles=16)
    go = InterruptAfter(10**9)  # described as the interrupting one is: "identity"
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _regions(attr, islands, chunk_tiles=16, out_dir=out, transform=InterruptAfter(4))
    resumed = _regions(
        attr, islands, chunk_tiles=16, out_dir=out, resume=True, border=5, transform=go
    )
    assert np.array_equal(resumed.concept_maps, reference.concept_maps)
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert (config["border"], config["region_size"]) == (None, 256)
    with pytest.raises(
        RunStateError, match=r"\(n_tiles: .*; region_size: recorded 256, now 128;"
    ) as e:
        _regions(
            attr, islands, chunk_tiles=16, out_dir=out, resume=True, region_size=128, transform=go
        )
    assert "__captum_nmf_description__" not in str(e.value)  # no transform changed

    real = explain_module.run_config

    def before(*args: object, **kwargs: object) -> dict[str, object]:  # as runs recorded it
        config = real(*args, **kwargs)  # type: ignore[arg-type]
        config.pop("region_size")
        return {**config, "border": 2}

    for finished in (True, False):
        old = tmp_path / f"old{finished}"
        with monkeypatch.context() as patch:
            patch.setattr(explain_module, "run_config", before)
            if finished:
                _regions(attr, islands, chunk_tiles=16, out_dir=old, transform=go)
            else:
                with pytest.raises(KeyboardInterrupt):
                    _regions(
                        attr, islands, chunk_tiles=16, out_dir=old, transform=InterruptAfter(4)
                    )
        again = _regions(
            attr, islands, chunk_tiles=16, out_dir=old, resume=True, border=0, transform=go
        )
        assert np.array_equal(again.concept_maps, reference.concept_maps)
        with pytest.raises(RunStateError, match=r"\(region_margin: recorded 16, now 8; ti") as e:
            _regions(attr, islands, out_dir=old, resume=True, region_margin=8, transform=go)
        assert "region_size" not in str(e.value)  # not recorded, and not what differs


def test_unreadable_region_raises_or_becomes_nan(
    tmp_path: Path, attr: NMFConceptAttribution
) -> None:
    broken = tmp_path / "broken.svs"
    bx, by = flip_tile_marker(CMU, broken, tile_index=52)  # one 240 px JPEG tile
    kwargs = {"region_size": 480, "region_margin": 16, "tissue_mask": None}
    with pytest.raises(SlideReadError, match=r"broken\.svs"):
        _regions(attr, broken, **kwargs)
    with pytest.warns(UnreadableRegionWarning, match=r"broken\.svs: 4 of \d+ regions could not"):
        ex = _regions(attr, broken, on_tile_error="skip", **kwargs)
    # every region whose window (interior + 16 px of context) touches the broken tile fails
    corners = ex.tile_locations
    touches = (
        (corners[:, 0] < bx + 240)
        & (corners[:, 0] + 512 > bx)
        & (corners[:, 1] < by + 240)
        & (corners[:, 1] + 512 > by)
    )
    assert sorted(map(tuple, ex.failed_tiles.tolist())) == sorted(map(tuple, corners[touches]))
    assert len(ex.failed_tiles) == 4  # the tile sits on a corner shared by four regions
    lost = np.zeros(ex.grid_shape, bool)
    for x, y in corners[touches]:
        lost[(y + 16) // 8 : (y + 16) // 8 + 60, (x + 16) // 8 : (x + 16) // 8 + 60] = True
    assert np.isnan(ex.concept_maps[:, lost]).all()  # never silently zero
    assert (ex.assignment[lost] == -1).all()
    assert np.isfinite(ex.concept_maps[:, ~lost]).all()


def test_region_sizes_must_be_whole_cells(islands: Path, attr: NMFConceptAttribution) -> None:
    with pytest.raises(ValueError, match=r"region_size=100 is not a multiple of the cell size 8"):
        _regions(attr, islands, region_size=100)


def test_forward_options_in_explain_slide(
    tmp_path: Path, islands: Path, attr: NMFConceptAttribution
) -> None:
    opts = {"tile_size": 64, "stride": 32, "progress": False}
    base = explain_slide(attr, islands, **opts)  # type: ignore[arg-type]
    last = explain_slide(attr, islands, channels_last=True, **opts)  # type: ignore[arg-type]
    np.testing.assert_allclose(last.concept_maps, base.concept_maps, rtol=1e-5, atol=1e-6)
    bf16 = explain_slide(attr, islands, autocast=torch.bfloat16, **opts)  # type: ignore[arg-type]
    assert bf16.config["autocast"] == "torch.bfloat16"
    assert bf16.concept_maps.dtype == np.float32
    # bfloat16 keeps 8 bits of mantissa: weights within ~1 % of their scale
    scale = float(np.abs(base.concept_maps).max())
    assert float(np.abs(bf16.concept_maps - base.concept_maps).max()) < 0.03 * scale
    assert (bf16.assignment == base.assignment).mean() > 0.95
    with pytest.raises(TypeError, match="autocast"):
        explain_slide(attr, islands, autocast="bf16", out_dir=tmp_path / "x", **opts)  # type: ignore[arg-type]
    assert not (tmp_path / "x").exists()  # checked before any work


def test_every_tissue_cell_gets_a_value_up_to_the_slide_edges(
    tmp_path: Path, attr: NMFConceptAttribution
) -> None:
    """Real H&E that is tissue to its edges; 740 px is not a whole number of 8 px cells, so
    the last cell row reaches past the slide. Each region reads its margin of context past the
    slide's edge (padded), so the regions' interiors reach the edge and no ring is lost."""
    path = write_pyramid(he_image()[:740, :1004], tmp_path / "nest.tiff", mpp=0.5)
    ex = _regions(attr, path)
    assert ex.grid_shape == (93, 126)  # ceil(740 / 8), ceil(1004 / 8)
    wanted = tissue_cells(ex.tissue, ex.grid_shape, ex.cell_size)
    ring = np.ones(ex.grid_shape, bool)
    ring[2:-2, 2:-2] = False  # the 2-cell ring a tile border would drop
    assert wanted[ring].mean() > 0.9  # the tissue does reach the slide's edges
    assert (ex.counts[wanted] == 1).all()
    assert np.isfinite(ex.concept_maps[:, wanted]).all()
    assert (ex.concept_maps[:, wanted].max(axis=0) > 0).all()
    assert (ex.assignment[wanted] >= 0).all()
