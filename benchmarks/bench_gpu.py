"""The GPU check in one command (a few minutes on an H200-class node): one table.

Run it whenever a GPU is lent: ``python benchmarks/bench_gpu.py`` (``--device cuda`` is the
default; ``--small --device cpu`` checks the script itself on a CPU in about a minute).
``benchmarks/device_check.sh`` runs it after the CUDA tests, in one prepared command.
Each row is printed as soon as it is measured (a run cut short keeps what it measured), and
the whole table again at the end. Every timed call is warmed up once first (CUDA context,
kernel loading, cuDNN plans).

Parts (``--parts``, in this order, default ``asn``):

a. ``attribute`` / ``LayerActivation`` for EfficientNet-Lite0 ``head_relu`` (ImageNet
   weights) and VGG16 ``features[29]`` (random weights), batch ``--attr-batch`` (64) of
   512 px inputs, fp32 and bf16 autocast + channels_last (the model a channels-last copy,
   the batch channels-last, for both methods): median of ``--repeats`` paired rounds,
   alternating which goes first. Target <= 1.03.
s. Slide: the real CMU region written as a 7 x 7 mosaic (15,540 x 20,769 px, cached in
   ``bench_out/pipeline/``), 512 px tiles every 256 px with the default tissue mask: about
   2,500 tissue tiles at level 0. For Lite0 (batch 64) and VGG16 (batch 32), each in fp32
   and in bf16 autocast + channels_last, tiles/s of
   * forward only: up to ``--forward-tiles`` tiles preloaded on the device, the model up to
     the layer in batches (the GPU's own speed);
   * reading only: the block reader (``TileBatches``) over every tile of the slide, with
     as many decoding threads as ``explain_slide`` uses for a GPU model, ``uint8`` in
     pinned memory (what a run hands to the device);
   * ``explain_slide`` in tile and region mode, in memory, ``batch_transform`` = the
     model's normalisation on the device; ratio = explain / min(forward, reading), target
     >= 0.6, and >= 1,000 tiles/s for Lite0 fp32 in tile mode.
n. The solver on the real 1M x 512 activation matrix (``_activations.py``, built on the GPU
   when it is not cached): ``NMF(6).fit`` time and objective against scikit-learn's
   ``NMF(solver="cd", init="nndsvda")`` on the CPU cores.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torchvision
from _activations import (
    activation_matrix,
    base_parser,
    machine_header,
    median_times,
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
from captum_nmf.wsi.run.execute import decoders_for
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


def _read_all(grid: object, n: int, device: torch.device) -> None:
    """Every tile as ``explain_slide`` reads it for a model on ``device`` (threads, pinning)."""
    source = TileBatches(  # type: ignore[arg-type]
        grid, threads=decoders_for(device), pin_memory=device.type == "cuda"
    )
    for i in range(0, n, 64):
        source.batch(list(range(i, min(i + 64, n))))
    source.close()


def _variant_attr(
    model: torch.nn.Module, layer: torch.nn.Module, fit_x: torch.Tensor, opts: dict
) -> NMFConceptAttribution:
    """Concepts for one variant: with ``channels_last`` on a channels-last copy of the model."""
    cl = bool(opts.get("channels_last"))
    net = copy.deepcopy(model).to(memory_format=torch.channels_last) if cl else model
    attr = NMFConceptAttribution(net, _same_module(model, net, layer), 6, random_state=0)
    return attr.fit(fit_x, progress=False)


def _one_model(
    name: str,
    model: torch.nn.Module,
    layer: torch.nn.Module,
    norm: Callable[[torch.Tensor], torch.Tensor],
    pre: torch.Tensor,
    setup: dict,
) -> None:
    path, device, n, t_read = setup["path"], setup["device"], setup["n"], setup["t_read"]
    batch = 64 if "Lite0" in name else 32
    for label, opts in setup["variants"]:
        attr = _variant_attr(model, layer, pre[:batch], opts)
        _forward_only(attr, pre[:batch], batch, opts)  # warm-up
        t_fwd = _time(lambda o=opts, a=attr: _forward_only(a, pre, batch, o), device)
        t_fwd *= n / len(pre)
        for mode in ("tile", "region"):
            options = {**setup["tiling"], "batch_size": batch, "mode": mode, **opts}

            def run(where: Path, a: NMFConceptAttribution = attr, o: dict = options) -> None:
                explain_slide(a, where, batch_transform=norm, progress=False, **o)

            # warm-up on the small slide (kernels, cuDNN plans of this variant and mode)
            run(setup["warm"], o={**options, "tissue_mask": "otsu"})
            t_exp = _time(lambda run=run: run(path), device)
            bound = min(n / t_fwd, n / t_read)
            lite_fp32 = "Lite0" in name and label == "fp32"
            target = ">= 0.6" + (", >= 1,000 tiles/s" if lite_fp32 else "")
            _row(
                [
                    f"{name}, {label}, {mode} mode ({n} tiles)",
                    f"{n / t_fwd:.0f}",
                    f"{n / t_read:.0f}",
                    f"{n / t_exp:.0f}",
                    f"{(n / t_exp) / bound:.2f}",
                    target if mode == "tile" else ">= 0.6",
                ]
            )
        del attr


def slides_part(
    path: Path, warm: Path, device: torch.device, small: bool, forward_tiles: int
) -> None:
    tile, stride = (256, 128) if small else (512, 256)
    with Slide(path) as s:
        grid = tile_grid(s, tile_size=tile, stride=stride)
    n = len(grid)
    _read_all(grid, min(n, 128), device)  # warm-up (page cache, threads)
    t_read = _time(lambda: _read_all(grid, n, device), device)
    sample = SlideTiles(path, tile_size=tile, stride=stride)
    m = min(forward_tiles, n)
    tiles = torch.stack([sample[i][0] for i in range(m)]).to(device)
    variants: list[tuple[str, dict]] = [("fp32", {})]
    if device.type == "cuda" or small:
        variants.append(("bf16+CL", {"autocast": torch.bfloat16, "channels_last": True}))
    setup = {
        "path": path,
        "warm": warm,
        "device": device,
        "n": n,
        "t_read": t_read,
        "variants": variants,
        # the tissue mask computed once, as for the reading: planning is not timed
        "tiling": {"tile_size": tile, "stride": stride, "tissue_mask": grid.tissue_mask},
    }
    for name, model, layer, norm in _models(device):
        _one_model(name, model, layer, norm, norm(tiles), setup)


def solver_part(device: torch.device, small: bool) -> None:
    from sklearn.decomposition import NMF as SkNMF

    v = activation_matrix(small)
    x = torch.from_numpy(v).to(device)  # the copy to the device is not the fit's time
    sync(device)
    t0 = time.perf_counter()
    ours = NMF(6, random_state=0)
    w = ours.fit_transform(x)
    sync(device)
    t_ours = time.perf_counter() - t0
    o_ours = objective(v, w.cpu().numpy(), ours.components_.cpu().numpy())
    del x, w
    print(f"# ours: NMF(6).fit_transform {t_ours:.2f} s, objective {o_ours:.5e}", flush=True)
    t0 = time.perf_counter()
    sk = SkNMF(6, solver="cd", init="nndsvda", random_state=0, max_iter=200)
    w_sk = sk.fit_transform(v)  # scored on its own W, as ours (no further transform)
    t_sk = time.perf_counter() - t0
    o_sk = objective(v, w_sk, sk.components_)
    _row(
        [
            f"NMF(6).fit_transform {v.shape[0]:,} x {v.shape[1]}: time s / objective vs sklearn",
            f"{t_ours:.2f} / {o_ours:.5e}",
            f"{t_sk:.1f} / {o_sk:.5e}",
            "",
            f"{t_ours / t_sk:.3f} / {o_ours / o_sk:.4f}",
            "time <= 0.5, objective <= 1.0",
        ]
    )


def attribute_part(device: torch.device, small: bool, batch: int, repeats: int) -> None:
    size = 224 if small else 512
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=gen).to(device)
    variants: list[tuple[str, dict]] = [("fp32", {})]
    if device.type == "cuda" or small:
        variants.append(("bf16+CL", {"autocast": torch.bfloat16, "channels_last": True}))
    for name, model, layer, norm in _models(device):
        fit_x = norm(x[: min(8, batch)])
        for label, opts in variants:
            cl = bool(opts.get("channels_last"))
            attr = _variant_attr(model, layer, fit_x, opts)  # a channels-last copy for both
            base = LayerActivation(attr.forward_func, attr.layer)
            xb = norm(x)
            xb = xb.contiguous(memory_format=torch.channels_last) if cl else xb
            amp = opts.get("autocast")

            def floor(base: LayerActivation = base, xb: torch.Tensor = xb, amp=amp) -> object:
                ctx = torch.autocast(device.type, amp) if amp is not None else nullcontext()
                with ctx:
                    return base.attribute(xb)

            def ours(attr=attr, xb=xb, opts=opts) -> object:
                return attr.attribute(xb, **opts)

            t = median_times({"ours": ours, "LayerActivation": floor}, repeats, device)
            _row(
                [
                    f"attribute / LayerActivation, {name}, {label}, batch {batch} x {size} px",
                    f"{batch / t['ours']:.0f}",
                    f"{batch / t['LayerActivation']:.0f}",
                    "",
                    f"{t['ours'] / t['LayerActivation']:.3f}",
                    "<= 1.03",
                ]
            )
            del attr, base


def _same_module(model: torch.nn.Module, copy_: torch.nn.Module, layer: torch.nn.Module):
    """``layer``'s counterpart in ``copy_`` (a deep copy of ``model``; itself when the same)."""
    if copy_ is model:
        return layer
    name = next(n for n, m in model.named_modules() if m is layer)
    return copy_.get_submodule(name)


HEADER = [
    "measurement",
    "forward / ours",
    "reading / reference",
    "explain_slide",
    "ratio",
    "target",
]


def _row(row: list[str]) -> None:
    """Keep the row for the final table and print it now (a run cut short keeps it)."""
    ROWS.append(row)
    print("| " + " | ".join(row) + " |", flush=True)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.set_defaults(device="cuda")
    parser.add_argument("--parts", default="asn", help="a: attribute, s: slides, n: NMF fit")
    parser.add_argument("--forward-tiles", type=int, default=512)
    parser.add_argument("--attr-batch", type=int, default=None, help="default 64 (small: 4)")
    parser.add_argument("--repeats", type=int, default=None, help="paired rounds (default 6)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    machine_header("bench_gpu", device)
    print("| " + " | ".join(HEADER) + " |")
    print("|" + " --- |" * len(HEADER), flush=True)
    if "a" in args.parts:
        batch = args.attr_batch or (4 if args.small else 64)
        attribute_part(device, args.small, batch, args.repeats or (2 if args.small else 6))
    if "s" in args.parts:
        out = ROOT / "bench_out" / "pipeline"
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        warm = _slide(out, 1)  # the CMU region itself: warm-up calls
        path = warm if args.small else _slide(out, 7)
        print(f"# slide {path.name} ready in {time.perf_counter() - t0:.0f} s", flush=True)
        slides_part(path, warm, device, args.small, 64 if args.small else args.forward_tiles)
    if "n" in args.parts:
        solver_part(device, args.small)
    print()
    print_table(HEADER, ROWS)


if __name__ == "__main__":
    main()
