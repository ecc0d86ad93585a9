"""The ``captum-nmf`` command: fit, explain, analyse, export, demo, info.

Every command exits 0 on success; on any error it prints one line
``captum-nmf: error: <message>`` to stderr and exits 1 (130 on Ctrl-C,
2 for bad command-line usage), with the traceback only under ``--debug``.

Models are given as ``--model torchvision:vgg16`` (any torchvision model
builder, random weights unless ``--weights``), ``--model
package.module:factory`` (any importable callable returning an ``nn.Module``;
like any Python import, this imports and runs that module's code)
or ``--model zoo:efficientnet_lite0`` (the offline ImageNet model), with
``--weights FILE`` (a ``.safetensors`` file, or a state dict loaded with
``torch.load(..., weights_only=True)``) and ``--layer features.29`` (a dotted
module path; numbers index ``Sequential`` containers).
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from captum_nmf._version import __version__

__all__ = ["flag_spelling", "load_model", "main", "resolve_layer"]

_EXAMPLES = {
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
}


class CLIError(Exception):
    """A user error the command line reports in one line."""


def _imagenet(x: Tensor) -> Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=x.dtype).view(3, 1, 1)
    return (x - mean) / std


def _lite(x: Tensor) -> Tensor:
    return (x - 0.5) / 0.5


NORMALISATIONS: dict[str, Callable[[Tensor], Tensor] | None] = {
    "imagenet": _imagenet,
    "lite": _lite,
    "none": None,
}


def load_model(spec: str, weights: str | None = None) -> nn.Module:
    """Build a model from ``torchvision:NAME``, ``zoo:NAME`` or ``module:factory``.

    Raises:
        CLIError: a bad spec, an unknown model or factory, or unreadable weights.
    """
    if ":" not in spec:
        raise CLIError(
            f"--model {spec!r} must look like 'torchvision:vgg16', 'zoo:efficientnet_lite0' or "
            "'package.module:factory'."
        )
    source, name = spec.split(":", 1)
    module_name = {"torchvision": "torchvision.models", "zoo": "captum_nmf.zoo"}.get(source, source)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CLIError(f"--model {spec!r}: cannot import {module_name!r} ({exc}).") from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        raise CLIError(f"--model {spec!r}: {module_name} has no callable {name!r}.")
    kwargs: dict[str, Any] = {"weights": None} if source == "torchvision" else {}
    try:
        model = factory(**kwargs)
    except Exception as exc:  # whatever the user's factory raises, name the flag
        raise CLIError(
            f"--model {spec!r}: calling {module_name}.{name}() failed ({type(exc).__name__}: "
            f"{exc}); --model module:factory must name a function that takes no required "
            "arguments and returns a torch.nn.Module."
        ) from exc
    if not isinstance(model, nn.Module):
        raise CLIError(
            f"--model {spec!r}: {module_name}.{name}() returned a {type(model).__name__}, not a "
            "torch.nn.Module; --model module:factory must name a function that returns the model."
        )
    if weights is not None:
        state = _state_dict(Path(weights))
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            own = set(model.state_dict())
            missing, unexpected = len(own - set(state)), len(set(state) - own)
            raise CLIError(
                f"--weights {weights} does not fit {spec}: {missing} missing and {unexpected} "
                "unexpected keys (or shapes differ); a checkpoint that nests the weights (e.g. "
                "under 'state_dict') must be unpacked first."
            ) from exc
    return model.eval()


def _state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CLIError(f"--weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise CLIError(f"--weights {path} is not a readable safetensors file ({exc}).") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for anything but tensors and containers
        raise CLIError(
            f"--weights {path} could not be loaded with weights_only=True ({exc}); only plain "
            "state dicts (or .safetensors) are accepted."
        ) from exc
    if not isinstance(state, dict):
        raise CLIError(f"--weights {path} holds a {type(state).__name__}, not a state dict.")
    return state


def resolve_layer(model: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted path such as ``features.29`` or ``layer4.1.relu``.

    Raises:
        CLIError: no such submodule (the message lists a few valid names).
    """
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        names = [n for n, _ in model.named_modules() if n][-8:]
        raise CLIError(f"--layer {path!r} is not a submodule of the model; e.g. {names}.") from exc


def _model_args(p: argparse.ArgumentParser) -> None:
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


def _tile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tile-size", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
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
        help="microns per level-0 pixel, for slides without that metadata",
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


def _slides_and_ray(args: argparse.Namespace) -> None:
    """'--ray a.svs b.svs': the value argparse gave --ray is a slide, not an address."""
    if args.ray and not _looks_like_address(args.ray):
        args.slide.insert(0, args.ray)
        args.ray = ""
    if not args.slide:
        raise CLIError(f"{args.command} needs at least one slide.")
    if args.workers is not None and args.ray is None:
        raise CLIError("--workers needs --ray (the local engine runs in this process).")


def _forward_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bf16", action="store_true", help="run the forward under bfloat16 autocast")
    p.add_argument("--channels-last", action="store_true", help="channels-last input batches")


def _forward_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "autocast": torch.bfloat16 if args.bf16 else None,
        "channels_last": args.channels_last,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captum-nmf",
        description="Explain CNNs by clustering their activations into NMF concepts.",
        epilog="Examples:\n  " + "\n  ".join(_EXAMPLES.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"captum-nmf {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors"
    )

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=text,
            description=text,
            parents=[common],
            epilog=f"Example:\n  {_EXAMPLES[name]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = command("fit", "Fit K concepts on the tissue tiles of slides.")
    _model_args(p)
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

    p = command(
        "explain",
        "Concept maps of whole slides (resumable). One slide is written to --out; several "
        "slides (or --ray) are a cohort: each slide goes to --out/<name>/, a restart skips "
        "finished slides, and cohort.json/.csv summarise the run.",
    )
    _model_args(p)
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

    p = command("analyse", "The paper's analyses (structure, surrogate, CAMs) on slide tiles.")
    _model_args(p)
    _tile_args(p)
    p.add_argument("slides", nargs="+")
    p.add_argument("--concepts", required=True)
    p.add_argument("--n-tiles", type=int, default=None)
    p.add_argument("--target", type=int, default=1, help="class explained by the CAMs")
    p.add_argument("--out", required=True, help="output directory")

    p = command("export", "GeoJSON, overlay TIFFs and a summary of an explained slide.")
    p.add_argument("explanation", help="a directory written by 'explain'")
    p.add_argument("--out", required=True)
    p.add_argument("--top-n", type=int, default=5)

    p = command("demo", "Run the whole pipeline offline on packaged real H&E.")
    p.add_argument("--out", required=True)
    p.add_argument("--no-progress", action="store_true")

    p = command("info", "Slide metadata and levels.")
    p.add_argument("slide")
    p.add_argument("--json", action="store_true", help="print JSON")
    return parser


# ------------------------------------------------------------------ commands
def _normalisation(args: argparse.Namespace) -> Callable[[Tensor], Tensor] | None:
    name = args.normalize
    if name is None:
        source = args.model.split(":", 1)[0]
        name = {"torchvision": "imagenet", "zoo": "lite"}.get(source)
        if name is None:
            raise CLIError(
                f"--model {args.model!r}: pass --normalize imagenet, lite or none (the input "
                "normalisation the model was trained with)."
            )
    return NORMALISATIONS[name]


def _attr(args: argparse.Namespace) -> Any:
    from captum_nmf import NMFConceptAttribution

    model = load_model(args.model, args.weights)
    layer = resolve_layer(model, args.layer)
    return model, layer, NMFConceptAttribution


def _slide_tiles(args: argparse.Namespace, paths: list[str]) -> Any:
    """The tissue tiles of ``paths`` with the command's tiling and normalisation."""
    from captum_nmf.wsi import SlideTiles

    return SlideTiles(
        paths,
        tile_size=args.tile_size,
        stride=args.stride,
        level=args.level,
        mpp=args.mpp,
        min_tissue=args.min_tissue,
        tissue_mask=None if args.no_tissue_mask else "otsu",
        slide_mpp=args.slide_mpp,
        transform=_normalisation(args),
    )


def _fit(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise CLIError(f"--out {out} must end in .safetensors (concepts are saved as safetensors).")
    if out.exists() and not args.overwrite:
        raise CLIError(f"--out {out} exists; pass --overwrite to replace it.")
    _slides_and_ray(args)
    model, layer, cls = _attr(args)
    tiles = _slide_tiles(args, args.slide)
    attr = cls(model, layer, args.k, random_state=args.seed)
    engine: dict[str, Any] = (
        {}
        if args.ray is None
        else {"engine": "ray", "workers": args.workers, "address": args.ray or None}
    )
    attr.fit(
        tiles,
        batch_size=args.batch_size,
        max_locations_per_batch=args.max_locations,
        n_epochs=args.epochs,
        progress=not args.no_progress,
        **engine,
        **_forward_options(args),
    )
    path = attr.save(args.out)
    print(f"fitted {args.k} concepts on {len(tiles)} tiles of {len(args.slide)} slide(s): {path}")
    return 0


def _looks_like_address(value: str) -> bool:
    return value == "auto" or (":" in value and not Path(value).exists())


def _explain(args: argparse.Namespace) -> int:
    from captum_nmf.wsi import explain_cohort, explain_slide

    _slides_and_ray(args)
    cohort = len(args.slide) > 1 or args.ray is not None
    if cohort and (args.resume or args.overwrite):
        raise CLIError(
            "--resume/--overwrite apply to one slide; a cohort (several slides or --ray) "
            "always skips finished slides and resumes the others; use a new --out to start over."
        )
    transform = _normalisation(args)  # checked before the model loads
    model, layer, cls = _attr(args)
    attr = cls.load(args.concepts, model, layer)
    options: dict[str, Any] = {
        "tile_size": args.tile_size,
        "stride": args.stride,
        "level": args.level,
        "mpp": args.mpp,
        "border": args.border,
        "mode": args.mode,
        "region_size": args.region_size,
        "region_margin": args.region_margin,
        "min_tissue": args.min_tissue,
        "tissue_mask": None if args.no_tissue_mask else "otsu",
        "slide_mpp": args.slide_mpp,
        "transform": transform,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "on_tile_error": args.on_tile_error,
        **_forward_options(args),
    }
    if not cohort:
        ex = explain_slide(
            attr,
            args.slide[0],
            out_dir=args.out,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            **options,
        )
        print(f"{ex!r} -> {args.out}")
        return 0
    result = explain_cohort(
        attr,
        args.slide,
        args.out,
        engine="local" if args.ray is None else "ray",
        workers=args.workers,
        address=args.ray or None,
        progress=not args.no_progress,
        **options,
    )
    print(f"{result!r} -> {Path(args.out) / 'cohort.json'}")
    for record in result.failed:
        print(f"  failed: {record.slide}: {record.error}", file=sys.stderr)
    return 0 if result.ok else 1


def _analyse(args: argparse.Namespace) -> int:
    from captum_nmf.compare import analyse

    model, layer, cls = _attr(args)
    attr = cls.load(args.concepts, model, layer)
    tiles = _slide_tiles(args, args.slides)
    result = analyse(
        attr,
        tiles,
        target=args.target,
        n_tiles=args.n_tiles,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    result.save(args.out)
    print(result.to_markdown())
    return 0


def _export(args: argparse.Namespace) -> int:
    from captum_nmf.export import export_explanation
    from captum_nmf.wsi import SlideExplanation

    ex = SlideExplanation.load(args.explanation)  # checks the file's digest: nothing on a mismatch
    out = export_explanation(ex, args.out, top_n=args.top_n)
    print(f"wrote GeoJSON, {ex.n_concepts + 1} overlay TIFFs and a summary to {out}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from captum_nmf.wsi import Slide

    with Slide(args.slide) as slide:
        mpps = slide.level_mpps()
        info: dict[str, Any] = {
            "path": str(slide.path),
            "vendor": slide.vendor,
            "dimensions": list(slide.dimensions),
            "mpp": slide.mpp,
            "levels": [
                {
                    "level": i,
                    "dimensions": list(dims),
                    "downsample": slide.level_downsamples[i],
                    "mpp": None if mpps is None else mpps[i],
                }
                for i, dims in enumerate(slide.level_dimensions)
            ],
            "fingerprint": slide.fingerprint(),
        }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['path']}: {info['vendor']}, {info['dimensions'][0]} x {info['dimensions'][1]} px")
    print(f"mpp: {info['mpp']}, fingerprint: {info['fingerprint']}")
    for lv in info["levels"]:
        mpp = "" if lv["mpp"] is None else f", {lv['mpp']:.4g} um/px"
        w, h = lv["dimensions"]
        print(f"  level {lv['level']}: {w} x {h} px, downsample {lv['downsample']:.4g}{mpp}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from captum_nmf.demo import run_demo

    report = run_demo(args.out, progress=not args.no_progress)
    print(f"report: {report}")
    return 0


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "fit": _fit,
    "explain": _explain,
    "analyse": _analyse,
    "export": _export,
    "demo": _demo,
    "info": _info,
}


# The library's messages name its Python arguments; on the command line they name the flags.
_SPELLINGS: tuple[tuple[str, str], ...] = (
    (r"\bresume=True\b", "--resume"),
    (r"\bresume=False\b", "no --resume"),
    (r"\boverwrite=True\b", "--overwrite"),
    (r"\bon_tile_error=['\"](skip|raise)['\"]", r"--on-tile-error \1"),
    (r"\btissue_mask=None\b", "--no-tissue-mask"),
    (r"\bSlide\(path, mpp=\.\.\.\)", "--slide-mpp MPP"),
    (r"\bslide_mpp=", "--slide-mpp "),
    (r"\bmode=['\"](tile|region)['\"]", r"--mode \1"),
    (r"\b(tile_size|stride|border|region_size|region_margin|min_tissue|batch_size)=(?=\S)", ""),
    (r"\b(min_tissue|batch_size|num_workers|tile_size|region_size|region_margin)\b", ""),
    (r"\bout_dir\b", "--out"),
)


def _flag(match: re.Match[str]) -> str:
    text = match.group(0)
    name = match.group(1) if match.re.groups else text
    return "--" + name.replace("_", "-") + (" " if text.endswith("=") else "")


def flag_spelling(message: str) -> str:
    """A library message with Python argument spellings replaced by the command's flags.

    ``resume=True`` becomes ``--resume``, ``on_tile_error='skip'`` becomes
    ``--on-tile-error skip``, ``tile_size=64`` becomes ``--tile-size 64``, and so on.

    Returns:
        *str*: the message as the command line should show it.
    """
    for pattern, flag in _SPELLINGS:
        message = re.sub(pattern, flag or _flag, message)
    return message


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (also used by the console script)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(
            "captum-nmf: interrupted (finished chunks are kept; rerun with --resume)",
            file=sys.stderr,
        )
        return 130
    except Exception as exc:  # every error becomes one line unless --debug
        if args.debug:
            traceback.print_exc()
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"captum-nmf: error: {flag_spelling(message)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
