"""Shared pieces of the slide-run tests: the small real-H&E slide, its concepts, fault tools."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from captum_nmf import NMFConceptAttribution
from captum_nmf.wsi import SlideTiles, write_pyramid
from captum_nmf.wsi.blocks import BlockReader
from captum_nmf.wsi.reader import Slide
from tests.helpers.synthetic_slides import he_image
from tests.helpers.wsi_models import PoolNet


def he_slide(folder: Path) -> Path:
    """512 x 384 px of real H&E as a pyramid: tiles of 64 px every 16 px fit exactly."""
    return write_pyramid(he_image()[:384, :512], folder / "he.svs", mpp=0.5)


def pool_concepts(slide: Path) -> NMFConceptAttribution:
    """Three concepts of the average-pool test network, fitted on ``slide``'s tiles."""
    net = PoolNet().eval()
    attr = NMFConceptAttribution(net, net.relu, n_concepts=3, random_state=0)
    tiles = SlideTiles(slide, tile_size=64, stride=32, tissue_mask=None)
    return attr.fit(tiles, batch_size=32, progress=False)


def tree(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` with its bytes (to show that nothing changed)."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def flip(path: Path, at: float = 0.5, n: int = 64) -> None:
    """Flip ``n`` bytes of ``path`` from the fraction ``at`` of its length on."""
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    for i in range(start, min(start + n, len(data))):
        data[i] ^= 0xA5
    path.write_bytes(bytes(data))


class InterruptReads:
    """Counts tile reads; raises KeyboardInterrupt at read number ``at`` (1-based).

    A tile is read by ``BlockReader.read`` (one reading thread) or ``Slide.read_tile``
    (``DataLoader`` workers); a block reader's fallback to ``read_tile`` counts once.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at: int | None) -> None:
        self.at, self.calls, self.inside = at, 0, False
        original_tile, original_block = Slide.read_tile, BlockReader.read

        def count() -> None:
            self.calls += 1
            if self.at is not None and self.calls == self.at:
                raise KeyboardInterrupt

        def read_tile(slide: Slide, *args: object, **kwargs: object) -> np.ndarray:
            if not self.inside:
                count()
            return original_tile(slide, *args, **kwargs)  # type: ignore[arg-type]

        def read_block(
            reader: BlockReader, index: int, out: np.ndarray | None = None
        ) -> np.ndarray:
            count()
            self.inside = True
            try:
                return original_block(reader, index, out)
            finally:
                self.inside = False

        monkeypatch.setattr(Slide, "read_tile", read_tile)
        monkeypatch.setattr(BlockReader, "read", read_block)
