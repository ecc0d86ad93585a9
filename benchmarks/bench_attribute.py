"""Per-batch cost of ``NMFConceptAttribution.attribute`` vs plain activations and vs DFF.

Two models, each timed in the same run on the same batch of real H&E tiles:

(i)  EfficientNet-Lite0, ImageNet weights (``captum_nmf.zoo.efficientnet_lite0``), layer
     ``head_relu`` (post-ReLU6, 1280 channels, 16 x 16 at 512 px); batch of 8 tiles.
(ii) torchvision VGG16 with random weights (``vgg16(weights=None)`` after
     ``torch.manual_seed(0)``), layer ``features[29]`` (the last post-ReLU, 512 x 32 x 32 at
     512 px), batch of the first 4 of those tiles: the paper's geometry.

Tiles: 512 x 512 crops of the two packaged 1500 x 1500 H&E images, RGB in [0, 1], normalised
with ``captum_nmf.zoo.normalize`` for both models. Batch tiles: the 2 x 2 grid at offsets
{0, 476}^2 of each image (inside the top-left 988 px square). Concepts (K = 6,
``random_state=0``) are first fitted in memory on 10 *other* tiles: offsets (988, 0),
(988, 494), (988, 988), (0, 988), (494, 988) of each image (disjoint from the batch tiles).

Timed (wall clock, each call warmed up once; ours and LayerActivation in ``2 x --repeats``
rounds of their own, one after the other, alternating which goes first; DFF and the
transform alone in ``--repeats`` further rounds, so that the memory DFF's autograd graph
releases is never re-faulted by one of the two compared; the median per method is
reported; torch threads left at default):

* ``NMFConceptAttribution(model, layer, 6).attribute(x)`` -> N x 6 x h x w concept maps;
* ``captum.attr.LayerActivation(model, layer).attribute(x)`` -> the raw activations (the
  floor: one forward pass with a hook);
* pytorch-grad-cam ``DeepFeatureFactorization(model=model, target_layer=layer,
  computation_on_concepts=None)(x, n_components=6)``: one forward (with autograd, as DFF
  runs it) plus a scikit-learn NMF (``init="random"``) refitted on this batch's activations,
  plus its per-image resize of the maps to the input size (that is what the call does). The
  DFF object is constructed inside the timed call and its hooks released after it, so its
  hooks never fire during the other methods.

Also printed: the time of ``nmf_.transform`` alone on the batch's activation rows, to show
where ``attribute``'s overhead over ``LayerActivation`` goes. ``--small``: 224 px tiles and
fewer repeats.

Forward options (meant for a GPU, ``--device cuda``): ``--bf16`` runs ``attribute`` with
``autocast=torch.bfloat16`` (maps solved in float32) and ``LayerActivation`` inside
``torch.autocast(device, torch.bfloat16)``; ``--channels-last`` converts the models to
channels-last memory and gives both channels-last batches (``channels_last=True`` for
``attribute``). DFF always runs plain float32.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from _activations import (
    IMAGES,
    base_parser,
    load_image,
    machine_header,
    median_times,
    print_table,
    resolve_device,
)
from captum.attr import LayerActivation
from pytorch_grad_cam import DeepFeatureFactorization
from torch import nn

from captum_nmf import NMFConceptAttribution, zoo

K = 6
BATCH_OFFSETS = ((0, 0), (0, 476), (476, 0), (476, 476))
FIT_OFFSETS = ((988, 0), (988, 494), (988, 988), (0, 988), (494, 988))


def tiles(offsets: tuple[tuple[int, int], ...], size: int) -> torch.Tensor:
    """Normalised tiles at ``offsets`` of both images (image-major), resized to ``size``."""
    out = []
    for name in IMAGES:
        img = load_image(name)
        for top, left in offsets:
            tile = img[:, :, top : top + 512, left : left + 512]
            if size != 512:
                tile = nn.functional.interpolate(
                    tile, size=(size, size), mode="bilinear", antialias=True, align_corners=False
                )
            out.append(tile)
    return zoo.normalize(torch.cat(out))


def run_dff(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> Any:
    """One DeepFeatureFactorization call; its hooks are released afterwards."""
    dff = DeepFeatureFactorization(model=model, target_layer=layer, computation_on_concepts=None)
    try:
        return dff(x, n_components=K)
    finally:
        dff.activations_and_grads.release()


def bench_model(
    label: str,
    model: nn.Module,
    layer: nn.Module,
    x: torch.Tensor,
    fit_x: torch.Tensor,
    repeats: int,
    device: torch.device,
    *,
    bf16: bool = False,
    channels_last: bool = False,
) -> list[str]:
    """Time the three methods on ``x``; return one table row."""
    concepts = NMFConceptAttribution(model, layer, K, random_state=0)
    concepts.fit(fit_x, progress=False)
    plain = LayerActivation(model, layer)
    acts = plain.attribute(x)
    rows = acts.permute(0, 2, 3, 1).reshape(-1, acts.shape[1])
    amp = torch.bfloat16 if bf16 else None
    xf = x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def floor() -> Any:
        if amp is None:
            return plain.attribute(xf)
        with torch.autocast(device.type, dtype=amp):
            return plain.attribute(xf)

    calls: dict[str, Callable[[], Any]] = {
        "ours": lambda: concepts.attribute(x, autocast=amp, channels_last=channels_last),
        "LayerActivation": floor,
        "DFF": lambda: run_dff(model, layer, x),
        "transform": lambda: concepts.nmf_.transform(rows),
    }
    # ours and its floor side by side, alternating which goes first, in rounds of their own:
    # the call after DFF pays for re-faulting the memory DFF's autograd graph released, which
    # would land on one of the two at random and swamp a difference of a few percent
    pair = ("LayerActivation", "ours")
    med = median_times({name: calls[name] for name in pair}, 2 * repeats, device)
    rest = ("transform", "DFF")
    med |= median_times({name: calls[name] for name in rest}, repeats, device)
    n, c, h, w = acts.shape
    return [
        label,
        f"{n} x {tuple(x.shape[1:])} -> {c} x {h} x {w}",
        f"{med['ours']:.3f}",
        f"{med['LayerActivation']:.3f}",
        f"{med['DFF']:.3f}",
        f"{med['transform']:.4f}",
        f"{med['ours'] / med['LayerActivation']:.3f}",
        f"{med['ours'] / med['DFF']:.3f}",
    ]


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7, 3)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast forward")
    parser.add_argument("--channels-last", action="store_true", help="channels-last model/batch")
    args = parser.parse_args()
    opts = {"bf16": args.bf16, "channels_last": args.channels_last}
    memory = torch.channels_last if args.channels_last else torch.contiguous_format
    device = resolve_device(args.device)
    size = 224 if args.small else 512
    repeats = args.repeats or (3 if args.small else 7)
    warnings.filterwarnings("ignore")  # sklearn ConvergenceWarning inside DFF
    machine_header(
        f"bench_attribute: {size} px H&E tiles, K = {K}, median of {repeats} rounds, "
        f"bf16={args.bf16}, channels_last={args.channels_last}",
        device,
    )
    batch = tiles(BATCH_OFFSETS, size).to(device)
    fit_tiles = tiles(FIT_OFFSETS, size).to(device)

    results = []
    eff = zoo.efficientnet_lite0().to(device, memory_format=memory).eval()
    results.append(
        bench_model(
            "EfficientNet-Lite0 head_relu",
            eff,
            eff.head_relu,
            batch,
            fit_tiles,
            repeats,
            device,
            **opts,
        )
    )
    del eff
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None).to(device, memory_format=memory).eval()
    results.append(
        bench_model(
            "VGG16 (random) features[29]",
            vgg,
            vgg.features[29],
            batch[:4],
            fit_tiles,
            repeats,
            device,
            **opts,
        )
    )
    print()
    print_table(
        [
            "model / layer",
            "batch -> activations",
            "ours (s)",
            "LayerActivation (s)",
            "DFF (s)",
            "transform alone (s)",
            "ours / LayerAct",
            "ours / DFF",
        ],
        results,
    )
    print("# target: ours / LayerActivation <= 1.02 on 2 CPU cores, <= 1.03 on a GPU")


if __name__ == "__main__":
    main()
