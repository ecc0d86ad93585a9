"""Choosing K and concept stability: planted concepts, split, determinism, bad input, real H&E."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from captum_nmf import NMFConceptAttribution
from captum_nmf.compare import selection, stability
from captum_nmf.compare.selection import (
    ConceptStability,
    KSelection,
    RowSample,
    _split,
    concept_stability,
    match_concepts,
    sample_rows,
    select_k,
    stability_from_runs,
)
from captum_nmf.exceptions import (
    CaptumNMFWarning,
    EmptyTileGridWarning,
    NotFittedError,
    NoTissueError,
)
from tests.helpers.basic_models import PlantedConceptNet, planted_maps

# Four planted non-negative concepts over C = 10 channels (fixed seed, each with its own
# dominant channel so that they are linearly independent).
_GEN = torch.Generator().manual_seed(1)
PLANTED = (torch.rand(4, 10, generator=_GEN) * (torch.rand(4, 10, generator=_GEN) < 0.5)) + (
    torch.eye(4, 10)
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny matrices: one thread (two threads thrash on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def planted() -> tuple[PlantedConceptNet, Tensor]:
    """The planted net and 40 tiles of 6 x 6 planted concept maps (rank 4 exactly)."""
    return PlantedConceptNet(PLANTED), planted_maps(40, 6, 6, k=4)


@pytest.fixture(scope="module")
def planted_result(planted: tuple[PlantedConceptNet, Tensor]) -> KSelection:
    net, x = planted
    return select_k((net, net.relu), x, ks=range(1, 6), batch_size=16, progress=False)


# ------------------------------------------------------------------- matching
def test_match_concepts_hand_checked() -> None:
    reference = np.array([[1.0, 0.0], [0.0, 1.0]])
    other = np.array([[0.0, 2.0], [1.0, 1.0]])  # a scaled copy of concept 1, then a mix
    index, cosine = match_concepts(reference, other)
    # Hungarian: ref0 -> other1 (cos 1/sqrt2), ref1 -> other0 (cos 1): 1.707 > 0 + 1/sqrt2
    assert index.tolist() == [1, 0]
    np.testing.assert_allclose(cosine, [1 / np.sqrt(2), 1.0])


def test_match_concepts_permutation_and_zero_row() -> None:
    reference = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    other = reference[[2, 0, 1]] * 3
    index, cosine = match_concepts(reference, other)
    assert index.tolist() == [1, 2, 0]
    np.testing.assert_allclose(cosine, [1.0, 1.0, 0.0])  # an all-zero concept matches nothing


def test_stability_from_runs_numbers_and_metadata() -> None:
    reference = np.eye(3)
    run_a = np.eye(3)[[1, 0, 2]]  # the same concepts, reordered
    run_b = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    stab = stability_from_runs(reference, [run_a, run_b], stable_cosine=0.9)
    cos = 1 / np.sqrt(2)
    # run_b: e0 -> row 0 (1), e1 -> row 2 (cos), e2 -> row 1 (cos) sums to 2.414, the best
    assert stab.matched_index.tolist() == [[1, 0], [0, 2], [2, 1]]
    np.testing.assert_allclose(stab.matched_cosine, [[1, 1], [1, cos], [1, cos]], atol=1e-12)
    np.testing.assert_allclose(stab.mean_cosine, [1, (1 + cos) / 2, (1 + cos) / 2])
    np.testing.assert_allclose(stab.min_cosine, [1, cos, cos])
    assert stab.stable.tolist() == [True, False, False]
    assert stab.share_stable == pytest.approx(1 / 3)
    meta = stab.to_metadata()
    assert set(meta) == {"stability"}
    assert isinstance(meta["stability"], str)
    back = ConceptStability.from_dict(json.loads(meta["stability"]))
    np.testing.assert_allclose(back.matched_cosine, stab.matched_cosine)
    assert back.stable.tolist() == stab.stable.tolist()
    assert "| 1 | 0.854 | 0.707 | no |" in stab.table().to_markdown()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"runs": []}, ValueError, "runs is empty"),
        ({"runs": [np.eye(2)]}, ValueError, r"same K x C shape, got \(3, 3\) and \(2, 2\)"),
        ({"runs": [np.eye(3)], "stable_cosine": 0.0}, ValueError, r"must be in \(0, 1\], got 0"),
        ({"runs": [np.eye(3)], "stable_cosine": "high"}, TypeError, "stable_cosine must be a"),
        ({"runs": [np.full((3, 3), np.nan)]}, ValueError, "must be finite"),
    ],
)
def test_stability_from_runs_bad_input(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        stability_from_runs(np.eye(3), **kwargs)


def test_from_dict_refuses_a_foreign_record() -> None:
    with pytest.raises(ValueError, match="not a ConceptStability record"):
        ConceptStability.from_dict({"threshold": 0.9})


# -------------------------------------------------------------- planted concepts
def test_planted_concepts_recovered_stable_and_recommended(planted_result: KSelection) -> None:
    r = planted_result
    assert r.ks == [1, 2, 3, 4, 5]
    assert r.recommended == 4
    i4 = r.ks.index(4)
    assert r.heldout_error[i4] < 1e-6  # rank 4 reconstructs held-out tiles exactly
    assert r.heldout_error[i4 - 1] > 0.01  # rank 3 does not
    assert r.stability[4].share_stable == 1.0
    assert r.stability[4].min_cosine.min() > 0.99
    _, cosine = match_concepts(r.concepts[4], PLANTED)
    assert cosine.min() > 0.999  # the planted concept vectors themselves
    assert "Recommended K = 4: the smallest K" in r.rule


def test_k_above_the_planted_rank_has_unstable_extras(planted_result: KSelection) -> None:
    stab = planted_result.stability[5]
    assert stab.share_stable < 1.0
    assert (~stab.stable).sum() >= 1
    assert planted_result.heldout_error[-1] < 1e-6  # no better fit to gain: only instability
    assert np.isnan(planted_result.gain[0])
    np.testing.assert_allclose(
        planted_result.gain[1:], -np.diff(planted_result.heldout_error), atol=1e-12
    )


def test_init_perturbation_also_flags_the_extras(planted: tuple[PlantedConceptNet, Tensor]) -> None:
    net, x = planted
    r = select_k((net, net.relu), x, ks=[4, 5], perturbation="init", progress=False)
    assert r.stability[4].share_stable == 1.0
    assert r.stability[5].share_stable < 1.0
    assert r.perturbation == "init"
    assert "random initialisation" in r.to_markdown()


def test_concept_stability_of_fitted_concepts(planted: tuple[PlantedConceptNet, Tensor]) -> None:
    net, x = planted
    attr = NMFConceptAttribution(net, net.relu, 4, random_state=0).fit(x, progress=False)
    stab = concept_stability(attr, x, n_seeds=3, progress=False)
    assert stab.matched_cosine.shape == (4, 2)
    assert stab.share_stable == 1.0
    too_many = NMFConceptAttribution(net, net.relu, 6, random_state=0).fit(x, progress=False)
    assert concept_stability(too_many, x, n_seeds=3, progress=False).share_stable < 1.0


def test_concept_stability_needs_fitted_concepts(planted: tuple[PlantedConceptNet, Tensor]) -> None:
    net, x = planted
    with pytest.raises(NotFittedError, match="before 'concept_stability'"):
        concept_stability(NMFConceptAttribution(net, net.relu, 4), x, progress=False)
    with pytest.raises(TypeError, match="attr must be a fitted NMFConceptAttribution"):
        concept_stability((net, net.relu), x)  # type: ignore[arg-type]


# ----------------------------------------------------------- sample and split
def test_sample_caps_rows_keeps_whole_tiles_and_is_seeded(
    planted: tuple[PlantedConceptNet, Tensor],
) -> None:
    net, x = planted
    kw = {"max_rows": 100, "locations_per_tile": 7, "batch_size": 6, "progress": False}
    a = sample_rows((net, net.relu), x, **kw)
    assert a.rows.shape == (98, 10)  # 14 whole tiles of 7 locations fit in 100 rows
    assert a.locations_per_tile == 7
    assert a.n_tiles_seen == 40
    assert a.n_tiles == 14
    assert np.all(np.diff(a.tiles) >= 0)  # in source order
    assert all((a.tiles == t).sum() == 7 for t in np.unique(a.tiles))
    # every kept row is a location of its own tile's activation map
    feats = torch.einsum("nkhw,kc->nchw", x, PLANTED).clamp(min=0)
    for row, t in zip(a.rows, a.tiles, strict=True):
        tile_rows = feats[t].reshape(10, -1).T
        assert torch.isclose(tile_rows, row, atol=1e-5).all(dim=1).any()
    b = sample_rows((net, net.relu), x, **kw)
    assert torch.equal(a.rows, b.rows)
    assert np.array_equal(a.tiles, b.tiles)
    c = sample_rows((net, net.relu), x, **{**kw, "random_state": 1})
    assert not np.array_equal(a.tiles, c.tiles)


def test_sample_default_quota_spreads_over_every_tile(
    planted: tuple[PlantedConceptNet, Tensor],
) -> None:
    net, x = planted
    s = sample_rows((net, net.relu), list(x.split(8)), max_rows=200, progress=False)
    assert s.locations_per_tile == 5  # ceil(200 / 40) of the 36 locations
    assert s.n_tiles == 40
    assert s.rows.shape[0] == 200


def test_split_never_puts_one_tile_on_both_sides(
    planted: tuple[PlantedConceptNet, Tensor],
) -> None:
    net, x = planted
    sample = sample_rows((net, net.relu), x, progress=False)
    for seed in range(5):
        held, unit, held_tiles, train_tiles = _split(sample, 0.3, seed)
        assert unit == "tile"
        for t in np.unique(sample.tiles):
            side = held[sample.tiles == t]
            assert side.all() or not side.any(), f"tile {t} split by location"
        assert not set(held_tiles) & set(train_tiles)
        assert len(held_tiles) == 12  # ceil(0.3 * 40) whole tiles
    r = select_k((net, net.relu), sample, ks=[2], holdout=0.3, progress=False)
    assert not set(r.heldout_tiles.tolist()) & set(r.train_tiles.tolist())
    assert r.n_heldout_rows == 36 * len(r.heldout_tiles)


def test_split_by_group_holds_out_whole_groups(
    planted: tuple[PlantedConceptNet, Tensor],
) -> None:
    net, x = planted
    groups = np.arange(40) // 8  # five "slides" of eight tiles
    sample = sample_rows((net, net.relu), x, groups=groups, progress=False)
    _held, unit, held_tiles, train_tiles = _split(sample, 0.2, 0)
    assert unit == "slide"
    assert not set(groups[held_tiles]) & set(groups[train_tiles])
    assert len(held_tiles) == 8


def test_same_seed_same_result(planted: tuple[PlantedConceptNet, Tensor]) -> None:
    net, x = planted
    a = select_k((net, net.relu), x, ks=[3, 4], max_rows=500, progress=False)
    b = select_k((net, net.relu), x, ks=[3, 4], max_rows=500, progress=False)
    np.testing.assert_array_equal(a.heldout_error, b.heldout_error)
    np.testing.assert_array_equal(a.concepts[4], b.concepts[4])
    np.testing.assert_array_equal(a.stability[3].matched_cosine, b.stability[3].matched_cosine)
    np.testing.assert_array_equal(a.heldout_tiles, b.heldout_tiles)
    c = select_k((net, net.relu), x, ks=[3, 4], max_rows=500, random_state=3, progress=False)
    assert not np.array_equal(a.heldout_tiles, c.heldout_tiles)


# ------------------------------------------------------------------- outputs
def test_outputs_markdown_csv_json_figure_and_save(
    planted_result: KSelection, tmp_path: Path
) -> None:
    r = planted_result
    md = r.to_markdown()
    assert "**Rule.** Recommended K = 4" in md
    assert "held out by tile" in md
    assert r.to_csv().splitlines()[0].startswith("K,held-out error,gain,train error")
    assert len(r.to_csv().splitlines()) == 1 + len(r.ks)
    data = json.loads(r.to_json())
    assert data["recommended"] == 4
    assert data["gain"][0] is None
    assert data["stability"]["5"]["share_stable"] == r.stability[5].share_stable
    fig = r.figure_data()
    assert fig["ks"].tolist() == r.ks
    assert [len(u) for u in fig["unstable"]] == r.ks
    assert fig["unstable"][-1].any()
    assert not fig["unstable"][3].any()
    out = r.save(tmp_path / "sk")
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "select_k.csv",
        "select_k.json",
        "select_k.md",
        "select_k_concepts.csv",
        "select_k_concepts.safetensors",
    ]
    assert json.loads((out / "select_k.json").read_text())["ks"] == r.ks
    assert (out / "select_k_concepts.csv").read_text().count("\n") == 1 + sum(r.ks)


def test_a_saved_sweep_loads_whole_and_refuses_changed_files(
    planted_result: KSelection, tmp_path: Path
) -> None:
    """A sweep could be saved but not read back: a notebook had to run select_k again to
    plot or compare it, and the concepts of each K were not saved at all."""
    r = planted_result
    out = r.save(tmp_path / "sk", figure=b"png")
    back = KSelection.load(out)
    assert back.to_dict() == r.to_dict()
    assert back.to_markdown() == r.to_markdown()
    assert sorted(back.concepts) == r.ks
    for k in r.ks:
        assert back.concepts[k].dtype == np.float32
        np.testing.assert_array_equal(back.concepts[k], r.concepts[k])
        assert back.stability[k].reference == r.stability[k].reference is not None
    fig, again = back.figure_data(), r.figure_data()
    for key in ("ks", "heldout_error", "train_error", "gain", "share_stable"):
        np.testing.assert_array_equal(fig[key], again[key])
    assert KSelection.load(out / "select_k.json").recommended == r.recommended == 4
    again_out = back.save(tmp_path / "again")  # what was loaded saves the same sweep
    for name in ("select_k.csv", "select_k_concepts.csv", "select_k.md"):
        assert (again_out / name).read_bytes() == (out / name).read_bytes()
    for k in r.ks:
        np.testing.assert_array_equal(KSelection.load(again_out).concepts[k], r.concepts[k])

    concepts = out / "select_k_concepts.safetensors"
    blob = bytearray(concepts.read_bytes())
    blob[-3] ^= 0x01  # one bit of one concept
    concepts.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=r"select_k_concepts\.safetensors changed since"):
        KSelection.load(out)
    concepts.unlink()
    with pytest.raises(FileNotFoundError, match=r"select_k_concepts\.safetensors is listed"):
        KSelection.load(out)
    with pytest.raises(FileNotFoundError, match=r"no select_k\.json in .*select-k --out"):
        KSelection.load(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "select_k.json").write_text('{"ks": [2, 3]}')
    with pytest.raises(ValueError, match=r"not a select_k record captum-nmf can read"):
        KSelection.load(tmp_path / "bad")

    older = tmp_path / "older"  # a record written before the concepts were saved
    r.save(older)
    record = json.loads((older / "select_k.json").read_text())
    del record["files"]["select_k_concepts.safetensors"]
    (older / "select_k.json").write_text(json.dumps(record))
    (older / "select_k_concepts.safetensors").unlink()
    loaded = KSelection.load(older)
    assert loaded.concepts == {}
    assert "were not saved with this record" in loaded.notes[-1]
    assert loaded.to_dict()["ks"] == r.ks


def test_saving_again_replaces_only_its_own_files(
    planted_result: KSelection, tmp_path: Path
) -> None:
    """Before: a user's select_k.md or select_k.png in the folder was replaced without a word."""
    r, out = planted_result, tmp_path / "sk"
    r.save(out, figure=b"png one")
    r.save(out, figure=b"png two")  # ours: replaced
    assert (out / "select_k.png").read_bytes() == b"png two"
    assert set(json.loads((out / "select_k.json").read_text())["files"]) == {
        "select_k.csv",
        "select_k_concepts.csv",
        "select_k_concepts.safetensors",
        "select_k.md",
        "select_k.png",
    }
    r.save(out)  # a sweep without a figure: the last one's is removed, not left beside it
    assert not (out / "select_k.png").exists()
    (out / "select_k.md").write_text("my notes")  # edited since: never replaced
    with pytest.raises(FileExistsError, match=r"select_k\.md was edited since captum-nmf wrote"):
        r.save(out)
    assert (out / "select_k.md").read_text() == "my notes"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "select_k.png").write_bytes(b"a user's figure")
    with pytest.raises(FileExistsError, match=r"select_k\.png was not written by captum-nmf"):
        r.save(theirs, figure=b"png")
    assert sorted(p.name for p in theirs.iterdir()) == ["select_k.png"]  # nothing written
    legacy = tmp_path / "legacy"  # written before the file list: a png there may be the user's
    r.save(legacy)
    record = json.loads((legacy / "select_k.json").read_text())
    del record["files"]
    (legacy / "select_k.json").write_text(json.dumps(record))
    (legacy / "select_k_concepts.safetensors").unlink()  # not written before the file list
    (legacy / "select_k.png").write_bytes(b"a user's figure")
    r.save(legacy)  # no figure now: the png is not listed with a digest, so it is kept
    assert (legacy / "select_k.png").read_bytes() == b"a user's figure"
    (theirs / "select_k.json").write_text("[1, 2]")
    with pytest.raises(FileExistsError, match=r"select_k\.json is not a record captum-nmf wrote"):
        r.save(theirs)


# ---------------------------------------------------------------- bad input
def _never_twice(x: Tensor) -> Iterator[Tensor]:
    yield x[:8]
    raise AssertionError("the K > C check must come after the first batch, before the rest")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"ks": []}, ValueError, r"ks is empty; pass at least one K"),
        ({"ks": range(5, 2)}, ValueError, r"ks is empty"),
        ({"ks": [0, 2]}, ValueError, r"ks must be >= 1, got 0"),
        ({"ks": [-1]}, ValueError, r"ks must be >= 1, got -1"),
        ({"ks": 4}, TypeError, r"ks must be an iterable of ints"),
        ({"ks": [2.5]}, TypeError, r"ks must be an int"),
        ({"holdout": 0.0}, ValueError, r"holdout must be in \(0, 1\), got 0.0"),
        ({"holdout": 1.0}, ValueError, r"holdout must be in \(0, 1\), got 1.0"),
        ({"holdout": -0.2}, ValueError, r"holdout must be in \(0, 1\)"),
        ({"holdout": "20%"}, TypeError, r"holdout must be a float"),
        ({"n_seeds": 1}, ValueError, r"n_seeds must be >= 2"),
        ({"gain_threshold": -0.1}, ValueError, r"gain_threshold must be >= 0"),
        ({"stable_cosine": 1.5}, ValueError, r"stable_cosine must be in \(0, 1\], got 1.5"),
        ({"perturbation": "bootstrap"}, ValueError, r"perturbation must be one of"),
        ({"max_rows": 0}, ValueError, r"max_rows must be >= 1"),
        ({"locations_per_tile": 0}, ValueError, r"locations_per_tile must be >= 1"),
        ({"groups": [0, 1]}, ValueError, r"groups has 2 entries but the source has more"),
        ({"groups": list(range(50))}, ValueError, r"groups has 50 entries but the source has 40"),
    ],
)
def test_select_k_bad_input(
    planted: tuple[PlantedConceptNet, Tensor], kwargs: dict, error: type, match: str
) -> None:
    net, x = planted
    with pytest.raises(error, match=match):
        select_k((net, net.relu), x, **{"ks": [2], "progress": False, **kwargs})


def test_k_larger_than_channels_fails_after_the_first_batch(
    planted: tuple[PlantedConceptNet, Tensor],
) -> None:
    net, x = planted
    with pytest.raises(ValueError, match=r"K=11 but layer 'relu' has 10 channels; choose every"):
        select_k((net, net.relu), _never_twice(x), ks=[2, 11], progress=False)
    sample = sample_rows((net, net.relu), x, progress=False)
    with pytest.raises(ValueError, match=r"K=12 but the sample has 10 channels"):
        select_k((net, net.relu), sample, ks=[12], progress=False)


def test_empty_or_too_small_sources(planted: tuple[PlantedConceptNet, Tensor]) -> None:
    net, x = planted
    with pytest.raises(ValueError, match="source holds no tiles"):
        select_k((net, net.relu), x[:0], progress=False)
    with pytest.raises(ValueError, match="source holds no tiles"):
        select_k((net, net.relu), [], progress=False)
    with pytest.raises(ValueError, match="source holds no tiles"):
        select_k((net, net.relu), iter([x[:0]]), progress=False)
    with pytest.raises(ValueError, match=r"needs at least 3 tiles \(1 held out, 2 to train on\)"):
        select_k((net, net.relu), x[:1], ks=[2], progress=False)
    with pytest.raises(ValueError, match="only 9 training rows; raise max_rows"):
        select_k((net, net.relu), x[:4], ks=[10], locations_per_tile=3, progress=False)
    with pytest.raises(TypeError, match=r"attr must be an NMFConceptAttribution or a \(model"):
        select_k(net, x, progress=False)  # type: ignore[arg-type]


def test_row_sample_passes_through(planted: tuple[PlantedConceptNet, Tensor]) -> None:
    net, x = planted
    sample = sample_rows((net, net.relu), x, progress=False)
    assert isinstance(sample, RowSample)
    r = select_k((net, net.relu), sample, ks=[4], progress=False)
    assert r.n_train_rows + r.n_heldout_rows == sample.rows.shape[0]
    assert r.sample_seconds == sample.seconds


# ---------------------------------------------------------------- slides
def test_slides_split_by_slide_and_blank_slides_named(tmp_path: Path) -> None:
    pytest.importorskip("openslide")
    from captum_nmf.wsi import SlideTiles
    from tests.helpers.synthetic_slides import blank_slide, tissue_on_white
    from tests.helpers.wsi_models import PoolNet

    net = PoolNet()
    a = tissue_on_white(tmp_path / "a.svs", (448, 384), (0, 0, 448, 384))
    b = tissue_on_white(tmp_path / "b.svs", (448, 384), (0, 0, 448, 384))
    blank = blank_slide(tmp_path / "blank.svs", (256, 256))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmptyTileGridWarning)
        tiles = SlideTiles([a, b, blank], tile_size=64, stride=64)
        only_blank = SlideTiles([blank], tile_size=64, stride=64)
    r = select_k((net, net.relu), tiles, ks=[2, 3], holdout=0.3, n_seeds=2, progress=False)
    assert r.split_by == "slide"
    slides = {tiles.locate(int(i))[0] for i in r.heldout_tiles}
    assert len(slides) == 1
    assert slides.isdisjoint({tiles.locate(int(i))[0] for i in r.train_tiles})
    assert any("blank.svs" in note for note in r.notes)
    with pytest.raises(NoTissueError, match=r"No tile of blank\.svs has enough tissue"):
        select_k((net, net.relu), only_blank, ks=[2], progress=False)
    with pytest.raises(NoTissueError, match=r"blank\.svs"):
        select_k((net, net.relu), only_blank.loader(batch_size=4), ks=[2], progress=False)


# ---------------------------------------------------------------- real data
def test_real_he_with_lite0(lite0: torch.nn.Module, he_tiles: Tensor) -> None:
    from captum_nmf.zoo import normalize

    x = normalize(he_tiles)  # 8 real 224 px H&E tiles: 392 rows of 1280 channels
    start = time.perf_counter()
    r = select_k((lite0, lite0.head_relu), x, ks=[2, 3, 4], n_seeds=3, progress=False)
    elapsed = time.perf_counter() - start
    assert r.n_channels == 1280
    assert r.layer_name == "head_relu"
    assert r.n_train_rows + r.n_heldout_rows == 8 * 49
    assert len(r.heldout_tiles) == 2  # ceil(0.2 * 8) whole tiles
    assert np.all((r.heldout_error > 0) & (r.heldout_error < 1))
    assert np.all(r.train_error < r.heldout_error)  # fitted rows are reconstructed better
    assert r.heldout_error[-1] < r.heldout_error[0]
    assert r.recommended in (2, 3, 4, None)
    assert r.concepts[4].shape == (4, 1280)
    assert all(r.stability[k].matched_cosine.shape == (k, 2) for k in r.ks)
    assert elapsed < 60


# ------------------------------------------- review of 2026-12-07 (third session)
def test_resample_shares_with_fewer_rows_than_k_are_refused_before_any_fit(
    planted: tuple[PlantedConceptNet, Tensor],
) -> None:
    # before: such a share fell back to every training row, which with the deterministic
    # initialisation repeated the reference fit and called pure noise "stable" (cosine 1.0)
    net, x = planted
    rows = torch.rand(10, 10, generator=torch.Generator().manual_seed(0))
    sample = RowSample(
        rows=rows,
        tiles=np.arange(10, dtype=np.int64),
        groups=np.full(10, -1, np.int64),
        n_tiles_seen=10,
        locations_per_tile=1,
    )
    with pytest.raises(ValueError, match=r"gets 4 rows, fewer than K = 6\. .*perturbation='init'"):
        select_k((net, net.relu), sample, ks=[3, 6], progress=False)
    attr = NMFConceptAttribution(net, net.relu, n_concepts=6, random_state=0)
    attr.fit(x, progress=False)
    with pytest.raises(ValueError, match=r"rows, fewer than K = 6"):
        concept_stability(attr, sample, progress=False)
    init = select_k((net, net.relu), sample, ks=[3, 6], perturbation="init", progress=False)
    assert init.ks == [3, 6]


def test_a_tile_never_exceeds_max_rows_on_its_own(
    planted: tuple[PlantedConceptNet, Tensor],
) -> None:
    net, x = planted  # 36 locations per tile
    batches = (x[i : i + 8] for i in range(0, 40, 8))  # a generator: the tile count is unknown
    sample = sample_rows((net, net.relu), batches, max_rows=30, progress=False)
    assert sample.rows.shape[0] == 30  # was 0 rows: every tile's 36 locations exceeded 30
    assert sample.locations_per_tile == 30
    with pytest.raises(ValueError, match=r"locations_per_tile=40 is more than max_rows=30"):
        sample_rows((net, net.relu), x, max_rows=30, locations_per_tile=40, progress=False)
    with pytest.raises(ValueError, match=r"1 tile \(of 40 seen, 30 locations each\).*smaller "):
        select_k((net, net.relu), iter([x]), ks=[2], max_rows=30, progress=False)


# ------------------------------------------- review of choosing K (fourth session)
def _rows(
    n_tiles: int, per_tile: int = 3, groups: list[int] | None = None, seed: int = 0
) -> RowSample:
    """A hand-made sample: ``per_tile`` random rows (C = 10) of each of ``n_tiles`` tiles."""
    tiles = np.repeat(np.arange(n_tiles, dtype=np.int64), per_tile)
    g = np.full(n_tiles, -1) if groups is None else np.asarray(groups)
    return RowSample(
        rows=torch.rand(len(tiles), 10, generator=torch.Generator().manual_seed(seed)),
        tiles=tiles,
        groups=np.repeat(g, per_tile).astype(np.int64),
        n_tiles_seen=n_tiles,
        locations_per_tile=per_tile,
    )


def _no_fit(*args: object, **kwargs: object) -> None:
    raise AssertionError("refused input must be refused before any NMF fit")


def test_resample_of_a_single_tile_is_refused_before_any_fit(
    planted: tuple[PlantedConceptNet, Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    # before: the "half" of one tile was the whole tile, so every reseeded fit repeated the
    # reference fit and every concept, even of pure noise, had cosine 1.0 ("stable")
    net, x = planted
    attr = NMFConceptAttribution(net, net.relu, 4, random_state=0).fit(x[:1], progress=False)
    init = concept_stability(attr, x[:1], n_seeds=2, perturbation="init", progress=False)
    assert init.matched_cosine.shape == (4, 1)  # another start on the same tile: still allowed
    monkeypatch.setattr(stability, "_solver", _no_fit)
    with pytest.raises(
        ValueError, match=r"perturbation='resample' .* only 1 tile .*perturbation='init'"
    ):
        concept_stability(attr, x[:1], progress=False)
    # select_k: the split now leaves at least 2 training tiles, so 2 tiles are refused there
    monkeypatch.setattr(selection, "_solver", _no_fit)
    for perturbation in ("resample", "init"):
        with pytest.raises(ValueError, match=r"2 tiles \(of 2 seen.*needs at least 3 tiles"):
            select_k((net, net.relu), x[:2], ks=[2], perturbation=perturbation, progress=False)


def test_slide_split_holds_out_the_slides_closest_to_holdout() -> None:
    # before: the first slide of the seeded order was held out even when it alone far
    # overshot holdout: a 48-tile slide held out, a 1-tile slide the whole training set
    sample = _rows(49, groups=[0] * 48 + [1])
    for seed in range(6):
        held, unit, held_tiles, train_tiles = _split(sample, 0.2, seed)
        assert unit == "slide"
        assert held_tiles.tolist() == [48]  # 1 tile (|1 - 10| < |48 - 10|)
        assert len(train_tiles) == 48
        assert held.sum() == 3
    # closest, not greedy: slides of 6, 5 and 5 tiles, ceil(0.6 x 16) = 10 -> the two 5s
    three = _rows(16, groups=[0] * 6 + [1] * 5 + [2] * 5)
    for seed in range(6):
        _held, _unit, held_tiles, _train = _split(three, 0.6, seed)
        assert held_tiles.tolist() == list(range(6, 16))
    # never fewer than 2 training tiles: a 1-tile slide is all there is to hold out
    small = _rows(3, groups=[0, 0, 1])
    for holdout in (0.2, 0.9):
        _held, _unit, held_tiles, train_tiles = _split(small, holdout, 0)
        assert (held_tiles.tolist(), train_tiles.tolist()) == ([2], [0, 1])
    with pytest.raises(ValueError, match=r"2 tiles \(of 2 seen.*needs at least 3 tiles"):
        _split(_rows(2, groups=[0, 1]), 0.5, 0)
    # never more than half of the tiles: a 50-tile slide beside three of 1 tile was "closest"
    # to ceil(0.5 x 53) = 27 (|50 - 27| < |3 - 27|), and 3 tiles trained
    uneven = _rows(53, groups=[0] * 50 + [1, 2, 3])
    for seed in range(6):
        _held, _unit, held_tiles, train_tiles = _split(uneven, 0.5, seed)
        assert (held_tiles.tolist(), len(train_tiles)) == ([50, 51, 52], 50)


def test_many_single_tiles_split_without_quadratic_memory() -> None:
    from captum_nmf.compare.selection import _closest_sum

    # one n-bit set per tile was ~5 GB at 200,000 tiles; single tiles need none
    assert _closest_sum([1] * 200_000, 40_000, 199_998) == list(range(40_000))


def test_split_keeps_the_seeded_order_for_tiles_and_equal_slides() -> None:
    # units of one tile: the first ceil(holdout x tiles) tiles of the seeded order, as before
    sample = _rows(40)
    for seed in range(4):
        _held, _unit, held_tiles, _train = _split(sample, 0.3, seed)
        first = np.random.default_rng(seed).permutation(np.arange(40))[:12]
        assert held_tiles.tolist() == sorted(first.tolist())
    # equal slides: the first slides of the seeded order (3 x 8 = 24 is closest to 0.6 x 40)
    slides = _rows(40, groups=list(np.arange(40) // 8))
    for seed in range(4):
        _held, _unit, held_tiles, _train = _split(slides, 0.6, seed)
        first = np.random.default_rng(seed).permutation(np.arange(5))[:3]
        assert sorted(set((held_tiles // 8).tolist())) == sorted(first.tolist())


@pytest.mark.parametrize("side", ["held-out", "training"])
def test_blank_tiles_on_one_side_are_refused_before_any_fit(
    planted: tuple[PlantedConceptNet, Tensor], monkeypatch: pytest.MonkeyPatch, side: str
) -> None:
    # before: blank held-out tiles gave a held-out error of 0 for every K, so K = 1 was
    # recommended; blank training tiles gave zero concepts and a sweep of nothing
    net, _ = planted
    sample = _rows(20)
    held, _, held_tiles, train_tiles = _split(sample, 0.2, 0)
    blank = held if side == "held-out" else ~held
    sample.rows[torch.from_numpy(blank)] = 0.0
    n = len(held_tiles) if side == "held-out" else len(train_tiles)
    monkeypatch.setattr(selection, "_solver", _no_fit)
    with pytest.raises(
        ValueError,
        match=rf"the {n} {side} tiles .*random_state=0\) have only zero activations .*glass",
    ):
        select_k((net, net.relu), sample, ks=[1, 2], progress=False)


def _untouched() -> Iterator[Tensor]:
    raise AssertionError("a bad argument must be refused before the source is streamed")
    yield  # a generator


@pytest.mark.parametrize("value", [1.5, 0.0, float("nan")])
def test_stable_cosine_is_checked_before_streaming(
    planted: tuple[PlantedConceptNet, Tensor], value: float
) -> None:
    # before: concept_stability streamed every batch and ran every refit, then said
    # "must be in (0, 1)" although 1.0 is accepted
    net, x = planted
    attr = NMFConceptAttribution(net, net.relu, 4, random_state=0).fit(x, progress=False)
    match = r"stable_cosine must be in \(0, 1\], got"
    with pytest.raises(ValueError, match=match):
        concept_stability(attr, _untouched(), stable_cosine=value, progress=False)
    with pytest.raises(ValueError, match=match):
        select_k((net, net.relu), _untouched(), stable_cosine=value, progress=False)
    with pytest.raises(ValueError, match=match):
        stability_from_runs(np.eye(3), [np.eye(3)], stable_cosine=value)


def test_stable_cosine_one_accepts_concepts_found_again_exactly() -> None:
    # before: identical float64 concepts matched at 1 - 1.1e-16 and were called unstable
    a = np.random.default_rng(0).random((6, 1280))
    stab = stability_from_runs(a, [a.copy(), a[::-1].copy()], stable_cosine=1.0)
    assert (stab.min_cosine < 1.0).any()  # the rounding this is about
    assert stab.stable.all()
    assert stab.threshold == 1.0
    off = stability_from_runs(a, [a + 1e-3 * np.eye(6, 1280)], stable_cosine=1.0)
    assert not off.stable.any()  # the tolerance (1e-9) is rounding, not a real difference


def test_tiles_held_out_of_overlapping_tiles_are_warned_about(tmp_path: Path) -> None:
    """At stride = tile / 2 every held-out tile shared half its pixels with training tiles
    (the command line's default stride, and the tutorial's), without a word."""
    pytest.importorskip("openslide")
    from captum_nmf.wsi import SlideTiles
    from tests.helpers.synthetic_slides import tissue_on_white
    from tests.helpers.wsi_models import PoolNet

    net = PoolNet()
    a = tissue_on_white(tmp_path / "a.svs", (448, 384), (0, 0, 448, 384))
    b = tissue_on_white(tmp_path / "b.svs", (448, 384), (0, 0, 448, 384))
    kwargs: dict = {"ks": [2], "n_seeds": 2, "progress": False}
    with pytest.warns(CaptumNMFWarning, match=r"overlap \(stride=32 < tile_size=64 on a\.svs\)"):
        select_k((net, net.relu), SlideTiles(a, tile_size=64, stride=32), **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overlap, or whole slides held out: nothing to say
        select_k((net, net.relu), SlideTiles(a, tile_size=64, stride=64), **kwargs)
        select_k((net, net.relu), SlideTiles([a, b], tile_size=64, stride=32), **kwargs)
