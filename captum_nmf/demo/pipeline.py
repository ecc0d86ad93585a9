"""``captum-nmf demo``: the whole pipeline, offline, on packaged real H&E and a real CNN.

1. cuts the two packaged H&E images into 256 px tiles and labels them from the
   real neoplastic-nuclei mask; fits a tumour-tile detector on EfficientNet-Lite0
   with its ImageNet weights (:mod:`captum_nmf.demo.detector`);
2. fits K = 6 concepts on the detector's post-ReLU6 head (``head_relu``);
3. writes a two-field multi-level slide from the real images (a tumour nest beside
   stroma) and explains it with overlapping tiles (:func:`~captum_nmf.wsi.explain_slide`);
4. runs the paper's analyses on the tiles (:func:`~captum_nmf.compare.analyse`);
5. exports QuPath GeoJSON, overlay TIFFs and a summary (:mod:`captum_nmf.export`);
6. draws the figures (:mod:`captum_nmf.viz`) and writes ``report.html``
   (:mod:`captum_nmf.demo.report`).

Needs the ``all`` extra; about two to four minutes on 2 CPU cores.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from captum_nmf import NMFConceptAttribution
from captum_nmf._utils.cpus import usable_cpus
from captum_nmf._utils.validation import check_device
from captum_nmf.compare import AnalysisResult, CamAgreement, analyse, cam_agreement
from captum_nmf.demo import data
from captum_nmf.demo.detector import HETiles, he_tiles, train_tumour_detector
from captum_nmf.demo.naming import run_concept_step
from captum_nmf.demo.report import DemoFindings, write_report
from captum_nmf.demo.zoo import normalize
from captum_nmf.export import slide_summary, to_geojson, write_overlay_tiff
from captum_nmf.io import atomic_write
from captum_nmf.viz import (
    plot_comparison,
    plot_concepts,
    plot_overlay,
    plot_select_k,
    plot_slide,
    plot_structure,
)
from captum_nmf.wsi import SlideExplanation, explain_slide, write_pyramid

__all__ = ["K", "TILE", "run_demo"]

K = 6
TILE = 256  # EfficientNet-Lite0's head: 8 x 8 cells of 32 px; stride 128 = 4 cells
STEPS = ("detector", "concepts", "slide", "explain", "analyses", "exports", "figures", "report")


class _Steps:
    """A progress bar over :data:`STEPS` that names the step under way."""

    def __init__(self, progress: bool) -> None:
        self.bar = tqdm(total=len(STEPS), disable=not progress, desc="captum-nmf demo", unit="step")
        self.bar.set_postfix_str(STEPS[0])

    def done(self, name: str) -> None:
        self.bar.update(1)
        following = STEPS.index(name) + 1
        self.bar.set_postfix_str(STEPS[following] if following < len(STEPS) else "done")
        if following == len(STEPS):
            self.bar.close()


def run_demo(
    out: str | os.PathLike[str],
    *,
    progress: bool = True,
    small: bool = False,
    device: str | torch.device | None = "auto",
) -> Path:
    """Run the demo into ``out`` and return the path of ``report.html``.

    Args:
        out (str or PathLike): output directory (created; the demo's own
                    earlier outputs there are replaced).
        progress (bool, optional): show a progress bar.
                    Default: True
        small (bool, optional): tiles without overlap (4x fewer), for tests
                    and a quick look; the environment variable
                    ``CAPTUM_NMF_DEMO_SMALL=1`` does the same.
                    Default: False
        device (str or torch.device, optional): where the model runs: ``"auto"``
                    or None (CUDA when available, else the CPU), ``"cpu"``, ``"cuda"``, ...
                    Default: ``"auto"``

    Returns:
        *Path*: ``report.html``.

    Raises:
        ImportError: an extra is missing (``pip install 'captum-nmf[all]'``).
        TypeError: ``device`` is neither a string, a ``torch.device`` nor None.
        ValueError: ``device`` is not a device, or one this machine lacks, or
                    ``LOKY_MAX_CPU_COUNT`` is not a whole number (checked
                    before any work).
    """
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = check_device("device", device)
    usable_cpus()  # a LOKY_MAX_CPU_COUNT that is not a number stops here, before any work
    small = small or os.environ.get("CAPTUM_NMF_DEMO_SMALL", "") not in ("", "0")
    stride = TILE if small else TILE // 2
    out_dir = Path(out)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    steps = _Steps(progress)
    torch.manual_seed(0)
    tiles = he_tiles(TILE, stride)
    model, train_accuracy = train_tumour_detector(tiles, device=device)
    steps.done("detector")
    attr = NMFConceptAttribution(model, model.head_relu, K, random_state=0)
    x = normalize(tiles.images.to(device))  # the tiles on the model's device, as attribute wants
    attr.fit([x[i : i + 32] for i in range(0, len(x), 32)], progress=False)
    concept_step = run_concept_step(attr, tiles, x, small=small)
    attr.save(out_dir / "concepts.safetensors")  # with the names and the stability record
    steps.done("concepts")
    nest, stroma = (data.rgb(name) for name in data.IMAGES)
    slide_path = write_pyramid(np.concatenate([nest, stroma], axis=1), out_dir / "demo_slide.svs")
    steps.done("slide")
    ex = _explain(attr, slide_path, out_dir / "explanation", stride, progress)
    steps.done("explain")
    result, vs_mask, gradcam_vs_mask = _analyses(attr, tiles, x, stride)
    result.save(out_dir / "analysis")
    steps.done("analyses")
    summary = _exports(ex, out_dir / "exports")
    steps.done("exports")
    figures = _figures(ex, tiles, result, out_dir / "figures")
    figures["select_k"] = _save(
        plot_select_k(concept_step.selection), out_dir / "figures" / "select_k.png"
    )
    concept_step.gallery.save(out_dir / "figures" / "gallery")
    steps.done("figures")
    findings = DemoFindings(
        result,
        vs_mask,
        gradcam_vs_mask,
        summary,
        train_accuracy,
        repr(ex),
        K,
        concept_step,
        _describe(device),
    )
    report = write_report(out_dir, figures, findings)
    steps.done("report")
    return report


def _describe(device: torch.device) -> str:
    """Where the model ran: ``"cpu (2 threads, 2 CPUs usable)"``, ``"cuda:0 (NVIDIA H200)"``."""
    if device.type == "cpu":  # torch's threads against affinity and a container's CPU quota
        return f"cpu ({torch.get_num_threads()} threads, {usable_cpus()} CPUs usable)"
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def _explain(
    attr: NMFConceptAttribution, slide: Path, out_dir: Path, stride: int, progress: bool
) -> SlideExplanation:
    """The demo slide's concept maps with overlapping tiles, replacing a former run's."""
    return explain_slide(
        attr,
        slide,
        tile_size=TILE,
        stride=stride,
        batch_transform=normalize,
        batch_size=16,
        out_dir=out_dir,
        overwrite=out_dir.is_dir() and any(out_dir.iterdir()),
        progress=progress,
    )


def _analyses(
    attr: NMFConceptAttribution, tiles: HETiles, x: torch.Tensor, stride: int
) -> tuple[AnalysisResult, CamAgreement, CamAgreement]:
    """The paper's analyses, and the concepts and GradCAM against the nuclei mask."""
    # overlapping tiles share pixels: the surrogate holds out whole spatial blocks
    block = 3 * stride
    blocks = (
        tiles.source * 10_000
        + (tiles.locations[:, 1] // block) * 100
        + tiles.locations[:, 0] // block
    )
    result = analyse(attr, x, target=1, groups=blocks, batch_size=16, progress=False)
    masked = tiles.has_mask[result.indices]
    grid = result.concept_maps.shape[-1]
    share = (
        tiles.neoplastic[result.indices][masked]
        .reshape(-1, grid, TILE // grid, grid, TILE // grid)
        .mean(axis=(2, 4))
    )
    name = "neoplastic-nuclei share"
    predictions = result.predictions[masked]
    vs_mask = cam_agreement(result.concept_maps[masked], share, predictions, name=name)
    gradcam = result.cam_values["gradcam"][masked][:, None]
    return result, vs_mask, cam_agreement(gradcam, share, predictions, name=name)


def _exports(ex: SlideExplanation, out_dir: Path) -> dict[str, Any]:
    """GeoJSON, the cluster and per-concept overlay TIFFs, and the slide summary."""
    to_geojson(ex, out_dir / "concepts.geojson")
    write_overlay_tiff(ex, out_dir / "clusters.tif")
    for j in range(K):
        write_overlay_tiff(ex, out_dir / f"concept_{j}.tif", kind="intensity", concept=j)
    return slide_summary(ex, out_dir / "summary", top_n=4)


def _save(fig: Any, path: Path) -> str:
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, dpi=110, format=path.suffix.lstrip(".") or "png")
    return path.name


def _figures(
    ex: SlideExplanation, tiles: HETiles, result: AnalysisResult, out_dir: Path
) -> dict[str, str]:
    """Figs. 1-4 on the first tile predicted tumour, and the slide overlays: key to file name."""
    tumour = np.flatnonzero(result.predictions == 1)
    first = int(tumour[0]) if tumour.size else 0
    image = tiles.images[result.indices[first]]
    maps = result.concept_maps[first]
    gradcam = result.cam_values["gradcam"][first]
    names = ex.config.get("concept_names")  # the names given in the concept step
    return {
        "fig1": _save(
            plot_overlay(image, maps, title="concept intensities", labels=names),
            out_dir / "fig1_overlay.png",
        ),
        "fig2": _save(plot_concepts(image, maps, labels=names), out_dir / "fig2_concepts.png"),
        "fig3": _save(
            plot_comparison(image, gradcam, maps, labels=names), out_dir / "fig3_comparison.png"
        ),
        "fig4": _save(
            plot_structure(result.similarity, result.correlation), out_dir / "fig4_structure.png"
        ),
        "slide": _save(plot_slide(ex), out_dir / "slide_overlay.png"),
        "slide_clusters": _save(plot_slide(ex, clusters=True), out_dir / "slide_clusters.png"),
    }
