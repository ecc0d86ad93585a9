"""Fixes from the hostile review of fitting from data, the gallery and the plots (2026-12-07).

Subsampling by tile, not by batch; padded DistributedSampler shards; the gallery's tile ids,
near-duplicates, reads and stale figures; plots beyond 17 concepts; argument checks.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, TensorDataset

from captum_nmf import NMFConceptAttribution
from captum_nmf.exceptions import CaptumNMFWarning, LayerError, SlideReadError
from captum_nmf.gallery import concept_gallery
from captum_nmf.viz import plot_concepts, plot_overlay
from captum_nmf.wsi import SlideTiles, write_pyramid
from tests.helpers.synthetic_slides import he_image
from tests.helpers.wsi_models import PoolNet

matplotlib.use("Agg")


class _Identity(nn.Module):
    """A 1 x 1 identity convolution and a ReLU: the activations are the image's channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3).reshape(3, 3, 1, 1))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x))


RED = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
BLUE = torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1)


def test_a_small_last_batch_keeps_proportionally_fewer_locations() -> None:
    # 33 tiles of 8 x 8 locations, batches of 32: the last batch is one tile. Before, it kept
    # 64 locations like a full batch, weighing 32 times as much per tile (0.727 vs 0.515)
    x = torch.stack([RED.expand(3, 8, 8), BLUE.expand(3, 8, 8)] * 16 + [BLUE.expand(3, 8, 8)])
    net = _Identity()
    attr = NMFConceptAttribution(net, net.relu, n_concepts=2, random_state=0)
    attr.fit(TensorDataset(x), batch_size=32, max_locations_per_batch=64, progress=False)
    assert attr.n_samples_seen_ == 64 + 2  # a 32nd of the quota for the one-tile batch
    loader = DataLoader(TensorDataset(x), batch_size=32)  # the loader's own batch size
    attr.fit(loader, max_locations_per_batch=64, progress=False)
    assert attr.n_samples_seen_ == 66


def test_a_padding_distributed_sampler_warns_and_drop_last_does_not() -> None:
    data = TensorDataset(torch.rand(5, 3, 4, 4))
    net = _Identity()
    attr = NMFConceptAttribution(net, net.relu, n_concepts=2, random_state=0)
    padded = DataLoader(data, batch_size=2, sampler=DistributedSampler(data, 2, 0, shuffle=False))
    with pytest.warns(CaptumNMFWarning, match=r"pads its 2 shards by repeating 1 tile"):
        attr.fit(padded, progress=False)
    exact = DistributedSampler(data, 2, 0, shuffle=False, drop_last=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CaptumNMFWarning)
        attr.fit(DataLoader(data, batch_size=2, sampler=exact), progress=False)


@pytest.fixture(scope="module")
def slide_tiles(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[SlideTiles, NMFConceptAttribution]:
    path = write_pyramid(he_image()[:192, :256], tmp_path_factory.mktemp("g") / "s.svs", mpp=0.5)
    net = PoolNet().eval()
    tiles = SlideTiles(path, tile_size=64, stride=64, tissue_mask=None, on_tile_error="skip")
    attr = NMFConceptAttribution(net, net.relu, 2, random_state=0).fit(tiles, progress=False)
    return tiles, attr


def test_gallery_tile_ids_through_the_slides_loader(
    slide_tiles: tuple[SlideTiles, NMFConceptAttribution], monkeypatch: pytest.MonkeyPatch
) -> None:
    tiles, attr = slide_tiles
    good = tiles.read

    def read(index: int) -> np.ndarray:
        if index == 1:
            raise SlideReadError("tile 1 cannot be read")
        return good(index)

    monkeypatch.setattr(tiles, "read", read)  # tile 1 skipped: stream positions shift by one
    direct = concept_gallery(attr, tiles, top_n=3, progress=False)
    loaded = concept_gallery(attr, tiles.loader(batch_size=4), top_n=3, progress=False)
    assert [[e.tile for e in c] for c in loaded.entries] == [
        [e.tile for e in c] for c in direct.entries
    ]
    for entries in loaded.entries:
        for e in entries:  # each reported tile is the one whose map is shown
            assert e.slide is not None  # the slide and location columns are kept too
            x, _ = tiles[e.tile]
            maps = attr.attribute(x[None])[0].double().numpy()
            assert any(np.allclose(m, e.intensity, atol=1e-6) for m in maps)


def test_gallery_reads_only_the_tiles_it_shows(
    slide_tiles: tuple[SlideTiles, NMFConceptAttribution], monkeypatch: pytest.MonkeyPatch
) -> None:
    tiles, attr = slide_tiles
    reads = []
    good = tiles.read
    monkeypatch.setattr(tiles, "read", lambda i: reads.append(i) or good(i))
    gallery = concept_gallery(attr, tiles, top_n=2, progress=False)
    shown = sum(len(e) for e in gallery.entries)
    assert len(reads) == len(tiles) + shown  # was once per concept and candidate as well


def test_near_duplicates_do_not_crowd_out_distinct_tiles() -> None:
    g = torch.Generator().manual_seed(0)
    texture = torch.rand(1, 16, 16, generator=g)
    copies = [RED * (0.9 + 0.1 * texture) + 0.001 * torch.rand(3, 16, 16, generator=g)] * 30
    distinct = [RED * (0.5 + 0.3 * torch.rand(1, 16, 16, generator=g)) for _ in range(20)]
    blues = [BLUE * (0.5 + 0.5 * torch.rand(1, 16, 16, generator=g)) for _ in range(20)]
    x = torch.stack(copies + distinct + blues).clamp(0, 1)
    net = _Identity()
    attr = NMFConceptAttribution(net, net.relu, n_concepts=2, random_state=0).fit(x, progress=False)
    gallery = concept_gallery(attr, x, top_n=6, progress=False)
    red = int(torch.argmax(attr.concepts_[:, 0]))
    tiles = [e.tile for e in gallery.entries[red]]
    assert len(tiles) == 6  # was 1: the 30 copies filled the candidate pool
    assert sum(t < 30 for t in tiles) == 1
    with pytest.raises(ValueError, match=r"images holds 10 images but the source has more"):
        concept_gallery(attr, x, top_n=2, images=x[:10], progress=False)
    with pytest.raises(ValueError, match=r"images holds 70 images for 20 tiles"):
        concept_gallery(attr, x[:20], top_n=2, images=x, progress=False)


def test_saving_a_smaller_gallery_removes_only_our_extra_figures(tmp_path: Path) -> None:
    x = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    net = _Identity()
    out = tmp_path / "gallery"
    for k in (3, 2):
        attr = NMFConceptAttribution(net, net.relu, n_concepts=k, random_state=0)
        concept_gallery(attr.fit(x, progress=False), x, top_n=2, progress=False).save(out)
    assert sorted(p.name for p in out.iterdir()) == [
        "gallery.csv",
        "gallery.json",
        "gallery_concept_0.png",
        "gallery_concept_1.png",
    ]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "gallery_concept_7.png").write_bytes(b"a user's figure")
    concept_gallery(attr, x, top_n=2, progress=False).save(foreign)
    assert (foreign / "gallery_concept_7.png").read_bytes() == b"a user's figure"  # not ours


def test_plots_beyond_17_concepts_and_labels_of_the_wrong_length() -> None:
    image = np.random.default_rng(0).random((8, 8, 3))
    maps = np.random.default_rng(1).random((18, 8, 8))
    plot_concepts(image, maps)  # IndexError: PALETTE has 17 colours
    with pytest.raises(ValueError, match=r"labels holds 2 names for 18 concepts"):
        plot_overlay(image, maps, labels=["a", "b"])
    with pytest.raises(ValueError, match=r"labels holds 19 names for 18 concepts"):
        plot_concepts(image, maps, labels=[str(i) for i in range(19)])


class _Tokens(nn.Module):
    """N x L x D tokens (16 = a 4 x 4 grid of 4 channels) through a linear layer and a ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.linear(x)).mean(dim=1)

    @staticmethod
    def grid(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], 4, 4)


class _Samples(IterableDataset):
    def __iter__(self):  # type: ignore[no-untyped-def]
        yield from torch.rand(4, 3, 12, 12)


def test_fit_argument_checks_before_any_work() -> None:
    net = _Identity()
    attr = NMFConceptAttribution(net, net.relu, n_concepts=3, random_state=0)
    with pytest.raises(LayerError, match=r"shape \(3, 12, 12\): if the source yields single"):
        attr.fit(_Samples(), progress=False)
    tokens = _Tokens()  # a model of N x L x D inputs (tokens) still fits: 3-D is no error
    fitted = NMFConceptAttribution(
        tokens, tokens.relu, 2, random_state=0, reshape_transform=_Tokens.grid
    ).fit(torch.rand(6, 16, 4), progress=False)
    assert tuple(fitted.attribute(torch.rand(2, 16, 4)).shape) == (2, 2, 4, 4)
    with pytest.raises(ValueError, match=r"max_locations_per_batch=2 is below n_concepts=3"):
        attr.fit(torch.rand(4, 3, 8, 8), max_locations_per_batch=2, progress=False)
    seeded = NMFConceptAttribution(
        net,
        net.relu,
        2,
        random_state=np.random.RandomState(0),  # type: ignore[arg-type]
    )
    seeded.fit(
        torch.rand(4, 3, 8, 8), max_locations_per_batch=16, progress=False
    )  # was a TypeError
    with pytest.raises(
        TypeError,
        match=r"random_state must be None, an int in \[0, 2\*\*32 - 1\] or a numpy RandomState",
    ):
        NMFConceptAttribution(net, net.relu, 2, random_state="0").fit(  # type: ignore[arg-type]
            torch.rand(4, 3, 8, 8), progress=False
        )


def _bare_images(tiles: SlideTiles) -> DataLoader[SlideTiles]:
    """A shuffled loader over ``tiles`` whose own collate keeps the images only (no indices)."""
    return DataLoader(
        tiles,
        batch_size=4,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
        collate_fn=lambda items: torch.stack([image for image, _ in items]),
    )


def test_a_loader_whose_batches_carry_no_indices_shows_the_tiles_as_given(
    slide_tiles: tuple[SlideTiles, NMFConceptAttribution],
) -> None:
    tiles, attr = slide_tiles
    loader = _bare_images(tiles)
    gallery = concept_gallery(attr, loader, top_n=3, progress=False)
    for entries in gallery.entries:
        for e in entries:  # no slide reads: the scored tensor is what is shown
            assert e.location is None
            assert e.slide is None


def test_the_command_lines_stride_defaults_to_half_a_tile() -> None:
    from captum_nmf.cli.commands import _stride
    from captum_nmf.cli.parser import build_parser

    argv = ["explain", "--model", "m", "--layer", "l", "--concepts", "c.safetensors"]
    args = build_parser().parse_args([*argv, "--out", "o", "--tile-size", "224", "s.svs"])
    assert _stride(args) == 112  # was a fixed 256, refused as larger than the tile
    args.stride = 64
    assert _stride(args) == 64


def test_blank_batches_are_refused_saying_so() -> None:
    # the stream holds its first rows until K of them are non-zero: with blank tiles only it
    # never starts, and the message says so (it said "0 samples", though 64 rows came)
    net = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.ReLU())
    attr = NMFConceptAttribution(net, net[1], 3, random_state=0)
    with pytest.raises(ValueError, match=r"received 64 rows, 0 of them with a non-zero.*blank"):
        attr.fit([torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)], progress=False)
    blank_first = [torch.zeros(8, 3, 4, 4), torch.rand(8, 3, 4, 4)]  # was: dead concepts
    attr.fit(blank_first, progress=False)
    assert bool((attr.concepts_.norm(dim=1) > 0.99).all())


def test_sampling_names_no_slide_for_bare_images_of_a_slide_loader(
    slide_tiles: tuple[SlideTiles, NMFConceptAttribution],
) -> None:
    # the twin of the gallery's case: a shuffled loader with its own collate yields images
    # only, so their stream positions must not be looked up in the dataset as tile indices
    from captum_nmf.compare.selection import sample_rows

    tiles, attr = slide_tiles
    loader = _bare_images(tiles)
    sample = sample_rows(attr, loader, progress=False)
    assert set(sample.groups.tolist()) == {-1}
    assert set(sample_rows(attr, tiles, progress=False).groups.tolist()) == {0}
