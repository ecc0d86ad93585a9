"""The GPU check in one command (at most ~5 minutes on an H200-class node): one table.

Run it whenever a GPU is lent: ``python benchmarks/bench_gpu.py`` (``--device cuda`` is the
default; ``--small --device cpu`` checks the script itself on a CPU in about a minute).

Slide: the real CMU-1 region written as a 7 x 7 mosaic (15,540 x 20,769 px, cached in
``bench_out/pipeline/``), 512 px tiles every 256 px with the default tissue mask: about
2,500 tissue tiles at level 0. For EfficientNet-Lite0 ``head_relu`` (ImageNet weights, level 0,
batch 64) and VGG16 ``features[29]`` (random weights, level 0, batch 32), each in fp32 and
in bf16 autocast + channels_last, the table gives tiles/s of

* forward only: up to ``--forward-tiles`` tiles preloaded on the device, the model up to the
  layer in batches (the GPU's own speed);
* reading only: the block reader (``TileBatches``, one thread) over every tile of the slide;
* ``explain_slide`` in tile mode (and region mode, fp32), in memory, ``batch_transform`` = the
  model's normalisation on the device; ratio = explain / min(forward, reading), target >= 0.6,
  and >= 1,000 tiles/s for Lite0 fp32 on an H200.

Then the solver on the real 1M x 512 activation matrix (``_activations.py``): ``NMF(6).fit``
time and objective against scikit-learn's ``NMF(solver="cd", init="nndsvda")`` (on the CPU
cores), and ``attribute`` / ``LayerActivation`` for Lite0 (fp32 and bf16 + channels_last).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from _activations import (
    activation_matrix,
    base_parser,
    machine_header,
    objective,
    print_table,
    resolve_device,
    sync,
)
from bench_pipeline import _slide
from captum.attr import LayerActivation

from captum_nmf import NMF, NMFConceptAttribution
from captum_nmf.wsi import Slide, SlideTiles, explain_slide, tile_grid
from captum_nmf.wsi.blocks import TileBatches
from captum_nmf.zoo import efficientnet_lite0, normalize

ROOT = Path(__file__).resolve().parents[1]
ROWS: list[list[str]] = []


def _imagenet(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _time(fn: Callable[[], object], device: torch.device, repeats: int = 1) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _models(device: torch.device) -> list[tuple[str, torch.nn.Module, torch.nn.Module, Callable]]:
    lite = efficientnet_lite0().eval().to(device)
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None).eval().to(device)
    return [
        ("Lite0 head_relu", lite, lite.head_relu, normalize),
        ("VGG16 features[29]", vgg, vgg.features[29], _imagenet),
    ]


def _forward_only(attr: NMFConceptAttribution, pre: torch.Tensor, batch: int, opts: dict) -> None:
    with torch.no_grad():
        for i in range(0, len(pre), batch):
            attr.features(pre[i : i + batch], **opts)


def _read_all(grid: object, n: int) -> None:
    source = TileBatches(grid)  # type: ignore[arg-type]
    for i in range(0, n, 64):
        source.batch(list(range(i, min(i + 64, n))))
    source.close()


def _one_model(
    name: str,
    attr: NMFConceptAttribution,
    norm: Callable[[torch.Tensor], torch.Tensor],
    pre: torch.Tensor,
    setup: dict,
) -> None:
    path, device, n, t_read = setup["path"], setup["device"], setup["n"], setup["t_read"]
    batch = 64 if "Lite0" in name else 32
    for label, opts in setup["variants"]:
        t_fwd = _time(lambda o=opts: _forward_only(attr, pre, batch, o), device) * n / len(pre)
        for mode in ("tile", "region") if label == "fp32" else ("tile",):
            options = {**setup["tiling"], "batch_size": batch, "mode": mode, **opts}
            t_exp = _time(
                lambda options=options: explain_slide(
                    attr, path, batch_transform=norm, progress=False, **options
                ),
                device,
            )
            bound = min(n / t_fwd, n / t_read)
            ROWS.append(
                [
                    f"{name}, {label}, {mode} mode ({n} tiles)",
                    f"{n / t_fwd:.0f}",
                    f"{n / t_read:.0f}",
                    f"{n / t_exp:.0f}",
                    f"{(n / t_exp) / bound:.2f}",
                ]
            )


def slides_part(path: Path, device: torch.device, small: bool, forward_tiles: int) -> None:
    tile, stride = (256, 128) if small else (512, 256)
    with Slide(path) as s:
        grid = tile_grid(s, tile_size=tile, stride=stride)
    n = len(grid)
    t_read = _time(lambda: _read_all(grid, n), device)
    sample = SlideTiles(path, tile_size=tile, stride=stride)
    m = min(forward_tiles, n)
    tiles = torch.stack([sample[i][0] for i in range(m)]).to(device)
    variants: list[tuple[str, dict]] = [("fp32", {})]
    if device.type == "cuda" or small:
        variants.append(("bf16+CL", {"autocast": torch.bfloat16, "channels_last": True}))
    setup = {
        "path": path,
        "device": device,
        "n": n,
        "t_read": t_read,
        "variants": variants,
        "tiling": {"tile_size": tile, "stride": stride},
    }
    for name, model, layer, norm in _models(device):
        pre = norm(tiles)
        attr = NMFConceptAttribution(model, layer, 6, random_state=0)
        attr.fit(pre[: min(m, 256)], progress=False)
        _one_model(name, attr, norm, pre, setup)


def solver_part(device: torch.device, small: bool) -> None:
    from sklearn.decomposition import NMF as SkNMF

    v = activation_matrix(small)
    t0 = time.perf_counter()
    ours = NMF(6, random_state=0).fit(torch.from_numpy(v).to(device))
    sync(device)
    t_ours = time.perf_counter() - t0
    w = ours.transform(torch.from_numpy(v).to(device)).cpu().numpy()
    o_ours = objective(v, w, ours.components_.cpu().numpy())
    t0 = time.perf_counter()
    sk = SkNMF(6, solver="cd", init="nndsvda", random_state=0, max_iter=200).fit(v)
    t_sk = time.perf_counter() - t0
    o_sk = objective(v, sk.transform(v), sk.components_)
    ROWS.append(
        [
            f"NMF(6).fit {v.shape[0]:,} x {v.shape[1]}: time s / objective vs sklearn",
            f"{t_ours:.2f} / {o_ours:.5e}",
            f"{t_sk:.1f} / {o_sk:.5e}",
            "",
            f"{t_ours / t_sk:.3f} / {o_ours / o_sk:.4f}",
        ]
    )


def attribute_part(device: torch.device) -> None:
    lite = efficientnet_lite0().eval().to(device)
    size = 64 if device.type == "cuda" else 8
    x = torch.rand(size, 3, 512, 512, generator=torch.Generator().manual_seed(0)).to(device)
    attr = NMFConceptAttribution(lite, lite.head_relu, 6, random_state=0)
    attr.fit(normalize(x[:8]), progress=False)
    base = LayerActivation(lite, lite.head_relu)
    variants: list[tuple[str, dict]] = [("fp32", {})]
    if device.type == "cuda":
        variants.append(("bf16+CL", {"autocast": torch.bfloat16, "channels_last": True}))
    for label, opts in variants:
        t_a = _time(lambda opts=opts: attr.attribute(normalize(x), **opts), device, 5)
        with torch.autocast(device.type, torch.bfloat16, enabled=bool(opts)):
            t_l = _time(lambda: base.attribute(normalize(x)), device, 5)
        ROWS.append(
            [
                f"attribute / LayerActivation, Lite0 {label}, batch {size}",
                f"{size / t_a:.0f}",
                f"{size / t_l:.0f}",
                "",
                f"{t_a / t_l:.3f}",
            ]
        )


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.set_defaults(device="cuda")
    parser.add_argument("--forward-tiles", type=int, default=512)
    args = parser.parse_args()
    device = resolve_device(args.device)
    machine_header("bench_gpu", device)
    out = ROOT / "bench_out" / "pipeline"
    out.mkdir(parents=True, exist_ok=True)
    path = _slide(out, 1 if args.small else 7)
    slides_part(path, device, args.small, 64 if args.small else args.forward_tiles)
    solver_part(device, args.small)
    attribute_part(device)
    print_table(
        ["measurement", "forward / ours", "reading / reference", "explain_slide", "ratio"], ROWS
    )


if __name__ == "__main__":
    main()
