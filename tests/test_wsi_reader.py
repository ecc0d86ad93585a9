"""Opening and reading slides: real SVS, written pyramids, plain images, and every bad file."""

from __future__ import annotations

import os
import pickle
import types
import warnings
from pathlib import Path

import numpy as np
import openslide
import pytest

from captum_nmf.data import path as data_path
from captum_nmf.exceptions import (
    CaptumNMFWarning,
    LargeThumbnailWarning,
    MultiPageImageWarning,
    SlideError,
    SlideNotFoundError,
    SlideReadError,
    UnreadableRegionWarning,
    UnsupportedSlideError,
)
from captum_nmf.wsi import Slide, reader, write_pyramid
from tests.helpers.synthetic_slides import (
    CMU,
    CMU_MPP,
    DATA,
    cmu_pixels,
    cmu_pyramid,
    flip_tile_marker,
    flip_tile_markers,
    he_image,
    sparse_tiff,
    truncated_copy,
)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cmu_pyramid(tmp_path_factory.mktemp("pyr") / "cmu_pyramid.svs")


def test_real_aperio_svs_metadata() -> None:
    with Slide(CMU) as slide:
        assert slide.vendor == "aperio"
        assert slide.dimensions == (2220, 2967)
        assert slide.level_count == 1
        assert slide.mpp == pytest.approx(CMU_MPP)
        assert slide.fingerprint().startswith("quickhash-1:6335ea0e")
        region = slide.read_region((1000, 1200), 0, (64, 32))
    assert region.shape == (32, 64, 3)
    assert region.dtype == np.uint8


def test_written_pyramid_levels_and_pixels(pyramid: Path) -> None:
    pixels = cmu_pixels()
    with Slide(pyramid) as slide:
        assert slide.vendor == "aperio"
        assert slide.level_count == 4
        assert slide.level_dimensions[1] == (1110, 1483)
        assert slide.level_downsamples[1] == pytest.approx(2.0, rel=1e-3)
        assert slide.mpp == pytest.approx(CMU_MPP)
        np.testing.assert_array_equal(
            slide.read_region((100, 200), 0, (300, 150)), pixels[200:350, 100:400]
        )
        # level-1 pixels at level-0 coordinates: the 2x box average of level 0
        level1 = slide.read_region((400, 600), 1, (8, 8)).astype(float)
        expected = pixels[600:616, 400:416].reshape(8, 2, 8, 2, 3).mean(axis=(1, 3))
        assert np.abs(level1 - expected).max() <= 1.0


def test_out_of_slide_pixels_are_white_not_black(pyramid: Path) -> None:
    with Slide(pyramid) as slide:
        w, h = slide.dimensions
        region = slide.read_region((w - 10, h - 10), 0, (40, 40))
        with openslide.OpenSlide(str(pyramid)) as raw:  # OpenSlide's own: transparent black
            assert np.asarray(raw.read_region((w - 10, h - 10), 0, (40, 40)))[30, 30, 3] == 0
    assert (region[10:, :] == 255).all()
    assert (region[:, 10:] == 255).all()
    with Slide(pyramid, background=(0, 0, 255)) as slide:
        assert slide.read_region((-5, -5), 0, (4, 4)).tolist() == [[[0, 0, 255]] * 4] * 4


@pytest.mark.parametrize("where", ["inside", "edge", "outside"])
def test_read_pixels_equals_read_region_which_stays_writable(pyramid: Path, where: str) -> None:
    # opaque regions drop their alpha in PIL; partly or fully transparent ones are composited
    with Slide(pyramid, background=(10, 20, 30)) as slide:
        w, h = slide.dimensions
        location = {"inside": (100, 200), "edge": (w - 10, h - 10), "outside": (w + 5, 0)}[where]
        with openslide.OpenSlide(str(pyramid)) as raw:
            rgba = np.asarray(raw.read_region(location, 0, (40, 30))).astype(np.uint16)
        alpha = rgba[..., 3:]
        expected = (rgba[..., :3] * alpha + np.array([10, 20, 30]) * (255 - alpha) + 127) // 255
        fast = slide.read_pixels(location, 0, (40, 30))
        region = slide.read_region(location, 0, (40, 30))
    np.testing.assert_array_equal(fast, expected)
    np.testing.assert_array_equal(region, expected)
    assert region.flags.writeable
    assert region.flags.c_contiguous
    assert region.dtype == np.uint8
    assert (alpha == 255).all() == (where == "inside")


def test_plain_jpeg_is_a_one_level_slide() -> None:
    with Slide(data_path("hgsc_nest.jpg")) as slide:
        assert slide.vendor == "image"
        assert slide.dimensions == (1500, 1500)
        assert slide.mpp is None
        assert slide.fingerprint().startswith("sha256:")
        assert slide.read_region((1490, 0), 0, (20, 2))[:, 10:].min() == 255


def test_plain_image_refused_when_not_allowed(tmp_path: Path) -> None:
    png = tmp_path / "tile.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png)
    with pytest.raises(UnsupportedSlideError, match=r"tile\.png.*allow_plain_images=True"):
        Slide(png, allow_plain_images=False)
    with Slide(png) as slide:
        assert slide.dimensions == (8, 8)


def _pages(path: Path, *pages: np.ndarray) -> Path:
    """A stripped (untiled) multi-page TIFF: OpenSlide does not read it, PIL does."""
    from PIL import Image

    images = [Image.fromarray(p) for p in pages]
    images[0].save(path, save_all=True, append_images=images[1:])
    return path


def _flat(width: int, height: int, value: int) -> np.ndarray:
    return np.full((height, width, 3), value, np.uint8)


def test_multi_page_tiff_reads_its_largest_page_and_names_pages_it_ignores(
    tmp_path: Path,
) -> None:
    # levels of a stripped pyramid (halved copies) are left out without a word
    pyr = _pages(tmp_path / "pyr.tif", _flat(64, 32, 10), _flat(32, 16, 20), _flat(16, 8, 30))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Slide(pyr) as slide:
            assert slide.dimensions == (64, 32)
            assert slide.read_region((0, 0), 0, (4, 4)).max() == 10
    # a thumbnail stored first: the large page is the image
    thumb_first = _pages(tmp_path / "thumb.tif", _flat(16, 8, 30), _flat(64, 32, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Slide(thumb_first) as slide:
            assert slide.dimensions == (64, 32)
            assert slide.read_region((60, 28), 0, (4, 4)).max() == 10
    # a stack of same-size pages (channels, focal planes): page 0 is read, the rest named
    stack = _pages(tmp_path / "stack.tif", _flat(64, 32, 10), _flat(64, 32, 20), _flat(64, 32, 30))
    with pytest.warns(
        MultiPageImageWarning,
        match=r"stack\.tif has 3 pages; reading page 0 \(64 x 32 px.*page\(s\) 1 \(64 x 32\), "
        r"2 \(64 x 32\)",
    ):
        slide = Slide(stack)
    with slide:
        assert slide.read_region((0, 0), 0, (4, 4)).max() == 10
    # a page of other proportions (a mask, a label) is data too
    other = _pages(tmp_path / "label.tif", _flat(64, 32, 10), _flat(20, 20, 99))
    with pytest.warns(MultiPageImageWarning, match=r"ignoring page\(s\) 1 \(20 x 20\)"):
        Slide(other).close()


@pytest.mark.parametrize(
    ("name", "fmt", "plain"),
    [("scan.svs", "PNG", ".png"), ("scan.ndpi", "JPEG", ".jpg"), ("scan.svs", "TIFF", ".tif")],
)
def test_an_image_under_a_slide_name_is_named_as_that_image(
    tmp_path: Path, name: str, fmt: str, plain: str
) -> None:
    from PIL import Image

    path = tmp_path / name
    Image.fromarray(_flat(32, 16, 128)).save(path, format=fmt)  # a stripped TIFF for TIFF
    said = "TIFF file that OpenSlide cannot read as a slide: a damaged" if fmt == "TIFF" else fmt
    with pytest.raises(
        UnsupportedSlideError, match=rf"{name} is a {said}.*name it \{plain}\.$"
    ) as info:
        Slide(path)
    assert isinstance(info.value, ValueError)
    with pytest.raises(UnsupportedSlideError, match=r"allow_plain_images=True\.$"):
        Slide(path, allow_plain_images=False)
    renamed = path.rename(path.with_suffix(plain))
    with pytest.raises(UnsupportedSlideError, match=r"Plain images need allow_plain_images") as e:
        Slide(renamed, allow_plain_images=False)  # already so named: not told to rename it
    assert "name it" not in str(e.value)
    with Slide(renamed) as slide:  # the advice works
        assert slide.dimensions == (32, 16)


def test_other_image_formats_and_huge_pages_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    Image.fromarray(_flat(32, 16, 128)).save(tmp_path / "scan.svs", format="GIF")
    with pytest.raises(UnsupportedSlideError, match=r"scan\.svs is a GIF image.*save it as PNG"):
        Slide(tmp_path / "scan.svs")
    # a later page over PIL's decompression-bomb limit is refused as page 0 would be
    big = _pages(tmp_path / "big.tif", _flat(16, 8, 10), _flat(64, 32, 20))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)  # page 0: 128 px; page 1: 2,048 px
    with pytest.raises(UnsupportedSlideError, match=r"big\.tif is too large.*page 1 has 2048"):
        Slide(big)


# ----------------------------------------------------------------- bad files (rows 1-3)
def test_missing_file_is_file_not_found_before_openslide(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*_: object) -> None:
        raise AssertionError("OpenSlide was called")

    monkeypatch.setattr(openslide.OpenSlide, "detect_format", boom)
    missing = tmp_path / "nope.svs"
    with pytest.raises(SlideNotFoundError, match=r"Slide file not found: .*nope\.svs") as info:
        Slide(missing)
    assert isinstance(info.value, FileNotFoundError)
    assert list(tmp_path.iterdir()) == []


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedSlideError, match="is a directory"):
        Slide(tmp_path)


@pytest.mark.parametrize(
    ("name", "content"),
    [("x.svs", b"123"), ("notes.txt", b"hello"), ("fake.png", b"not a png at all")],
)
def test_unsupported_files(tmp_path: Path, name: str, content: bytes) -> None:
    bad = tmp_path / name
    bad.write_bytes(content)
    with pytest.raises(UnsupportedSlideError, match=rf"{name}.*Supported: \.svs") as info:
        Slide(bad)
    assert isinstance(info.value, ValueError)


def test_openslide_fixture_unopenable_tiff() -> None:
    with pytest.raises(UnsupportedSlideError, match=r"unopenable\.tiff.*generic-tiff.*cannot open"):
        Slide(DATA / "unopenable.tiff")


@pytest.mark.parametrize("fraction", [0.6, 0.9, 0.95])
def test_truncated_svs_is_refused_naming_the_file(tmp_path: Path, fraction: float) -> None:
    cut = truncated_copy(CMU, tmp_path / "cut.svs", fraction)
    with warnings.catch_warnings():  # nothing but the error: PIL's sniffing stays quiet
        warnings.simplefilter("error")
        with pytest.raises(UnsupportedSlideError, match=r"cut\.svs") as info:
            Slide(cut)
    if "TIFF" in str(info.value):  # never advice to rename a damaged slide without a word
        assert "damaged or truncated slide" in str(info.value)


def test_truncated_jpeg_is_refused_naming_the_file(tmp_path: Path) -> None:
    cut = truncated_copy(data_path("hgsc_nest.jpg"), tmp_path / "cut.jpg", 0.5)
    with pytest.raises(UnsupportedSlideError, match=r"cut\.jpg is not a readable image"):
        Slide(cut)


def test_unreadable_svs_reopens_retries_once_then_raises() -> None:
    with Slide(DATA / "unreadable.svs") as slide:
        with pytest.raises(SlideReadError, match=r"unreadable\.svs.*on_tile_error='skip'") as info:
            slide.read_region((0, 0), 0, (16, 16))
        err = info.value
        assert isinstance(err, OSError)
        assert isinstance(err.__cause__, openslide.OpenSlideError)
        assert (err.path, err.level, err.location, err.size) == (
            str(DATA / "unreadable.svs"),
            0,
            (0, 0),
            (16, 16),
        )
        assert slide.read_retries == 1
        # the handle was reopened: metadata works again (OpenSlide's own handle stays dead)
        assert slide.properties["openslide.vendor"] == "aperio"
    copy = pickle.loads(pickle.dumps(err))  # crosses DataLoader worker processes intact
    assert isinstance(copy, SlideReadError)
    assert (str(copy), copy.location, copy.size) == (str(err), (0, 0), (16, 16))


def test_one_broken_tile_does_not_poison_the_handle(tmp_path: Path) -> None:
    broken = tmp_path / "broken.svs"
    x, y = flip_tile_marker(CMU, broken, tile_index=52)
    good = cmu_pixels()[0:64, 0:64]
    with Slide(broken) as slide:
        with pytest.raises(SlideReadError, match=r"broken\.svs"):
            slide.read_region((x + 8, y + 8), 0, (32, 32))
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (64, 64)), good)
        assert slide.read_retries == 1


def test_a_read_whose_reopen_failed_costs_that_read_not_the_slide(tmp_path: Path) -> None:
    """Storage away while a broken tile is retried: later reads reopen the file themselves."""
    broken = tmp_path / "broken.svs"
    away = tmp_path / "away.svs"
    x, y = flip_tile_marker(CMU, broken, tile_index=52)
    good = cmu_pixels()[0:64, 0:64]
    with Slide(broken) as slide:
        broken.rename(away)  # the open handle still reads; a reopen cannot
        with pytest.raises(SlideReadError, match=r"broken\.svs"):
            slide.read_region((x + 8, y + 8), 0, (32, 32))
        assert not slide.closed  # not closed by the user: no "slide is closed" ValueError
        assert "unreachable since a failed read" in repr(slide)
        with pytest.raises(SlideReadError, match=r"broken\.svs.*not found") as info:
            slide.read_region((0, 0), 0, (64, 64))  # still away: a read error, skippable
        assert info.value.location == (0, 0)
        with pytest.raises(SlideError, match=r"could not be reopened after a failed read"):
            _ = slide.dimensions
        away.rename(broken)  # back
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (64, 64)), good)
        assert slide.dimensions == (2220, 2967)
    assert slide.closed
    with pytest.raises(ValueError, match=r"slide is closed"):
        slide.read_region((0, 0), 0, (64, 64))


# --------------------------------------------------------------- levels and mpp (row 6)
@pytest.mark.parametrize(
    ("level", "error", "match"),
    [
        (-1, ValueError, r"level=-1 out of range; slide cmu_pyramid\.svs has 4 levels \(0-3\)"),
        (4, ValueError, r"level=4 out of range.*downsamples \(1, 2, 4\.002, 8\.017\)"),
        (99, ValueError, "level=99 out of range"),
        (1.5, TypeError, "level must be an int, got 1.5"),
        ("0", TypeError, "level must be an int, got '0'"),
        (True, TypeError, "level must be an int, got True"),
    ],
)
def test_bad_levels_are_refused_before_reading(
    pyramid: Path, level: object, error: type[Exception], match: str
) -> None:
    with Slide(pyramid) as slide:
        with pytest.raises(error, match=match):
            slide.read_region((0, 0), level, (4, 4))  # type: ignore[arg-type]
        with pytest.raises(error, match=match):
            slide.resolve(level=level)  # type: ignore[arg-type]


def test_resolve_by_mpp(pyramid: Path) -> None:
    with Slide(pyramid) as slide:
        exact = slide.resolve(mpp=CMU_MPP * 2)
        assert (exact.level, exact.resample) == (1, 1.0)
        between = slide.resolve(mpp=1.5)  # between level 1 (~1.0) and level 2 (~2.0)
        assert between.level == 1
        assert between.scale == pytest.approx(1.5 / CMU_MPP)
        coarse = slide.resolve(mpp=100.0)
        assert coarse.level == 3
        assert slide.resolve().level == 0
        with pytest.raises(ValueError, match=r"mpp=0\.1 is finer than level 0.*mpp \(0\.499"):
            slide.resolve(mpp=0.1)
        with pytest.raises(ValueError, match="pass level= or mpp=, not both"):
            slide.resolve(level=1, mpp=1.0)
        with pytest.raises(ValueError, match="mpp must be a positive number"):
            slide.resolve(mpp=-1.0)


def test_mpp_without_metadata_needs_a_declared_mpp() -> None:
    with (
        Slide(data_path("hgsc_nest.jpg")) as slide,
        pytest.raises(ValueError, match=r"no microns-per-pixel metadata.*Slide\(path, mpp"),
    ):
        slide.resolve(mpp=1.0)
    with Slide(data_path("hgsc_nest.jpg"), mpp=0.5) as slide:
        res = slide.resolve(mpp=1.0)
        assert (res.level, res.resample) == (0, 2.0)
        assert slide.read_tile((0, 0), res, 16).shape == (16, 16, 3)


def test_read_tile_resamples_by_area(pyramid: Path) -> None:
    pixels = cmu_pixels().astype(float)
    with Slide(pyramid) as slide:
        res = slide.resolve(mpp=CMU_MPP * 3)  # level 1 then a further 1.5x
        tile = slide.read_tile((600, 900), res, 20).astype(float)
    expected = pixels[900:960, 600:660].reshape(20, 3, 20, 3, 3).mean(axis=(1, 3))
    assert np.abs(tile - expected).mean() < 3.0


# ------------------------------------------------------------- closed handles (row 21)
def test_use_after_close_raises(pyramid: Path) -> None:
    slide = Slide(pyramid)
    slide.close()
    slide.close()  # idempotent
    assert slide.closed
    for call in (
        lambda: slide.read_region((0, 0), 0, (4, 4)),
        lambda: slide.dimensions,
        lambda: slide.thumbnail(),
        lambda: slide.fingerprint(),
    ):
        with pytest.raises(ValueError, match="slide is closed"):
            call()
    assert "closed" in repr(slide)


def test_pickled_slide_reopens_its_own_handle(pyramid: Path) -> None:
    with Slide(pyramid) as slide:
        copy = pickle.loads(pickle.dumps(slide))
        assert copy._handle is not slide._handle
        np.testing.assert_array_equal(
            copy.read_region((5, 5), 1, (9, 9)), slide.read_region((5, 5), 1, (9, 9))
        )
        copy.close()
        assert not slide.closed


def test_a_pickled_copy_says_nothing_and_leaves_warning_filters_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A copy in a worker process does not repeat the opening's warnings. It silenced them
    with warnings.catch_warnings, which swaps the filters of every thread of the process."""
    cmu = Path(__file__).parent / "data" / "cmu_small_region.svs"
    with pytest.warns(CaptumNMFWarning, match="fallback scale of 0.25"):
        slide = Slide(cmu, fallback_mpp=0.25)
    data = pickle.dumps(slide)
    reader._SAID.clear()  # as in a fresh worker process

    def process_wide(*args: object, **kwargs: object) -> None:
        raise AssertionError("warnings.catch_warnings changes every thread's filters")

    quiet = types.SimpleNamespace(**{**vars(warnings), "catch_warnings": process_wide})
    monkeypatch.setattr(reader, "warnings", quiet)  # the reader's own view of the module
    copy = pickle.loads(data)  # the suite makes the library's warnings errors
    assert copy.mpp == pytest.approx(0.499)
    copy.close()
    slide.close()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mpp": 0}, "mpp must be a positive number"),
        ({"mpp": "0.5"}, "mpp must be a positive number"),
        ({"mpp": float("inf")}, "mpp must be a positive number"),
        ({"background": (255, 255)}, "background must be three ints"),
        ({"background": (0, 0, 256)}, "background must be three ints"),
    ],
)
def test_bad_slide_options(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Slide(CMU, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [(0, 4), (4, -1), (2.5, 4)])
def test_bad_region_sizes(size: tuple[int, int]) -> None:
    with Slide(CMU) as slide, pytest.raises(ValueError, match="size must be two positive ints"):
        slide.read_region((0, 0), 0, size)


def test_thumbnail_downsample(pyramid: Path) -> None:
    with Slide(pyramid) as slide:
        thumb, (dx, dy) = slide.thumbnail(256)
    assert max(thumb.shape[:2]) == 256
    assert dx == pytest.approx(2220 / thumb.shape[1])
    assert dy == pytest.approx(2967 / thumb.shape[0])


def test_write_pyramid_rejects_bad_images(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"H x W x 3 uint8, got shape \(4, 4\)"):
        write_pyramid(np.zeros((4, 4), np.uint8), tmp_path / "x.svs")
    with pytest.raises(ValueError, match="multiple of 16"):
        write_pyramid(np.zeros((4, 4, 3), np.uint8), tmp_path / "x.svs", tile=10)


def test_thumbnail_matches_openslide_and_never_upsamples() -> None:
    with Slide(CMU) as slide, openslide.OpenSlide(str(CMU)) as raw:
        ours, _ = slide.thumbnail(300)
        theirs = np.asarray(raw.get_thumbnail((300, 300)).convert("RGB"))
    assert ours.shape == theirs.shape
    assert np.abs(ours.astype(int) - theirs.astype(int)).mean() < 4.0  # box vs Lanczos
    with Slide(DATA / "boxes.tiff") as slide:
        thumb, down = slide.thumbnail(2048)
    assert thumb.shape == (250, 300, 3)
    assert down == (1.0, 1.0)


def test_a_tiff_at_a_print_resolution_has_no_scale() -> None:
    """OpenSlide's fixture boxes.tiff has 72 dpi resolution tags, which OpenSlide reports as
    352.8 um per pixel; before, that was the slide's scale (tiles chosen and overlays written
    by it), without a word."""
    with openslide.OpenSlide(str(DATA / "boxes.tiff")) as raw:
        assert float(raw.properties["openslide.mpp-x"]) == pytest.approx(25400 / 72)
    with Slide(DATA / "boxes.tiff") as slide:
        said = r"boxes\.tiff records 352\.778 um per pixel \(72 dpi"
        with pytest.warns(CaptumNMFWarning, match=said):
            first = slide.mpp
        assert first is None
        assert slide.mpp is None  # said once
    with Slide(DATA / "boxes.tiff", fallback_mpp=0.5) as given:  # the fallback applies, no word
        assert given.mpp == 0.5
    with Slide(CMU) as scan:  # a scanner's own scale is kept
        assert scan.mpp == pytest.approx(0.499)


def test_failed_reopen_during_retry_is_a_read_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with Slide(DATA / "unreadable.svs") as slide:

        def vanish(self: Slide) -> None:
            raise SlideNotFoundError(f"Slide file not found: {self.path}")

        monkeypatch.setattr(Slide, "_reopen", vanish)
        with pytest.raises(SlideReadError, match=r"unreadable\.svs") as info:
            slide.read_region((0, 0), 0, (16, 16))
        assert isinstance(info.value.__cause__, SlideNotFoundError)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_unreadable_permissions(tmp_path: Path) -> None:
    locked = tmp_path / "locked.svs"
    locked.write_bytes(CMU.read_bytes())
    locked.chmod(0)
    with pytest.raises(PermissionError, match=r"locked\.svs is not readable"):
        Slide(locked)


# ------------------------------------------------------ huge, sparse and broken thumbnails
@pytest.fixture(scope="module")
def sparse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4000 x 4100 px in 512 px tiles (8 x 9), four of them real H&E, the rest empty."""
    he = he_image()
    tiles = {
        (0, 0): he[:512, :512],
        (3, 5): he[512:1024, :512],
        (3, 6): he[:512, 512:1024],
        (7, 2): he[988:, 988:],
    }
    return sparse_tiff(tmp_path_factory.mktemp("sparse") / "sparse.tif", (4000, 4100), tiles=tiles)


def test_tile_layout_of_a_sparse_tiff(sparse: Path) -> None:
    with Slide(sparse) as slide:
        layout = slide.tile_layout(0)
    assert layout is not None
    assert layout.tile_size == (512, 512)
    assert layout.empty.shape == (9, 8)
    assert sorted(zip(*np.nonzero(~layout.empty), strict=True)) == [(0, 0), (3, 5), (3, 6), (7, 2)]
    assert layout.data_pixels == 4 * 512 * 512
    assert layout.data_span(1536, 2048) == (2560, 3584)  # tile row 3: columns 5 and 6
    assert layout.data_span(512, 1536) is None  # rows 1 and 2 hold nothing
    with Slide(data_path("hgsc_nest.jpg")) as image:
        assert image.tile_layout(0) is None  # a plain image has no TIFF tiles


@pytest.mark.parametrize("size", [4100, 2048, 333])
def test_empty_tiles_are_background_without_decoding(
    sparse: Path, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[tuple[tuple[int, int], tuple[int, int]]] = []
    read = Slide.read_region

    def counted(self: Slide, location: tuple[int, int], level: int, size: tuple[int, int]):  # type: ignore[no-untyped-def]
        reads.append((location, size))
        return read(self, location, level, size)

    with Slide(sparse) as slide:
        monkeypatch.setattr(Slide, "read_region", counted)
        fast, down = slide.thumbnail(size)
        read_px = sum(w * h for _, (w, h) in reads)
        slide._layouts[0] = None  # what reading every tile gives
        dense, dense_down = slide.thumbnail(size)
    np.testing.assert_array_equal(fast, dense)  # the same pixels, exactly
    assert down == dense_down
    # only the 4 tiles with data are read (a tile row shared by two strips: a few rows twice)
    assert 4 * 512 * 512 <= read_px <= 4 * 512 * 520


def test_huge_single_level_thumbnail_warns_with_progress(
    sparse: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(reader, "LARGE_THUMBNAIL_PIXELS", 10**6)  # instead of 10^9
    with Slide(sparse) as slide, pytest.warns(LargeThumbnailWarning) as caught:
        slide.thumbnail(1000)
    # only the 4 tiles with data are counted: 4 x 512 x 512 px
    assert "decodes 1,048,576 pixels of level 0, about" in str(caught[0].message)
    assert "write_pyramid" in str(caught[0].message)
    assert "thumbnail of sparse.tif" in capsys.readouterr().err  # the progress bar
    with Slide(CMU) as slide:
        # 10 x 13 JPEG tiles of 240 px: 7,488,000 pixels decoded
        with pytest.warns(LargeThumbnailWarning, match=r"decodes 7,488,000 pixels .* s at the"):
            slide.thumbnail(300, progress=False)
        assert "thumbnail of" not in capsys.readouterr().err
    monkeypatch.setattr(reader, "LARGE_THUMBNAIL_PIXELS", 10**9)
    with Slide(CMU) as slide, warnings.catch_warnings():
        warnings.simplefilter("error")
        slide.thumbnail(300)
    assert "thumbnail of" not in capsys.readouterr().err


def test_thumbnail_skips_unreadable_blocks_only(tmp_path: Path) -> None:
    broken = tmp_path / "broken.svs"
    corners = flip_tile_markers(CMU, broken, [52, 77])  # two 240 px JPEG tiles
    with Slide(CMU) as slide:
        intact = slide.read_thumbnail(2967)  # level 0, one thumbnail pixel per slide pixel
    with Slide(broken) as slide:
        with pytest.raises(SlideReadError, match=r"broken\.svs.*pass on_tile_error='skip'"):
            slide.thumbnail(2220)
        with pytest.warns(UnreadableRegionWarning, match=r"2 region\(s\) of broken\.svs"):
            thumb = slide.read_thumbnail(2967, on_tile_error="skip")
    assert sorted(thumb.unreadable) == sorted((x, y, 240, 240) for x, y in corners)
    lost = np.zeros(thumb.pixels.shape[:2], bool)
    for x, y in corners:
        lost[y : y + 240, x : x + 240] = True
    assert (thumb.pixels[lost] == 255).all()  # background
    np.testing.assert_array_equal(thumb.pixels[~lost], intact.pixels[~lost])
    assert intact.unreadable == ()


def test_bad_thumbnail_arguments() -> None:
    with Slide(CMU) as slide:
        with pytest.raises(ValueError, match="on_tile_error must be 'raise' or 'skip'"):
            slide.thumbnail(64, on_tile_error="ignore")
        with pytest.raises(ValueError, match="max_size must be >= 1, got 0"):
            slide.thumbnail(0)
