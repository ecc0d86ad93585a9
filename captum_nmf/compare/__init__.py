"""The paper's analyses: concept structure, a surrogate model, agreement with CAM methods.

* :func:`concept_similarity`, :func:`weight_correlation` (Fig. 4);
* :func:`surrogate_report` (Table 1): a logistic regression predicting the model's
  label from per-tile concept features;
* :func:`cam_maps` (GradCAM, GradCAM++, HiResCAM, signed, at the concepts'
  layer) and :func:`cam_agreement` (Table 2);
* :func:`analyse` runs all three on tiles; :func:`sample_tiles` draws a
  reproducible sample from tiles, tile datasets or slide explanations;
* :class:`Table` (:mod:`captum_nmf.compare.tables`) lays the numbers out as
  markdown, HTML, CSV or a dict.

Only the core (torch, Captum, scikit-learn) is needed; pytorch-grad-cam
(extra ``cam``) is used by the tests to cross-check GradCAM++.
"""

from __future__ import annotations

from captum_nmf.compare.analysis import AnalysisResult, TileSample, analyse, sample_tiles
from captum_nmf.compare.cams import CAM_METHODS, cam_maps, gradcam_plus_plus_weights
from captum_nmf.compare.metrics import (
    CamAgreement,
    ConceptCorrelation,
    ConceptSimilarity,
    SurrogateReport,
    cam_agreement,
    concept_similarity,
    surrogate_features,
    surrogate_report,
    weight_correlation,
)
from captum_nmf.compare.tables import Table

__all__ = [
    "CAM_METHODS",
    "AnalysisResult",
    "CamAgreement",
    "ConceptCorrelation",
    "ConceptSimilarity",
    "SurrogateReport",
    "Table",
    "TileSample",
    "analyse",
    "cam_agreement",
    "cam_maps",
    "concept_similarity",
    "gradcam_plus_plus_weights",
    "sample_tiles",
    "surrogate_features",
    "surrogate_report",
    "weight_correlation",
]
