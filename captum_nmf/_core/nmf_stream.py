"""Streaming ``NMF``: ``partial_fit`` and the pieces a distributed fit runs (start, update)."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import torch
from torch import Tensor

from captum_nmf._core.nmf_input import (
    ArrayLike,
    _Kind,
    check_finite_non_negative,
    check_tensor,
    components_matrix,
    rank,
)
from captum_nmf._core.nmf_statistics import NMFStatistics
from captum_nmf._utils import solvers
from captum_nmf._utils.precision import without_autocast
from captum_nmf._utils.validation import check_device
from captum_nmf.exceptions import CaptumNMFWarning, NotFittedError

__all__ = ["StreamMixin", "canonical"]

#: The stream starts from at least this many non-zero rows (and ``_START_ROWS_PER_CONCEPT``
#: per concept): ``partial_fit`` holds the first chunks' rows until it has them. On the
#: review's data (6000 x 48, K = 8, chunks of 200) a start from 80 to 1000 rows ended within
#: 0.2 % of the in-memory fit (from K = 8 rows: 161 % worse). Not more: a distributed fit
#: (``initialise_stream`` on one worker's first batch) starts from one batch, and batches of
#: 128 rows should start it as they start ``partial_fit``.
_START_ROWS = 100
_START_ROWS_PER_CONCEPT = 10
#: ... and the held rows must span K directions: the K-th singular value above this share of
#: the first (a chunk of one repeated background row spans one) ...
_START_RANK_TOL = 1e-4
#: ... unless the data has lower rank: then the stream starts once it holds this many times
#: the rows it needs (memory stays bounded).
_START_CAP = 10
#: A row whose residual is below this share of its squared norm counts as explained: it is
#: no seed for a dead concept (float32 rounding leaves about 1e-14).
_SEED_MIN_RESIDUAL = 1e-12


@dataclass(frozen=True)
class _StartBuffer:
    """The first chunks' rows with a non-zero entry, held until the stream can start from them.

    ``rows`` are copies (never a caller's tensor), on the compute device, chunk
    after chunk; ``chunks`` holds, per chunk, how many of them it gave and how
    many rows it had (rows of zeros included); ``n_rows`` is their total.
    """

    rows: Tensor
    chunks: tuple[tuple[int, int], ...]
    is_numpy: bool

    @property
    def n_rows(self) -> int:
        return sum(total for _, total in self.chunks)


def _non_zero_rows(v: Tensor) -> Tensor:
    """The rows of non-negative ``v`` with a non-zero entry (a copy)."""
    return v[torch.amax(v, dim=1) > 0]


def _spans(rows: Tensor, k: int) -> bool:
    """Whether ``rows`` (at least K of them) span K directions (``_START_RANK_TOL``).

    From a seeded randomised SVD (a few passes over ``rows``, K + 10 wide), as
    the NNDSVD initialisation computes.
    """
    s = solvers.randomized_svd(rows, k, generator=torch.Generator().manual_seed(0))[1]
    return bool(s[k - 1] > _START_RANK_TOL * s[0])


def _enough_to_start(rows: Tensor, needed: int, k: int) -> bool:
    """Whether held non-zero ``rows`` start a stream: ``needed`` of them spanning K directions.

    Data of lower rank never spans K: it starts at ``_START_CAP`` times as many rows.
    """
    n = int(rows.shape[0])
    return n >= needed and (n >= _START_CAP * needed or _spans(rows, k))


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
    init: str
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
    _start_buffer: _StartBuffer
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
    def _forget_factors(self) -> None: ...
    def _input(self, x: ArrayLike, *, reset: bool, values: bool = True) -> tuple[Tensor, _Kind]: ...
    def _rank(self, n_samples: int, n_features: int) -> int: ...
    def _initialise(self, v: Tensor, k: int) -> tuple[Tensor, Tensor]: ...
    def _hals(self, v: Tensor, wt: Tensor, h: Tensor, sq: Tensor) -> tuple[Tensor, Tensor, int]: ...
    def _solve_w(self, v: Tensor, dtype: torch.dtype = torch.float64) -> Tensor: ...
    def _commit_h(self, h: Tensor, weight_sums: Tensor, kind: _Kind) -> None: ...
    def _reset_stream(self) -> None: ...
    def _initialise_from(self, rows: Tensor, is_numpy: bool) -> None: ...
    def _start(self, h: Tensor, is_numpy: bool) -> None: ...
    def _check_streaming(self) -> None: ...
    def _statistics(self, v: Tensor) -> NMFStatistics: ...
    def _seeds(self, v: Tensor, w: Tensor) -> tuple[Tensor, Tensor]: ...
    def _has_dead(self) -> bool: ...
    def _update(self, stats: NMFStatistics) -> None: ...
    def _buffer_rows(self, v: Tensor, buffer: _StartBuffer) -> None: ...
    def _rows_to_begin(self, n_features: int) -> int: ...
    def _start_rows(self, n_features: int) -> int: ...
    def _buffering_note(self) -> str: ...
    def update(self, stats: NMFStatistics) -> Any: ...


_S = TypeVar("_S", bound=_Solver)


class StreamMixin:
    """Online NMF for :class:`~captum_nmf.NMF`: running statistics ``W^T W`` and ``W^T X``.

    The stream state is ``_a``/``_b`` (the statistics weighted by
    ``forget_factor``), ``_a_sum``/``_b_sum``/``_sq_sum`` (exact sums, for the
    reconstruction error) and the concepts ``H``; memory is ``O(K * C)``
    whatever the number of rows, plus, until the stream has started, the
    buffered non-zero rows of its first chunks (``_start_buffer``: at most
    ``max(100, 10 K)`` rows and the last chunk's, or ten times that many for
    data of rank below K). The estimator provides the
    input checks, the initialisation, HALS and the fixed-``H`` solve.
    """

    _a: Tensor
    _b: Tensor
    _a_sum: Tensor
    _b_sum: Tensor
    _sq_sum: Tensor

    def _reset_stream(self: _Solver) -> None:
        """Forget the stream's statistics and held rows (a new ``fit`` restarts ``partial_fit``)."""
        for name in ("_a", "_b", "_a_sum", "_b_sum", "_sq_sum", "_start_buffer"):
            self.__dict__.pop(name, None)

    def _rows_to_begin(self: _Solver, n_features: int) -> int:
        """Non-zero rows needed to compute any concepts: K (SVD-based ``init``) or 1."""
        k = rank(self.n_components, "random", 1, n_features)
        return 1 if self.init == "random" else k

    def _start_rows(self: _Solver, n_features: int) -> int:
        """Non-zero rows the stream starts from: ``max(100, 10 K)``."""
        k = rank(self.n_components, "random", 1, n_features)
        return max(_START_ROWS, _START_ROWS_PER_CONCEPT * k)

    def _buffering_note(self: _Solver) -> str:
        """A sentence for NotFittedError while the first chunks hold too few non-zero rows."""
        buffer: _StartBuffer | None = self.__dict__.get("_start_buffer")
        if buffer is None or "_concepts" in self.__dict__:
            return ""
        needed = self._rows_to_begin(int(buffer.rows.shape[1]))
        return (
            f" Its stream has received {buffer.n_rows} rows, {buffer.rows.shape[0]} of them "
            f"with a non-zero entry, fewer than the {needed} it needs to compute concepts "
            "(rows of zeros carry no information); call partial_fit with more rows."
        )

    @without_autocast
    def partial_fit(self: _S, X: ArrayLike, y: Any = None) -> _S:
        """Update the factorisation with one chunk of rows (online NMF).

        **Start.** The stream starts from at least ``max(100, 10 K)`` rows with
        a non-zero entry that span K directions (the K-th singular value above
        1e-4 of the first: a run of identical background rows spans one; data
        of lower rank starts at 10 times as many rows). Until then
        ``partial_fit`` holds the first chunks' non-zero rows (copies; at most
        that many plus the last chunk's) and each call factorises all of them
        in memory (up to ``max_iter`` HALS iterations) followed by one
        :meth:`update` with their statistics.
        So the concepts, ``components_``, ``transform`` and
        ``reconstruction_err_`` are those of every row seen, available as soon
        as K non-zero rows (one with ``init="random"``) have come; before that
        the estimator is not fitted (``NotFittedError`` says how many rows it
        holds). Once it holds enough, the stream starts from their in-memory
        fit, replays the held chunks through :meth:`update` one by one (each
        row is counted once, with the weights for the concepts of its turn),
        and drops them; from then on only the statistics are kept. Rows of
        zeros carry no information: they are counted (``n_samples_seen_``, the
        error) but never held nor used to start, so a stream that opens with
        blank tiles starts from the first real ones. A first chunk with enough
        rows (of full rank) starts the stream at once, exactly as before.

        After :meth:`fit`, :meth:`from_components` or a load (concepts without
        a stream's statistics) ``partial_fit`` starts a new stream and warns
        (``CaptumNMFWarning``): those concepts are replaced, not refined. To
        refine them, call ``start_stream(components_)`` first: the stream then
        starts from them with zero statistics.

        **Later chunks.** Each gets its exact weights ``W_t`` for the current
        ``H``; ``W_t^T W_t`` and ``W_t^T X_t`` are added to the running
        statistics and ``H`` is updated from them by HALS. Nothing else is kept.
        A concept that is dead (a zero vector, or no weight on any row so far)
        is re-seeded by :meth:`update` from the chunk's row with the largest
        residual ``||x - w H||``, so no concept stays unused for good. This is
        common practice: scikit-learn's dictionary learning replaces an unused
        atom by a data row, MiniBatchKMeans reassigns small clusters, and
        k-means++ seeds at poorly explained points (scikit-learn's
        MiniBatchNMF itself re-seeds nothing).

        Once started, ``partial_fit(X)`` is ``update(statistics(X))``; the
        start is :meth:`initialise_stream` on the held rows followed by
        ``update(statistics(chunk))`` for each held chunk. A distributed fit
        runs the same pieces with statistics summed over workers.

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
        buffer: _StartBuffer | None = self.__dict__.get("_start_buffer")
        if buffer is None and hasattr(self, "_a"):  # the stream has started
            v, _ = self._input(X, reset=False)
            self._check_fitted()
            self.update(self._statistics(v))
            return self
        saved = dict(self.__dict__)
        try:
            if buffer is None:  # a new stream (after a fit, too): nothing of the old state
                if "components_" in saved:
                    warnings.warn(
                        f"partial_fit starts a new stream: the {saved.get('n_components_', '?')} "
                        "concepts of the earlier fit (or from_components, or a load) are not "
                        "continued and will be replaced by those of the chunks given from now "
                        "on; fit() keeps no stream statistics to continue from. To refine those "
                        "concepts with new chunks, call start_stream(components_) first.",
                        CaptumNMFWarning,
                        stacklevel=3,  # the caller's line, past without_autocast
                    )
                self._check_params()
                v, kind = self._input(X, reset=True)
                self._rows_to_begin(int(v.shape[1]))  # K <= C, refused at once
                for name in (
                    "_concepts",
                    "components_",
                    "n_components_",
                    "_weight_sums",
                    "reconstruction_err_",
                    "n_iter_",
                ):
                    self.__dict__.pop(name, None)
                self._forget_factors()
                buffer = _StartBuffer(v[:0].clone(), (), kind.is_numpy)
            else:
                v, _ = self._input(X, reset=False)
            self._buffer_rows(v, buffer)
        except BaseException:
            # Nothing is committed by a call that fails (a bad chunk is not held either).
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise
        return self

    def _buffer_rows(self: _Solver, v: Tensor, buffer: _StartBuffer) -> None:
        """Hold ``v``'s non-zero rows; fit all held rows, or start the stream when they suffice.

        Holding fewer than ``_start_rows`` rows, the state is the in-memory fit of
        all of them followed by one update with their statistics (redone at each
        call). With enough, the stream starts from their in-memory fit and then
        replays the held chunks through the update one by one, as a stream that
        had started from them would have seen them (each gets its weights for the
        ``H`` of its turn; ``forget_factor`` applies per chunk), and drops them.
        """
        new = _non_zero_rows(v).to(buffer.rows.device)
        rows = torch.cat([buffer.rows, new]) if buffer.rows.shape[0] else new  # promotes dtype
        chunks = (*buffer.chunks, (int(new.shape[0]), int(v.shape[0])))
        buffer = _StartBuffer(rows, chunks, buffer.is_numpy)
        self._start_buffer = buffer
        self.n_samples_seen_ = buffer.n_rows
        c = int(rows.shape[1])
        if rows.shape[0] < self._rows_to_begin(c):
            return  # not fitted yet: see _buffering_note
        self._initialise_from(rows, buffer.is_numpy)
        if not _enough_to_start(rows, self._start_rows(c), self.n_components_):
            # still holding: the fit of every row seen
            stats = self._statistics(rows)
            self._update(dataclasses.replace(stats, n_samples=buffer.n_rows))  # zeros counted
            return
        first = 0
        for held, total in buffer.chunks:
            part = rows[first : first + held]
            first += held
            stats = (
                self._statistics(part)
                if held
                else NMFStatistics.zeros(self.n_components_, c, device=rows.device)
            )
            self._update(dataclasses.replace(stats, n_samples=total))
        del self.__dict__["_start_buffer"]  # started: from now on statistics only

    # --------------------------------------------------------- stream pieces
    @without_autocast
    def stream_readiness(self: _Solver, X: Tensor) -> Literal["ready", "possible", "too few"]:
        """Whether the non-zero rows of ``X`` suffice to start a stream as :meth:`partial_fit` does.

        A distributed fit holds its workers' first chunks until one worker's
        held rows are ``"ready"``, so that it starts from as much as a
        single-process stream would.

        Args:
            X (Tensor): n x C non-negative rows (e.g. the held chunks).

        Returns:
            *str*: ``"ready"``: at least ``max(100, 10 K)`` rows with a
            non-zero entry that span K directions (or 10 times as many
            rows), where ``partial_fit`` starts; ``"possible"``: enough for
            :meth:`initialise_stream` (K, or 1 with ``init="random"``), where
            ``partial_fit`` would wait for more; ``"too few"``: fewer.

        Raises:
            ValueError, TypeError: ``X`` is not a non-negative finite matrix,
                        or bad parameters.
        """
        self._check_params()
        v = check_tensor(X, None)
        rows = _non_zero_rows(v)
        c = int(v.shape[1])
        if rows.shape[0] < self._rows_to_begin(c):
            return "too few"
        k = rank(self.n_components, "random", 1, c)
        return "ready" if _enough_to_start(rows, self._start_rows(c), k) else "possible"

    @without_autocast
    def initialise_stream(self: _S, X: ArrayLike) -> _S:
        """Start a stream: factorise a first chunk in memory to get ``H0``; zero statistics.

        This is the first half of the start of :meth:`partial_fit`: the
        concepts ``H0`` are the in-memory fit of the rows of ``X`` that have a
        non-zero entry (rows of zeros carry no information; as stored, not yet
        normalised or reordered: the first :meth:`update` does that). ``X``
        itself is not added to the statistics: pass ``statistics(X)`` to
        :meth:`update` for that. A fitted or streaming estimator starts over.
        Unlike :meth:`partial_fit` it does not wait for more rows: give it a
        chunk of at least ``max(100, 10 K)`` non-zero rows for concepts as good
        as the in-memory fit's (a chunk of K rows ended 2.6x worse in a test).

        Args:
            X (ndarray or Tensor): n x C non-negative chunk, with at least K
                        rows with a non-zero entry when ``init`` is SVD-based
                        (one with ``init="random"``).

        Returns:
            *NMF*: ``self``, ready for :meth:`statistics` and :meth:`update`.

        Raises:
            ValueError: as :meth:`fit`, or too few rows with a non-zero entry.
        """
        self._check_params()
        v, kind = self._input(X, reset=True)
        rows = _non_zero_rows(v)
        needed = self._rows_to_begin(int(v.shape[1]))
        if rows.shape[0] < needed:
            raise ValueError(
                f"initialise_stream needs at least {needed} rows with a non-zero entry "
                f"(init={self.init!r}, n_components={self.n_components}), got "
                f"{rows.shape[0]} of {v.shape[0]} rows (rows of zeros carry no information); "
                "start from a chunk with more non-zero rows (partial_fit waits for them)."
            )
        self._reset_stream()
        self._initialise_from(rows, kind.is_numpy)
        return self

    @without_autocast
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
        self._reset_stream()
        self.n_features_in_ = int(h.shape[1])
        if hasattr(self, "feature_names_in_"):
            del self.feature_names_in_
        self.n_iter_ = 0
        self._start(h.clone(), is_numpy)
        return self

    def _initialise_from(self: _Solver, rows: Tensor, is_numpy: bool) -> None:
        """``H0``: the in-memory fit of ``rows`` (all with a non-zero entry); zero statistics."""
        sq = solvers.sq_norm(rows)
        k = self._rank(*rows.shape)
        wt, h = self._initialise(rows, k)
        _, h, n_iter = self._hals(rows, wt, h, sq)
        self.n_iter_ = n_iter
        self._start(h, is_numpy)

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
                "(or 'start_stream', or 'partial_fit') first." + self._buffering_note()
            )

    @without_autocast
    def statistics(self: _Solver, X: ArrayLike) -> NMFStatistics:
        """Sufficient statistics of a chunk for the current concepts (nothing is updated).

        The chunk's exact weights ``W`` for the current ``H`` give
        ``W^T W``, ``W^T X``, ``||X||^2``, the column sums of ``W`` and the
        row count, in float64. Statistics of several chunks (or workers) add
        up with ``+`` and :meth:`update` applies them as one chunk. When ``H``
        has a dead concept they also hold the chunk's rows of largest residual,
        to re-seed it (see :class:`NMFStatistics`).

        Args:
            X (ndarray or Tensor): n x C non-negative chunk.

        Returns:
            *NMFStatistics*: the chunk's statistics, on the compute device.

        Raises:
            NotFittedError: before :meth:`initialise_stream` / :meth:`start_stream`.
            ValueError: ``X`` is invalid, has another number of features, or a
                        product (``X @ H^T``, ``W^T X``) overflows its dtype.
        """
        self._check_streaming()
        v, _ = self._input(X, reset=False)
        return self._statistics(v)

    def _statistics(self: _Solver, v: Tensor) -> NMFStatistics:
        w = self._solve_w(v, v.dtype)  # refuses an overflowing X @ H^T
        wtv = w.T @ v  # the one n x C x K product, in X's dtype
        if not bool(torch.isfinite(wtv).all()):
            raise ValueError(
                solvers.overflow_message(v.dtype, float(v.max()), product="W^T X overflows")
            )
        w64 = w.double()
        seeds, scores = self._seeds(v, w64) if self._has_dead() else (None, None)
        return NMFStatistics(
            wtw=w64.T @ w64,
            wtv=wtv.double(),
            sq=solvers.sq_norm(v),
            weight_sums=w64.sum(dim=0),
            n_samples=int(v.shape[0]),
            seeds=seeds,
            seed_scores=scores,
        )

    def _has_dead(self: _Solver) -> bool:
        """Whether ``H`` has a concept that is zero, or unused by every (non-zero) row so far."""
        norms = torch.linalg.vector_norm(self._h.double(), dim=1)
        unused = (self._weight_sums == 0) & (self._sq_sum > 0)
        return bool(((norms == 0) | unused.to(norms.device)).any())

    def _seeds(self: _Solver, v: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        """Up to K rows of ``v`` with the largest residual for their exact float64 ``w``.

        Each seed is the positive part of its row's residual ``v - w H`` (what
        the concepts miss), or the row itself where that part is zero; rows
        explained to within ``_SEED_MIN_RESIDUAL`` of their squared norm are
        none. The residuals come from ``||v||^2 - w (H H^T) w^T`` (KKT:
        ``w . (v H^T) = w H H^T w^T`` at the exact solution), with no pass
        over ``v`` beyond its row norms; the few candidates' are then exact.

        Returns:
            *tuple[Tensor, Tensor]*: m x C seeds (float64) and their squared
            residuals, largest first (m <= K; 0 when every row is explained).
        """
        h = self._h.to(device=v.device, dtype=torch.float64)
        row_sq = solvers.row_sq_norms(v)
        approx = row_sq - ((w @ (h @ h.T)) * w).sum(dim=1)
        idx = torch.topk(approx, min(int(h.shape[0]), int(v.shape[0]))).indices
        rows = v[idx].double()
        residual = rows - w[idx] @ h
        scores = (residual * residual).sum(dim=1)
        keep = scores > _SEED_MIN_RESIDUAL * row_sq[idx]
        rows, residual, scores = rows[keep], residual[keep], scores[keep]
        order = torch.argsort(scores, descending=True, stable=True)
        positive = residual.clamp_min(0.0)
        seeds = torch.where(positive.amax(dim=1, keepdim=True) > 0, positive, rows)
        return seeds[order], scores[order]

    @without_autocast
    def update(self: _S, stats: NMFStatistics) -> _S:
        """Add a chunk's statistics (earlier ones weighted by ``forget_factor``) and update ``H``.

        ``H`` gets up to 50 HALS sweeps on the running ``W^T W`` and ``W^T X``,
        then is normalised and reordered canonically (the statistics follow).
        Statistics of zero rows still apply the forget factor and the sweeps.

        A dead concept (a zero vector after the sweeps, or no weight on any
        row so far while the stream has seen non-zero rows) is re-seeded from
        ``stats.seeds``, the chunk's rows of largest residual, largest first
        (:meth:`statistics` records them when the current ``H`` has a dead
        concept; a concept that dies in this update is re-seeded by the next).
        Its past weights reconstructed nothing (its vector was zero, or the
        weights were), so its rows and columns of the statistics are set to
        zero: the statistics stay those of the rows' weights, and
        ``reconstruction_err_`` does not change by the re-seeding. Statistics
        reduced with :meth:`NMFStatistics.flatten` carry no seeds.

        Called while :meth:`partial_fit` still holds its first rows, it ends
        that: the stream goes on from the rows held so far.

        Args:
            stats (NMFStatistics): statistics from :meth:`statistics` for the
                        current concepts, or a sum of them over workers.

        Returns:
            *NMF*: ``self``.

        Raises:
            NotFittedError: before :meth:`initialise_stream` / :meth:`start_stream`.
            TypeError: ``stats`` is not an :class:`NMFStatistics`.
            ValueError: the statistics' shapes do not match K and C, or they
                        hold NaN, infinity or impossible negative values.
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
        self._update(stats)
        self.__dict__.pop("_start_buffer", None)  # the stream goes on from its statistics
        return self

    def _update(self: _Solver, stats: NMFStatistics) -> None:
        """:meth:`update` on checked statistics; commits only at the end."""
        device = self._a.device
        rho = self.forget_factor
        wtw = stats.wtw.to(device=device, dtype=torch.float64)
        wtv = stats.wtv.to(device=device, dtype=torch.float64)
        sq = stats.sq.to(device=device, dtype=torch.float64)
        used = stats.weight_sums.to(device=device, dtype=torch.float64)
        finite = torch.stack([torch.isfinite(t).all() for t in (wtw, wtv, sq, used)]).all()
        signs = (sq >= 0) & (used >= 0).all() & (torch.diagonal(wtw) >= 0).all()
        if not bool(finite & signs) or stats.n_samples < 0:  # one synchronisation
            if not bool(finite):
                raise ValueError(
                    "stats hold NaN or infinity (the statistics of these rows overflowed); "
                    "compute them with NMF.statistics from X in float64, or rescale X."
                )
            raise ValueError(
                "stats are not the statistics of any rows: ||X||^2, the weight sums, the "
                "diagonal of W^T W and n_samples must be >= 0; compute them with "
                "NMF.statistics (and add them with +)."
            )
        # Compute everything first, then commit: an interrupt (or error) before the
        # assignments below leaves the stream exactly as it was, never statistics
        # counted against a stale H.
        a, b = rho * self._a + wtw, rho * self._b + wtv
        a_sum, b_sum = self._a_sum + wtw, self._b_sum + wtv
        sq_sum = self._sq_sum + sq
        weight_sums = self._weight_sums + used
        h = self._h
        h64 = solvers.hals_sweeps(h.double().clone(), a, b, 50)
        if stats.seeds is not None and stats.seeds.shape[0] > 0:
            _reseed(h64, stats.seeds.to(h64), weight_sums, sq_sum, (a, a_sum), (b, b_sum))
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


def _reseed(
    h: Tensor,
    seeds: Tensor,
    weight_sums: Tensor,
    sq_sum: Tensor,
    grams: tuple[Tensor, ...],
    crosses: tuple[Tensor, ...],
) -> None:
    """Replace the dead rows of ``h`` by the unit-norm ``seeds`` (in order); all in place.

    Dead: a zero row, or zero weight while non-zero rows have been seen. Their
    weights reconstructed nothing, so their rows and columns of the K x K
    ``grams`` (``W^T W``), their rows of the K x C ``crosses`` (``W^T X``) and
    their weight sums become zero: the statistics of the same rows with those
    weights set to zero.
    """
    norms = torch.linalg.vector_norm(h, dim=1)
    dead = torch.nonzero((norms == 0) | ((weight_sums == 0) & (sq_sum > 0)))[:, 0]
    dead = dead[: seeds.shape[0]]
    if dead.numel() == 0:
        return
    chosen = seeds[: dead.numel()]
    h[dead] = chosen / torch.linalg.vector_norm(chosen, dim=1, keepdim=True)
    weight_sums[dead] = 0.0
    for gram in grams:
        gram[dead] = 0.0
        gram[:, dead] = 0.0
    for cross in crosses:
        cross[dead] = 0.0
