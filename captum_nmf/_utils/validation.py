"""Shared argument checks: a wrong type raises TypeError, a wrong value ValueError."""

from __future__ import annotations

import math
import numbers
from typing import Literal, overload

import torch
from torch import Tensor

__all__ = [
    "check_bool",
    "check_device",
    "check_int",
    "device_problem",
    "is_positive_number",
    "value_range",
]


@overload
def check_int(
    name: str,
    value: object,
    *,
    minimum: int | None = ...,
    hint: str = ...,
    optional: Literal[False] = False,
) -> int: ...


@overload
def check_int(
    name: str, value: object, *, minimum: int | None = ..., hint: str = ..., optional: bool
) -> int | None: ...


def check_int(
    name: str,
    value: object,
    *,
    minimum: int | None = 1,
    hint: str = "",
    optional: bool = False,
) -> int | None:
    """Check a count-like integer argument and return it as a Python ``int``.

    ``bool`` is refused although it is an ``int`` subclass (``True`` is not a
    count); numpy integers are accepted.

    Args:
        name (str): the argument's name, for the message.
        value (object): the value passed.
        minimum (int, optional): smallest allowed value; None allows any.
                    Default: 1
        hint (str, optional): the fix, appended to the message (e.g.
                    ``"pass e.g. n_epochs=1."``).
                    Default: ``""``
        optional (bool, optional): whether None is allowed (and returned).
                    Default: False

    Returns:
        *int* or *None*: ``value`` as an ``int`` (None only when ``optional``).

    Raises:
        TypeError: ``value`` is not an integer (a float, a bool, a string,
                    or None when not ``optional``).
        ValueError: ``value`` is below ``minimum``.
    """
    if value is None and optional:
        return None
    tail = f"; {hint}" if hint else "."
    bound = f" >= {minimum}" if minimum is not None else ""
    kind = f"an int{bound}" + (" or None" if optional else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {kind}, got {value!r} ({type(value).__name__}){tail}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}{tail}")
    return int(value)


def is_positive_number(value: object) -> bool:
    """Whether ``value`` is a real number (not a bool), finite and above 0 (an mpp, a scale)."""
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and float(value) > 0
    )


def check_bool(name: str, value: object, *, optional: bool = False) -> bool | None:
    """Check a flag argument.

    Args:
        name (str): the argument's name, for the message.
        value (object): the value passed.
        optional (bool, optional): whether None is allowed (and returned).
                    Default: False

    Returns:
        *bool* or *None*: ``value``.

    Raises:
        TypeError: ``value`` is not a bool (or None when ``optional``).
    """
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        kind = "a bool" + (" or None" if optional else "")
        raise TypeError(
            f"{name} must be {kind}, got {value!r} ({type(value).__name__}); pass "
            f"{name}=True or {name}=False."
        )
    return value


_MPS = "MPS is not supported: the NMF solver computes in float64, which PyTorch's MPS backend lacks"


def device_problem(device: torch.device) -> str | None:
    """Why the library cannot run on ``device`` here (no CUDA, no such CUDA index, MPS), or None."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available (torch.cuda.is_available() is False)"
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            return f"this machine has {count} CUDA device(s), 0 to {count - 1}"
    elif device.type == "mps":
        return _MPS
    return None


def check_device(name: str, value: object) -> torch.device:
    """A device argument as a ``torch.device`` that this machine has, checked before any work.

    Args:
        name (str): the argument's name, for the message.
        value (str or torch.device): ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Returns:
        *torch.device*: the device.

    Raises:
        TypeError: ``value`` is neither a string nor a ``torch.device``.
        ValueError: not a device name, a device this machine does not have (no
                    CUDA, a CUDA index past the last device), or MPS (no float64).
    """
    if not isinstance(value, (str, torch.device)):
        raise TypeError(
            f"{name} must be a str or torch.device, got {type(value).__name__}; "
            "pass e.g. 'cpu' or 'cuda'."
        )
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(
            f"{name}={value!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'."
        ) from exc
    problem = device_problem(device)
    if problem is not None:
        raise ValueError(f"{name}={str(value)!r}: {problem}; use 'cpu' (or None).")
    return device


def value_range(t: Tensor) -> Tensor:
    """The minimum and maximum of ``t`` (a 2-element tensor on its device), in one pass.

    A NaN makes both NaN and an infinity shows in them, so this is the one
    reduction a check for NaN, infinite and negative values needs. A dense
    tensor in another memory order (channels-last activations) is reduced as
    the 1-D view of its memory: ``torch.aminmax`` over a channels-last N x C x h x w
    tensor took 8x as long as over the same values contiguous (2.8 against
    0.35 ms for 16 x 1280 x 16 x 16 floats, torch 2.14, 2 CPU cores).

    Args:
        t (Tensor): a non-empty tensor.

    Returns:
        *Tensor*: ``[min, max]`` in ``t``'s dtype.
    """
    return torch.stack(torch.aminmax(_memory_order(t)))


def _memory_order(t: Tensor) -> Tensor:
    """``t`` as a 1-D view in the order of its memory when it is dense, else ``t`` itself."""
    if t.is_contiguous():
        return t.view(-1)
    order = sorted(range(t.dim()), key=t.stride, reverse=True)
    permuted = t.permute(order)
    return permuted.view(-1) if permuted.is_contiguous() else t
