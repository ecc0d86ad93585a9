"""Exports: QuPath GeoJSON checked with shapely, overlay TIFFs reopened by OpenSlide, summaries."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import openslide
import pytest
import shapely
from PIL import Image

from captum_nmf import NMFConceptAttribution
from captum_nmf.export import concept_polygons, slide_summary, to_geojson, write_overlay_tiff
from captum_nmf.viz import PALETTE
from captum_nmf.wsi import Slide, SlideExplanation, SlideTiles, explain_slide, write_pyramid
from tests.helpers.synthetic_slides import he_image, tissue_on_white
from tests.helpers.wsi_models import PoolNet


def _fingerprint(path: Path) -> str:
    if not path.is_file():
        return "sha256:x"
    with Slide(path) as slide:
        return slide.fingerprint()


def _hand_made(path: Path) -> SlideExplanation:
    """A 5 x 6 cell grid of 16 px cells: concept 0 rings concept 1; column 5 is background."""
    assignment = np.full((5, 6), -1, np.int16)
    assignment[:, :5] = 0
    assignment[1:4, 1:4] = 1
    assignment[2, 2] = -1  # a hole inside concept 1
    maps = np.zeros((2, 5, 6), np.float32)
    maps[0][assignment == 0] = 2.0
    maps[1][assignment == 1] = 1.0
    counts = np.ones((5, 6), np.int32)
    return SlideExplanation(
        concept_maps=maps,
        assignment=assignment,
        counts=counts,
        tissue_cells=assignment >= 0,
        cell_size=16.0,
        origin=(0.0, 0.0),
        tile_locations=np.array([[0, 0], [32, 32]], np.int64),
        tile_outputs=None,
        failed_tiles=np.zeros((0, 2), np.int64),
        concepts=np.eye(2, 3, dtype=np.float32),
        slide_path=str(path),
        slide_fingerprint=_fingerprint(path),
        dimensions=(96, 80),
        config={"tile_size": 32, "cell_px": 16, "slide_mpp": 0.5},
    )


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pyramid(he_image()[:80, :96], tmp_path_factory.mktemp("s") / "s.svs", mpp=0.5)


def test_polygons_are_exact_and_keep_holes() -> None:
    assignment = np.zeros((5, 5), int)
    assignment[1:4, 1:4] = 1
    ring = concept_polygons(assignment, 0, cell_size=10.0)
    assert ring.is_valid
    assert ring.area == 16 * 100.0
    assert len(ring.interiors) == 1
    assert shapely.Polygon(ring.interiors[0]).area == 9 * 100.0
    core = concept_polygons(assignment, 1, cell_size=10.0)
    assert core.bounds == (10.0, 10.0, 40.0, 40.0)
    assert concept_polygons(assignment, 2, 10.0).is_empty


def test_geojson_for_qupath(tmp_path: Path, slide_path: Path) -> None:
    ex = _hand_made(slide_path)
    collection = to_geojson(ex, tmp_path / "concepts.geojson", names=["stroma", "tumour"])
    assert json.loads((tmp_path / "concepts.geojson").read_text()) == collection
    assert collection["type"] == "FeatureCollection"
    features = collection["features"]
    assert [f["properties"]["classification"]["name"] for f in features] == ["stroma", "tumour"]
    assert features[0]["properties"]["classification"]["color"] == [230, 159, 0]  # PALETTE[0]
    for feature in features:
        geometry = shapely.geometry.shape(feature["geometry"])
        assert geometry.is_valid
        cells = int((ex.assignment == feature["properties"]["concept"]).sum())
        assert feature["properties"]["cells"] == cells
        assert geometry.area == pytest.approx(cells * 16.0**2, rel=0.01)
    tumour = shapely.geometry.shape(features[1]["geometry"])
    assert len(tumour.interiors) == 1  # the hole at cell (2, 2) is kept
    assert tumour.bounds == (16.0, 16.0, 64.0, 64.0)  # level-0 pixels
    with pytest.raises(ValueError, match="names must hold 2 names"):
        to_geojson(ex, names=["only one"])


def test_geojson_polygons_end_at_the_slide_edge(slide_path: Path) -> None:
    """Cells along the right and bottom edges reach past the slide: before, polygons went to
    y = 2976 on a 2967 px slide and area_px counted the pixels outside it."""
    import dataclasses

    ex = dataclasses.replace(_hand_made(slide_path), dimensions=(72, 75))  # 16 px cells to 80
    features = to_geojson(ex)["features"]
    stroma, tumour = (shapely.geometry.shape(f["geometry"]) for f in features)
    assert stroma.bounds == (0.0, 0.0, 72.0, 75.0)
    # [0, 72] x [0, 75] less the tumour's square [16, 64]^2, by hand
    assert features[0]["properties"]["area_px"] == 72 * 75 - 48 * 48
    assert features[0]["properties"]["cells"] == 16  # cells are counted as before
    assert features[1]["properties"]["area_px"] == 48 * 48 - 16 * 16  # inside: unchanged
    assert stroma.is_valid
    assert tumour.is_valid


def test_geojson_of_a_real_explanation(tmp_path: Path) -> None:
    path = tissue_on_white(tmp_path / "t.svs", (384, 320), (96, 64, 224, 192))
    net = PoolNet().eval()
    tiles = SlideTiles(path, tile_size=64, stride=64, tissue_mask=None)
    attr = NMFConceptAttribution(net, net.relu, 3, random_state=0).fit(tiles, progress=False)
    ex = explain_slide(attr, path, tile_size=64, stride=32, min_tissue=0.1, progress=False)
    features = to_geojson(ex)["features"]
    assert features
    total = 0
    for feature in features:
        geometry = shapely.geometry.shape(feature["geometry"])
        assert geometry.is_valid
        assert geometry.area == pytest.approx(feature["properties"]["cells"] * 64.0, rel=0.01)
        minx, miny, maxx, maxy = geometry.bounds
        assert min(minx, miny) >= 0
        assert maxx <= 384
        assert maxy <= 320
        total += feature["properties"]["cells"]
    assert total == int((ex.assignment >= 0).sum())


def test_overlay_tiff_reopens_in_openslide(tmp_path: Path, slide_path: Path) -> None:
    ex = _hand_made(slide_path)
    full = write_overlay_tiff(ex, tmp_path / "clusters.tif", downsample=1, tile=16)
    with openslide.OpenSlide(str(full)) as osr:
        assert osr.dimensions == (96, 80)  # the slide's level-0 geometry
        assert osr.level_count >= 2
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        centre_of = {(0, 0): 0, (1, 1): 1, (2, 2): -1, (0, 5): -1}
        for (r, c), concept in centre_of.items():
            pixel = np.asarray(osr.read_region((c * 16 + 8, r * 16 + 8), 0, (1, 1)))[0, 0]
            if concept < 0:
                assert pixel[3] == 0  # transparent where no concept
            else:
                colour = [int(PALETTE[concept][i : i + 2], 16) for i in (1, 3, 5)]
                assert pixel.tolist() == [*colour, 255]
    small = write_overlay_tiff(ex, tmp_path / "cells.tif", downsample=ex.cell_size)  # per cell
    with openslide.OpenSlide(str(small)) as osr:
        assert osr.dimensions == (6, 5)
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(8.0)
    # the TIFF resolution tags too, per level (readers that ignore the Aperio description,
    # such as Bio-Formats, said 1 pixel per unit of no unit: found by a review, 2026-12-08)
    import tifffile

    with tifffile.TiffFile(full) as tif:
        for page in tif.pages:
            width = page.shape[1]
            per_cm = 1e4 / (0.5 * 96 / width)  # 0.5 um at level 0
            assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
            x, y = page.get_resolution(tifffile.RESUNIT.CENTIMETER)
            assert x == pytest.approx(per_cm, rel=1e-6)
            assert y == pytest.approx(per_cm, rel=1e-6)
    with tifffile.TiffFile(small) as tif:
        assert tif.pages[0].get_resolution(tifffile.RESUNIT.CENTIMETER)[0] == pytest.approx(1250)
    # a slide without a scale (a plain JPEG): none written (it was a made-up MPP = 1)
    import dataclasses

    unscaled = dataclasses.replace(ex, config={**ex.config, "slide_mpp": None})
    plain = write_overlay_tiff(unscaled, tmp_path / "plain.tif", downsample=1, tile=16)
    with openslide.OpenSlide(str(plain)) as osr:
        assert osr.properties["openslide.vendor"] == "aperio"
        assert "openslide.mpp-x" not in osr.properties
    with tifffile.TiffFile(plain) as tif:  # no scale made up in the tags either
        assert tif.pages[0].tags["ResolutionUnit"].value == tifffile.RESUNIT.NONE
    intensity = write_overlay_tiff(
        ex, tmp_path / "c0.tif", kind="intensity", concept=0, downsample=16
    )
    with openslide.OpenSlide(str(intensity)) as osr:
        region = np.asarray(osr.read_region((0, 0), 0, (6, 5)))
    assert region[0, 0, 3] == 255  # concept 0 at its maximum
    assert region[1, 1, 3] == 0  # concept 1 territory
    with pytest.raises(ValueError, match="needs concept in"):
        write_overlay_tiff(ex, tmp_path / "x.tif", kind="intensity")
    with pytest.raises(ValueError, match="kind must be"):
        write_overlay_tiff(ex, tmp_path / "x.tif", kind="heat")  # type: ignore[arg-type]


def test_slide_summary(tmp_path: Path, slide_path: Path) -> None:
    ex = _hand_made(slide_path)
    summary = slide_summary(ex, tmp_path / "summary", top_n=1, crop_size=32)
    tissue = 24  # 25 concept cells minus the hole
    first, second = summary["concepts"]
    assert summary["tissue_cells"] == tissue
    assert first["area_fraction"] == pytest.approx(16 / tissue)
    assert second["area_fraction"] == pytest.approx(8 / tissue)
    assert first["mean_intensity"] == pytest.approx(2.0 * 16 / tissue)
    assert second["top_tiles"][0]["x"] == 32  # the tile over concept 1
    crop = Image.open(tmp_path / "summary" / second["top_tiles"][0]["crop"])
    assert crop.size == (32, 32)
    assert json.loads((tmp_path / "summary" / "summary.json").read_text()) == summary
    csv_text = (tmp_path / "summary" / "summary.csv").read_text().splitlines()
    assert csv_text[0] == "concept,name,area_fraction,mean_intensity"
    assert len(csv_text) == 3
    with pytest.raises(ValueError, match="top_n must be >= 1"):
        slide_summary(ex, top_n=0)


def test_names_are_checked_and_stay_text_in_spreadsheets_and_markdown(
    tmp_path: Path, slide_path: Path
) -> None:
    """Found by a hostile review (2026-12-08): ``names=`` in the export API was not
    checked (two concepts of one name become one QuPath class); a name such as
    ``=HYPERLINK(...)`` or ``-ve stroma`` ran as a formula in summary.csv; a ``|`` in a
    name broke the markdown tables (5 cells in the header, 4 in the separator)."""
    import csv

    from captum_nmf.compare.tables import Table

    ex = _hand_made(slide_path)
    with pytest.raises(ValueError, match=r"must be unique: 'tumour' names concepts 0 and 1"):
        to_geojson(ex, names=["tumour", "tumour"])
    with pytest.raises(ValueError, match=r"concept name 0 is empty"):
        slide_summary(ex, names=["", "x"])
    formula = '=HYPERLINK("http://evil.example","click")'
    summary = slide_summary(ex, tmp_path / "s", top_n=1, crop_size=32, names=[formula, "-ve"])
    assert [e["name"] for e in summary["concepts"]] == [formula, "-ve"]  # JSON: as given
    with (tmp_path / "s" / "summary.csv").open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert [r[1] for r in rows[1:]] == ["'" + formula, "'-ve"]  # text in a spreadsheet
    assert float(rows[1][2]) == pytest.approx(16 / 24)  # numbers unchanged
    table = Table(["concept", "ER+|PR+", "n"], [["@SUM(1)", -0.5, "-"]], "t")
    assert table.to_csv().splitlines() == ["concept,ER+|PR+,n", "'@SUM(1),-0.5,-"]
    header, separator, row = table.to_markdown().splitlines()[2:]
    cells = [len(re.split(r"(?<!\\)\|", line)) for line in (header, separator, row)]
    assert cells == [5, 5, 5]  # 3 cells each, between the outer pipes
    assert "ER+\\|PR+" in header


def test_slide_summary_of_a_region_mode_explanation(tmp_path: Path, slide_path: Path) -> None:
    ex = _hand_made(slide_path)
    # region mode has no tiles of one size: candidates are 512 output px windows every 256 px,
    # here 2 x 2 cells (cell_px 256) every cell, at least half tissue
    ex.config = {**ex.config, "mode": "region", "cell_px": 256}
    with pytest.raises(ValueError, match="mode='region'"):
        ex.tile_window(0)
    summary = slide_summary(ex, tmp_path / "region", top_n=2, crop_size=16)
    best = summary["concepts"][1]["top_tiles"]
    assert (best[0]["x"], best[0]["y"]) == (16, 16)  # cells (1, 1)-(2, 2): 3 of 4 are concept 1
    assert best[0]["mean_weight"] == pytest.approx(0.75)
    assert (best[1]["x"], best[1]["y"]) == (32, 16)  # the next one overlapping it by half at most
    assert Image.open(tmp_path / "region" / best[0]["crop"]).size == (16, 16)


def test_overlay_defaults_to_the_slides_geometry_and_levels(tmp_path: Path) -> None:
    """Opened beside the slide, the overlay has its dimensions and level downsamples."""
    slide = write_pyramid(he_image()[:1500, :1300], tmp_path / "big.svs", mpp=0.5)
    with openslide.OpenSlide(str(slide)) as osr:
        dims, downs, count = osr.dimensions, osr.level_downsamples, osr.level_count
    assert count >= 2
    ex = _hand_made(slide)
    ex.dimensions = dims
    ex.cell_size = 260.0  # the 6 x 5 cells over 1300 x 1500 px (the last ones clipped)
    overlay = write_overlay_tiff(ex, tmp_path / "clusters.tif")
    with openslide.OpenSlide(str(overlay)) as osr:
        assert osr.dimensions == dims
        assert osr.level_count == count
        assert osr.level_downsamples == pytest.approx(downs)
        pixel = np.asarray(osr.read_region((300, 300), 0, (1, 1)))[0, 0]  # cell (1, 1)
    colour = [int(PALETTE[1][i : i + 2], 16) for i in (1, 3, 5)]
    assert pixel.tolist() == [*colour, 255]
    # a slide that cannot be read: level 0 at its size, levels halving
    ex.slide_path = str(tmp_path / "moved.svs")
    fallback = write_overlay_tiff(ex, tmp_path / "fallback.tif")
    with openslide.OpenSlide(str(fallback)) as osr:
        assert osr.dimensions == dims


def test_geojson_ids_are_stable_uuids(tmp_path: Path, slide_path: Path) -> None:
    import uuid

    ex = _hand_made(slide_path)
    first = [f["id"] for f in to_geojson(ex)["features"]]
    again = [f["id"] for f in to_geojson(ex)["features"]]
    assert first == again  # the same explanation gives the same ids
    assert all(uuid.UUID(i).version == 5 for i in first)
    assert len(set(first)) == len(first)
    ex.slide_fingerprint = "sha256:y"
    other = [f["id"] for f in to_geojson(ex)["features"]]
    assert not set(other) & set(first)
    ex.slide_fingerprint = _hand_made(slide_path).slide_fingerprint  # the same slide, run
    ex.assignment = ex.assignment.copy()  # with other tiles: another map, other ids
    ex.assignment[0, 0] = 1
    rerun = [f["id"] for f in to_geojson(ex)["features"]]
    assert not set(rerun) & set(first)


def test_intensity_overlays_record_their_scale_and_can_share_one(
    tmp_path: Path, slide_path: Path
) -> None:
    import tifffile

    ex = _hand_made(slide_path)  # concept 0 weighs 2.0 where it is
    own = write_overlay_tiff(ex, tmp_path / "own.tif", kind="intensity", concept=0)
    shared = write_overlay_tiff(
        ex, tmp_path / "shared.tif", kind="intensity", concept=0, scale=np.float32(4.0)
    )
    with tifffile.TiffFile(own) as a, tifffile.TiffFile(shared) as b:
        assert "Opaque at weight = 2|" not in a.pages[0].description
        assert a.pages[0].description.endswith("Concept = concept 0|Opaque at weight = 2")
        assert b.pages[0].description.endswith("Opaque at weight = 4")
        alpha_own, alpha_shared = a.pages[0].asarray()[..., 3], b.pages[0].asarray()[..., 3]
    assert alpha_own.max() == 255
    assert alpha_shared.max() == 128  # the same weight, half the scale's
    with pytest.raises(ValueError, match="scale must be a positive number, got 0"):
        write_overlay_tiff(ex, tmp_path / "x.tif", kind="intensity", concept=0, scale=0)
