"""What ``NMF`` accepts: hyper-parameter, input-row and concept-matrix checks, and output kinds."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from captum_nmf._utils.validation import check_int, value_range

__all__ = [
    "ArrayLike",
    "InitName",
    "check_finite_non_negative",
    "check_params",
    "check_tensor",
    "check_values",
    "components_matrix",
    "rank",
]

ArrayLike = Any  # numpy array, torch tensor or anything numpy.asarray accepts
InitName = Literal["nndsvda", "nndsvd", "random"]
_INITS = ("nndsvda", "nndsvd", "random")


@dataclass(frozen=True)
class _Kind:
    """How to give results back: as the caller's array kind, dtype and device."""

    is_numpy: bool
    dtype: torch.dtype
    device: torch.device


def check_params(
    n_components: object, init: object, max_iter: object, tol: float, forget_factor: float
) -> None:
    """Check the hyper-parameters of :class:`~captum_nmf.NMF` (at fit time, as scikit-learn).

    Raises:
        TypeError: ``n_components`` or ``max_iter`` is not an integer.
        ValueError: a hyper-parameter is out of range.
    """
    check_int("n_components", n_components, optional=True, hint="pass e.g. n_components=6.")
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}.")
    check_int("max_iter", max_iter, hint="pass e.g. max_iter=200.")
    if not isinstance(tol, numbers.Real) or not tol >= 0:
        raise ValueError(f"tol must be a float >= 0, got {tol!r}.")
    if not isinstance(forget_factor, numbers.Real) or not 0.0 < forget_factor <= 1.0:
        raise ValueError(f"forget_factor must be in (0, 1], got {forget_factor!r}.")


def check_tensor(x: Tensor, n_features: int | None, *, values: bool = True) -> Tensor:
    """``x`` as a dense, finite, non-negative 2-D floating tensor (half precision as float32).

    Args:
        x (Tensor): n x C rows.
        n_features (int or None): the C of the fitted estimator, or None when
                    ``x`` starts a fit.
        values (bool, optional): check the values (a pass over ``x``); off
                    for a caller that checks them itself (``transform``
                    folds the cheap part of the check into its product).
                    Default: True

    Returns:
        *Tensor*: ``x``, or its float32 / float64 copy for half or integer input.

    Raises:
        TypeError: ``x`` is not dense.
        ValueError: ``x`` is on an MPS device, is not 2-D, is empty, has NaN,
                    infinite or negative values, or has another C than ``n_features``.
    """
    if x.layout != torch.strided:
        raise TypeError(
            f"NMF needs a dense tensor, got layout {x.layout}; call X.to_dense() first."
        )
    refuse_mps(x)
    if x.ndim != 2:
        raise ValueError(
            f"Expected a 2-D tensor (n_samples x n_features), got shape {tuple(x.shape)}; "
            "reshape your data with X.reshape(-1, n_features)."
        )
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    elif not x.is_floating_point():
        x = x.double()
    n, c = x.shape
    if n < 1:
        raise ValueError(
            f"Found array with 0 sample(s) (shape={tuple(x.shape)}) while a minimum of 1 "
            "is required by NMF."
        )
    if c < 1:
        raise ValueError(
            f"Found array with 0 feature(s) (shape={tuple(x.shape)}) while a minimum of 1 "
            "is required by NMF."
        )
    if values:
        check_values(x)
    if n_features is not None and c != n_features:
        raise ValueError(
            f"X has {c} features, but NMF is expecting {n_features} features as input."
        )
    return x


def refuse_mps(x: Tensor) -> None:
    """Refuse rows on an MPS device before any work: the solver needs float64 there.

    Raises:
        ValueError: ``x`` is on an MPS device.
    """
    if x.device.type == "mps":
        raise ValueError(
            "NMF cannot compute on an MPS device: its solver needs float64, which PyTorch's "
            "MPS backend lacks; run the model on the CPU or CUDA (NMF alone: NMF(device='cpu') "
            "moves X, or pass X.cpu())."
        )


def check_values(x: Tensor) -> None:
    """Refuse rows with NaN, infinite or negative entries (``-0.0`` is zero, accepted).

    Raises:
        ValueError: ``x`` holds such an entry; the message says which kind.
    """
    # One pass, one host synchronisation, no temporary: NaN propagates into the
    # minimum and maximum, infinities show in them.
    low, high = value_range(x).tolist()
    if not (math.isfinite(low) and math.isfinite(high)):
        what = "NaN" if bool(torch.isnan(x).any()) else "infinity"
        raise ValueError(f"Input X contains {what}; NMF needs finite values.")
    if low < 0:
        raise ValueError("Negative values in data passed to NMF (input X).")


def rank(n_components: int | None, init: str, n_samples: int, n_features: int) -> int:
    """K: ``n_components``, or C when None, checked against the shape of ``X``.

    Raises:
        ValueError: K > C, or K > n with an SVD-based ``init``.
    """
    k = n_features if n_components is None else int(n_components)
    if k > n_features:
        raise ValueError(
            f"n_components={k} exceeds the {n_features} features of X; "
            f"choose n_components <= {n_features}."
        )
    if init != "random" and k > n_samples:
        raise ValueError(
            f"init={init!r} needs n_components <= min(n_samples, n_features), got "
            f"n_components={k} with {n_samples} samples; pass more rows or init='random'."
        )
    return k


def components_matrix(components: ArrayLike, *, fix: str = "") -> tuple[Tensor, bool]:
    """Given concept vectors as a K x C tensor (detached, not copied), and whether they were numpy.

    Args:
        components (ndarray or Tensor): K x C concept vectors.
        fix (str, optional): appended to the message of a bad shape (e.g.
                    ``"; pass the stream's H0"``).
                    Default: ``""``

    Returns:
        *tuple*: the tensor and whether ``components`` was not a tensor.

    Raises:
        ValueError: ``components`` is not a K x C matrix with K, C >= 1.
    """
    is_numpy = not isinstance(components, Tensor)
    h = torch.as_tensor(np.asarray(components)) if is_numpy else components.detach()
    if h.ndim != 2 or h.shape[0] < 1 or h.shape[1] < 1:
        raise ValueError(f"components must be a K x C matrix, got shape {tuple(h.shape)}{fix}.")
    return h, is_numpy


def check_finite_non_negative(h: Tensor) -> None:
    """Refuse concept vectors with NaN, infinite or negative entries.

    Raises:
        ValueError: ``h`` has such an entry.
    """
    if not bool(torch.isfinite(h).all()) or bool((h < 0).any()):
        raise ValueError("components must be finite and non-negative.")
