"""Prototype galleries: the strongest tiles per concept, near-duplicates out, saved as images."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from captum_nmf import NMFConceptAttribution
from captum_nmf.exceptions import CaptumNMFWarning, NotFittedError
from captum_nmf.gallery import MIN_SCORE_FRACTION, RECORD, ConceptGallery, concept_gallery
from captum_nmf.io import sha256_file
from captum_nmf.wsi import SlideTiles
from tests.helpers import runs
from tests.helpers.wsi_models import PoolNet


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return runs.he_slide(tmp_path_factory.mktemp("gallery"))


@pytest.fixture(scope="module")
def attr(slide: Path) -> NMFConceptAttribution:
    return runs.pool_concepts(slide)


def test_tensor_source_scores_order_and_duplicates(
    slide: Path, attr: NMFConceptAttribution
) -> None:
    tiles = SlideTiles(slide, tile_size=64, stride=32, tissue_mask=None)
    x = torch.stack([tiles[i][0] for i in range(12)])
    x = torch.cat([x, x[:1]])  # tile 12 repeats tile 0 exactly
    gallery = concept_gallery(attr, x, top_n=4, batch_size=5, progress=False)
    with torch.no_grad():
        expected = attr.attribute(x).double().mean(dim=(2, 3)).numpy()
    assert gallery.names == attr.concept_names
    for j, entries in enumerate(gallery.entries):
        assert 1 <= len(entries) <= 4
        scores = [e.score for e in entries]
        assert scores == sorted(scores, reverse=True)
        best = int(np.argmax(expected[:, j]))
        assert entries[0].score == pytest.approx(float(expected[:, j].max()))
        assert entries[0].tile in (best, 0 if best == 12 else best)
        assert not {0, 12} <= {e.tile for e in entries}  # the repeat is a near-duplicate


def test_slide_tiles_source_locations_and_save(
    tmp_path: Path, slide: Path, attr: NMFConceptAttribution
) -> None:
    tiles = SlideTiles(slide, tile_size=64, stride=32, tissue_mask=None)
    attr.rename({0: "stroma"})
    gallery = concept_gallery(attr, tiles, top_n=3, progress=False)
    for entries in gallery.entries:
        assert len(entries) == 3
        locations = [e.location for e in entries]
        assert all(loc is not None for loc in locations)
        for a in range(3):
            for b in range(a + 1, 3):
                dx = abs(locations[a][0] - locations[b][0])  # type: ignore[index]
                dy = abs(locations[a][1] - locations[b][1])  # type: ignore[index]
                assert max(dx, dy) >= 32  # never more than half a tile of overlap
        first = entries[0]
        assert first.image.shape == (64, 64, 3)
        assert np.array_equal(first.image * 255, np.asarray(tiles.read(first.tile), np.float64))
    out = gallery.save(tmp_path / "g")
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "gallery.csv",
        "gallery.json",
        "gallery_concept_0.png",
        "gallery_concept_1.png",
        "gallery_concept_2.png",
    ]
    assert "stroma" in (out / "gallery.csv").read_text()
    gallery.names[1] = "-ve stroma"  # a spreadsheet ran it as a formula (#NAME?)
    assert ",'-ve stroma," in gallery.to_csv()


def test_bad_input(attr: NMFConceptAttribution) -> None:
    x = torch.rand(2, 3, 64, 64)
    with pytest.raises(ValueError, match="top_n must be >= 1"):
        concept_gallery(attr, x, top_n=0, progress=False)
    with pytest.raises(TypeError, match="top_n must be an int"):
        concept_gallery(attr, x, top_n=1.5, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="labels must hold 3 names"):
        concept_gallery(attr, x, labels=["a"], progress=False)
    with pytest.raises(ValueError, match="source holds no tiles"):
        concept_gallery(attr, [], progress=False)
    net = PoolNet()
    with pytest.raises(NotFittedError, match="not fitted"):
        concept_gallery(NMFConceptAttribution(net, net.relu, 3), x, progress=False)
    with pytest.raises(IndexError, match="no concept 5"):
        concept_gallery(attr, x, progress=False).figure(5)


def test_a_gallery_over_several_slides_names_each_tiles_slide(
    tmp_path: Path, slide: Path, attr: NMFConceptAttribution
) -> None:
    import csv
    import shutil

    twin = Path(shutil.copy(slide, tmp_path / "twin.svs"))  # the same pixels at the same places
    tiles = SlideTiles([slide, twin], tile_size=64, stride=32, tissue_mask=None)
    gallery = concept_gallery(attr, tiles, top_n=2, progress=False)
    for entries in gallery.entries:
        # a tile and its twin at the same place are not near repeats of each other:
        # they are on two slides, and both are shown
        assert entries[0].score == pytest.approx(entries[1].score)
        assert {e.slide for e in entries} == {str(slide.resolve()), str(twin.resolve())}
        assert entries[0].location == entries[1].location
    with (gallery.save(tmp_path / "g") / "gallery.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {Path(r["slide"]).name for r in rows} == {"he.svs", "twin.svs"}


# -- saving: a record of our files (gallery.json); never a user's file replaced or removed


def _small(attr: NMFConceptAttribution, k: int | None = None, seed: int = 0) -> ConceptGallery:
    """A gallery of one tile per concept over eight random tiles; its first ``k`` concepts."""
    x = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    gallery = concept_gallery(attr, x, top_n=1, progress=False)
    k = len(gallery.names) if k is None else k
    return ConceptGallery(gallery.names[:k], gallery.entries[:k], gallery.min_score)


def test_save_writes_a_record_of_its_files(tmp_path: Path, attr: NMFConceptAttribution) -> None:
    out = _small(attr).save(tmp_path / "g")
    record = json.loads((out / RECORD).read_text())
    assert record["format"] == "captum-nmf/gallery"
    assert record["names"] == attr.concept_names
    assert sorted(record["files"]) == [
        "gallery.csv",
        "gallery_concept_0.png",
        "gallery_concept_1.png",
        "gallery_concept_2.png",
    ]
    assert record["files"]["gallery.csv"] == sha256_file(out / "gallery.csv")
    _small(attr, seed=1).save(out)  # its own files are replaced
    assert json.loads((out / RECORD).read_text())["files"]["gallery.csv"] == sha256_file(
        out / "gallery.csv"
    )


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("gallery.csv", b"patient,diagnosis\nP01,HGSC\n", r"gallery\.csv was not written by"),
        ("gallery_concept_0.png", b"my own figure", r"gallery_concept_0\.png was not written by"),
        (RECORD, b'{"my": "notes"}', r"gallery\.json is not a record captum-nmf wrote"),
        (RECORD, b"not json", r"gallery\.json is not a record captum-nmf wrote"),
    ],
)
def test_save_refuses_a_users_files(
    tmp_path: Path, attr: NMFConceptAttribution, name: str, content: bytes, match: str
) -> None:
    # before, a user's gallery.csv and gallery_concept_0.png were overwritten without a word
    out = tmp_path / "g"
    out.mkdir()
    (out / name).write_bytes(content)
    (out / "gallery_concept_7.png").write_bytes(b"another file of mine")
    before = runs.tree(out)
    with pytest.raises(FileExistsError, match=match):
        _small(attr).save(out)
    assert runs.tree(out) == before  # nothing written


def test_a_smaller_gallery_removes_only_our_unchanged_figures(
    tmp_path: Path, attr: NMFConceptAttribution
) -> None:
    out = _small(attr).save(tmp_path / "g")
    (out / "gallery_concept_9.png").write_bytes(b"a pathologist's annotated figure")
    _small(attr, 2).save(out)  # concept 2's figure is ours and unchanged: removed
    # before, the user's figure was removed too ("ours" judged from the CSV's header)
    assert (out / "gallery_concept_9.png").read_bytes() == b"a pathologist's annotated figure"
    assert sorted(p.name for p in out.iterdir()) == [
        "gallery.csv",
        RECORD,
        "gallery_concept_0.png",
        "gallery_concept_1.png",
        "gallery_concept_9.png",  # not ours: kept (before, removed)
    ]
    _small(attr).save(out)
    (out / "gallery_concept_2.png").write_bytes(b"edited by hand after the save")
    before = runs.tree(out)
    with pytest.raises(FileExistsError, match=r"gallery_concept_2\.png was edited since"):
        _small(attr, 2).save(out)  # before, the edited figure was removed
    assert runs.tree(out) == before


def test_a_gallery_an_earlier_version_saved_is_taken_over_and_nothing_removed(
    tmp_path: Path, attr: NMFConceptAttribution
) -> None:
    """A first version of the record refused such a folder: rerunning the demo (which saves
    its gallery last) into an earlier version's output folder failed after all its work."""
    out = _small(attr).save(tmp_path / "g")
    (out / RECORD).unlink()  # as an earlier captum-nmf saved it: no record
    kept = runs.tree(out)["gallery_concept_2.png"]
    (out / "notes.txt").write_text("mine")
    _small(attr, 2).save(out)  # replaced as the earlier version did
    record = json.loads((out / RECORD).read_text())
    assert sorted(record["files"]) == [
        "gallery.csv",
        "gallery_concept_0.png",
        "gallery_concept_1.png",
    ]
    assert runs.tree(out)["gallery_concept_2.png"] == kept  # not ours to prove: never removed
    assert (out / "notes.txt").read_text() == "mine"
    (out / RECORD).unlink()
    (out / "gallery.csv").write_text("patient,diagnosis\n")  # not our CSV: nothing adopted
    with pytest.raises(FileExistsError, match=r"gallery_concept_0\.png was not written by captum"):
        _small(attr, 2).save(out)


def test_save_is_all_or_nothing(
    tmp_path: Path, attr: NMFConceptAttribution, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _small(attr).save(tmp_path / "g")
    before = runs.tree(out)
    drawn = ConceptGallery.figure

    def failing(self: ConceptGallery, concept: int) -> Any:
        if concept == 2:
            raise OSError("No space left on device (simulated)")
        return drawn(self, concept)

    monkeypatch.setattr(ConceptGallery, "figure", failing)
    with pytest.raises(OSError, match="simulated"):
        _small(attr, seed=1).save(out)
    # before, figures 0 and 1 were new and figure 2 and gallery.csv old
    assert runs.tree(out) == before


# -- near repeats on slides of different resolutions


def test_slides_of_two_resolutions_are_each_judged_by_their_own_tile(
    tmp_path: Path, attr: NMFConceptAttribution
) -> None:
    from PIL import Image

    from captum_nmf.wsi import write_pyramid
    from tests.helpers.synthetic_slides import he_image

    image = he_image()[:128, :192]
    fine = np.array(Image.fromarray(image).resize((384, 256), Image.BILINEAR))
    a = write_pyramid(image, tmp_path / "a.svs", mpp=0.5)
    b = write_pyramid(fine, tmp_path / "b.svs", mpp=0.25)  # the same tissue, twice the pixels
    tiles = SlideTiles([a, b], tile_size=64, stride=16, mpp=0.5, tissue_mask=None)
    sides = {str(g.path): g.tile_size_level0 for g in tiles.grids}
    assert sorted(sides.values()) == [64, 128]
    gallery = concept_gallery(attr, tiles, top_n=6, progress=False)
    for entries in gallery.entries:
        for i, e in enumerate(entries):
            for f in entries[:i]:
                if e.slide != f.slide:
                    continue
                dx = abs(e.location[0] - f.location[0])  # type: ignore[index]
                dy = abs(e.location[1] - f.location[1])  # type: ignore[index]
                # before, slide b's tiles were judged by slide a's 64 px: 75 % overlaps
                assert max(dx, dy) >= sides[str(e.slide)] / 2


# -- a concept absent from the tiles


class _Colours(torch.nn.Module):
    """A 1 x 1 identity convolution and a ReLU: the activations are the tile's colours."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3).reshape(3, 3, 1, 1))
        self.relu = torch.nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x))


def _colour_tiles(counts: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """``counts[c]`` tiles of colour c (red, green, blue), textured, with a trace of noise."""
    g = torch.Generator().manual_seed(seed)
    tiles = []
    for colour, n in enumerate(counts):
        for _ in range(n):
            tile = 1e-5 * torch.rand(3, 8, 8, generator=g)
            tile[colour] += 0.5 + 0.5 * torch.rand(8, 8, generator=g)
            tiles.append(tile)
    return torch.stack(tiles)


@pytest.fixture(scope="module")
def colours() -> tuple[NMFConceptAttribution, list[int]]:
    """Red, green and blue concepts; the concept index of each colour."""
    net = _Colours()
    attr = NMFConceptAttribution(net, net.relu, n_concepts=3, random_state=0)
    attr.fit(_colour_tiles((10, 10, 10)), progress=False)
    return attr, [int(torch.argmax(attr.concepts_[:, c])) for c in range(3)]


def test_a_concept_absent_from_the_tiles_gets_no_tiles_and_a_warning(
    tmp_path: Path, colours: tuple[NMFConceptAttribution, list[int]]
) -> None:
    attr, index = colours
    x = _colour_tiles((10, 10, 0))  # no blue tile: blue scores about 1e-5, red and green 0.75
    blue = index[2]
    with pytest.warns(
        CaptumNMFWarning, match=rf"concept {blue} \('concept {blue}'\): 0 of 6 tiles kept"
    ):
        gallery = concept_gallery(attr, x, top_n=6, progress=False)
    assert gallery.entries[blue] == []  # before, its six least-empty tiles
    best = max(entries[0].score for entries in gallery.entries if entries)
    assert gallery.min_score == pytest.approx(MIN_SCORE_FRACTION * best)
    for j in (index[0], index[1]):
        assert len(gallery.entries[j]) == 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = concept_gallery(attr, x, top_n=6, min_score_fraction=0.0, progress=False)
    assert len(kept.entries[blue]) == 6  # every tile above 0 (about 1e-5)
    out = gallery.save(tmp_path / "g")  # the absent concept's figure says so
    assert (out / f"gallery_concept_{blue}.png").is_file()
    with (out / "gallery.csv").open() as fh:
        assert {int(r["concept"]) for r in csv.DictReader(fh)} == {index[0], index[1]}


def test_a_concept_in_fewer_tiles_than_top_n_shows_those(
    colours: tuple[NMFConceptAttribution, list[int]],
) -> None:
    attr, index = colours
    x = _colour_tiles((10, 10, 2))  # two blue tiles
    blue = index[2]
    with pytest.warns(CaptumNMFWarning, match=rf"concept {blue} .*: 2 of 6 tiles kept.*top_n=6"):
        gallery = concept_gallery(attr, x, top_n=6, progress=False)
    assert sorted(e.tile for e in gallery.entries[blue]) == [20, 21]


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ("0.1", TypeError, r"min_score_fraction must be a float in \[0, 1\), got '0.1'"),
        (True, TypeError, r"min_score_fraction must be a float"),
        (1.0, ValueError, r"min_score_fraction must be in \[0, 1\), got 1.0"),
        (-0.1, ValueError, r"min_score_fraction must be in \[0, 1\), got -0.1"),
        (float("nan"), ValueError, r"min_score_fraction must be in \[0, 1\), got nan"),
    ],
)
def test_bad_min_score_fraction(
    colours: tuple[NMFConceptAttribution, list[int]], value: Any, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        concept_gallery(
            colours[0], torch.rand(2, 3, 8, 8), min_score_fraction=value, progress=False
        )
