"""CAM maps on the concept grid: GradCAM, GradCAM++ and HiResCAM at the layer's resolution.

All three are computed for the same layer the concepts factorise, so a CAM map
and a concept map share their h x w grid cell for cell, and they are *signed*:
"> 0" means the layer's evidence at that location raises the target's score.

* ``"gradcam"``: Captum's :class:`captum.attr.LayerGradCam` with
  ``relu_attributions=False`` (channel weights = spatial mean of the gradients).
* ``"hirescam"``: Captum's :class:`captum.attr.LayerGradientXActivation`
  summed over channels (gradient times activation, location by location).
* ``"gradcam++"``: Captum has none; implemented from Eq. 19 of Chattopadhyay et
  al., "Grad-CAM++" (https://arxiv.org/abs/1710.11063), exactly as
  pytorch-grad-cam's ``GradCAMPlusPlus.get_cam_weights`` computes the weights
  (same epsilon), then summed over channels without a ReLU.

pytorch-grad-cam returns maps that are ReLU'd, min-max scaled to [0, 1] and
resized to the input: there "> 0" is almost everywhere, so its maps must not
be thresholded at 0. :func:`~captum_nmf.compare.cam_agreement` warns
(:class:`~captum_nmf.exceptions.CamScaleWarning`) when it is given maps that
look like that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from captum.attr import LayerActivation, LayerGradCam, LayerGradientXActivation
from torch import Tensor, nn

from captum_nmf._utils.activations import eval_mode, models_of

__all__ = ["CAM_METHODS", "GRADCAM_PP_EPS", "CamMethod", "cam_maps", "gradcam_plus_plus_weights"]

CamMethod = Literal["gradcam", "gradcam++", "hirescam"]
CAM_METHODS: tuple[CamMethod, ...] = ("gradcam", "gradcam++", "hirescam")
GRADCAM_PP_EPS = 1e-6  # pytorch-grad-cam's epsilon in the alpha denominator


def _single(x: Any) -> Tensor:
    out = x[0] if isinstance(x, (tuple, list)) else x
    if not isinstance(out, Tensor):
        raise TypeError(f"expected a tensor from Captum, got {type(out).__name__}.")
    return out


def gradcam_plus_plus_weights(activations: Tensor, gradients: Tensor) -> Tensor:
    """GradCAM++ channel weights (N x C) from N x C x h x w activations and gradients.

    ``alpha = g^2 / (2 g^2 + sum_ij(A) g^3 + eps)`` where ``g != 0`` (else 0),
    ``w_c = sum_ij(alpha * relu(g))`` (Eq. 19 of the Grad-CAM++ paper).

    Returns:
        *Tensor*: N x C weights.
    """
    g2 = gradients**2
    g3 = g2 * gradients
    sum_a = activations.sum(dim=(2, 3), keepdim=True)
    alpha = g2 / (2 * g2 + sum_a * g3 + GRADCAM_PP_EPS)
    alpha = torch.where(gradients != 0, alpha, torch.zeros_like(alpha))
    return (torch.relu(gradients) * alpha).sum(dim=(2, 3))


def cam_maps(
    forward_func: Callable[..., Any],
    layer: nn.Module,
    inputs: Tensor,
    method: CamMethod,
    target: int | Tensor,
    *,
    additional_forward_args: Any = None,
    attribute_to_layer_input: bool = False,
) -> Tensor:
    r"""Signed CAM maps of ``target`` at ``layer``'s resolution.

    The model runs in eval mode for the call; every module's ``training``
    flag is restored afterwards.

    Args:
        forward_func (Callable): the model.
        layer (torch.nn.Module): the layer (the one the concepts factorise).
        inputs (Tensor): N x ... inputs.
        method (str): ``"gradcam"``, ``"gradcam++"`` or ``"hirescam"``.
        target (int or Tensor): output index explained (e.g. the positive
                    class), one for all or one per input.
        additional_forward_args (Any, optional): as in Captum.
                    Default: None
        attribute_to_layer_input (bool, optional): the CAM of the layer's
                    input instead of its output, as in Captum (for concepts
                    fitted on the input).
                    Default: False

    Returns:
        *Tensor*: N x h x w signed maps (detached, on the inputs' device).

    Raises:
        ValueError: an unknown ``method``.
    """
    if method not in CAM_METHODS:
        raise ValueError(f"method must be one of {CAM_METHODS}, got {method!r}.")
    with eval_mode(models_of(forward_func, layer)):
        if method == "gradcam":
            cam = LayerGradCam(forward_func, layer).attribute(
                inputs,
                target=target,
                additional_forward_args=additional_forward_args,
                attribute_to_layer_input=attribute_to_layer_input,
                relu_attributions=False,
            )
            out = _single(cam)[:, 0]
        elif method == "hirescam":
            gxa = LayerGradientXActivation(forward_func, layer).attribute(
                inputs,
                target=target,
                additional_forward_args=additional_forward_args,
                attribute_to_layer_input=attribute_to_layer_input,
            )
            out = _single(gxa).sum(dim=1)
        else:
            grads = LayerGradientXActivation(
                forward_func, layer, multiply_by_inputs=False
            ).attribute(
                inputs,
                target=target,
                additional_forward_args=additional_forward_args,
                attribute_to_layer_input=attribute_to_layer_input,
            )
            acts = LayerActivation(forward_func, layer).attribute(
                inputs,
                additional_forward_args=additional_forward_args,
                attribute_to_layer_input=attribute_to_layer_input,
            )
            a, g = _single(acts).double(), _single(grads).double()
            weights = gradcam_plus_plus_weights(a, g)
            out = (weights[:, :, None, None] * a).sum(dim=1).to(_single(acts).dtype)
    return out.detach()
