"""Tissue detection: colour and brightness on real H&E, blank and dark slides, pen marks,
masks that do not fit their slide, unreadable regions and huge sparse slides."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage.color import rgb2gray

from captum_nmf import NMFConceptAttribution
from captum_nmf.data import path as data_path
from captum_nmf.exceptions import (
    CaptumNMFWarning,
    EmptyTileGridWarning,
    NoTissueError,
    SlideReadError,
    UnreadableRegionWarning,
)
from captum_nmf.wsi import Slide, SlideTiles, TissueMask, detect_tissue, tile_grid, write_pyramid
from captum_nmf.wsi.tissue import pen_marks
from tests.helpers.synthetic_slides import (
    CMU,
    CMU_MPP,
    he_image,
    paint_pen_strokes,
    sparse_tiff,
    tissue_on_white,
    zero_tile_data,
)
from tests.helpers.wsi_models import PoolNet

HE_IMAGES = ["hgsc_nest.jpg", "hgsc_stromal_he.jpg"]


def _full_resolution(mask: TissueMask, shape: tuple[int, int]) -> np.ndarray:
    """The mask looked up at every level-0 pixel of an H x W slide."""
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]]
    rows = np.minimum((ys / mask.downsample[1]).astype(int), mask.mask.shape[0] - 1)
    cols = np.minimum((xs / mask.downsample[0]).astype(int), mask.mask.shape[1] - 1)
    return mask.mask[rows, cols]


def _flat_slide(path: Path, rgb: tuple[int, int, int], noise: int = 0) -> Path:
    pixels = np.full((768, 1024, 3), rgb, dtype=np.int64)
    if noise:
        pixels += np.random.default_rng(0).integers(-noise, noise + 1, pixels.shape)
    return write_pyramid(np.clip(pixels, 0, 255).astype(np.uint8), path, mpp=0.5)


# ------------------------------------------------------------------ real material
def test_cmu_tissue_is_found_and_glass_is_not() -> None:
    with Slide(CMU) as slide:
        tissue = detect_tissue(slide)
        thumb, _ = slide.thumbnail(max(tissue.mask.shape))
    assert tissue.downsample[0] == pytest.approx(4.0 / CMU_MPP, rel=0.02)  # 4 um per mask pixel
    # known places, read off the thumbnail (level-0 x, y, width, height)
    glass = [(1650, 0, 550, 380), (0, 1500, 700, 700)]  # top right, left of the tissue
    dermis = [(990, 2220, 390, 500)]  # stained skin below the follicle
    np.testing.assert_array_equal(tissue.fractions(np.array(glass)), [0.0, 0.0])
    np.testing.assert_array_equal(tissue.fractions(np.array(dermis)), [1.0])
    grey = rgb2gray(thumb)
    assert tissue.mask[grey > 0.93].mean() < 0.05  # bright background is not tissue
    assert tissue.mask[grey < 0.6].mean() > 0.99  # stained tissue is
    assert 0.3 < tissue.tissue_share < 0.45
    assert (tissue.threshold, tissue.saturation_threshold) == (0.8, 0.15)  # both bounds hold


@pytest.mark.parametrize("name", HE_IMAGES)
@pytest.mark.parametrize("mpp", [0.5, None])
def test_packaged_he_images_are_tissue(name: str, mpp: float | None) -> None:
    with Slide(data_path(name), mpp=mpp) as slide:
        tissue = detect_tissue(slide)
    assert tissue.tissue_share >= 0.95


def test_otsu_alone_would_split_an_all_tissue_image() -> None:
    with Slide(data_path("hgsc_stromal_he.jpg"), mpp=0.5) as slide:
        bounded = detect_tissue(slide)
        plain = detect_tissue(
            slide,
            min_threshold=0.0,
            saturation_bounds=(0.0, 1.0),
            closing_um=None,
            min_object_um2=0,
        )
    assert bounded.tissue_share >= 0.95
    assert plain.tissue_share < 0.75  # what unbounded Otsu does to a view that is all tissue
    assert plain.saturation_threshold is not None
    assert plain.saturation_threshold > 0.15


# ------------------------------------------------------------ blank and flat slides
@pytest.mark.parametrize(
    ("rgb", "noise"),
    [((255, 255, 255), 0), ((245, 245, 245), 0), ((245, 245, 245), 3), ((240, 236, 244), 3)],
)
def test_blank_and_near_blank_slides_have_no_tissue(
    tmp_path: Path, rgb: tuple[int, int, int], noise: int
) -> None:
    with Slide(_flat_slide(tmp_path / "flat.svs", rgb, noise)) as slide:
        tissue = detect_tissue(slide)
        with pytest.warns(EmptyTileGridWarning, match=r"flat\.svs.*; 0 % of the slide is tissue"):
            grid = tile_grid(slide, tile_size=256, stride=128)
    assert tissue.tissue_share == 0.0
    assert len(grid) == 0
    assert grid.tissue_share == 0.0


@pytest.mark.parametrize("level", [0, 40, 128])
@pytest.mark.parametrize("exclude_pen", [True, False])
def test_grey_or_black_slides_have_no_tissue(tmp_path: Path, level: int, exclude_pen: bool) -> None:
    # Decision: stained tissue is coloured. A uniform grey or black slide, however dark,
    # is an empty or failed scan, not tissue; saturation_threshold=0 uses brightness alone.
    with Slide(_flat_slide(tmp_path / "dark.svs", (level, level, level))) as slide:
        assert detect_tissue(slide, exclude_pen=exclude_pen).tissue_share == 0.0
        brightness_only = detect_tissue(slide, saturation_threshold=0.0, exclude_pen=False)
    assert brightness_only.tissue_share == 1.0
    assert brightness_only.saturation_threshold == 0.0


def test_explaining_a_blank_slide_is_no_tissue(tmp_path: Path) -> None:
    from captum_nmf.wsi import explain_slide

    net = PoolNet().eval()
    attr = NMFConceptAttribution(net, net.relu, n_concepts=2, random_state=0)
    he = tissue_on_white(tmp_path / "he.svs", (256, 256), (0, 0, 256, 256))
    attr.fit(SlideTiles(he, tile_size=64, stride=64, tissue_mask=None), progress=False)
    blank = _flat_slide(tmp_path / "grey245.svs", (245, 245, 245), noise=3)
    with pytest.raises(NoTissueError, match=r"grey245\.svs \(tissue share 0\.00%\)"):
        explain_slide(attr, blank, tile_size=64, stride=32, progress=False)


# --------------------------------------------------------------------- pen marks
def test_pen_colours_by_hand() -> None:
    pixels = np.array(
        [
            [(30, 60, 170), (40, 140, 70), (25, 25, 30), (0, 128, 128)],  # blue, green, black, teal
            [(80, 40, 120), (230, 120, 180), (45, 25, 59), (245, 245, 245)],  # H, E, nucleus, glass
        ],
        dtype=np.uint8,
    )
    np.testing.assert_array_equal(pen_marks(pixels), [[1, 1, 1, 1], [0, 0, 0, 0]])


@pytest.mark.parametrize("name", HE_IMAGES)
def test_pen_strokes_on_real_tissue_are_excluded(tmp_path: Path, name: str) -> None:
    image = he_image(name)
    strokes = [
        ("blue", (100, 200, 1400, 700)),
        ("green", (150, 1100, 1350, 1150)),
        ("black", (900, 100, 1000, 1400)),
    ]
    painted, _ = paint_pen_strokes(image, strokes)
    path = write_pyramid(painted, tmp_path / "pen.svs", mpp=0.5)
    with Slide(path) as slide:
        kept = detect_tissue(slide)
        ignored = detect_tissue(slide, exclude_pen=False)
    on, off = _full_resolution(kept, image.shape[:2]), _full_resolution(ignored, image.shape[:2])
    union = np.zeros(image.shape[:2], bool)
    for stroke in strokes:
        _, pixels = paint_pen_strokes(image, [stroke])
        union |= pixels
        assert on[pixels].mean() < 0.01, stroke  # the ink is not tissue
        assert off[pixels].mean() > 0.99, stroke  # it would be, without exclude_pen
    around = ~ndimage.binary_dilation(union, iterations=24)  # 3 mask pixels away from the ink
    assert on[around].mean() > 0.99  # the tissue around the strokes is kept
    assert ignored.tissue_share == 1.0


# -------------------------------------------------------------- masks of the user
def test_tissue_fractions_by_hand() -> None:
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    tm = TissueMask(mask, (10.0, 10.0))
    boxes = [
        (0, 0, 20, 20),  # exactly the tissue
        (0, 0, 40, 40),  # the whole mask
        (10, 10, 20, 20),  # one tissue pixel of four
        (100, 100, 10, 10),  # outside the slide
        (-20, -20, 40, 40),  # only its inside part counts
        (30, 30, 20, 20),  # inside part is background
    ]
    np.testing.assert_allclose(tm.fractions(np.array(boxes)), [1, 0.25, 0.25, 0, 1, 0])
    assert TissueMask.from_array(mask, (400, 200)).downsample == (100.0, 50.0)
    assert tm.extent == (40.0, 40.0)
    assert not tm.mask.flags.writeable


def test_a_mask_of_the_user_sets_the_tiles() -> None:
    with Slide(CMU) as slide:
        w, h = slide.dimensions  # 2220 x 2967
        mask = np.zeros((h // 10, w // 10), bool)  # 296 x 222: 10.02 x 10 px per mask pixel
        mask[:, : mask.shape[1] // 2] = True  # the left half, x < 1110
        grid = tile_grid(
            slide, tile_size=740, stride=740, tissue_mask=TissueMask.from_array(mask, (w, h))
        )
        # a mask 7 px short of the slide (within one mask pixel) is rounding, not a mismatch
        short = tile_grid(slide, tissue_mask=TissueMask(np.ones((296, 222), bool), (10.0, 10.0)))
    # pad: 3 columns x 5 rows; the left column is all tissue, the middle one half, the right none
    assert (grid.n_cols, grid.n_rows) == (3, 5)
    assert sorted(set(grid.cols.tolist())) == [0, 1]
    np.testing.assert_allclose(grid.tissue[grid.cols == 0], 1.0)
    np.testing.assert_allclose(grid.tissue[grid.cols == 1], 0.5)
    assert len(short) == short.n_rows * short.n_cols


@pytest.mark.parametrize(
    ("shape", "downsample", "extent"),
    [
        ((150, 111), (20.0, 20.0), "2220 x 3000"),  # another slide's aspect
        ((297, 222), (20.0, 20.0), "4440 x 5940"),  # the right shape, another downsample
    ],
)
def test_a_mask_that_does_not_cover_the_slide_is_refused(
    shape: tuple[int, int], downsample: tuple[float, float], extent: str
) -> None:
    mask = TissueMask(np.ones(shape, bool), downsample)
    match = rf"tissue_mask does not match cmu_small_region\.svs.*covers {extent} level-0 px, but"
    with Slide(CMU) as slide, pytest.raises(ValueError, match=match + r" .* is 2220 x 2967 px"):
        tile_grid(slide, tissue_mask=mask)
    with pytest.raises(ValueError, match=match):
        SlideTiles(CMU, tissue_mask=mask)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((np.zeros((2, 2, 2), bool), (1.0, 1.0)), "non-empty 2-D array"),
        ((np.zeros((0, 3), bool), (1.0, 1.0)), "non-empty 2-D array"),
        ((np.zeros((2, 2), bool), (1.0, 0.0)), "two positive numbers"),
    ],
)
def test_bad_tissue_masks(args: tuple[object, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TissueMask(*args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": 200}, r"threshold must be in \[0, 1\], got 200"),
        ({"saturation_threshold": -0.1}, r"saturation_threshold must be in \[0, 1\], got -0.1"),
        ({"saturation_bounds": (0.2, 0.1)}, r"saturation_bounds must be \(lower, upper\)"),
        ({"saturation_bounds": (0.1,)}, r"saturation_bounds must be \(lower, upper\)"),
        ({"saturation_bounds": (0.1, 2.0)}, r"saturation_bounds\[1\] must be in \[0, 1\]"),
        ({"mask_mpp": 0}, "mask_mpp must be positive"),
        ({"on_tile_error": "ignore"}, "on_tile_error must be 'raise' or 'skip', got 'ignore'"),
    ],
)
def test_bad_detection_arguments(kwargs: dict[str, object], match: str) -> None:
    with Slide(CMU) as slide, pytest.raises(ValueError, match=match):
        detect_tissue(slide, **kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------- unreadable regions
def test_unreadable_regions_raise_or_count_as_no_tissue(tmp_path: Path) -> None:
    broken = tmp_path / "zeroed.svs"
    corners = zero_tile_data(CMU, broken, [104, 105])  # two 240 px tiles of dermis, data zeroed
    with Slide(CMU) as slide:
        intact = detect_tissue(slide)
    boxes = np.array([(x, y, 240, 240) for x, y in corners])
    assert intact.fractions(boxes).min() == 1.0
    with Slide(broken) as slide:
        with pytest.raises(SlideReadError, match=r"zeroed\.svs.*pass on_tile_error='skip'"):
            detect_tissue(slide)
        with pytest.raises(SlideReadError, match=r"zeroed\.svs"):
            tile_grid(slide)
        listed = "; ".join(rf"\({x}, {y}, 240, 240\)" for x, y in corners)
        with pytest.warns(
            UnreadableRegionWarning, match=rf"2 region\(s\) of zeroed\.svs.*{listed}"
        ):
            skipped = detect_tissue(slide, on_tile_error="skip")
        with pytest.warns(UnreadableRegionWarning):
            grid = tile_grid(slide, tile_size=240, stride=240, on_tile_error="skip")
    # the unreadable tiles are no tissue; away from them the mask is the intact one
    assert skipped.fractions(boxes + np.array([8, 8, -16, -16])).max() == 0.0
    np.testing.assert_array_equal(skipped.mask[:280], intact.mask[:280])  # rows above y = 2245
    kept = {(int(c), int(r)) for r, c in zip(grid.rows, grid.cols, strict=True)}
    assert not {(x // 240, y // 240) for x, y in corners} & kept
    with pytest.warns(UnreadableRegionWarning):
        tiles = SlideTiles(broken, tile_size=240, stride=240, on_tile_error="skip")
    assert len(tiles) == len(grid)


def test_explain_slide_skips_unreadable_regions_in_tissue_detection(tmp_path: Path) -> None:
    from captum_nmf.wsi import explain_slide

    broken = tmp_path / "zeroed.svs"
    corners = zero_tile_data(CMU, broken, [104, 105])
    net = PoolNet().eval()
    attr = NMFConceptAttribution(net, net.relu, n_concepts=2, random_state=0)
    attr.fit(SlideTiles(CMU, tile_size=240, stride=240, min_tissue=0.5), progress=False)
    options = {"tile_size": 240, "stride": 240, "border": 0, "progress": False}
    with pytest.raises(SlideReadError, match=r"zeroed\.svs.*pass on_tile_error='skip'"):
        explain_slide(attr, broken, **options)  # type: ignore[arg-type]
    with pytest.warns(UnreadableRegionWarning, match=r"zeroed\.svs"):
        ex = explain_slide(attr, broken, on_tile_error="skip", **options)  # type: ignore[arg-type]
    # the unreadable tiles are no tissue: no tile is planned there, so none fails
    assert len(ex.failed_tiles) == 0
    planned = {tuple(xy) for xy in ex.tile_locations.tolist()}
    assert planned
    assert not planned & set(corners)


# ------------------------------------------------------------ huge, sparse slides
def test_huge_sparse_tiff_has_no_tissue_within_seconds(tmp_path: Path) -> None:
    from captum_nmf.wsi import explain_slide

    path = sparse_tiff(tmp_path / "huge.tif", (100_000, 100_000))
    assert path.stat().st_size < 400_000  # tile tables only: every tile has byte count 0
    net = PoolNet().eval()
    attr = NMFConceptAttribution(net, net.relu, n_concepts=2, random_state=0)
    he = tissue_on_white(tmp_path / "he.svs", (256, 256), (0, 0, 256, 256))
    attr.fit(SlideTiles(he, tile_size=64, stride=64, tissue_mask=None), progress=False)
    start = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # in particular no LargeThumbnailWarning: nothing to decode
        with pytest.raises(NoTissueError, match=r"huge\.tif \(tissue share 0\.00%\)"):
            explain_slide(attr, path, progress=False)
    assert time.monotonic() - start < 60  # the bound on 2 cores (about 4 s here)


# ------------------------------------------- review of 2026-12-07 (fourth session)
@pytest.mark.parametrize("rgb", [(1, 0, 2), (3, 1, 4), (14, 6, 18), (40, 25, 50), (45, 30, 55)])
def test_near_black_padding_and_tinted_black_ink_are_not_tissue(
    tmp_path: Path, rgb: tuple[int, int, int]
) -> None:
    """Near black, one count between channels gave saturation up to 1: (1, 0, 2) was tissue."""
    image = np.full((1024, 2048, 3), 235, np.uint8)
    image[256:768, 256:768] = he_image("hgsc_nest.jpg")[:512, :512]
    image[:, 1536:] = rgb  # a scanner's padding band, or a tinted black marker
    with Slide(write_pyramid(image, tmp_path / "pad.svs", mpp=0.5)) as slide:
        mask = detect_tissue(slide)
    full = _full_resolution(mask, image.shape[:2])
    assert full[:, 1600:].mean() == 0.0
    assert full[300:700, 300:700].mean() > 0.99  # the tissue beside it is kept


@pytest.mark.parametrize("side", [96, 224, 400])
def test_small_images_keep_their_glass_and_their_tissue(tmp_path: Path, side: int) -> None:
    """Before: a 96 px glass image was all tissue (its glass "filled" as a hole), and the
    tissue half of a 224 px image was removed as a speck (0 % tissue)."""
    glass = np.full((side, side, 3), 238, np.uint8)
    Image.fromarray(glass).save(tmp_path / "blank.png")
    half = glass.copy()
    half[:, : side // 2] = he_image("hgsc_nest.jpg")[:side, : side // 2]
    Image.fromarray(half).save(tmp_path / "half.png")
    with Slide(tmp_path / "blank.png", mpp=0.5) as slide:
        assert detect_tissue(slide).tissue_share == 0.0
    with Slide(tmp_path / "half.png", mpp=0.5) as slide:
        full = _full_resolution(detect_tissue(slide), (side, side))
    assert full[:, side // 2 + 8 :].mean() == 0.0
    assert full[:, : side // 2 - 8].mean() > 0.95


def test_a_transposed_mask_is_refused_naming_the_fix() -> None:
    mask = np.zeros((370, 277), bool)  # rows along the 2,967 px height, as the CMU slide's
    assert TissueMask.from_array(mask, (2220, 2967)).downsample == (2220 / 277, 2967 / 370)
    with pytest.raises(ValueError, match=r"shape \(277, 370\).*stretched by 6 x 10\.71.*mask\.T"):
        TissueMask.from_array(mask.T, (2220, 2967))
    assert TissueMask.from_array(mask[:, :1], (2220, 2967)).downsample == (2220, 2967 / 370)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_size": 0}, r"max_size must be an int >= 64 \(thumbnail pixels\), got 0"),
        ({"min_threshold": float("nan")}, "min_threshold must be in"),
        ({"min_threshold": 1.5}, r"min_threshold must be in \[0, 1\], got 1.5"),
        ({"closing_um": -16}, "closing_um must be a finite number >= 0 or None, got -16"),
        ({"min_object_um2": float("inf")}, "min_object_um2 must be a finite number >= 0, got inf"),
    ],
)
def test_bad_detection_arguments_are_named(kwargs: dict[str, object], match: str) -> None:
    with (
        Slide(data_path("hgsc_nest.jpg"), mpp=0.5) as slide,
        pytest.raises(ValueError, match=match),
    ):
        detect_tissue(slide, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("mpp", [0, -0.5, float("nan")])
def test_write_pyramid_refuses_a_bad_mpp(tmp_path: Path, mpp: float) -> None:
    """mpp=0 was a ZeroDivisionError; -0.5 and NaN were written, and the slide had no mpp."""
    with pytest.raises(ValueError, match="mpp must be a positive number of microns per pixel"):
        write_pyramid(np.zeros((32, 32, 3), np.uint8), tmp_path / "x.svs", mpp=mpp)


def test_non_square_pixels_are_named(tmp_path: Path) -> None:
    """mpp-x 0.5 and mpp-y 1: Slide.mpp was 0.5 without a word, and resolve(mpp=1.0)
    chose tiles of 1 x 2 um pixels."""
    import tifffile

    image = he_image("hgsc_nest.jpg")[:512, :512]
    path = tmp_path / "aniso.tif"
    with tifffile.TiffWriter(path) as tif:  # 20,000 and 10,000 px per cm: 0.5 x 1 um
        tif.write(
            image,
            tile=(256, 256),
            photometric="rgb",
            resolution=(20000, 10000),
            resolutionunit="CENTIMETER",
            metadata=None,
        )
    said = r"pixels of 0.5 x 1 um .* square pixels \(in Python, Slide\(path, mpp=\.\.\.\) states"
    with Slide(path) as slide, pytest.warns(CaptumNMFWarning, match=said):
        assert slide.mpp == pytest.approx(0.5)
    with Slide(path) as slide, warnings.catch_warnings():  # once per slide and process, as
        warnings.simplefilter("error")  # the scale's other warnings (was: once per handle)
        assert slide.mpp == pytest.approx(0.5)
    with Slide(path, mpp=0.5) as slide, warnings.catch_warnings():
        warnings.simplefilter("error")
        assert slide.mpp == 0.5  # stated by the user: no warning


def test_a_greyscale_slide_without_tissue_says_how_to_detect_it(tmp_path: Path) -> None:
    grey = np.asarray(Image.fromarray(he_image("hgsc_nest.jpg")).convert("L"))
    image = np.full((1200, 1600), 242, np.uint8)
    image[100:1100, 300:1300] = grey[:1000, :1000]
    Image.fromarray(image).save(tmp_path / "grey.png")
    with Slide(tmp_path / "grey.png", mpp=0.5) as slide:
        with pytest.warns(EmptyTileGridWarning, match=r"looks greyscale.*saturation_threshold=0"):
            tile_grid(slide, tile_size=256, stride=256)
        mask = detect_tissue(slide, saturation_threshold=0)
    full = _full_resolution(mask, image.shape)
    assert full[150:1050, 350:1250].mean() > 0.9  # by brightness
    assert full[:, :250].mean() == 0.0
    with Slide(data_path("hgsc_nest.jpg"), mpp=0.5) as slide:
        assert not detect_tissue(slide).greyscale


def test_a_faint_section_beside_a_well_stained_one_keeps_its_pale_parts(tmp_path: Path) -> None:
    """Otsu's saturation threshold, raised to 0.15 by the stained section, kept 47 % of a
    section faded to 30 % stain (0.975 alone on its slide)."""
    tissue = he_image("hgsc_nest.jpg")[:1024, :1024].astype(np.float64)
    image = np.full((2048, 3072, 3), 242.0)
    image[512:1536, 256:1280] = tissue
    image[512:1536, 1792:2816] = 0.3 * tissue + 0.7 * 242
    path = write_pyramid(image.round().astype(np.uint8), tmp_path / "two.svs", mpp=0.5)
    with Slide(path) as slide:
        mask = detect_tissue(slide)
        fixed = detect_tissue(slide, saturation_threshold=0.15)  # a threshold given: as given
    full = _full_resolution(mask, image.shape[:2])
    assert mask.saturation_threshold == 0.15
    assert full[512:1536, 1792:2816].mean() > 0.85
    assert full[512:1536, 256:1280].mean() > 0.97
    assert full[:400].mean() == 0.0
    assert _full_resolution(fixed, image.shape[:2])[512:1536, 1792:2816].mean() < 0.6


def _tinted(tint: tuple[int, int, int], *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Real H&E on glass of colour ``tint``: the whole scan multiplied by it (transmitted
    light), with an 8 % illumination gradient, +-4 counts of noise and JPEG at quality 80."""
    import io

    tissue = np.zeros((1024, 1536), bool)
    tissue[256:768, 256:1006] = True
    scan = np.full((1024, 1536, 3), 238.0)
    scan[256:768, 256:1006] = he_image("hgsc_nest.jpg")[:512, :750]
    xx = np.arange(1536)[None, :, None]
    scan = scan * np.array(tint) / 238 * (1 - 0.08 * xx / 1536)
    scan += np.random.default_rng(seed).uniform(-4, 4, scan.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(scan, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=80)
    return np.array(Image.open(buf)), tissue


@pytest.mark.parametrize(
    "tint", [(205, 195, 170), (180, 170, 150), (215, 200, 160), (175, 190, 215), (238, 238, 238)]
)
def test_tinted_glass_is_glass(tmp_path: Path, tint: tuple[int, int, int]) -> None:
    """Before: dim glass tinted by yellowed mounting medium or a scanner's cast, (205, 195,
    170), was coloured (saturation 0.17) and not bright (grey 0.77): all of it tissue."""
    scan, truth = _tinted(tint)
    Image.fromarray(scan).save(tmp_path / "tinted.png")
    with Slide(tmp_path / "tinted.png", mpp=0.5) as slide:
        mask = detect_tissue(slide)
    full = _full_resolution(mask, truth.shape)
    assert full[~truth].mean() < 0.005
    assert full[truth].mean() > 0.97
    if tint == (238, 238, 238):  # untinted glass: colours taken as they are
        assert mask.glass is None
    else:  # the glass colour measured (the gradient darkens it by up to 8 %)
        assert mask.glass is not None
        np.testing.assert_allclose(mask.glass, tint, rtol=0.1)
        assert all(g <= t + 3 for g, t in zip(mask.glass, tint, strict=True))


def test_all_tissue_and_stain_tinted_glass_are_taken_as_they_are(tmp_path: Path) -> None:
    """No glass to measure against (a field of tissue, tinted or not), a smooth tinted region
    of tissue along one side of a crop (a pool of mucin: not around the sections, as glass
    is), and glass tinted in the stains' own hues (pink: it cannot be told from pale eosin):
    no white balance."""
    field = he_image("hgsc_nest.jpg")[:768, :768].astype(np.float64)
    mucin = field.copy()
    mucin[:, :300] = np.array([200, 190, 150]) + np.random.default_rng(0).uniform(
        -3, 3, (768, 300, 3)
    )
    for name, pixels in {
        "field": field,
        "yellow_field": field * np.array([205, 195, 170]) / 238,
        "smooth_side": mucin,
        "pink_glass": _tinted((235, 200, 220))[0].astype(np.float64),
    }.items():
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(tmp_path / f"{name}.png")
        with Slide(tmp_path / f"{name}.png", mpp=0.5) as slide:
            mask = detect_tissue(slide)
        assert mask.glass is None, name
        if name != "pink_glass":  # the smooth region was tissue before, and stays tissue
            assert mask.tissue_share > 0.95, name


def test_the_readme_rows_of_boxes_tiff() -> None:
    """The README's tissue table: boxes.tiff at its 72-dpi scale and as it opens (no scale)."""
    boxes = Path(__file__).parent / "data" / "boxes.tiff"
    with Slide(boxes, mpp=352.778) as slide:
        at_dpi = detect_tissue(slide)
    with Slide(boxes, fallback_mpp=None) as slide, warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptumNMFWarning)  # 72 dpi taken as no scale
        opened = detect_tissue(slide)
    assert round(100 * float(at_dpi.mask.mean()), 1) == 11.3
    assert (at_dpi.threshold, at_dpi.saturation_threshold) == pytest.approx((0.8, 0.07))
    assert round(100 * float(opened.mask.mean()), 1) == 70.3
    assert (opened.threshold, opened.saturation_threshold) == pytest.approx((0.8, 0.15))
