"""Figure: the slide's edge ring before and after keeping the edge tiles' border cells.

Slide: 1280 x 960 px of the packaged real H&E ``hgsc_nest.jpg`` (tissue to every edge),
written with ``write_pyramid(image, path, mpp=0.5)`` into a temporary folder. Tiles of 256 px
every 128 px (``SlideTiles`` defaults otherwise: tissue mask from ``detect_tissue``,
``min_tissue=0.25``, ``edge="pad"``), RGB in [0, 1] normalised by ``zoo.normalize``.
Model: EfficientNet-Lite0 with its ImageNet weights (``captum_nmf.zoo``), layer ``head_relu``
(32 px cells, 8 x 8 cells per tile). Concepts: ``NMFConceptAttribution(model, layer, 5,
random_state=0)`` fitted on the same tiles.

Both panels stitch the same tiles' features with :class:`FeatureStitcher` (``border=2``):
"before" with ``coverage=None`` (every tile's 2-cell border dropped, as the paper does),
"after" with ``coverage=cell_coverage(...)`` over every tile (border cells that no tile's
interior covers come from the tiles that see them best). Each cell's concept weights are
solved by NNLS with the fitted concepts; a cell is assigned the concept of largest weight when
it is at least half tissue (``tissue_cells``) and has a value, else shown grey.

Usage::

    python benchmarks/fig_edges.py [--out docs/edges_before_after.png]

Prints the number of tissue cells without a value before and after.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import ListedColormap
from PIL import Image

from captum_nmf import NMFConceptAttribution
from captum_nmf.data import path as data_path
from captum_nmf.wsi import FeatureStitcher, SlideTiles, cell_coverage, write_pyramid
from captum_nmf.wsi.regions import tissue_cells
from captum_nmf.zoo import efficientnet_lite0, normalize

TILE, STRIDE, BORDER, K = 256, 128, 2, 5
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"]


def stitch(
    feats: np.ndarray, origins: np.ndarray, shape: tuple[int, int], coverage: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Mean features (Hc x Wc x C) and counts of the tiles, in raster order."""
    st = FeatureStitcher(shape, feats.shape[-1], border=BORDER, coverage=coverage)
    means = np.zeros((*shape, feats.shape[-1]), np.float32)
    counts = np.zeros(shape, np.int32)
    st.add(feats, origins)
    for band in st.finish():
        means[band.row], counts[band.row] = band.features, band.counts
    return means, counts


def assign(
    attr: NMFConceptAttribution, means: np.ndarray, counts: np.ndarray, tissue: np.ndarray
) -> np.ndarray:
    """Concept of largest NNLS weight per cell with a value and tissue; -1 elsewhere."""
    out = np.full(counts.shape, -1, np.int64)
    have = counts > 0
    weights = np.asarray(attr.nmf_.transform(torch.from_numpy(means[have])))
    best = weights.argmax(axis=1)
    out[have] = np.where(weights.max(axis=1) > 0, best, -1)
    out[~tissue] = -1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/edges_before_after.png")
    args = parser.parse_args()
    torch.manual_seed(0)
    image = np.asarray(Image.open(data_path("hgsc_nest.jpg")).convert("RGB"))[:960, :1280]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_pyramid(image, Path(tmp) / "nest.tiff", mpp=0.5)
        tiles = SlideTiles(path, tile_size=TILE, stride=STRIDE, transform=normalize)
        grid = tiles.grids[0]
        model = efficientnet_lite0()
        attr = NMFConceptAttribution(model, model.head_relu, n_concepts=K, random_state=0)
        attr.fit(tiles, batch_size=16, progress=False)
        feats, idx_all = [], []
        with torch.no_grad():
            for images, idx, _ in tiles.loader(batch_size=16):
                feats.append(attr.features(images).permute(0, 2, 3, 1).numpy())
                idx_all.append(idx.numpy())
        mask = grid.tissue_mask
        tiles.close()
    features = np.concatenate(feats)
    order = np.concatenate(idx_all)
    cell = TILE // features.shape[1]
    shape = (int(np.ceil(960 / cell)), int(np.ceil(1280 / cell)))
    step = STRIDE // cell
    origins = np.stack([grid.rows[order] * step, grid.cols[order] * step], axis=1)
    tissue = tissue_cells(mask, shape, float(cell))
    coverage = cell_coverage(origins, (features.shape[1],) * 2, BORDER, shape)
    panels = {}
    for name, cov in (("before", None), ("after", coverage)):
        means, counts = stitch(features, origins, shape, cov)
        panels[name] = assign(attr, means, counts, tissue)
        missing = int((tissue & (counts == 0)).sum())
        print(f"{name}: {missing} of {int(tissue.sum())} tissue cells without a value")
    cmap = ListedColormap(["#d9d9d9", *COLOURS[:K]])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.3), dpi=90)
    thumb = np.asarray(Image.fromarray(image).resize((1280 // 4, 960 // 4)))
    axes[0].imshow(thumb)
    axes[0].set_title("H&E, 1280 x 960 px (hgsc_nest.jpg)", fontsize=9)
    titles = {
        "before": "before: 2-cell border dropped everywhere",
        "after": "after: edge cells from the tiles that see them best",
    }
    for ax, name in zip(axes[1:], ("before", "after"), strict=True):
        ax.imshow(panels[name] + 1, cmap=cmap, vmin=0, vmax=K, interpolation="nearest")
        ax.set_title(titles[name], fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"Lite0 head_relu, {TILE}/{STRIDE} px tiles, {cell} px cells, K = {K}; grey: no concept",
        fontsize=9,
    )
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    with Image.open(out) as png:  # a 256-colour palette keeps the file small
        small = png.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
