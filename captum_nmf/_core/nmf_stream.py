"""Streaming ``NMF``: ``partial_fit`` and the pieces a distributed fit runs (start, update)."""

from __future__ import annotations

import math
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor

from captum_nmf._core.nmf_input import (
    ArrayLike,
    _Kind,
    check_finite_non_negative,
    components_matrix,
)
from captum_nmf._core.nmf_statistics import NMFStatistics
from captum_nmf._utils import solvers
from captum_nmf._utils.validation import check_device
from captum_nmf.exceptions import NotFittedError

__all__ = ["StreamMixin", "canonical"]


def canonical(h: Tensor, weight_sums: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Unit-norm rows of ``h`` in decreasing order of their weight sums.

    Returns:
        *tuple*: the new ``H`` (``h``'s dtype), ``order``, the ``scale`` of each
        kept row (its old norm) and the reordered, rescaled weight sums.
    """
    norms = torch.linalg.vector_norm(h.double(), dim=1)
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    sums = weight_sums.double() * norms
    order = torch.argsort(-sums, stable=True)
    return (h.double() / norms[:, None])[order].to(h.dtype), order, norms[order], sums[order]


class _Solver(Protocol):
    """What the stream needs of the estimator it is mixed into (:class:`~captum_nmf.NMF`)."""

    n_components: int | None
    device: str | torch.device | None
    forget_factor: float
    n_features_in_: int
    n_components_: int
    n_iter_: int
    n_samples_seen_: int
    components_: Any
    reconstruction_err_: float
    _components_is_numpy: bool
    _weight_sums: Tensor
    _a: Tensor
    _b: Tensor
    _a_sum: Tensor
    _b_sum: Tensor
    _sq_sum: Tensor

    @property
    def _h(self) -> Tensor: ...
    @_h.setter
    def _h(self, value: Tensor) -> None: ...
    def _check_params(self) -> None: ...
    def _check_fitted(self) -> None: ...
    def _input(self, x: ArrayLike, *, reset: bool, values: bool = True) -> tuple[Tensor, _Kind]: ...
    def _rank(self, n_samples: int, n_features: int) -> int: ...
    def _initialise(self, v: Tensor, k: int) -> tuple[Tensor, Tensor]: ...
    def _hals(self, v: Tensor, wt: Tensor, h: Tensor, sq: Tensor) -> tuple[Tensor, Tensor, int]: ...
    def _solve_w(self, v: Tensor, dtype: torch.dtype = torch.float64) -> Tensor: ...
    def _commit_h(self, h: Tensor, weight_sums: Tensor, kind: _Kind) -> None: ...
    def _reset_stream(self) -> None: ...
    def _initialise_stream(self, v: Tensor, kind: _Kind) -> None: ...
    def _start(self, h: Tensor, is_numpy: bool) -> None: ...
    def _check_streaming(self) -> None: ...
    def _statistics(self, v: Tensor) -> NMFStatistics: ...
    def update(self, stats: NMFStatistics) -> Any: ...


_S = TypeVar("_S", bound=_Solver)


class StreamMixin:
    """Online NMF for :class:`~captum_nmf.NMF`: running statistics ``W^T W`` and ``W^T X``.

    The stream state is ``_a``/``_b`` (the statistics weighted by
    ``forget_factor``), ``_a_sum``/``_b_sum``/``_sq_sum`` (exact sums, for the
    reconstruction error) and the concepts ``H``; memory is ``O(K * C)``
    whatever the number of rows. The estimator provides the input checks, the
    initialisation, HALS and the fixed-``H`` solve.
    """

    _a: Tensor
    _b: Tensor
    _a_sum: Tensor
    _b_sum: Tensor
    _sq_sum: Tensor

    def _reset_stream(self: _Solver) -> None:
        """Forget streaming statistics (a fresh ``fit`` restarts ``partial_fit``)."""
        for name in ("_a", "_b", "_a_sum", "_b_sum", "_sq_sum"):
            if hasattr(self, name):
                delattr(self, name)

    def partial_fit(self: _S, X: ArrayLike, y: Any = None) -> _S:
        """Update the factorisation with one chunk of rows (online NMF).

        The first chunk is factorised in memory (up to ``max_iter`` HALS
        iterations) and must have at least K rows with an SVD-based ``init``.
        Each later chunk gets its exact weights ``W_t`` for the current ``H``;
        ``W_t^T W_t`` and ``W_t^T X_t`` are added to the running statistics and
        ``H`` is updated from them by HALS. Nothing else is kept.

        ``partial_fit(X)`` is :meth:`initialise_stream` (first chunk only)
        followed by ``update(statistics(X))``; a distributed fit runs the same
        pieces with statistics summed over workers.

        Draw chunks in random order (e.g. a shuffled ``DataLoader``): on real
        activations 64 shuffled chunks end within about 1 % of the in-memory
        fit's objective. A stream ordered by slide or tile biases ``H`` towards
        the first chunks (4-6 % worse in one pass); make several passes with a
        ``forget_factor`` slightly below 1 (three passes with 0.98 come within
        1 %).

        Args:
            X (ndarray or Tensor): n_t x C non-negative chunk.
            y (None): ignored.

        Returns:
            *NMF*: ``self``.

        Raises:
            ValueError: as :meth:`fit`, or a chunk with another number of features.
        """
        first = not hasattr(self, "_a")
        if first:
            self._check_params()
        v, kind = self._input(X, reset=first)
        if first:
            self._initialise_stream(v, kind)
        else:
            self._check_fitted()
        self.update(self._statistics(v))
        return self

    # --------------------------------------------------------- stream pieces
    def initialise_stream(self: _S, X: ArrayLike) -> _S:
        """Start a stream: factorise a first chunk in memory to get ``H0``; zero statistics.

        This is the first half of the first :meth:`partial_fit`: the concepts
        ``H0`` are the in-memory fit of ``X`` (as stored, not yet normalised
        or reordered; the first :meth:`update` does that). ``X`` itself is not
        added to the statistics: pass ``statistics(X)`` to :meth:`update` for
        that. A fitted or streaming estimator starts over.

        Args:
            X (ndarray or Tensor): n x C non-negative chunk, with at least K
                        rows when ``init`` is SVD-based.

        Returns:
            *NMF*: ``self``, ready for :meth:`statistics` and :meth:`update`.

        Raises:
            ValueError: as :meth:`fit`.
        """
        self._check_params()
        v, kind = self._input(X, reset=True)
        self._initialise_stream(v, kind)
        return self

    def start_stream(self: _S, components: ArrayLike) -> _S:
        """Start a stream from given concept vectors ``H0`` (no fitting); zero statistics.

        A distributed fit calls this on every worker with the ``H0`` that
        one worker got from :meth:`initialise_stream`, so that all hold the
        same state.

        Args:
            components (ndarray or Tensor): K x C finite non-negative ``H0``,
                        used as given (not re-normalised).

        Returns:
            *NMF*: ``self``, ready for :meth:`statistics` and :meth:`update`.

        Raises:
            TypeError: ``components`` is not floating point.
            ValueError: ``components`` is not a finite non-negative K x C
                        matrix, or K differs from ``n_components``.
        """
        self._check_params()
        h, is_numpy = components_matrix(components, fix="; pass the stream's H0")
        if not h.is_floating_point():
            raise TypeError(
                f"components must be floating point, got dtype {h.dtype}; pass components.double()."
            )
        if self.n_components is not None and h.shape[0] != self.n_components:
            raise ValueError(
                f"components has {h.shape[0]} rows but n_components={self.n_components}; "
                "pass H0 of the same rank."
            )
        check_finite_non_negative(h)
        if self.device is not None:
            h = h.to(check_device("device", self.device))
        self.n_features_in_ = int(h.shape[1])
        if hasattr(self, "feature_names_in_"):
            del self.feature_names_in_
        self.n_iter_ = 0
        self._start(h.clone(), is_numpy)
        return self

    def _initialise_stream(self: _Solver, v: Tensor, kind: _Kind) -> None:
        sq = solvers.sq_norm(v)
        k = self._rank(*v.shape)
        wt, h = self._initialise(v, k)
        _, h, n_iter = self._hals(v, wt, h, sq)
        self.n_iter_ = n_iter
        self._start(h, kind.is_numpy)

    def _start(self: _Solver, h: Tensor, is_numpy: bool) -> None:
        """Stream state with concepts ``h`` (K x C) and zero statistics."""
        k, c = h.shape
        kd: dict[str, Any] = {"dtype": torch.float64, "device": h.device}
        self._h = h
        self._a = torch.zeros(k, k, **kd)
        self._b = torch.zeros(k, c, **kd)
        self._a_sum = torch.zeros(k, k, **kd)
        self._b_sum = torch.zeros(k, c, **kd)
        self._sq_sum = torch.zeros((), **kd)
        self._weight_sums = torch.zeros(k, **kd)
        self._components_is_numpy = is_numpy
        self.n_components_ = int(k)
        self.components_ = h.cpu().numpy() if is_numpy else h.clone()
        self.n_samples_seen_ = 0

    def _check_streaming(self: _Solver) -> None:
        if not hasattr(self, "_a"):
            raise NotFittedError(
                f"This {type(self).__name__} instance has no stream; call 'initialise_stream' "
                "(or 'start_stream', or 'partial_fit') first."
            )

    def statistics(self: _Solver, X: ArrayLike) -> NMFStatistics:
        """Sufficient statistics of a chunk for the current concepts (nothing is updated).

        The chunk's exact weights ``W`` for the current ``H`` give
        ``W^T W``, ``W^T X``, ``||X||^2``, the column sums of ``W`` and the
        row count, in float64. Statistics of several chunks (or workers) add
        up with ``+`` and :meth:`update` applies them as one chunk.

        Args:
            X (ndarray or Tensor): n x C non-negative chunk.

        Returns:
            *NMFStatistics*: the chunk's statistics, on the compute device.

        Raises:
            NotFittedError: before :meth:`initialise_stream` / :meth:`start_stream`.
            ValueError: ``X`` is invalid or has another number of features.
        """
        self._check_streaming()
        v, _ = self._input(X, reset=False)
        return self._statistics(v)

    def _statistics(self: _Solver, v: Tensor) -> NMFStatistics:
        w = self._solve_w(v, v.dtype)
        return NMFStatistics(
            wtw=(w.T @ w).double(),
            wtv=(w.T @ v).double(),
            sq=solvers.sq_norm(v),
            weight_sums=w.double().sum(dim=0),
            n_samples=int(v.shape[0]),
        )

    def update(self: _S, stats: NMFStatistics) -> _S:
        """Add a chunk's statistics (earlier ones weighted by ``forget_factor``) and update ``H``.

        ``H`` gets up to 50 HALS sweeps on the running ``W^T W`` and ``W^T X``,
        then is normalised and reordered canonically (the statistics follow).
        Statistics of zero rows still apply the forget factor and the sweeps.

        Args:
            stats (NMFStatistics): statistics from :meth:`statistics` for the
                        current concepts, or a sum of them over workers.

        Returns:
            *NMF*: ``self``.

        Raises:
            NotFittedError: before :meth:`initialise_stream` / :meth:`start_stream`.
            TypeError: ``stats`` is not an :class:`NMFStatistics`.
            ValueError: the statistics' shapes do not match K and C.
        """
        self._check_streaming()
        if not isinstance(stats, NMFStatistics):
            raise TypeError(
                f"stats must be an NMFStatistics (from NMF.statistics), got {type(stats).__name__}."
            )
        k, c = self._b.shape
        if (
            stats.wtw.shape != (k, k)
            or stats.wtv.shape != (k, c)
            or stats.weight_sums.shape != (k,)
        ):
            raise ValueError(
                f"stats are for K={stats.wtw.shape[0]} concepts and C={stats.wtv.shape[-1]} "
                f"features but the stream has K={k}, C={c}; compute them with this "
                "stream's statistics()."
            )
        device = self._a.device
        rho = self.forget_factor
        wtw = stats.wtw.to(device=device, dtype=torch.float64)
        wtv = stats.wtv.to(device=device, dtype=torch.float64)
        # Compute everything first, then commit: an interrupt (or error) before the
        # assignments below leaves the stream exactly as it was, never statistics
        # counted against a stale H.
        a, b = rho * self._a + wtw, rho * self._b + wtv
        a_sum, b_sum = self._a_sum + wtw, self._b_sum + wtv
        sq_sum = self._sq_sum + stats.sq.to(device=device, dtype=torch.float64)
        weight_sums = self._weight_sums + stats.weight_sums.to(device=device, dtype=torch.float64)
        h = self._h
        h64 = solvers.hals_sweeps(h.double().clone(), a, b, 50)
        h_new, order, scale, sums = canonical(h64.to(h.dtype), weight_sums)
        s = scale.to(a)  # the statistics follow the rescaled, reordered concepts
        scaled = s[:, None] * s[None, :]
        a, a_sum = a[order][:, order] * scaled, a_sum[order][:, order] * scaled
        b, b_sum = b[order] * s[:, None], b_sum[order] * s[:, None]
        error = math.sqrt(float(solvers.objective_from_stats(sq_sum, h_new, a_sum, b_sum)))
        self._commit_h(h_new, sums, _Kind(self._components_is_numpy, h.dtype, h.device))
        self._a, self._b, self._a_sum, self._b_sum, self._sq_sum = a, b, a_sum, b_sum, sq_sum
        self.n_samples_seen_ += int(stats.n_samples)
        self.reconstruction_err_ = error
        return self
