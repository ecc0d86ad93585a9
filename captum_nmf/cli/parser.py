"""The ``captum-nmf`` argument parser: fit, explain, analyse, export, demo, info, name, select-k."""

from __future__ import annotations

import argparse

from captum_nmf._version import __version__
from captum_nmf.demo.zoo import NORMALISATIONS

__all__ = ["EXAMPLES", "build_parser"]

EXAMPLES = {
    "fit": "captum-nmf fit --model torchvision:vgg16 --weights vgg16.safetensors "
    "--layer features.29 --k 6 --level 1 --out concepts.safetensors a.svs b.svs\n"
    "  captum-nmf fit ... --out concepts.safetensors --ray --workers 4 slides/*.svs",
    "explain": "captum-nmf explain --model torchvision:vgg16 --weights vgg16.safetensors "
    "--layer features.29 --concepts concepts.safetensors --level 1 --out runs/c --resume c.svs\n"
    "  captum-nmf explain --model torchvision:vgg16 --weights vgg16.safetensors "
    "--layer features.29 --concepts concepts.safetensors --level 1 --out runs/cohort "
    "--ray slides/*.svs",
    "analyse": "captum-nmf analyse --model torchvision:vgg16 --weights vgg16.safetensors "
    "--layer features.29 --concepts concepts.safetensors --n-tiles 10000 --out analysis a.svs",
    "export": "captum-nmf export runs/c --out runs/c/export",
    "demo": "captum-nmf demo --out demo_out",
    "info": "captum-nmf info slide.svs",
    "name": 'captum-nmf name concepts.safetensors 3="tumour epithelium" 0=stroma',
    "select-k": "captum-nmf select-k --model zoo:efficientnet_lite0 --layer head_relu "
    "--ks 2-12 --out select_k a.svs b.svs",
}


def _model_args(p: argparse.ArgumentParser, ray: bool = False) -> None:
    p.add_argument("--model", required=True, help="torchvision:NAME, zoo:NAME or module:factory")
    p.add_argument("--weights", help="a .safetensors file or a state dict (weights_only=True)")
    p.add_argument("--layer", required=True, help="dotted module path, e.g. features.29")
    p.add_argument(
        "--normalize",
        choices=sorted(NORMALISATIONS),
        default=None,
        help="input normalisation of the tiles (default: imagenet for torchvision models, "
        "lite for zoo models; required for module:factory models)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="where the model runs: auto (CUDA when available, else the CPU), cpu, cuda, "
        "cuda:N (not mps: no float64 there)"
        + ("; with --ray each actor uses the GPU Ray gives it" if ray else "")
        + " (default auto)",
    )


def _tile_args(p: argparse.ArgumentParser, stride: str = "half a tile") -> None:
    p.add_argument("--tile-size", type=int, default=512)
    p.add_argument(
        "--stride", type=int, default=None, help=f"pixels between tiles (default: {stride})"
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument("--level", type=int, default=None)
    group.add_argument("--mpp", type=float, default=None)
    p.add_argument("--min-tissue", type=float, default=0.25)
    p.add_argument(
        "--no-tissue-mask",
        action="store_true",
        help="use every tile (no tissue detection)",
    )
    p.add_argument(
        "--slide-mpp",
        type=float,
        default=None,
        help="microns per level-0 pixel, for slides without that metadata (a slide's own wins)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-progress", action="store_true")


def _ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on Ray actors: embedded on this machine, or on the cluster at ADDRESS "
        "(HOST:PORT, ray://HOST:PORT or auto; a value that is not one of these is taken as "
        "a slide)",
    )
    p.add_argument("--workers", type=int, default=None, help="Ray actors (default: per GPU/CPU)")


def _forward_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bf16", action="store_true", help="run the forward under bfloat16 autocast")
    p.add_argument("--channels-last", action="store_true", help="channels-last input batches")


def _fit_args(p: argparse.ArgumentParser) -> None:
    _model_args(p, ray=True)
    _tile_args(p)
    p.add_argument("slide", nargs="*", help="one or more slides")
    p.add_argument("--k", type=int, default=6, help="number of concepts (default 6)")
    p.add_argument("--max-locations", type=int, default=4096, help="locations kept per batch")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    _ray_args(p)
    _forward_args(p)
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def _explain_args(p: argparse.ArgumentParser) -> None:
    _model_args(p, ray=True)
    _tile_args(p)
    p.add_argument("slide", nargs="*", help="one or more slides")
    p.add_argument("--concepts", required=True, help="a .safetensors file from 'fit'")
    p.add_argument("--border", type=int, default=2)
    p.add_argument(
        "--mode",
        choices=("tile", "region"),
        default="tile",
        help="'tile': the paper's overlapping tiles (default); 'region': the fast fully "
        "convolutional mode on large regions",
    )
    p.add_argument("--region-size", type=int, default=1024, help="region mode: root side (px)")
    p.add_argument("--region-margin", type=int, default=64, help="region mode: context (px)")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--on-tile-error", choices=("raise", "skip"), default="raise")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue the run of one slide")
    p.add_argument("--overwrite", action="store_true", help="replace one slide's run")
    _ray_args(p)
    _forward_args(p)


def _analyse_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    _tile_args(p)
    p.add_argument("slides", nargs="+")
    p.add_argument("--concepts", required=True)
    p.add_argument("--n-tiles", type=int, default=None)
    p.add_argument("--target", type=int, default=1, help="class explained by the CAMs")
    p.add_argument("--out", required=True, help="output directory")


def _ks(text: str) -> list[int]:
    """``2-12`` or ``2,4,8`` (or a mix) as a list of K."""
    ks: list[int] = []
    try:
        for part in text.split(","):
            low, sep, high = part.strip().partition("-")
            if sep and int(high) < int(low):
                raise argparse.ArgumentTypeError(
                    f"{part.strip()!r} in {text!r} runs backwards; write {int(high)}-{int(low)}"
                )
            ks.extend(range(int(low), int(high) + 1) if sep else [int(low)])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a range of K; write e.g. 2-12 or 2,4,8"
        ) from None
    return ks


def _select_k_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    _tile_args(p, stride="a tile: held-out tiles share no pixels with training ones")
    p.add_argument("slides", nargs="+")
    p.add_argument("--ks", type=_ks, default=list(range(2, 13)), help="K to try (default 2-12)")
    p.add_argument("--holdout", type=float, default=0.2, help="share of tiles held out")
    p.add_argument("--n-seeds", type=int, default=5, help="fits per K for stability")
    p.add_argument("--max-rows", type=int, default=10_000, help="feature rows sampled")
    p.add_argument(
        "--locations-per-tile",
        type=int,
        default=None,
        help="locations sampled per tile (default: all), so that more tiles fit in --max-rows",
    )
    p.add_argument(
        "--perturbation",
        choices=("resample", "init"),
        default="resample",
        help="what changes between fits for stability: the training tiles (a seeded half) or "
        "the initialisation (default: resample)",
    )
    p.add_argument("--gain-threshold", type=float, default=0.01)
    p.add_argument("--stable-cosine", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (tables, JSON, figure)")


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("explanation", help="a directory written by 'explain'")
    p.add_argument("--out", required=True)
    p.add_argument("--top-n", type=int, default=5)
    p.add_argument(
        "--concepts",
        help="the concepts file the slide was explained with: its current names (from "
        "'name', also given after 'explain') label the export",
    )
    p.add_argument(
        "--slide",
        help="where the explained slide is now, for the prototype crops (a run folder copied "
        "to another machine); default: the path recorded by 'explain'",
    )
    p.add_argument(
        "--intensity-scale",
        type=float,
        help="the concept weight drawn opaque in every concept_<k>.tif (the same value for "
        "several slides puts them on one scale); default: each concept's maximum on the slide",
    )


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--device",
        default="auto",
        help="where the demo's model runs: auto (CUDA when available, else the CPU), cpu, "
        "cuda or cuda:N (default auto)",
    )


def _name_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("concepts", help="a .safetensors file from 'fit'")
    p.add_argument(
        "names",
        nargs="*",
        metavar="INDEX=NAME",
        help="concepts to rename; without any, the current names are printed",
    )


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("slide")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--slide-mpp",
        type=float,
        default=None,
        help="microns per level-0 pixel, for slides without that metadata (a slide's own wins): "
        "shows the scale the other commands would use with it",
    )


_COMMANDS = (
    ("fit", "Fit K concepts on the tissue tiles of slides.", _fit_args),
    (
        "explain",
        "Concept maps of whole slides (resumable). One slide is written to --out; several "
        "slides (or --ray) are a cohort: each slide goes to --out/<name>/, a restart skips "
        "finished slides, and cohort.json/.csv summarise the run.",
        _explain_args,
    ),
    ("analyse", "The paper's analyses (structure, surrogate, CAMs) on slide tiles.", _analyse_args),
    ("export", "GeoJSON, overlay TIFFs and a summary of an explained slide.", _export_args),
    ("demo", "Run the whole pipeline offline on packaged real H&E.", _demo_args),
    ("info", "Slide metadata and levels.", _info_args),
    ("name", "Name concepts (saved in the concepts file, used in exports).", _name_args),
    (
        "select-k",
        "Choose K: held-out error and concept stability for a range of K, and a stated rule.",
        _select_k_args,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``captum-nmf`` and its sub-commands (``args.command`` names the command).

    Returns:
        *argparse.ArgumentParser*: the parser.
    """
    parser = argparse.ArgumentParser(
        prog="captum-nmf",
        description="Explain CNNs by clustering their activations into NMF concepts.",
        epilog="Examples:\n  " + "\n  ".join(EXAMPLES.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"captum-nmf {__version__}")
    memory = (
        "let glibc return freed memory to the system after each batch (its default): a "
        "smaller resident size between batches, but a CPU forward page-faults its "
        "activations in again every batch (up to 3x slower); by default this process keeps "
        "freed memory for reuse"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--return-memory", action="store_true", help=memory)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors"
    )
    common.add_argument(
        "--return-memory", action="store_true", default=argparse.SUPPRESS, help=memory
    )
    for name, text, add_arguments in _COMMANDS:
        command = sub.add_parser(
            name,
            help=text,
            description=text,
            parents=[common],
            epilog=f"Example:\n  {EXAMPLES[name]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_arguments(command)
    return parser
