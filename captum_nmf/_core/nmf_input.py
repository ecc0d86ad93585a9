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
    "check_random_state_param",
    "check_tensor",
    "check_values",
    "components_matrix",
    "rank",
    "refuse_complex",
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
    n_components: object,
    init: object,
    max_iter: object,
    tol: float,
    forget_factor: float,
    *,
    random_state: object = None,
) -> None:
    """Check the hyper-parameters of :class:`~captum_nmf.NMF` (at fit time, as scikit-learn).

    Raises:
        TypeError: ``n_components`` or ``max_iter`` is not an integer, or
                    ``random_state`` is neither None, an int nor a numpy
                    ``RandomState``.
        ValueError: a hyper-parameter is out of range (``random_state`` must be
                    in [0, 2**32 - 1], numpy's seed range).
    """
    check_int("n_components", n_components, optional=True, hint="pass e.g. n_components=6.")
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}.")
    check_int("max_iter", max_iter, hint="pass e.g. max_iter=200.")
    if not isinstance(tol, numbers.Real) or not tol >= 0:
        raise ValueError(f"tol must be a float >= 0, got {tol!r}.")
    if not isinstance(forget_factor, numbers.Real) or not 0.0 < forget_factor <= 1.0:
        raise ValueError(f"forget_factor must be in (0, 1], got {forget_factor!r}.")
    check_random_state_param(random_state)


def check_random_state_param(random_state: object) -> None:
    """Refuse a ``random_state`` numpy cannot seed, naming it (not numpy's bare "Seed must be ...").

    Raises:
        TypeError: not None, an int or a ``numpy.random.RandomState``.
        ValueError: an int outside [0, 2**32 - 1].
    """
    if random_state is None or isinstance(random_state, np.random.RandomState):
        return
    if isinstance(random_state, bool) or not isinstance(random_state, numbers.Integral):
        raise TypeError(
            f"random_state must be None, an int in [0, 2**32 - 1] or a numpy RandomState, got "
            f"{random_state!r} ({type(random_state).__name__}); pass e.g. random_state=0."
        )
    if not 0 <= int(random_state) <= 2**32 - 1:
        raise ValueError(
            f"random_state must be in [0, 2**32 - 1] (numpy's seed range), got {random_state!r}; "
            "pass e.g. random_state=0."
        )


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
        TypeError: ``x`` is not dense, or is complex.
        ValueError: ``x`` is on an MPS device, is not 2-D, is empty, has NaN,
                    infinite or negative values, or has another C than ``n_features``.
    """
    if x.layout != torch.strided:
        raise TypeError(
            f"NMF needs a dense tensor, got layout {x.layout}; call X.to_dense() first."
        )
    refuse_complex(x, "X")
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


def refuse_complex(t: Tensor, name: str) -> None:
    """Refuse a complex tensor (its imaginary part would be dropped by a cast).

    Raises:
        TypeError: ``t`` is complex.
    """
    if t.is_complex():
        raise TypeError(
            f"NMF needs real, non-negative {name}, got a complex tensor of dtype {t.dtype}; "
            f"pass {name}.real or {name}.abs() (whichever you mean), not the complex values."
        )


def _first(mask: Tensor) -> tuple[int, int, int]:
    """How many entries the 2-D ``mask`` marks, and the row and column of the first one."""
    count = int(mask.sum())
    flat = int(torch.argmax(mask.reshape(-1).to(torch.uint8)))  # the first True, row-major
    row, col = divmod(flat, int(mask.shape[1]))
    return count, row, col


def _entries(count: int) -> str:
    return f"{count} entr{'y' if count == 1 else 'ies'}"


def check_values(x: Tensor) -> None:
    """Refuse rows with NaN, infinite or negative entries (``-0.0`` is zero, accepted).

    The message says which kind, how many entries, where the first one is, and the fix.

    Raises:
        ValueError: ``x`` holds such an entry.
    """
    # One pass, one host synchronisation, no temporary: NaN propagates into the
    # minimum and maximum, infinities show in them. Only a refusal looks further.
    low, high = value_range(x).tolist()
    if not (math.isfinite(low) and math.isfinite(high)):
        nan = torch.isnan(x)
        if bool(nan.any()):
            count, row, col = _first(nan)
            raise ValueError(
                f"Input X contains NaN ({_entries(count)}, the first at row {row}, column {col}); "
                "NMF needs finite values: drop those rows or replace the NaN (e.g. "
                "torch.nan_to_num(X, nan=0.0))."
            )
        inf = torch.isinf(x)
        count, row, col = _first(inf)
        raise ValueError(
            f"Input X contains infinity ({_entries(count)}, the first {float(x[row, col])} at "
            f"row {row}, column {col}); NMF needs finite values: drop those rows, or clip X to "
            "a finite maximum."
        )
    if low < 0:
        negative = x < 0
        count, row, col = _first(negative)
        raise ValueError(
            f"Negative values in data passed to NMF (input X): {_entries(count)} below 0, the "
            f"first {float(x[row, col]):.3g} at row {row}, column {col} (the smallest "
            f"{low:.3g}); NMF factorises non-negative data: clip X (X.clamp(min=0), or "
            "np.clip(X, 0, None)) or fix its source (NMFConceptAttribution(..., "
            "negative='relu') does that to a layer's activations)."
        )


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
        TypeError: ``components`` is complex.
        ValueError: ``components`` is not a K x C matrix with K, C >= 1.
    """
    is_numpy = not isinstance(components, Tensor)
    h = torch.as_tensor(np.asarray(components)) if is_numpy else components.detach()
    refuse_complex(h, "components")
    if h.ndim != 2 or h.shape[0] < 1 or h.shape[1] < 1:
        raise ValueError(f"components must be a K x C matrix, got shape {tuple(h.shape)}{fix}.")
    return h, is_numpy


def check_finite_non_negative(h: Tensor) -> None:
    """Refuse concept vectors with NaN, infinite or negative entries, saying which and where.

    Raises:
        ValueError: ``h`` has such an entry.
    """
    for bad, what in (
        (torch.isnan(h), "NaN"),
        (torch.isinf(h), "infinite"),
        (h < 0, "negative"),
    ):
        if bool(bad.any()):
            count, row, col = _first(bad)
            raise ValueError(
                f"components must be finite and non-negative: {_entries(count)} "
                f"{'are' if count > 1 else 'is'} {what}, the first "
                f"components[{row}, {col}] = {float(h[row, col]):.3g}; pass concept vectors "
                "without NaN, infinity or negative entries (e.g. a fitted NMF's components_)."
            )
