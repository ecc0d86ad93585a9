"""Host-to-device copies that do not make the host wait for the device."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["upload"]


def upload(t: Tensor, device: torch.device) -> Tensor:
    """``t`` (a host tensor) on ``device``, without waiting for the device's queued work.

    A blocking host-to-device copy on CUDA (``.to(device)``, ``torch.tensor(...,
    device=)``) waits until the device has finished everything queued before it,
    and so does a ``non_blocking`` one from pageable memory. In the slide loop that
    stalled the host behind the forward at every batch. Here ``t`` is copied into
    pinned memory (PyTorch's caching host allocator keeps that block until the copy
    has run) and sent ``non_blocking``; on the CPU, or for a tensor already there,
    it is ``t.to(device)``.

    Args:
        t (Tensor): a tensor, usually small (indices, counts).
        device (torch.device): where it is needed.

    Returns:
        *Tensor*: ``t`` on ``device`` (``t`` itself when it is there already).
    """
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
