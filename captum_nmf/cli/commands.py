"""The six commands of ``captum-nmf``: each takes the parsed arguments and returns an exit code."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from captum_nmf.cli.errors import CLIError
from captum_nmf.cli.models import (
    load_model,
    normalisation,
    normalisation_name,
    resolve_device,
    resolve_layer,
)

__all__ = ["COMMANDS"]


# ------------------------------------------------------------------ shared by fit/explain/analyse
def _looks_like_address(value: str) -> bool:
    return value == "auto" or (":" in value and not Path(value).exists())


def _slides_and_ray(args: argparse.Namespace) -> None:
    """'--ray a.svs b.svs': the value argparse gave --ray is a slide, not an address."""
    if args.ray and not _looks_like_address(args.ray):
        args.slide.insert(0, args.ray)
        args.ray = ""
    if not args.slide:
        raise CLIError(f"{args.command} needs at least one slide.")
    if args.workers is not None and args.ray is None:
        raise CLIError("--workers needs --ray (the local engine runs in this process).")


def _device(args: argparse.Namespace) -> torch.device | None:
    """The ``--device`` the model moves to; None with ``--ray`` (each actor picks its own)."""
    if getattr(args, "ray", None) is not None:
        if args.device != "auto":
            raise CLIError(
                f"--device {args.device} applies to runs in this process; with --ray each actor "
                "uses the GPU Ray gives it, or the CPU. Leave --device at auto."
            )
        return None
    return resolve_device(args.device)


def _model(args: argparse.Namespace, device: torch.device | None) -> tuple[nn.Module, nn.Module]:
    """The ``--model`` with its ``--weights``, moved once to ``device``, and its ``--layer``."""
    model = load_model(args.model, args.weights)
    layer = resolve_layer(model, args.layer)
    if device is not None:
        model.to(device)
    return model, layer


def _stride(args: argparse.Namespace) -> Any:
    """``--stride``, or half of ``--tile-size`` (the paper's overlap) when not given."""
    if args.stride is not None:
        return args.stride
    size = args.tile_size
    return max(1, size // 2) if isinstance(size, int) and size >= 1 else size


def _slide_tiles(args: argparse.Namespace, paths: list[str]) -> Any:
    """The tissue tiles of ``paths`` with the command's tiling and normalisation (per tile)."""
    from captum_nmf.wsi import SlideTiles

    return SlideTiles(
        paths,
        tile_size=args.tile_size,
        stride=_stride(args),
        level=args.level,
        mpp=args.mpp,
        min_tissue=args.min_tissue,
        tissue_mask=None if args.no_tissue_mask else "otsu",
        slide_mpp=args.slide_mpp,
        transform=normalisation(args.model, args.normalize),
    )


def _forward_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "autocast": torch.bfloat16 if args.bf16 else None,
        "channels_last": args.channels_last,
    }


def _check_writable(folder: Path) -> None:
    """Refuse a folder (or the nearest existing one above it) this process cannot write.

    A probe file is created and removed, so a read-only mount is seen too (where
    ``os.access`` may say yes to root).

    Raises:
        CLIError: naming the folder and the reason.
    """
    anchor = Path(os.path.realpath(folder))
    while not anchor.exists():
        anchor = anchor.parent
    try:
        with tempfile.NamedTemporaryFile(dir=anchor, prefix=".captum-nmf-probe-"):
            pass
    except OSError as exc:
        raise CLIError(
            f"cannot write into {anchor} ({exc.strerror or exc}); choose another --out."
        ) from None


def _check_output_folder(out: Path) -> None:
    """Refuse an ``--out`` folder that is a file or cannot be written, before any work.

    Raises:
        CLIError: naming the flag and what to do.
    """
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory; choose a folder.")
    _check_writable(out)


# ------------------------------------------------------------------ commands
def fit(args: argparse.Namespace) -> int:
    """``captum-nmf fit``: fit K concepts on the tissue tiles of slides and save them."""
    from captum_nmf import NMFConceptAttribution

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise CLIError(f"--out {out} must end in .safetensors (concepts are saved as safetensors).")
    if out.exists() and not args.overwrite:
        raise CLIError(f"--out {out} exists; pass --overwrite to replace it.")
    if out.is_dir():
        raise CLIError(f"--out {out} is a directory; name the concepts file to write.")
    _check_writable(out.parent)  # before the fit, not after it
    _slides_and_ray(args)
    device = _device(args)
    normalisation(args.model, args.normalize)  # checked before the model loads
    model, layer = _model(args, device)
    tiles = _slide_tiles(args, args.slide)
    attr = NMFConceptAttribution(model, layer, args.k, random_state=args.seed)
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
    attr.provenance_ = {**attr.provenance_, **_pipeline(args)}  # checked by explain, analyse
    path = attr.save(args.out)
    print(f"fitted {args.k} concepts on {len(tiles)} tiles of {len(args.slide)} slide(s): {path}")
    return 0


def _pipeline(args: argparse.Namespace) -> dict[str, Any]:
    """How the command's tiles become activations: recorded with concepts, checked on use."""
    return {
        "model": args.model,
        "layer": args.layer,
        "normalize": normalisation_name(args.model, args.normalize),
        "tile_size": args.tile_size,
        "level": args.level,
        "mpp": args.mpp,
    }


def _load_concepts(args: argparse.Namespace, model: Any, layer: Any) -> Any:
    """``--concepts`` bound to the model, refused when made from another pipeline.

    Another layer name or other weights than the concepts were fitted on are
    refused (``strict=True``), and so is another ``--model`` or ``--normalize``
    than ``captum-nmf fit`` recorded; another tile size or resolution is said
    with a warning (concepts may be applied at another scale on purpose).

    Raises:
        CLIError: naming the flags that differ and what they were.
    """
    from captum_nmf import NMFConceptAttribution
    from captum_nmf.exceptions import CaptumNMFWarning, ConceptModelMismatchError

    try:
        attr = NMFConceptAttribution.load(args.concepts, model, layer, strict=True)
    except ConceptModelMismatchError as exc:  # the library's strict=... advice is not a flag
        reason = re.split(r" Pass strict=False| \(strict=True", str(exc))[0]
        raise CLIError(
            f"--concepts {args.concepts} do not fit this --model / --weights / --layer: {reason}"
        ) from None
    recorded, now = attr.provenance_, _pipeline(args)
    flags = {"model": "--model", "normalize": "--normalize"}
    refused = [k for k in flags if k in recorded and recorded[k] != now[k]]
    if refused:
        said = ", ".join(f"{flags[k]} {recorded[k]} (now {now[k]})" for k in refused)
        raise CLIError(
            f"--concepts {args.concepts} were fitted with {said}: pass the same, or fit "
            "concepts for this model and normalisation."
        )
    scales = {"tile_size": "--tile-size", "level": "--level", "mpp": "--mpp"}
    moved = [k for k in scales if k in recorded and recorded[k] != now[k]]
    if moved:
        said = ", ".join(f"{scales[k]} {recorded[k]} (now {now[k]})" for k in moved)
        warnings.warn(
            f"--concepts {args.concepts} were fitted with {said}: the concepts describe "
            "features at that scale.",
            CaptumNMFWarning,
            stacklevel=2,
        )
    return attr


def _explain_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``explain_slide`` arguments of the command; the normalisation runs on the device."""
    return {
        "tile_size": args.tile_size,
        "stride": _stride(args),
        "level": args.level,
        "mpp": args.mpp,
        "border": args.border,
        "mode": args.mode,
        "region_size": args.region_size,
        "region_margin": args.region_margin,
        "min_tissue": args.min_tissue,
        "tissue_mask": None if args.no_tissue_mask else "otsu",
        "slide_mpp": args.slide_mpp,
        "batch_transform": normalisation(args.model, args.normalize),
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "on_tile_error": args.on_tile_error,
        **_forward_options(args),
    }


def explain(args: argparse.Namespace) -> int:
    """``captum-nmf explain``: concept maps of one slide, or of a cohort (several or --ray)."""
    from captum_nmf.wsi import explain_cohort, explain_slide

    _slides_and_ray(args)
    cohort = len(args.slide) > 1 or args.ray is not None
    if cohort and (args.resume or args.overwrite):
        raise CLIError(
            "--resume/--overwrite apply to one slide; a cohort (several slides or --ray) "
            "always skips finished slides and resumes the others; use a new --out to start over."
        )
    device = _device(args)
    options = _explain_options(args)  # checked before the model loads
    model, layer = _model(args, device)
    attr = _load_concepts(args, model, layer)
    progress = not args.no_progress
    if not cohort:
        out = args.out
        ex = explain_slide(
            attr,
            args.slide[0],
            out_dir=out,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=progress,
            **options,
        )
        print(f"{ex!r} -> {out}")
        return 0
    result = explain_cohort(
        attr,
        args.slide,
        args.out,
        engine="local" if args.ray is None else "ray",
        workers=args.workers,
        address=args.ray or None,
        progress=progress,
        **options,
    )
    print(f"{result!r} -> {Path(args.out) / 'cohort.json'}")
    for record in result.failed:
        print(f"  failed: {record.slide}: {record.error}", file=sys.stderr)
    return 0 if result.ok else 1


def analyse(args: argparse.Namespace) -> int:
    """``captum-nmf analyse``: the paper's analyses on a sample of slide tiles."""
    from captum_nmf.compare import analyse as run_analyses
    from captum_nmf.compare.analysis import RECORD, analysis_files, legacy_files
    from captum_nmf.io import claim_outputs

    out = Path(args.out)
    _check_output_folder(out)  # before the analyses, not after them
    claim_outputs(out, RECORD, analysis_files(), legacy_files)  # every table it may write
    device = _device(args)
    normalisation(args.model, args.normalize)  # checked before the model loads
    model, layer = _model(args, device)
    attr = _load_concepts(args, model, layer)
    tiles = _slide_tiles(args, args.slides)
    result = run_analyses(
        attr,
        tiles,
        target=args.target,
        n_tiles=args.n_tiles,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    result.save(out)
    print(result.to_markdown())
    return 0


def export(args: argparse.Namespace) -> int:
    """``captum-nmf export``: GeoJSON, overlay TIFFs and a summary of an explained slide."""
    from captum_nmf.export import export_explanation
    from captum_nmf.wsi import SlideExplanation

    if args.top_n < 1:  # before the explanation is read
        raise CLIError(f"--top-n must be >= 1, got {args.top_n}.")
    _check_finished(Path(args.explanation))
    ex = SlideExplanation.load(args.explanation)  # checks the file's digest: nothing on a mismatch
    names = None if args.concepts is None else _names_of(Path(args.concepts), ex.concepts)
    out = export_explanation(
        ex,
        args.out,
        top_n=args.top_n,
        names=names,
        slide=args.slide,
        intensity_scale=args.intensity_scale,
    )
    print(f"wrote GeoJSON, {ex.n_concepts + 1} overlay TIFFs and a summary to {out}")
    return 0


def _check_finished(run: Path) -> None:
    """Refuse a run folder whose ``explain`` has not finished, saying how to finish it.

    Raises:
        CLIError: the run's manifest says it is still running (or was stopped).
    """
    from captum_nmf.wsi.cohort import COHORT_FILE
    from captum_nmf.wsi.runner import MANIFEST_FILE

    if not run.exists():
        raise CLIError(
            f"{run} does not exist: give the folder that 'captum-nmf explain --out' wrote."
        )
    if run.is_dir() and (run / COHORT_FILE).is_file():  # a cohort: one folder per slide
        slides = sorted(p.name for p in run.iterdir() if (p / MANIFEST_FILE).is_file())[:3]
        example = f" (e.g. {run / slides[0]})" if slides else ""
        raise CLIError(
            f"{run} is a cohort folder: export one slide at a time, from its own folder in "
            f"it{example}; {COHORT_FILE} lists the slides and their folders."
        )
    try:
        manifest = json.loads((run / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # not a run folder (a saved explanation): its own check follows
    if isinstance(manifest, dict) and manifest.get("status") not in (None, "complete"):
        done, chunks = manifest.get("done"), manifest.get("chunks")
        progress = f" ({done} of {len(chunks)} chunks)" if isinstance(chunks, list) else ""
        raise CLIError(
            f"{run} is an unfinished explain run{progress}: nothing to export yet. Finish it "
            "with the same 'captum-nmf explain' command and --resume, then export."
        )


def _names_of(path: Path, concepts: Any) -> list[str]:
    """The current names in a concepts file, if its concepts are the explanation's.

    Raises:
        CLIError: the file's concepts are not the ones the slide was explained with.
    """
    import numpy as np

    from captum_nmf._core.names import default_concept_names, names_from_metadata
    from captum_nmf.io import load_tensors

    tensors, meta = load_tensors(path, required=("concepts",))
    vectors = tensors["concepts"].to(torch.float32).numpy()
    if vectors.shape != concepts.shape or not np.array_equal(vectors, concepts):
        raise CLIError(
            f"--concepts {path} holds other concepts than those the slide was explained with "
            f"({vectors.shape[0]} x {vectors.shape[1]} against {concepts.shape[0]} x "
            f"{concepts.shape[1]}, or other values); pass the file given to 'explain'."
        )
    k = int(vectors.shape[0])
    return names_from_metadata(meta, k, str(path)) or default_concept_names(k)


def _slide_info(path: str, slide_mpp: float | None = None) -> dict[str, Any]:
    from captum_nmf.wsi import Slide

    with Slide(path, fallback_mpp=slide_mpp) as slide:
        mpps = slide.level_mpps()
        recorded = slide.recorded_mpp
        return {
            "path": str(slide.path),
            "vendor": slide.vendor,
            "dimensions": list(slide.dimensions),
            "mpp": slide.mpp,
            # where the scale comes from: the slide's metadata, --slide-mpp, or nowhere
            "mpp_source": (
                "slide" if recorded is not None else None if slide.mpp is None else "--slide-mpp"
            ),
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


def info(args: argparse.Namespace) -> int:
    """``captum-nmf info``: a slide's metadata and levels, as text or JSON."""
    found = _slide_info(args.slide, args.slide_mpp)
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    width, height = found["dimensions"]
    print(f"{found['path']}: {found['vendor']}, {width} x {height} px")
    source = {
        "slide": "recorded by the slide",
        "--slide-mpp": "from --slide-mpp: the slide records none",
        None: "unknown: give the commands --slide-mpp MPP, or choose tiles by --level",
    }[found["mpp_source"]]
    print(f"mpp: {found['mpp']} ({source}), fingerprint: {found['fingerprint']}")
    for lv in found["levels"]:
        mpp = "" if lv["mpp"] is None else f", {lv['mpp']:.4g} um/px"
        w, h = lv["dimensions"]
        print(f"  level {lv['level']}: {w} x {h} px, downsample {lv['downsample']:.4g}{mpp}")
    return 0


def demo(args: argparse.Namespace) -> int:
    """``captum-nmf demo``: the whole pipeline offline on the packaged H&E."""
    from captum_nmf.demo.pipeline import run_demo

    device = resolve_device(args.device)  # before any work: a device this machine lacks is refused
    report = run_demo(args.out, progress=not args.no_progress, device=device)
    print(f"report: {report}")
    return 0


def name(args: argparse.Namespace) -> int:
    """``captum-nmf name``: rename concepts in a concepts file (atomically), or list the names."""
    from captum_nmf._core.names import rename_concept_file

    mapping: dict[int, str] = {}
    for item in args.names:
        index, sep, text = item.partition("=")
        if not sep or re.fullmatch(r"-?[0-9]+", index.strip()) is None:  # ASCII digits only
            raise CLIError(
                f'{item!r} is not INDEX=NAME; write e.g. 3="tumour epithelium" (concepts are '
                "numbered from 0)."
            )
        if int(index) in mapping:
            raise CLIError(
                f"concept {int(index)} is named twice ({int(index)}={mapping[int(index)]!r} and "
                f"{item!r}); give each concept one name."
            )
        mapping[int(index)] = text
    for j, text in enumerate(rename_concept_file(args.concepts, mapping)):  # {}: only reads
        print(f"{j}: {text}")
    return 0


def select_k(args: argparse.Namespace) -> int:
    """``captum-nmf select-k``: error and stability against K on slide tiles; a recommended K."""
    from captum_nmf.compare.kselection import RECORD, legacy_files
    from captum_nmf.compare.selection import select_k as sweep
    from captum_nmf.io import claim_outputs

    out = Path(args.out)
    _check_output_folder(out)  # before the sweep, not after it
    claim_outputs(out, RECORD, [*legacy_files({}), RECORD], legacy_files)
    device = _device(args)
    normalisation(args.model, args.normalize)  # checked before the model loads
    model, layer = _model(args, device)
    if args.stride is None:  # held-out tiles must not share pixels with training ones
        args.stride = args.tile_size
    result = sweep(
        (model, layer),
        _slide_tiles(args, args.slides),
        ks=args.ks,
        holdout=args.holdout,
        n_seeds=args.n_seeds,
        max_rows=args.max_rows,
        locations_per_tile=args.locations_per_tile,
        perturbation=args.perturbation,
        gain_threshold=args.gain_threshold,
        stable_cosine=args.stable_cosine,
        batch_size=args.batch_size,
        random_state=args.seed,
        progress=not args.no_progress,
    )
    figure = None
    try:
        from captum_nmf.viz import plot_select_k
    except ImportError:  # pragma: no cover - the viz extra is missing: tables only
        pass
    else:
        buffer = io.BytesIO()
        plot_select_k(result).savefig(buffer, format="png", dpi=120)
        figure = buffer.getvalue()
    result.save(out, figure=figure)  # the figure written with the tables, listed in the record
    print(result.to_markdown())
    return 0


#: Command name to its function; :func:`captum_nmf.cli.main` dispatches through it.
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "fit": fit,
    "explain": explain,
    "analyse": analyse,
    "export": export,
    "demo": demo,
    "info": info,
    "name": name,
    "select-k": select_k,
}
