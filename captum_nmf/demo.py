"""``captum-nmf demo``: the whole pipeline, offline, on packaged real H&E and a real CNN.

1. cuts the two packaged H&E images into 256 px tiles and labels them from the
   real neoplastic-nuclei mask; fits a tumour-tile detector on EfficientNet-Lite0
   with its ImageNet weights (:mod:`captum_nmf.tumour`);
2. fits K = 6 concepts on the detector's post-ReLU6 head (``head_relu``);
3. writes a two-field multi-level slide from the real images (a tumour nest beside
   stroma) and explains it with overlapping tiles (:func:`~captum_nmf.wsi.explain_slide`);
4. runs the paper's analyses on the tiles (:func:`~captum_nmf.compare.analyse`);
5. exports QuPath GeoJSON, overlay TIFFs and a summary (:mod:`captum_nmf.export`);
6. draws the figures (:mod:`captum_nmf.viz`) and writes ``report.html``.

Needs the ``all`` extra; about two to four minutes on 2 CPU cores.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from captum_nmf import NMFConceptAttribution, data
from captum_nmf.compare import analyse, cam_agreement
from captum_nmf.export import slide_summary, to_geojson, write_overlay_tiff
from captum_nmf.io import atomic_write
from captum_nmf.tumour import he_tiles, train_tumour_detector
from captum_nmf.viz import plot_comparison, plot_concepts, plot_overlay, plot_slide, plot_structure
from captum_nmf.wsi import explain_slide, write_pyramid
from captum_nmf.zoo import normalize

__all__ = ["run_demo"]

K = 6
TILE = 256  # EfficientNet-Lite0's head: 8 x 8 cells of 32 px; stride 128 = 4 cells
STEPS = ("detector", "concepts", "slide", "explain", "analyses", "exports", "figures", "report")


def _save(fig: Any, path: Path) -> str:
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, dpi=110, format=path.suffix.lstrip(".") or "png")
    return path.name


def run_demo(out: str | os.PathLike[str], *, progress: bool = True, small: bool = False) -> Path:
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

    Returns:
        *Path*: ``report.html``.

    Raises:
        ImportError: an extra is missing (``pip install 'captum-nmf[all]'``).
    """
    small = small or os.environ.get("CAPTUM_NMF_DEMO_SMALL", "") not in ("", "0")
    stride = TILE if small else TILE // 2
    out_dir = Path(out)
    figures = out_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(STEPS), disable=not progress, desc="captum-nmf demo", unit="step")
    bar.set_postfix_str(STEPS[0])

    def step(name: str) -> None:
        bar.update(1)
        following = STEPS.index(name) + 1
        bar.set_postfix_str(STEPS[following] if following < len(STEPS) else "done")

    torch.manual_seed(0)
    tiles = he_tiles(TILE, stride)
    model, train_accuracy = train_tumour_detector(tiles)
    step("detector")
    x = normalize(tiles.images)
    attr = NMFConceptAttribution(model, model.head_relu, K, random_state=0)
    attr.fit([x[i : i + 32] for i in range(0, len(x), 32)], progress=False)
    attr.save(out_dir / "concepts.safetensors")
    step("concepts")
    nest = data.rgb("hgsc_nest.jpg")
    stroma = data.rgb("hgsc_stromal_he.jpg")
    slide_path = write_pyramid(np.concatenate([nest, stroma], axis=1), out_dir / "demo_slide.svs")
    step("slide")
    explanation_dir = out_dir / "explanation"
    ex = explain_slide(
        attr,
        slide_path,
        tile_size=TILE,
        stride=stride,
        transform=normalize,
        batch_size=16,
        out_dir=explanation_dir,
        overwrite=explanation_dir.is_dir() and any(explanation_dir.iterdir()),  # a former run's
        progress=progress,
    )
    step("explain")
    # overlapping tiles share pixels: the surrogate holds out whole spatial blocks
    block = 3 * stride
    blocks = (
        tiles.source * 10_000
        + (tiles.locations[:, 1] // block) * 100
        + tiles.locations[:, 0] // block
    )
    result = analyse(attr, x, target=1, groups=blocks, batch_size=16, progress=False)
    result.save(out_dir / "analysis")
    masked = tiles.has_mask[result.indices]
    grid = result.concept_maps.shape[-1]
    share = (
        tiles.neoplastic[result.indices][masked]
        .reshape(-1, grid, TILE // grid, grid, TILE // grid)
        .mean(axis=(2, 4))
    )
    vs_mask = cam_agreement(
        result.concept_maps[masked],
        share,
        result.predictions[masked],
        name="neoplastic-nuclei share",
    )
    gradcam_vs_mask = cam_agreement(
        result.cam_values["gradcam"][masked][:, None],
        share,
        result.predictions[masked],
        name="neoplastic-nuclei share",
    )
    step("analyses")
    exports = out_dir / "exports"
    to_geojson(ex, exports / "concepts.geojson")
    write_overlay_tiff(ex, exports / "clusters.tif")
    for j in range(K):
        write_overlay_tiff(ex, exports / f"concept_{j}.tif", kind="intensity", concept=j)
    summary = slide_summary(ex, exports / "summary", top_n=4)
    step("exports")
    tumour = (
        int(np.flatnonzero(result.predictions == 1)[0]) if (result.predictions == 1).any() else 0
    )
    image = tiles.images[result.indices[tumour]]
    maps = result.concept_maps[tumour]
    names = {
        "fig1": _save(
            plot_overlay(image, maps, title="concept intensities"), figures / "fig1_overlay.png"
        ),
        "fig2": _save(plot_concepts(image, maps), figures / "fig2_concepts.png"),
        "fig3": _save(
            plot_comparison(image, result.cam_values["gradcam"][tumour], maps),
            figures / "fig3_comparison.png",
        ),
        "fig4": _save(
            plot_structure(result.similarity, result.correlation), figures / "fig4_structure.png"
        ),
        "slide": _save(plot_slide(ex), figures / "slide_overlay.png"),
        "slide_clusters": _save(plot_slide(ex, clusters=True), figures / "slide_clusters.png"),
    }
    step("figures")
    report = _report(out_dir, names, result, vs_mask, gradcam_vs_mask, summary, train_accuracy, ex)
    step("report")
    bar.close()
    return report


def _report(
    out_dir: Path,
    figures: dict[str, str],
    result: Any,
    vs_mask: Any,
    gradcam_vs_mask: Any,
    summary: dict[str, Any],
    train_accuracy: float,
    ex: Any,
) -> Path:
    def img(key: str, caption: str) -> str:
        return (
            f'<figure><img src="figures/{figures[key]}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )

    rows = "".join(
        f"<tr><td>{html.escape(c['name'])}</td><td>{c['area_fraction']:.3f}</td>"
        f"<td>{c['mean_intensity']:.3f}</td></tr>"
        for c in summary["concepts"]
    )
    g = gradcam_vs_mask.summary["all"]
    tables = "".join(t.to_html() for t in result.tables().values())
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in result.notes)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>captum-nmf demo report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}img{{max-width:100%}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:2px 6px}}
caption{{font-weight:bold;text-align:left}}</style></head><body>
<h1>captum-nmf demo</h1>
<p>Real H&amp;E (high-grade serous ovarian carcinoma, packaged with attribution), EfficientNet-Lite0
with its real ImageNet weights and a tumour-tile head (training accuracy {train_accuracy:.3f}),
{K} NMF concepts of <code>head_relu</code>. {result.n_tiles} tiles analysed.</p>
<h2>Whole slide</h2>
<p>{html.escape(repr(ex))}</p>
{img("slide", "concept intensities over the slide")}{img("slide_clusters", "concept clusters")}
<table><caption>Concepts on the slide (within tissue)</caption>
<thead><tr><th>concept</th><th>area share</th><th>mean intensity</th></tr></thead>
<tbody>{rows}</tbody></table>
<p>Exports: <a href="exports/concepts.geojson">QuPath GeoJSON</a>,
<a href="exports/clusters.tif">cluster overlay TIFF</a>,
{", ".join(f'<a href="exports/concept_{j}.tif">concept {j} TIFF</a>' for j in range(K))},
<a href="exports/summary/summary.csv">summary CSV</a>.</p>
<h2>One tumour tile (Fig. 1-3)</h2>
{img("fig1", "Fig. 1: all concepts")}{img("fig2", "Fig. 2: one panel per concept")}
{img("fig3", "Fig. 3: image, GradCAM, concepts, clusters")}
<h2>Analyses (Fig. 4, Tables 1-2)</h2>
{img("fig4", "Fig. 4: concept structure")}
{tables}
<ul>{notes}</ul>
<h2>Concepts vs the neoplastic-nuclei mask</h2>
{vs_mask.table.to_html()}
<p>GradCAM vs the same mask: IoU {g["iou_mean"][0]:.3f} ± {g["iou_std"][0]:.3f}, correlation
{g["corr_mean"][0]:.3f} ± {g["corr_std"][0]:.3f}.</p>
</body></html>
"""
    path = out_dir / "report.html"
    with atomic_write(path) as fh:
        fh.write(page)
    return path
