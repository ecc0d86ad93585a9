"""The fixed-``H`` solve's per-``H`` state: scaled rows, NNLS factors, overflow refusals.

:class:`~captum_nmf._core.nmf.NMF` keeps one :class:`FactorCache` per ``H``:
for each device and dtype a :class:`FixedH` (``H`` with rows of extreme norm
scaled by powers of two, see :func:`row_scales`, and its NNLS factors), valid
while ``H`` is the same tensor at the same version.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from captum_nmf._utils import solvers

__all__ = ["FactorCache", "FixedH", "refuse_fit_overflow", "refuse_overflow", "row_scales"]

KEEP_EXPONENT = 4  # the fixed-H solve rescales concepts of norm beyond ~2^(+-4.5) (row_scales)


def refuse_overflow(
    w: Tensor,
    x: Tensor,
    *,
    what: str = "entries",
    fix: str | None = None,
    scale: Tensor | None = None,
) -> None:
    """Raise when the weights of checked (finite, non-negative) rows are not finite.

    With finite ``X`` that only happens when ``X @ H^T`` overflowed ``X``'s dtype,
    or when tiny concepts (``scale``, see :func:`row_scales`, above 1) make the
    weights themselves overflow it. ``x`` is what was solved (the rows, or their
    products), named ``what`` in the message, which ends with ``fix`` (None: use
    float64, or rescale X when it is float64).

    Raises:
        ValueError: ``w`` holds NaN or infinity.
    """
    if bool(torch.isfinite(w).all()):
        return
    if scale is not None and float(scale.max()) > 1.0:
        smallest = 1.0 / float(scale.max())
        raise ValueError(
            f"The weights W overflow {w.dtype}: the concepts are tiny (row norms down to about "
            f"{smallest:.3g}), so their weights are huge; rescale the components (e.g. to unit "
            "norm) or pass X in float64."
        )
    raise ValueError(solvers.overflow_message(x.dtype, float(x.max()), what=what, fix=fix))


def refuse_fit_overflow(v: Tensor) -> None:
    """Refuse a fit whose products of (checked, finite) ``v`` overflowed: the transform wording.

    Raises:
        ValueError: always.
    """
    raise ValueError(
        solvers.overflow_message(
            v.dtype,
            float(v.max()),
            product="A product of X in the fit (X @ H^T, W^T X or W^T W) overflows",
        )
    )


def row_scales(h: Tensor) -> Tensor | None:
    """Powers of two that bring the rows of ``h`` of extreme norm to about unit norm.

    Extreme: ``log2`` of the norm rounds to more than 4 in magnitude (a norm
    outside about [1/22, 22]). The fixed-``H`` solve with the scaled rows is
    the same problem, scaled: its weights times the scales are the weights for
    ``h``. Powers of two scale exactly, and rows of moderate norm (fitted
    concepts have unit norm) keep scale 1, so their solve is bit for bit what
    it was; concepts of any other scale (1e-155, or rows 1e12 apart) get a
    well-scaled ``H H^T`` (a pseudo-inverse truncates relative to its largest
    eigenvalue). Zero rows keep scale 1. One host synchronisation: computed
    when ``H`` is assigned, not per solve.

    Returns:
        *Tensor or None*: K float64 scales on ``h``'s device, or None when all are 1.
    """
    h64 = h.detach().double()
    top = torch.amax(torch.abs(h64), dim=1)
    safe = torch.where(top > 0, top, torch.ones_like(top))
    norms = top * torch.linalg.vector_norm(h64 / safe[:, None], dim=1)  # no overflow
    exponent = torch.round(torch.log2(torch.where(norms > 0, norms, torch.ones_like(norms))))
    exponent = torch.where(exponent.abs() > KEEP_EXPONENT, exponent, 0.0).clamp(-1000.0, 1000.0)
    if not bool((exponent != 0).any()):
        return None
    return torch.exp2(-exponent)


@dataclass(frozen=True)
class FixedH:
    """``H`` cast for one device and dtype, with its NNLS factors.

    ``h`` is ``H`` with rows of extreme norm scaled to about unit norm by
    powers of two (:func:`row_scales`); the solve works with it, and its weights times
    ``scale`` (None: all 1) are those for ``H``. ``pinv`` is ``pinv(h h^T)`` in
    the same dtype: ``(V h^T) @ pinv`` in float32 is the cheap guess of the
    starting passive sets (only its signs are used).
    """

    h: Tensor
    pinv: Tensor
    factors: solvers.NNLSFactors
    scale: Tensor | None = None

    def weights(self, w: Tensor, dtype: torch.dtype) -> Tensor:
        """Weights of the scaled rows ``h`` (K last) as weights of ``H``, in ``dtype``."""
        if self.scale is None:
            return w.to(dtype)
        return (w.double() * self.scale.to(w.device)).to(dtype)

    def weights_maps(self, maps: Tensor) -> Tensor:
        """:meth:`weights` of N x K x h x w concept maps (their dtype)."""
        if self.scale is None:
            return maps
        scale = self.scale.to(maps.device)[:, None, None]
        return (maps.double() * scale).to(maps.dtype).contiguous()


@dataclass(eq=False)
class FactorCache:
    """Per-``H`` solve factors, valid while ``_h`` is ``h`` at version ``version``.

    ``scales`` holds an ``H``, its version and its :func:`row_scales`, computed
    when ``H`` is assigned (so the first solve reads nothing back).
    """

    h: Tensor | None
    version: int
    entries: dict[tuple[str, torch.dtype], FixedH]
    scales: tuple[Tensor, int, Tensor | None] | None = None
