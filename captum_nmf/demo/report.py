"""The demo's ``report.html``: the figures, tables and exports of one run on one page."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captum_nmf.compare import AnalysisResult, CamAgreement
from captum_nmf.io import atomic_write

__all__ = ["DemoFindings", "write_report"]

_STYLE = """body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 6px}
caption{font-weight:bold;text-align:left}"""


@dataclass(frozen=True)
class DemoFindings:
    """What the demo computed, as the report shows it.

    Attributes:
        result (AnalysisResult): the paper's analyses on the tiles.
        vs_mask (CamAgreement): the concepts against the neoplastic-nuclei share.
        gradcam_vs_mask (CamAgreement): GradCAM against the same share.
        summary (dict): :func:`captum_nmf.export.slide_summary` of the slide.
        train_accuracy (float): the detector's training accuracy.
        slide (str): a one-line description of the slide's explanation.
        n_concepts (int): K.
        concepts: the concept step (``naming.ConceptStep``), when it ran.
        device (str): where the model ran, e.g. ``"cpu (2 threads, 2 CPUs usable)"``
            or ``"cuda:0 (NVIDIA H200)"``.
    """

    result: AnalysisResult
    vs_mask: CamAgreement
    gradcam_vs_mask: CamAgreement
    summary: dict[str, Any]
    train_accuracy: float
    slide: str
    n_concepts: int
    concepts: Any = None  # the concept step (naming.ConceptStep), when it ran
    device: str = "cpu"


def _figure(figures: dict[str, str], key: str, caption: str) -> str:
    return (
        f'<figure><img src="figures/{figures[key]}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _slide_section(figures: dict[str, str], found: DemoFindings) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(c['name'])}</td><td>{c['area_fraction']:.3f}</td>"
        f"<td>{c['mean_intensity']:.3f}</td></tr>"
        for c in found.summary["concepts"]
    )
    tiffs = ", ".join(
        f'<a href="exports/concept_{j}.tif">concept {j} TIFF</a>' for j in range(found.n_concepts)
    )
    return f"""<h2>Whole slide</h2>
<p>{html.escape(found.slide)}</p>
{_figure(figures, "slide", "concept intensities over the slide")}
{_figure(figures, "slide_clusters", "concept clusters")}
<table><caption>Concepts on the slide (within tissue)</caption>
<thead><tr><th>concept</th><th>area share</th><th>mean intensity</th></tr></thead>
<tbody>{rows}</tbody></table>
<p>Exports: <a href="exports/concepts.geojson">QuPath GeoJSON</a>,
<a href="exports/clusters.tif">cluster overlay TIFF</a>, {tiffs},
<a href="exports/summary/summary.csv">summary CSV</a>.</p>
"""


def _analysis_section(figures: dict[str, str], found: DemoFindings) -> str:
    g = found.gradcam_vs_mask.summary["all"]
    tables = "".join(t.to_html() for t in found.result.tables().values())
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in found.result.notes)
    return f"""<h2>One tumour tile (Fig. 1-3)</h2>
{_figure(figures, "fig1", "Fig. 1: all concepts")}
{_figure(figures, "fig2", "Fig. 2: one panel per concept")}
{_figure(figures, "fig3", "Fig. 3: image, GradCAM, concepts, clusters")}
<h2>Analyses (Fig. 4, Tables 1-2)</h2>
{_figure(figures, "fig4", "Fig. 4: concept structure")}
{tables}
<ul>{notes}</ul>
<h2>Concepts vs the neoplastic-nuclei mask</h2>
{found.vs_mask.table.to_html()}
<p>GradCAM vs the same mask: IoU {g["iou_mean"][0]:.3f} ± {g["iou_std"][0]:.3f}, correlation
{g["corr_mean"][0]:.3f} ± {g["corr_std"][0]:.3f}.</p>
"""


def _concept_section(figures: dict[str, str], found: DemoFindings) -> str:
    step = found.concepts
    if step is None or "select_k" not in figures:
        return ""
    names = step.gallery.names
    rows = "".join(
        f"<tr><td>{j}</td><td>{html.escape(names[j])}</td>"
        f"<td>{'' if j not in step.shares else f'{step.shares[j]:.2f}'}</td>"
        f"<td>{step.stability.min_cosine[j]:.3f}</td>"
        f"<td>{'yes' if step.stability.stable[j] else 'no'}</td>"
        f'<td><a href="figures/gallery/gallery_concept_{j}.png">gallery</a></td></tr>'
        for j in range(len(names))
    )
    return f"""<h2>Choosing K, stability and names</h2>
{_figure(figures, "select_k", "held-out error and concept stability against K")}
<p>{html.escape(step.selection.rule)}</p>
<p>The demo keeps K = {found.n_concepts} (the paper's choice) and reports the sweep beside it.
Concepts are named after the nuclei type that holds at least half of the typed nuclei pixels
in the cells assigned to them on the tiles of the image with a nuclei-type mask (majority
overlap); the others keep their numbers. Stability: the minimum cosine of each concept with its
Hungarian match in refits on other halves of the tiles (stable at 0.9 or more).</p>
<table><tr><th>concept</th><th>name</th><th>majority share</th><th>min matched cosine</th>
<th>stable</th><th>prototypes</th></tr>{rows}</table>
"""


def write_report(out_dir: Path, figures: dict[str, str], found: DemoFindings) -> Path:
    """Write ``out_dir/report.html`` atomically.

    Args:
        out_dir (Path): the demo's output directory.
        figures (dict[str, str]): figure key to file name under ``out_dir/figures``.
        found (DemoFindings): what the demo computed.

    Returns:
        *Path*: ``report.html``.
    """
    sections = "".join(
        part(figures, found) for part in (_concept_section, _slide_section, _analysis_section)
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>captum-nmf demo report</title>
<style>{_STYLE}</style></head><body>
<h1>captum-nmf demo</h1>
<p>Real H&amp;E (high-grade serous ovarian carcinoma, packaged with attribution), EfficientNet-Lite0
with its real ImageNet weights and a tumour-tile head (training accuracy
{found.train_accuracy:.3f}), {found.n_concepts} NMF concepts of <code>head_relu</code>.
{found.result.n_tiles} tiles analysed. The model ran on {html.escape(found.device)}.</p>
{sections}</body></html>
"""
    path = out_dir / "report.html"
    with atomic_write(path) as fh:
        fh.write(page)
    return path
