"""Figures: pixel-level checks of the overlays and of what each figure draws."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from captum_nmf import NMFConceptAttribution
from captum_nmf.viz import (
    PALETTE,
    cluster_image,
    concept_colors,
    overlay,
    plot_comparison,
    plot_concepts,
    plot_overlay,
    plot_slide,
    plot_structure,
)
from captum_nmf.wsi import SlideTiles, explain_slide, write_pyramid
from tests.helpers.synthetic_slides import he_image
from tests.helpers.wsi_models import PoolNet

ORANGE, SKY = np.array([230, 159, 0]) / 255, np.array([86, 180, 233]) / 255


@pytest.fixture(autouse=True)
def _no_global_state() -> object:
    import matplotlib.pyplot as plt

    before = dict(mpl.rcParams)
    yield
    assert dict(mpl.rcParams) == before
    assert plt.get_fignums() == []  # nothing went through pyplot


def _images(fig: Figure) -> list[np.ndarray]:
    return [np.asarray(im.get_array()) for ax in fig.axes for im in ax.get_images()]


def test_palette_is_fixed_and_colour_blind_safe() -> None:
    np.testing.assert_allclose(concept_colors(2), [ORANGE, SKY])
    assert PALETTE[:8] == (
        "#E69F00",
        "#56B4E9",
        "#009E73",
        "#F0E442",
        "#0072B2",
        "#D55E00",
        "#CC79A7",
        "#000000",
    )  # Okabe-Ito
    many = concept_colors(60)  # beyond the palette: distinct, the palette's first
    assert many.shape == (60, 3)
    assert np.array_equal(many[:17], concept_colors(17))
    assert len({tuple(np.round(c, 3)) for c in many}) == 60
    assert ((many >= 0) & (many <= 1)).all()
    assert np.array_equal(concept_colors(20), many[:20])  # a concept keeps its colour
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        concept_colors(0)
    with pytest.raises(TypeError, match="k must be an int"):
        concept_colors(2.5)  # type: ignore[arg-type]


def test_more_than_17_concepts_have_distinct_colours_in_a_plot() -> None:
    from captum_nmf.viz import cluster_image

    labels = np.arange(20).reshape(4, 5)
    image = cluster_image(labels, 20)
    colours = {tuple(image[r, c]) for r in range(4) for c in range(5)}
    assert len(colours) == 20


def test_overlay_by_hand() -> None:
    image = np.full((2, 2, 3), 0.5)
    maps = np.zeros((2, 2, 2))
    maps[0, 0, 0] = 1.0  # concept 0 alone at (0, 0)
    maps[1, 1, 1] = 2.0  # concept 1 alone at (1, 1), its own maximum
    maps[0, 1, 0], maps[1, 1, 0] = 0.5, 2.0  # (1, 0): concept 0 at 0.5, concept 1 at 1.0
    out = overlay(image, maps, alpha=0.5)
    np.testing.assert_allclose(out[0, 0], 0.25 + 0.5 * ORANGE)
    np.testing.assert_allclose(out[0, 1], 0.5)  # no concept: the image
    np.testing.assert_allclose(out[1, 1], 0.25 + 0.5 * SKY)
    mixed = (0.5 * ORANGE + 1.0 * SKY) / 1.5
    np.testing.assert_allclose(out[1, 0], 0.25 + 0.5 * mixed)
    # uint8 CHW tensors work the same, and one cell spreads over the image
    tensor = torch.full((3, 4, 4), 128, dtype=torch.uint8)
    uniform = overlay(tensor, np.ones((1, 1, 1)), alpha=1.0)
    np.testing.assert_allclose(uniform, np.broadcast_to(ORANGE, (4, 4, 3)))
    # a shared vmax keeps images comparable
    half = overlay(image, np.full((1, 2, 2), 1.0), alpha=1.0, vmax=[2.0])
    np.testing.assert_allclose(half, 0.5 * 0.5 + 0.5 * np.broadcast_to(ORANGE, (2, 2, 3)))


@pytest.mark.parametrize(
    ("image", "error", "match"),
    [
        (
            np.full((4, 4, 3), 255.0, np.float32),
            ValueError,
            "float in \\[0, 1\\] or uint8, got float32 with min 255 and max 255",
        ),
        (np.full((4, 4, 3), -0.1), ValueError, "undo the normalisation"),
        (np.zeros((4, 4, 5)), ValueError, "H x W x 3"),
        (np.zeros((4, 4, 3), np.int32), ValueError, "got int32"),
        ([[0.0]], TypeError, "ndarray or a Tensor"),
    ],
)
def test_bad_images(image: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        overlay(image, np.ones((1, 2, 2)))


def test_bad_overlay_arguments() -> None:
    with pytest.raises(ValueError, match="alpha must be in"):
        overlay(np.zeros((2, 2, 3)), np.ones((1, 2, 2)), alpha=2)
    with pytest.raises(ValueError, match="vmax must hold 1 values"):
        overlay(np.zeros((2, 2, 3)), np.ones((1, 2, 2)), vmax=[1.0, 2.0])
    with pytest.raises(ValueError, match="K x h x w"):
        overlay(np.zeros((2, 2, 3)), np.ones(4))


def test_cluster_image() -> None:
    out = cluster_image(np.array([[0, 1], [-1, 1]]), 2)
    np.testing.assert_allclose(out[0, 0], ORANGE)
    np.testing.assert_allclose(out[1, 0], 1.0)
    with pytest.raises(ValueError, match="holds concept 2 but k=2"):
        cluster_image(np.array([[2]]), 2)


def _tile_and_maps() -> tuple[np.ndarray, np.ndarray]:
    image = he_image()[:64, :64]
    maps = np.random.default_rng(0).random((3, 8, 8))
    maps[1, :4] = 0
    return image, maps


def test_plot_overlay_draws_the_overlay_and_a_legend() -> None:
    image, maps = _tile_and_maps()
    fig = plot_overlay(image, maps, title="tile")
    assert isinstance(fig, Figure)
    (shown,) = _images(fig)
    np.testing.assert_allclose(shown, overlay(image, maps))
    legend = fig.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["concept 0", "concept 1", "concept 2"]
    np.testing.assert_allclose(legend.legend_handles[1].get_facecolor()[:3], SKY)
    fig.savefig(io.BytesIO(), format="png")  # renders without pyplot
    host = Figure()
    ax = host.add_subplot()
    assert plot_overlay(image, maps, ax=ax) is host


def test_plot_overlay_of_a_batch_shares_one_scale() -> None:
    images = torch.from_numpy(he_image()[:64, :128].copy()).permute(2, 0, 1).float() / 255
    batch = torch.stack([images[:, :, :64], images[:, :, 64:]])
    maps = np.zeros((2, 2, 4, 4))
    maps[0, 0] = 1.0
    maps[1, 0] = 2.0  # tile 1 holds twice as much of concept 0
    maps[1, 1, 0, 0] = 3.0
    fig = plot_overlay(batch, maps, alpha=1.0)
    shown = _images(fig)
    assert len(shown) == 2
    np.testing.assert_allclose(shown[0], overlay(batch[0], maps[0], alpha=1.0, vmax=[2.0, 3.0]))
    np.testing.assert_allclose(shown[1][40, 40], ORANGE)  # full scale only on tile 1
    with pytest.raises(ValueError, match="image holds 1 tiles for 2 maps"):
        plot_overlay(batch[:1], maps)
    single = plot_overlay(batch[:1], maps[:1])  # a batch of one is still a batch
    assert len(_images(single)) == 1
    with pytest.raises(ValueError, match="ax takes one image"):
        plot_overlay(batch, maps, ax=Figure().add_subplot())


def test_plot_concepts_one_panel_each() -> None:
    image, maps = _tile_and_maps()
    fig = plot_concepts(image, maps)
    shown = _images(fig)
    assert len(shown) == 3
    only_1 = np.zeros_like(maps)
    only_1[1] = maps[1]
    np.testing.assert_allclose(shown[1], overlay(image, only_1, alpha=0.7))
    assert fig.axes[2].get_title() == "concept 2"
    with pytest.raises(ValueError, match="one Axes per concept"):
        plot_concepts(image, maps, axes=[Figure().add_subplot()])


def test_plot_comparison_shows_signed_cam_and_clusters() -> None:
    image, maps = _tile_and_maps()
    cam = np.linspace(-2, 1, 64).reshape(8, 8)
    fig = plot_comparison(image, torch.from_numpy(cam), maps)
    shown = _images(fig)
    assert len(shown) == 4
    np.testing.assert_allclose(shown[1], cam)
    assert fig.axes[1].get_images()[0].get_clim() == (-2.0, 2.0)  # symmetric: 0 is white
    np.testing.assert_allclose(shown[3], cluster_image(np.argmax(maps, axis=0), 3))
    with pytest.raises(ValueError, match="cam must be h x w"):
        plot_comparison(image, np.ones((2, 3, 4)), maps)
    legend = fig.axes[3].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["concept 0", "concept 1", "concept 2"]
    named = plot_comparison(image, cam, maps, labels=["tumour", "stroma", "lymphocytes"])
    texts = [t.get_text() for t in named.axes[3].get_legend().get_texts()]
    assert texts == ["tumour", "stroma", "lymphocytes"]  # before: always "concept j" (Fig. 3)


def test_plot_structure_heatmaps() -> None:
    sim = np.eye(3)
    cor = np.full((3, 3), 0.5)
    cor[0, 2] = np.nan
    fig = plot_structure(sim, cor)
    shown = _images(fig)
    np.testing.assert_allclose(shown[0], sim)
    texts = [t.get_text() for t in fig.axes[1].texts]
    assert texts.count("0.50") == 8
    assert "" in texts  # NaN left blank
    with pytest.raises(ValueError, match="two K x K matrices"):
        plot_structure(np.eye(2), np.eye(3))


def test_plot_slide(tmp_path: Path) -> None:
    path = write_pyramid(he_image()[:192, :256], tmp_path / "s.svs", mpp=0.5)
    net = PoolNet().eval()
    tiles = SlideTiles(path, tile_size=64, stride=64, tissue_mask=None)
    attr = NMFConceptAttribution(net, net.relu, 2, random_state=0).fit(tiles, progress=False)
    ex = explain_slide(attr, path, tile_size=64, stride=32, tissue_mask=None, progress=False)
    fig = plot_slide(ex, max_size=128)
    (shown,) = _images(fig)
    assert shown.shape == (96, 128, 3)
    # every cell has a value now, the slide's edge cells included (the stitcher keeps the
    # edges), so the overlay covers the corners as well as the centre
    from captum_nmf.wsi import Slide

    assert not np.isnan(ex.concept_maps).any()
    with Slide(path) as slide:
        thumb, _ = slide.thumbnail(128)
    assert not np.allclose(shown[0, 0], thumb[0, 0] / 255)
    assert not np.allclose(shown[48, 64], thumb[48, 64] / 255)
    clusters = plot_slide(ex, max_size=128, clusters=True)
    assert _images(clusters)[0].shape == (96, 128, 3)
    panels = plot_slide(ex, max_size=128, per_concept=True)
    assert len(_images(panels)) == 2
