"""The analyses: hand-checked structure, surrogate and CAM agreement; CAMs vs Captum, grad-cam."""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from captum.attr import LayerGradientXActivation
from captum.testing.helpers.basic_models import BasicModel_ConvNet_One_Conv
from torch import nn

from captum_nmf import NMFConceptAttribution
from captum_nmf.compare import (
    Table,
    analyse,
    cam_agreement,
    cam_maps,
    concept_similarity,
    sample_tiles,
    surrogate_features,
    surrogate_report,
    weight_correlation,
)
from captum_nmf.compare import tables as compare_tables
from captum_nmf.exceptions import CamScaleWarning, NotFittedError

# ----------------------------------------------------------------------- CAMs
CAPTUM_INPUT = torch.arange(16).view(1, 1, 4, 4).float()


def test_gradcam_by_hand_on_captums_one_conv_model() -> None:
    # conv1 (pre-ReLU) = window sums [45, 54, 81, 90] - bias: ch0 [-5, 4, 31, 40],
    # ch1 [-30, -21, 6, 15]; d out0 / d conv1 = [0, 1, 1, 1] and [0, 0, -1, -1];
    # GradCAM weights 0.75 and -0.5 -> [11.25, 13.5, 20.25, 22.5] (Captum's own test value).
    net = BasicModel_ConvNet_One_Conv()
    cam = cam_maps(net, net.conv1, CAPTUM_INPUT, "gradcam", target=0)
    torch.testing.assert_close(cam, torch.tensor([[[11.25, 13.5], [20.25, 22.5]]]))
    # HiResCAM = sum_c grad * activation = [0, 4, 31 - 6, 40 - 15]
    hires = cam_maps(net, net.conv1, CAPTUM_INPUT, "hirescam", target=0)
    torch.testing.assert_close(hires, torch.tensor([[[0.0, 4.0], [25.0, 25.0]]]))
    gxa = LayerGradientXActivation(net, net.conv1).attribute(CAPTUM_INPUT, target=0)
    torch.testing.assert_close(hires, gxa.sum(dim=1))


def _same_size_net() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 2),
    ).eval()


def _scaled(cam: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's post-processing, ReLU then min-max per image, without its 1e-7
    (which is not negligible next to the tiny CAMs of a random network)."""
    out = []
    for img in np.maximum(np.asarray(cam, dtype=np.float64), 0):
        img = img - img.min()
        out.append(img / img.max())
    return np.asarray(out)


@pytest.mark.parametrize(
    ("method", "reference"),
    [("gradcam++", "GradCAMPlusPlus"), ("gradcam", "GradCAM"), ("hirescam", "HiResCAM")],
)
def test_cams_match_pytorch_grad_cam_after_its_normalisation(method: str, reference: str) -> None:
    grad_cam = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    net = _same_size_net()
    x = torch.rand(3, 3, 9, 9, generator=torch.Generator().manual_seed(1))
    ours = _scaled(cam_maps(net, net[3], x, method, target=1).numpy())  # type: ignore[arg-type]
    with getattr(grad_cam, reference)(model=net, target_layers=[net[3]]) as cam:
        theirs = _scaled(cam(input_tensor=x, targets=[ClassifierOutputTarget(1)] * 3))
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_cam_maps_restore_training_flags_and_refuse_unknown_methods() -> None:
    net = _same_size_net().train()
    cam_maps(net, net[3], torch.rand(1, 3, 5, 5), "gradcam++", target=0)
    assert all(m.training for m in net.modules())
    with pytest.raises(ValueError, match="method must be one of"):
        cam_maps(net, net[3], torch.rand(1, 3, 5, 5), "scorecam", target=0)  # type: ignore[arg-type]


# ------------------------------------------------------------------ structure
def test_concept_similarity_by_hand() -> None:
    sim = concept_similarity(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]))
    r = 1 / math.sqrt(2)
    np.testing.assert_allclose(sim.matrix, [[1, r, 0], [r, 1, r], [0, r, 1]], atol=1e-12)
    assert "| concept 0 | 1.000 | 0.707 | 0.000 |" in sim.table.to_markdown()
    with pytest.raises(ValueError, match="norm 0"):
        concept_similarity(np.array([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="K x C matrix"):
        concept_similarity(np.ones(3))


def test_weight_correlation_by_hand() -> None:
    up = np.array([[1.0, 2.0], [3.0, 4.0]])
    maps = np.stack(
        [
            np.stack([up, up[::-1, ::-1], np.zeros((2, 2))]),  # corr(0, 1) = -1; concept 2 absent
            np.stack([up, up, np.ones((2, 2))]),  # corr(0, 1) = +1; concept 2 constant
        ]
    )
    res = weight_correlation(maps)
    assert res.per_tile[0, 0, 1] == pytest.approx(-1.0)
    assert res.per_tile[1, 0, 1] == pytest.approx(1.0)
    assert res.mean[0, 1] == pytest.approx(0.0)
    assert res.std[0, 1] == pytest.approx(1.0)
    assert np.isnan(res.mean[0, 2])  # never defined: left out, not zero
    assert res.n_tiles[0, 1] == 2
    assert res.n_tiles[0, 2] == 0
    assert "0.000 ± 1.000" in res.table.to_markdown()


@pytest.mark.parametrize(
    ("maps", "match"),
    [(np.ones((2, 3, 4)), "N x K x h x w"), (np.ones((0, 2, 2, 2)), "0 tiles")],
)
def test_bad_maps(maps: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        weight_correlation(maps)
    with pytest.raises(TypeError, match="maps must be a Tensor or ndarray"):
        weight_correlation("maps")


# ------------------------------------------------------------------ surrogate
def test_surrogate_features_by_hand() -> None:
    maps = np.array([[[[2.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 0.0]]]])  # 1 tile, K = 2
    np.testing.assert_allclose(surrogate_features(maps, "sum"), [[2.0, 3.0]])
    np.testing.assert_allclose(surrogate_features(maps, "max"), [[2.0, 1.0]])
    np.testing.assert_allclose(surrogate_features(maps, "coverage"), [[0.25, 0.5]])
    np.testing.assert_allclose(surrogate_features(maps, "mean_positive"), [[2.0, 1.0]])
    with pytest.raises(ValueError, match="feature must be one of"):
        surrogate_features(maps, "median")  # type: ignore[arg-type]


def _synthetic(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concept 0 drives label 1, concept 2 drives label 0, concept 1 is noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    maps = rng.random((n, 3, 4, 4)) * 0.5
    maps[:, 0] += labels[:, None, None] * rng.random((n, 4, 4))
    maps[:, 2] += (1 - labels)[:, None, None] * rng.random((n, 4, 4))
    groups = np.arange(n) // 20
    return maps, labels, groups


def test_surrogate_recovers_the_signs() -> None:
    maps, labels, groups = _synthetic()
    report = surrogate_report(maps, labels)
    assert report.coefficients[0] > 1.0
    assert report.coefficients[2] < -1.0
    assert abs(report.coefficients[1]) < 0.5 * min(abs(report.coefficients[[0, 2]]))
    assert report.metrics["accuracy"] > 0.9
    assert report.metrics["roc_auc"] > 0.95
    assert (report.n_train, report.n_test) == (300, 100)
    grouped = surrogate_report(maps, labels, groups=groups, feature="max")
    assert grouped.grouped
    assert grouped.n_test == 100  # 5 of 20 groups of 20 tiles
    scores = np.stack([1 - labels, labels], axis=1).astype(float)  # two-class scores -> argmax
    assert surrogate_report(maps, scores).metrics == report.metrics
    assert "roc_auc" in report.table.to_csv()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"predictions": np.zeros(400, int)}, "one class only"),
        ({"predictions": np.zeros(3, int)}, "3 entries for 400 tiles"),
        ({"predictions": np.full(400, 2)}, "labels must be 0 or 1"),
        ({"predictions": np.full(400, 1.5)}, r"probabilities in \[0, 1\]"),
        ({"predictions": np.ones((400, 3))}, "3 columns"),
        ({"groups": np.zeros(400)}, "one group only"),
        ({"test_size": 1.5}, r"test_size must be in \(0, 1\)"),
    ],
)
def test_bad_surrogate_input(kwargs: dict[str, object], match: str) -> None:
    maps, labels, _ = _synthetic()
    args: dict[str, object] = {"predictions": labels}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        surrogate_report(maps, **args)  # type: ignore[arg-type]


# -------------------------------------------------------------- CAM agreement
def test_cam_agreement_by_hand() -> None:
    maps = np.array([[[[1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]]]] * 2)
    maps[1] *= -1  # tile 1: no concept region at all
    cam = np.array([[[1.0, -1.0], [1.0, -1.0]]] * 2)
    res = cam_agreement(maps, cam, [1, 0])
    np.testing.assert_allclose(res.iou[0], [1 / 2, 1 / 3])
    np.testing.assert_allclose(res.iou[1], [0.0, 0.0])
    np.testing.assert_allclose(res.correlation[0, 0], 1 / math.sqrt(3))
    np.testing.assert_allclose(res.correlation[0, 1], 0.0, atol=1e-12)
    np.testing.assert_allclose(res.summary["label 1"]["iou_mean"], [1 / 2, 1 / 3])
    np.testing.assert_allclose(res.summary["all"]["iou_mean"], [1 / 4, 1 / 6])
    assert "label 0, 1 tiles" in res.table.to_markdown()
    empty = cam_agreement(np.zeros((1, 1, 2, 2)), np.full((1, 1, 2, 2), -1.0), [0])
    assert np.isnan(empty.iou[0, 0])  # both regions empty: undefined, not 1 or 0
    assert np.isnan(empty.correlation[0, 0])


def test_cam_agreement_keeps_label_values_as_data() -> None:
    """Any integer labels, negative ones included, key the statistics and the table."""
    maps = np.array([[[[1.0, 0.0], [0.0, 0.0]]]] * 3)  # 3 tiles, K = 1
    cam = np.array([[[1.0, -1.0], [-1.0, -1.0]], [[1.0, 1.0], [-1.0, -1.0]]] * 2)[:3]
    res = cam_agreement(maps, cam, [7, -2, 7])
    assert list(res.by_label) == [-2, 7]
    np.testing.assert_allclose(res.by_label[7]["iou_mean"], [1.0])  # tiles 0 and 2
    np.testing.assert_allclose(res.by_label[-2]["iou_mean"], [1 / 2])
    assert res.summary["label -2"] is res.by_label[-2]
    assert res.table.columns[2:] == [
        "corr. with GradCAM (label -2, 1 tiles)",
        "corr. with GradCAM (label 7, 2 tiles)",
    ]
    shown = [[str(v) for v in row] for row in res.table.rows]
    assert shown == [["concept 0", "0.833 ± 0.236", "0.577 ± 0.000", "1.000 ± 0.000"]]


def test_tables_render_numbers_and_text() -> None:
    table = Table(["a", "b"], [["x", 0.5], ["y", float("nan")]], "T <1>")
    assert table.to_markdown().splitlines() == [
        "**T <1>**",
        "",
        "| a | b |",
        "| --- | --- |",
        "| x | 0.500 |",
        "| y | nan |",
    ]
    assert table.to_csv() == "a,b\nx,0.5\ny,nan\n"
    assert table.to_dict()["rows"] == [["x", 0.5], ["y", None]]
    assert "<caption>T &lt;1&gt;</caption>" in table.to_html()
    assert compare_tables.similarity_table(np.eye(2)).rows == [
        ["concept 0", 1.0, 0.0],
        ["concept 1", 0.0, 1.0],
    ]


def test_cam_agreement_refuses_mismatches_and_warns_on_scaled_cams() -> None:
    maps = np.ones((2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"cams must be N x h x w = \(2, 4, 4\).*interpolate"):
        cam_agreement(maps, np.ones((2, 8, 8)), [0, 1])
    with pytest.raises(ValueError, match="predicted_labels has 3 entries for 2 tiles"):
        cam_agreement(maps, np.ones((2, 4, 4)), [0, 1, 1])
    raw = np.random.default_rng(0).random((2, 4, 4))
    scaled = raw - raw.min(axis=(1, 2), keepdims=True)
    scaled /= 1e-7 + scaled.max(axis=(1, 2), keepdims=True)  # pytorch-grad-cam's scaling
    with pytest.warns(CamScaleWarning, match="looks ReLU'd and min-max scaled"):
        cam_agreement(maps, scaled, [0, 1], name="pytorch-grad-cam GradCAM")
    cam_agreement(maps, raw * 0.5, [0, 1])  # positive but not min-max scaled: no warning


# -------------------------------------------------------------------- analyse
class ColourNet(nn.Module):
    """Class 1 when a tile is redder than it is blue; a 1x1 conv keeps the colours apart."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.fc.weight.copy_(torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3)))


def _colour_tiles(n: int = 48) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 6, 6, generator=gen) * 0.3
    x[: n // 2, 0] += 0.6  # red tiles
    x[n // 2 :, 2] += 0.6  # blue tiles
    return x


def test_analyse_end_to_end(tmp_path: Path) -> None:
    net = ColourNet().eval()
    attr = NMFConceptAttribution(net, net.relu, n_concepts=2, random_state=0)
    x = _colour_tiles()
    attr.fit(x, progress=False)
    result = analyse(attr, x, n_tiles=40, batch_size=16, progress=False)
    assert result.n_tiles == 40
    assert sorted(np.unique(result.predictions).tolist()) == [0, 1]
    assert result.surrogate is not None
    assert result.surrogate.metrics["accuracy"] == 1.0
    assert set(result.cams) == {"gradcam", "gradcam++", "hirescam"}
    red = int(np.argmax(np.abs(attr.concepts_.numpy()[:, 0])))  # the concept of the red channel
    assert result.surrogate.coefficients[red] > 0
    text = result.to_markdown()
    assert "Agreement of concepts with GradCAM++" in text
    assert "Cosine similarity" in text
    out = result.save(tmp_path / "analysis")
    saved = json.loads((out / "analysis.json").read_text())
    assert saved["n_tiles"] == 40
    assert saved["surrogate_metrics"]["accuracy"] == 1.0
    assert (out / "cam_gradcampp.csv").read_text().startswith("concept,")
    again = analyse(attr, x, n_tiles=40, batch_size=7, progress=False)  # reproducible sample
    np.testing.assert_array_equal(again.predictions, result.predictions)


def test_analyse_with_one_label_notes_the_missing_surrogate() -> None:
    net = ColourNet().eval()
    x = _colour_tiles()[:20]  # red only
    attr = NMFConceptAttribution(net, net.relu, n_concepts=2, random_state=0).fit(x, progress=False)
    result = analyse(attr, x, cam_methods=("gradcam",), progress=False)
    assert result.surrogate is None
    assert "every tile is predicted as the target label 1 (predicted labels: 1)" in result.notes[0]
    assert list(result.cams) == ["gradcam"]
    # every tile predicted as the target is said so (it was "the same label (<first tile's>)",
    # even when the tiles' labels differed and none was the target)
    other = analyse(attr, x, target=0, cam_methods=("gradcam",), progress=False)
    assert "no tile is predicted as the target label 0 (predicted labels: 1)" in other.notes[0]


def test_saving_an_analysis_again_replaces_only_its_own_files(tmp_path: Path) -> None:
    """Before: a user's analysis.md was replaced, and an analysis without a surrogate left
    the last one's surrogate.csv beside it."""
    net = ColourNet().eval()
    x = _colour_tiles()
    attr = NMFConceptAttribution(net, net.relu, n_concepts=2, random_state=0).fit(x, progress=False)
    out = tmp_path / "analysis"
    with_surrogate = analyse(attr, x, n_tiles=40, cam_methods=("gradcam",), progress=False)
    with_surrogate.save(out)
    assert (out / "surrogate.csv").is_file()
    legacy = json.loads((out / "analysis.json").read_text())
    without = analyse(attr, x[:20], cam_methods=("gradcam",), progress=False)  # one label
    assert without.surrogate is None
    without.save(out)
    assert not (out / "surrogate.csv").exists()  # the stale table is gone
    del legacy["files"]  # a folder written before the file list: its tables are ours
    (out / "analysis.json").write_text(json.dumps(legacy))
    with_surrogate.save(out)
    (out / "analysis.md").write_text("my reading of it")
    with pytest.raises(FileExistsError, match=r"analysis\.md was edited since captum-nmf wrote"):
        without.save(out)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "analysis.md").write_text("a user's notes")
    with pytest.raises(FileExistsError, match=r"analysis\.md was not written by captum-nmf"):
        without.save(theirs)
    assert sorted(p.name for p in theirs.iterdir()) == ["analysis.md"]


def test_analyse_bad_input() -> None:
    net = ColourNet()
    with pytest.raises(NotFittedError):
        analyse(NMFConceptAttribution(net, net.relu, 2), _colour_tiles())
    attr = NMFConceptAttribution(net, net.relu, 2, random_state=0).fit(
        _colour_tiles(), progress=False
    )
    with pytest.raises(ValueError, match="cam_methods must be among"):
        analyse(attr, _colour_tiles(), cam_methods=("eigencam",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n must be >= 1"):
        sample_tiles(_colour_tiles(), 0)
    with pytest.raises(TypeError, match="source must be a tensor of tiles"):
        sample_tiles({"a": 1}, 3)


def test_sample_tiles_is_reproducible() -> None:
    x = torch.arange(100).view(100, 1).float()
    a = sample_tiles(x, 10, random_state=3)
    b = sample_tiles(x, 10, random_state=3)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert a.inputs is not None
    assert a.inputs[:, 0].tolist() == a.indices.tolist()
    assert len(sample_tiles(x, None).indices) == 100


def test_saved_analysis_files_are_written_together(tmp_path: Path) -> None:
    net = ColourNet()
    x = _colour_tiles()
    attr = NMFConceptAttribution(net, net.relu, 2, random_state=0).fit(x, progress=False)
    result = analyse(attr, x, n_tiles=40, batch_size=16, progress=False)
    out = result.save(tmp_path / "analysis")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken() -> str:
        raise OSError(28, "No space left on device")

    result.to_markdown = broken  # type: ignore[method-assign]
    with pytest.raises(OSError, match="No space left"):
        result.save(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no file replaced


# ------------------------------------------- review of 2026-12-07 (third session)
def test_surrogate_metrics_undefined_on_one_held_out_label_are_nan_and_said() -> None:
    # slide 0 holds every label-1 tile; a grouped split that holds out a benign slide leaves
    # no label-1 tile on the test side: recall, F1 and AUC are 0/0, never a reported 0.0
    rng = np.random.default_rng(0)
    y = np.zeros(40, int)
    y[:10] = 1
    maps = np.maximum(rng.normal(size=(40, 2, 3, 3)), 0)
    maps[y == 1, 0] += 2.0  # concept 0 separates perfectly
    groups = np.repeat([0, 1, 2, 3], 10)
    report = next(
        r
        for r in (surrogate_report(maps, y, groups=groups, random_state=s) for s in range(20))
        if r.n_test == 10 and "held-out tiles all have label 0" in r.table.title
    )
    assert report.metrics["accuracy"] == 1.0
    for name in ("precision", "recall", "f1", "roc_auc"):
        assert math.isnan(report.metrics[name]), name
    assert "| recall | nan |" in report.table.to_markdown()
    assert "metrics that need the other label are undefined (nan)" in report.table.title


def test_constant_float64_maps_give_no_correlation() -> None:
    # a concept present uniformly on a tile: centring leaves ~1e-16 in float64, which divided
    # gave a correlation of -8e-17 counted as a tile; Pearson's r is undefined there (scipy: nan)
    maps = np.zeros((1, 2, 3, 3))
    maps[0, 0] = 0.9127555772777217
    maps[0, 1] = np.random.default_rng(0).random((3, 3))
    res = weight_correlation(maps)
    assert np.isnan(res.per_tile[0, 0, 1])
    assert res.n_tiles[0, 1] == 0
    cams = np.random.default_rng(1).normal(size=(1, 3, 3))
    assert np.isnan(cam_agreement(maps, cams, [1]).correlation[0, 0])


def test_cells_over_fewer_tiles_show_their_count_and_files_keep_full_precision(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(0)
    maps = np.maximum(rng.normal(size=(10, 2, 4, 4)), 0)
    maps[1:, 1] = 0.0  # concept 1 absent on 9 of 10 tiles
    corr = weight_correlation(maps)
    cell = corr.table.rows[0][2]
    assert isinstance(cell, compare_tables.MeanStd)
    assert (cell.n, cell.of) == (1, 10)
    assert str(cell).endswith(" ± 0.000 (n=1)")
    assert str(corr.table.rows[0][1]) == "1.000 ± 0.000"  # over every tile: no count
    agreement = cam_agreement(maps, rng.normal(size=(10, 4, 4)), np.ones(10, int))
    assert str(agreement.table.rows[1][2]).endswith("(n=1)")
    assert agreement.summary["all"]["corr_n"].tolist() == [10, 1]
    # CSV: a MeanStd column becomes mean, std and n at full precision
    rows = list(csv.reader(io.StringIO(agreement.table.to_csv())))
    assert rows[0][:4] == [
        "concept",
        "IoU with GradCAM > 0 mean",
        "IoU with GradCAM > 0 std",
        "IoU with GradCAM > 0 n",
    ]
    assert float(rows[1][1]) == agreement.summary["all"]["iou_mean"][0]  # not rounded
    assert rows[2][-1] == "1"
    record = agreement.table.to_dict()["rows"][0][1]
    assert record == {
        "mean": agreement.summary["all"]["iou_mean"][0],
        "std": agreement.summary["all"]["iou_std"][0],
        "n": 10,
    }
    nan_cell = compare_tables.MeanStd(float("nan"), float("nan"), 0, 4)
    assert str(nan_cell) == "nan"
    assert nan_cell.to_dict() == {"mean": None, "std": None, "n": 0}


def test_cam_agreement_labels_from_probabilities_scores_and_integral_floats() -> None:
    maps = np.ones((4, 1, 2, 2))
    cams = np.random.default_rng(0).normal(size=(4, 2, 2))
    probs = cam_agreement(maps, cams, np.array([0.9, 0.2, 0.6, 0.4]))  # was truncated to 0
    assert probs.labels.tolist() == [1, 0, 1, 0]
    scores = cam_agreement(maps, cams, np.array([[0.1, 0.9], [3.0, 0.0], [0, 1], [2, 1]]))
    assert scores.labels.tolist() == [1, 0, 1, 0]
    assert cam_agreement(maps, cams, np.array([2.0, 7.0, 2.0, 2.0])).labels.tolist() == [2, 7, 2, 2]
    with pytest.raises(ValueError, match="fractional values outside"):
        cam_agreement(maps, cams, np.array([1.5, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="predicted_labels contain NaN"):
        cam_agreement(maps, cams, np.array([np.nan, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="predicted_labels holds NaN scores on 1 tiles"):
        cam_agreement(maps, cams, np.array([[np.nan, 1], [0, 1], [0, 1], [1, 0]]))
    with pytest.raises(ValueError, match=r"must be \(n,\) labels or \(n, classes\) scores"):
        cam_agreement(maps, cams, np.array(1))


@pytest.mark.parametrize(
    ("predictions", "match"),
    [
        (np.array(1.0), r"predictions must be \(n,\) labels or \(n, 2\) scores, got shape \(\)"),
        (np.array([[0.2, np.nan], [0.9, 0.1], [0.3, 0.7], [0.6, 0.4]]), "NaN scores on 1 tiles"),
    ],
)
def test_surrogate_refuses_0d_and_nan_scores(predictions: np.ndarray, match: str) -> None:
    maps = np.random.default_rng(0).random((4, 2, 2, 2))
    with pytest.raises(ValueError, match=match):
        surrogate_report(maps, predictions)


def test_nan_in_maps_or_cams_is_refused_naming_the_tiles() -> None:
    maps = np.ones((3, 2, 2, 2))
    maps[1, 0, 0, 0] = np.nan
    for call in (weight_correlation, lambda m: surrogate_report(m, [0, 1, 1])):
        with pytest.raises(
            ValueError,
            match=r"maps holds NaN or infinite values on 1 of 3 tiles "
            r"\(the first: tile 1\)",
        ):
            call(maps)
    cams = np.zeros((3, 2, 2))
    cams[2, 1, 1] = np.inf
    with pytest.raises(ValueError, match=r"cams holds NaN or infinite values on 1 of 3 tiles"):
        cam_agreement(np.ones((3, 2, 2, 2)), cams, [0, 1, 1])


def test_a_binary_mask_is_no_scaled_cam() -> None:
    rng = np.random.default_rng(0)
    maps = np.maximum(rng.normal(size=(20, 3, 8, 8)), 0)
    mask = (rng.random((20, 8, 8)) < 0.6).astype(np.float32)  # nuclei on ~60 % of cells
    with warnings.catch_warnings():
        warnings.simplefilter("error", CamScaleWarning)
        cam_agreement(maps, mask, np.ones(20, int), name="neoplastic nuclei")


class MixNet(ColourNet):
    """ColourNet with a 3x3 convolution after the ReLU: its input (the ReLU's output,
    non-negative) is what the concepts factorise; its output is that input smoothed over
    neighbours, so the CAMs of its input and of its output differ."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        with torch.no_grad():
            self.mix.weight.copy_(
                torch.rand(3, 3, 3, 3, generator=torch.Generator().manual_seed(0))
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.mix(self.relu(self.conv(x))).mean(dim=(2, 3)))


def test_analyse_concepts_of_the_layer_input() -> None:
    net = MixNet().eval()
    x = _colour_tiles()
    attr = NMFConceptAttribution(net, net.mix, n_concepts=2, random_state=0)
    attr.fit(x, attribute_to_layer_input=True, progress=False)  # failed in analyse before
    result = analyse(attr, x, cam_methods=("gradcam",), progress=False)
    expected = cam_maps(net, net.mix, x, "gradcam", 1, attribute_to_layer_input=True)
    np.testing.assert_allclose(result.cam_values["gradcam"], expected.numpy(), rtol=1e-6)
    at_output = cam_maps(net, net.mix, x, "gradcam", 1)
    assert not torch.allclose(expected, at_output)  # the input's CAM, not the output's


def test_analyse_keeps_its_work_when_the_surrogate_split_cannot_fit() -> None:
    net = ColourNet().eval()
    x = _colour_tiles()[23:26]  # one red, two blue: holding out the red one leaves one label
    attr = NMFConceptAttribution(net, net.relu, n_concepts=2, random_state=0).fit(x, progress=False)
    notes = []
    for seed in range(10):
        result = analyse(attr, x, cam_methods=("gradcam",), random_state=seed, progress=False)
        if result.surrogate is None:
            notes = result.notes
            assert result.cams["gradcam"].iou.shape == (3, 2)  # the rest of the work is kept
            break
    assert notes
    assert notes[-1].startswith("no surrogate model: the training split holds one")


def test_analyse_refuses_a_bare_or_repeated_cam_method() -> None:
    net = ColourNet().eval()
    attr = NMFConceptAttribution(net, net.relu, 2, random_state=0).fit(
        _colour_tiles(), progress=False
    )
    with pytest.raises(TypeError, match=r"got the string 'gradcam'; pass \('gradcam',\)"):
        analyse(attr, _colour_tiles(), cam_methods="gradcam")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="names 'gradcam' twice"):
        analyse(attr, _colour_tiles(), cam_methods=("gradcam", "gradcam"))
