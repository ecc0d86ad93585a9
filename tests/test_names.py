"""Concept names: set, validated, saved with the concepts, used by exports and the command line."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from captum_nmf import NMFConceptAttribution
from captum_nmf._core.names import rename_concept_file
from captum_nmf.exceptions import NotFittedError
from captum_nmf.export import to_geojson
from captum_nmf.wsi import explain_slide
from tests.helpers import runs
from tests.helpers.wsi_models import PoolNet


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return runs.he_slide(tmp_path_factory.mktemp("names"))


@pytest.fixture(scope="module")
def fitted(slide: Path) -> NMFConceptAttribution:
    return runs.pool_concepts(slide)


@pytest.fixture
def attr(fitted: NMFConceptAttribution) -> NMFConceptAttribution:
    return copy.deepcopy(fitted)  # each test renames its own copy


def test_default_names_rename_and_round_trip(tmp_path: Path, attr: NMFConceptAttribution) -> None:
    assert attr.concept_names == ["concept 0", "concept 1", "concept 2"]
    assert attr.rename({2: " tumour epithelium "}) is attr
    assert attr.concept_names == ["concept 0", "concept 1", "tumour epithelium"]
    attr.concept_names = ["stroma", "lymphocytes", "tumour epithelium"]
    path = attr.save(tmp_path / "c.safetensors")
    net = PoolNet().eval()
    again = NMFConceptAttribution.load(path, net, net.relu)
    assert again.concept_names == ["stroma", "lymphocytes", "tumour epithelium"]
    attr.fit(torch.rand(2, 3, 64, 64), progress=False)  # new concepts: default names again
    assert attr.concept_names[0] == "concept 0"


@pytest.mark.parametrize(
    ("mapping", "error", "match"),
    [
        ({3: "x"}, IndexError, r"no concept 3: the concepts are numbered 0 to 2"),
        ({-1: "x"}, IndexError, "no concept -1"),
        ({0: "  "}, ValueError, "concept name 0 is empty"),
        ({0: "a\nb"}, ValueError, "control character"),
        ({0: "x" * 65}, ValueError, "65 characters long; at most 64"),
        ({0: "kept"}, ValueError, r"unique: 'kept' names concepts 0 and 1"),
        ({"0": "x"}, TypeError, "indices must be ints"),
    ],
)
def test_bad_names_change_nothing(
    tmp_path: Path,
    attr: NMFConceptAttribution,
    mapping: dict,
    error: type[Exception],
    match: str,
) -> None:
    attr.rename({1: "kept"})
    with pytest.raises(error, match=match):
        attr.rename(mapping)
    assert attr.concept_names == ["concept 0", "kept", "concept 2"]
    path = attr.save(tmp_path / "c.safetensors")
    before = path.read_bytes()
    with pytest.raises(error, match=match):
        rename_concept_file(path, mapping)
    assert path.read_bytes() == before  # the file is left exactly as it was


def test_names_need_fitted_concepts() -> None:
    net = PoolNet()
    with pytest.raises(NotFittedError, match="not fitted"):
        _ = NMFConceptAttribution(net, net.relu, 3).concept_names


def test_older_files_without_names_load(tmp_path: Path, attr: NMFConceptAttribution) -> None:
    path = attr.save(tmp_path / "c.safetensors")  # default names are not written
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert "concept_names" not in f.metadata()
    net = PoolNet().eval()
    assert NMFConceptAttribution.load(path, net, net.relu).concept_names[1] == "concept 1"


def test_names_reach_the_explanation_and_the_qupath_classes(
    slide: Path, attr: NMFConceptAttribution
) -> None:
    attr.rename({0: "stroma", 2: "tumour epithelium"})
    ex = explain_slide(attr, slide, tile_size=64, stride=32, tissue_mask=None, progress=False)
    assert ex.config["concept_names"] == ["stroma", "concept 1", "tumour epithelium"]
    classes = {f["properties"]["classification"]["name"] for f in to_geojson(ex)["features"]}
    assert classes <= {"stroma", "concept 1", "tumour epithelium"}
    assert "stroma" in classes or "tumour epithelium" in classes


def test_name_command(
    tmp_path: Path, attr: NMFConceptAttribution, capsys: pytest.CaptureFixture[str]
) -> None:
    from captum_nmf import cli

    path = attr.save(tmp_path / "c.safetensors")
    assert cli.main(["name", str(path), "2=tumour epithelium", "0=stroma"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "0: stroma",
        "1: concept 1",
        "2: tumour epithelium",
    ]
    net = PoolNet().eval()
    assert NMFConceptAttribution.load(path, net, net.relu).concept_names[2] == "tumour epithelium"
    before = path.read_bytes()
    assert cli.main(["name", str(path), "5=x"]) == 1
    assert "no concept 5" in capsys.readouterr().err
    assert cli.main(["name", str(path), "stroma"]) == 1
    assert "is not INDEX=NAME" in capsys.readouterr().err
    assert cli.main(["name", str(path), "1=a", "1=b"]) == 1  # was: "b", silently
    assert "concept 1 is named twice (1='a' and '1=b'); give each concept one" in (
        capsys.readouterr().err
    )
    assert cli.main(["name", str(path), "\u0661=x"]) == 1  # an Arabic-Indic 1 was concept 1
    assert "is not INDEX=NAME" in capsys.readouterr().err
    assert path.read_bytes() == before
    assert cli.main(["name", str(path)]) == 0
    assert json.dumps(capsys.readouterr().out.splitlines()[0]) == '"0: stroma"'


def test_stability_is_stored_with_the_concepts(
    tmp_path: Path, attr: NMFConceptAttribution, slide: Path
) -> None:
    from captum_nmf.compare.stability import ConceptStability, concept_stability
    from captum_nmf.wsi import SlideTiles

    assert attr.stability_ is None
    assert ConceptStability.of(attr) is None
    tiles = SlideTiles(slide, tile_size=64, stride=32, tissue_mask=None)
    result = concept_stability(attr, tiles, n_seeds=3, progress=False)
    assert result.attach(attr) is attr
    path = attr.save(tmp_path / "c.safetensors")
    net = PoolNet().eval()
    again = ConceptStability.of(NMFConceptAttribution.load(path, net, net.relu))
    assert again is not None
    np.testing.assert_array_equal(again.matched_cosine, result.matched_cosine)
    np.testing.assert_array_equal(again.stable, result.stable)
    other = NMFConceptAttribution(net, net.relu, 2, random_state=0).fit(
        torch.rand(2, 3, 64, 64), progress=False
    )
    with pytest.raises(ValueError, match="stability is of 3 concepts, attr has 2"):
        result.attach(other)
    attr.fit(torch.rand(2, 3, 64, 64), progress=False)
    assert attr.stability_ is None  # new concepts: the old record no longer applies
    # nor can it be attached again: it was measured on the concepts before the refit (it
    # checked only K, so the old stable / unstable marks labelled the new concepts)
    assert again.reference == result.reference is not None
    with pytest.raises(ValueError, match="measured on other concepts than attr's"):
        result.attach(attr)
    legacy = ConceptStability.from_dict(
        {k: v for k, v in result.to_dict().items() if k != "reference_sha256"}
    )
    assert legacy.attach(attr) is attr  # records made before the digest: K is all there is


def test_legends_show_names_and_mark_unstable_concepts(attr: NMFConceptAttribution) -> None:
    from captum_nmf.viz import concept_labels

    attr.rename({0: "stroma"})
    assert concept_labels(attr) == ["stroma", "concept 1", "concept 2"]
    attr.stability_ = {
        "threshold": 0.9,
        "matched_cosine": [[0.99, 0.95], [0.5, 0.97], [0.92, 0.91]],
        "matched_index": [[0, 0], [1, 2], [2, 1]],
    }
    assert concept_labels(attr) == ["stroma", "concept 1 (unstable)", "concept 2"]


def test_analysis_tables_use_the_names(slide: Path, attr: NMFConceptAttribution) -> None:
    from captum_nmf.compare import analyse
    from captum_nmf.wsi import SlideTiles

    attr.rename({0: "stroma", 2: "tumour epithelium"})
    tiles = SlideTiles(slide, tile_size=64, stride=32, tissue_mask=None)
    x = torch.stack([tiles[i][0] for i in range(24)])
    result = analyse(attr, x, target=1, progress=False)
    for name, table in result.tables().items():
        text = table.to_markdown()
        assert "concept 0" not in text, name
        assert "stroma" in text, name
    assert result.similarity.table.columns[1:] == ["stroma", "concept 1", "tumour epithelium"]


def test_an_empty_renaming_only_reads(tmp_path: Path, attr: NMFConceptAttribution) -> None:
    path = attr.rename({1: "lymphocytes"}).save(tmp_path / "c.safetensors")
    before, mtime = path.read_bytes(), path.stat().st_mtime_ns
    assert rename_concept_file(path, {}) == ["concept 0", "lymphocytes", "concept 2"]
    assert path.read_bytes() == before
    assert path.stat().st_mtime_ns == mtime


def test_names_that_look_the_same_are_one_name(attr: NMFConceptAttribution) -> None:
    """Composed and decomposed accents, a no-break space, a ligature: each pair looked the same
    in legends and QuPath, and was accepted as two names."""
    composed, decomposed = "\u00e9pith\u00e9lium", "e\u0301pithe\u0301lium"
    with pytest.raises(ValueError, match="unique: '\u00e9pith\u00e9lium' names concepts 0 and 1"):
        attr.concept_names = [composed, decomposed, "x"]
    with pytest.raises(ValueError, match="which look the same, names concepts 0 and 2"):
        attr.concept_names = ["fibrosis", "y", "\ufb01brosis"]
    attr.concept_names = [decomposed, "tumour\u00a0epithelium", "x"]
    assert attr.concept_names[:2] == [composed, "tumour epithelium"]  # one spelling each
    with pytest.raises(ValueError, match="holds only combining marks"):
        attr.concept_names = ["\u0301", "y", "x"]
    attr.rename({np.int64(2): "stroma"})  # a NumPy index, as from np.argmax
    assert attr.concept_names[2] == "stroma"


def test_files_of_earlier_versions_load_and_can_be_renamed(
    tmp_path: Path, attr: NMFConceptAttribution
) -> None:
    """Names an earlier version saved (a combining accent alone; a ligature beside its
    letters) made the file unloadable and unrenamable once the look-alike rules came."""
    from captum_nmf.io import load_tensors, save_tensors

    path = attr.save(tmp_path / "c.safetensors")
    tensors, meta = load_tensors(path, required=("concepts",))
    meta = {k: v for k, v in meta.items() if k not in ("content_sha256", "integrity")}
    meta["concept_names"] = json.dumps(["\u0301", "\ufb01brosis", "fibrosis"])
    save_tensors(path, tensors, meta)  # as an earlier version wrote it
    net = PoolNet().eval()
    assert NMFConceptAttribution.load(path, net, net.relu).concept_names[1] == "\ufb01brosis"
    with pytest.raises(ValueError, match="which look the same, names concepts 1 and 2"):
        rename_concept_file(path, {0: "stroma"})  # the pair the file holds is named
    assert rename_concept_file(path, {1: "fibrosis, dense"}) == [
        "\u0301",
        "fibrosis, dense",
        "fibrosis",
    ]
    assert rename_concept_file(path, {0: "stroma"})[0] == "stroma"


@pytest.mark.parametrize(
    ("a", "b"),
    [("x\u00b2", "x2"), ("CD4\u207a", "CD4+"), ("\u24b6", "A"), ("H\u2082O", "H2O")],
)
def test_superscripts_subscripts_and_circled_letters_are_other_names(
    attr: NMFConceptAttribution, a: str, b: str
) -> None:
    attr.concept_names = [a, b, "x"]  # they look different: NFKC alone made them duplicates
    assert attr.concept_names[:2] == [a, b]
