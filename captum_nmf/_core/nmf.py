"""``NMF``: a scikit-learn-compatible, streaming, device-agnostic NMF estimator."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import NDArray
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import validate_data
from torch import Tensor

from captum_nmf._core.fixed_h import (
    FactorCache,
    FixedH,
    refuse_fit_overflow,
    refuse_overflow,
    row_scales,
)
from captum_nmf._core.nmf_input import (
    ArrayLike,
    InitName,
    _Kind,
    check_finite_non_negative,
    check_params,
    check_tensor,
    check_values,
    components_matrix,
    rank,
    refuse_mps,
)
from captum_nmf._core.nmf_statistics import NMFStatistics
from captum_nmf._core.nmf_stream import StreamMixin, canonical
from captum_nmf._utils import solvers
from captum_nmf._utils.precision import without_autocast
from captum_nmf._utils.validation import check_device
from captum_nmf.exceptions import NotFittedError

if TYPE_CHECKING:
    from captum_nmf._utils.activations import PendingCheck

__all__ = ["NMF", "NMFStatistics"]

_INNER_W = 5  # HALS sweeps over W per outer iteration (early stop at 1 % change); measured best


class NMF(
    ClassNamePrefixFeaturesOutMixin,  # type: ignore[misc]
    TransformerMixin,  # type: ignore[misc]
    StreamMixin,
    BaseEstimator,  # type: ignore[misc]
):
    r"""Non-negative matrix factorisation ``X ~ W H`` in torch, in memory or streamed.

    Minimises ``0.5 * ||X - W H||_F^2`` over ``W >= 0`` (n x K) and ``H >= 0``
    (K x C). ``fit`` runs accelerated HALS on a matrix held in memory;
    ``partial_fit`` streams chunks of rows and keeps only the sufficient
    statistics ``W^T W`` (K x K) and ``W^T X`` (K x C), so memory is
    ``O(K * C)`` whatever the number of rows (online NMF, Mairal et al. 2010).
    ``transform`` keeps ``H`` fixed and solves the non-negative least-squares
    problem for ``W`` exactly (block principal pivoting).

    The fitted concept vectors (rows of ``components_``) have unit Euclidean
    norm, so ``W`` carries the intensities, and are sorted by decreasing mean
    weight over the fitted rows: two fits with the same ``random_state`` give
    the same concepts in the same order.

    Works on CPU and CUDA, in float32 and float64. Accepts numpy arrays and
    torch tensors and returns the kind it was given (numpy in, numpy out;
    tensors come back on their own device).

    Args:
        n_components (int, optional): number of components K. ``None`` uses
                    the number of features.
                    Default: None
        init (str, optional): initialisation: ``"nndsvda"`` (NNDSVD with
                    zeros filled by the mean of X, as scikit-learn), ``"nndsvd"``
                    or ``"random"``.
                    Default: ``"nndsvda"``
        max_iter (int, optional): maximum number of outer iterations of ``fit``
                    (and of the in-memory fit of the rows that start a
                    ``partial_fit`` stream).
                    Default: 200
        tol (float, optional): stop when one iteration lowers the objective
                    (evaluated exactly) by less than ``tol`` times its value.
                    Default: 1e-4
        random_state (int, RandomState or None, optional): seed of the
                    randomised SVD and of ``init="random"``; an int must be
                    in [0, 2**32 - 1] (numpy's seed range).
                    Default: None
        device (str or torch.device, optional): where to compute. ``None``
                    computes where the data is (numpy arrays: CPU; in
                    ``transform``, numpy arrays where ``H`` is). A device this
                    machine lacks is refused at the first call, before any work.
                    Default: None
        forget_factor (float, optional): weight in (0, 1] that ``partial_fit``
                    gives the statistics of earlier chunks at each new chunk;
                    1 keeps exact sums.
                    Default: 1.0

    Attributes:
        components_ (ndarray or Tensor): K x C concept vectors, unit norm,
                    of the kind (numpy or torch) passed to ``fit``.
        n_components_ (int): K.
        n_features_in_ (int): C.
        reconstruction_err_ (float): Frobenius norm ``||X - W H||_F`` of the
                    fitted data. After ``partial_fit`` it is measured with the
                    ``W`` each chunk got when it was seen and the final ``H``
                    (an upper bound on the best ``W``).
        n_iter_ (int): outer iterations run by the last ``fit`` (or by the
                    in-memory fit that started the stream).
        n_samples_seen_ (int): rows seen by ``fit``/``partial_fit`` (rows a
                    stream still holds and rows of zeros included).

    Raises:
        TypeError: ``n_components`` or ``max_iter`` is not an integer,
                    ``random_state`` is not None, an int or a ``RandomState``,
                    ``device`` is neither a str nor a ``torch.device``, or
                    ``X`` is a complex tensor.
        ValueError: a hyper-parameter is out of range, ``device`` names a
                    device this machine lacks, ``X`` is empty, has negative,
                    NaN or infinite values (the message says how many and
                    where the first is), has another number of features
                    than at fit time, or a product of ``X`` overflows its dtype.
        NotFittedError: ``transform`` or ``inverse_transform`` before ``fit``
                    (or before a stream has K rows with a non-zero entry).

    Examples::

        >>> import torch
        >>> from captum_nmf import NMF
        >>> g = torch.Generator().manual_seed(0)
        >>> X = torch.rand(100, 3, generator=g, dtype=torch.float64) @ torch.rand(
        ...     3, 8, generator=g, dtype=torch.float64)
        >>> model = NMF(3, random_state=0).fit(X)
        >>> W = model.transform(X)
        >>> tuple(W.shape), bool((W >= 0).all())
        ((100, 3), True)
        >>> residual = torch.linalg.norm(model.inverse_transform(W) - X)
        >>> bool(residual / torch.linalg.norm(X) < 0.01)
        True
    """

    def __init__(
        self,
        n_components: int | None = None,
        *,
        init: InitName = "nndsvda",
        max_iter: int = 200,
        tol: float = 1e-4,
        random_state: int | np.random.RandomState | None = None,
        device: str | torch.device | None = None,
        forget_factor: float = 1.0,
    ) -> None:
        self.n_components = n_components
        self.init = init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.device = device
        self.forget_factor = forget_factor

    # ------------------------------------------------- concepts and their cache
    @property
    def _h(self) -> Tensor:
        """The concepts ``H`` (K x C) that ``transform`` solves with; unset before fitting."""
        try:
            h: Tensor = self.__dict__["_concepts"]
        except KeyError:
            raise AttributeError("_h") from None
        return h

    @_h.setter
    def _h(self, value: Tensor) -> None:
        self.__dict__["_concepts"] = value
        self._forget_factors()
        version = int(getattr(value, "_version", 0))
        self._factor_cache().scales = (value, version, row_scales(value))

    @property
    def components(self) -> Tensor:
        """The fitted concepts ``H`` (K x C) as a read-only tensor, on the compute device.

        A detached copy, whatever ``X`` was (``components_`` follows ``X``'s
        kind: a numpy array for numpy input); changing it leaves the estimator
        alone. Use it instead of private state in code that drives the solver
        (distributed fitting, persistence).

        Raises:
            NotFittedError: before fitting, or while a stream's first chunks
                        hold fewer non-zero rows than K (see :meth:`partial_fit`).
        """
        h: Tensor | None = self.__dict__.get("_concepts")
        if h is None:
            raise NotFittedError(
                "This NMF instance is not fitted yet. Call 'fit', 'partial_fit', "
                "'initialise_stream' or 'start_stream' first." + self._buffering_note()
            )
        return h.detach().clone()

    def __sklearn_is_fitted__(self) -> bool:
        """Whether there are concepts (a stream still waiting for rows has none)."""
        return "_concepts" in self.__dict__

    def _factor_cache(self) -> FactorCache:
        """The cache object, created once and afterwards only changed in place.

        Filling it in ``transform`` therefore leaves ``__dict__`` equal to what it
        was (scikit-learn's ``check_dict_unchanged``).
        """
        cache: FactorCache | None = self.__dict__.get("_nnls_cache")
        if cache is None:
            cache = self.__dict__["_nnls_cache"] = FactorCache(None, -1, {})
        return cache

    def _forget_factors(self) -> None:
        """Drop the cached per-``H`` solve factors (``H`` or where it is used changed)."""
        cache = self._factor_cache()
        cache.h, cache.version = None, -1
        cache.entries.clear()

    def _fixed_h(self, device: torch.device, dtype: torch.dtype) -> FixedH:
        """``H`` on ``device`` in ``dtype`` and its :class:`solvers.NNLSFactors`, cached.

        The cache belongs to one ``H`` tensor: assigning ``_h`` (fit, partial_fit,
        update, from_components, start_stream) or ``set_params`` empties it, and an
        in-place change of ``H`` (its version counter) is detected here, so stale
        factors are never used.
        """
        h = self._h
        version = int(getattr(h, "_version", 0))
        cache = self._factor_cache()
        if cache.h is not h or cache.version != version:
            cache.entries.clear()
            cache.h, cache.version = h, version
        key = (str(device), dtype)
        entry = cache.entries.get(key)
        if entry is None:
            scales = cache.scales
            if scales is None or scales[0] is not h or scales[1] != version:
                scales = cache.scales = (h, version, row_scales(h))  # H changed in place
            scale = None if scales[2] is None else scales[2].to(device)
            hc = h.detach().to(device=device, dtype=dtype)
            if scale is not None:
                hc = (hc.double() * scale[:, None]).to(dtype)
            # H H^T of the compute-dtype H, formed in float64 (exact products of its entries,
            # float64 sums): in float32 two near-duplicate concepts lost their difference
            # and pivoting cycled. X H^T stays in X's dtype.
            h64 = hc.double()
            factors = solvers.NNLSFactors(h64 @ h64.T)
            entry = FixedH(hc, factors.pinv.to(dtype), factors, scale)
            cache.entries[key] = entry
        return entry

    def set_params(self, **params: Any) -> NMF:
        """Set hyper-parameters (scikit-learn API); drops the cached solve factors.

        Returns:
            *NMF*: ``self``.
        """
        super().set_params(**params)
        self._forget_factors()
        return self

    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = super().__getstate__()
        state = dict(state)
        state["_nnls_cache"] = FactorCache(None, -1, {})  # derived from H: not pickled
        return state

    # ------------------------------------------------------------------ checks
    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.requires_fit = True
        tags.input_tags.positive_only = True
        tags.input_tags.sparse = False
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    def _check_params(self) -> None:
        check_params(
            self.n_components,
            self.init,
            self.max_iter,
            self.tol,
            self.forget_factor,
            random_state=self.random_state,
        )

    def _input(
        self, x: ArrayLike, *, reset: bool, values: bool = True, stay: bool = False
    ) -> tuple[Tensor, _Kind]:
        """Validate ``x`` and return it as a 2-D floating tensor on the compute device.

        With ``values=False`` a tensor's values are left to the caller to check
        (``transform`` does it inside its pass over ``x``). The compute device is
        ``device`` when set; else, with ``stay``, a tensor's own device (``H`` is
        cast there, cached), else ``H``'s device.
        """
        if isinstance(x, Tensor):  # the solver is not differentiable: no autograd history
            t = self._check_tensor(x.detach(), reset=reset, values=values)
            if reset:
                self._record_features(int(t.shape[1]))
            kind = _Kind(False, t.dtype, x.device)
        else:
            arr = validate_data(self, x, reset=reset, dtype=[np.float64, np.float32])
            with warnings.catch_warnings():
                # Read-only arrays (e.g. np.memmap(mode="r")) are fine: X is never written.
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                t = torch.from_numpy(np.ascontiguousarray(arr))
            check_values(t)  # NaN and infinity were refused above: the negative-value message
            kind = _Kind(True, t.dtype, t.device)
        if self.device is not None:
            t = t.to(check_device("device", self.device))
        elif reset is False and hasattr(self, "_h") and not (stay and isinstance(x, Tensor)):
            t = t.to(self._h.device)
        return t, kind

    def _check_tensor(self, x: Tensor, *, reset: bool, values: bool = True) -> Tensor:
        return check_tensor(x, None if reset else self.n_features_in_, values=values)

    def _record_features(self, n_features: int) -> None:
        """Remember the feature count of a tensor ``X`` that starts a fit (as ``validate_data``)."""
        self.n_features_in_ = n_features
        if hasattr(self, "feature_names_in_"):
            del self.feature_names_in_

    def _output(self, t: Tensor, kind: _Kind) -> ArrayLike:
        t = t.to(dtype=kind.dtype)
        if kind.is_numpy:
            out: NDArray[Any] = t.cpu().numpy()
            return out
        return t.to(kind.device)

    def _rank(self, n_samples: int, n_features: int) -> int:
        return rank(self.n_components, self.init, n_samples, n_features)

    def _generator(self) -> torch.Generator:
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        return torch.Generator().manual_seed(seed)

    def _check_fitted(self) -> None:
        if not hasattr(self, "_h"):
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet. Call 'fit' or "
                "'partial_fit' with appropriate arguments before using this estimator."
                + self._buffering_note()
            )

    # ------------------------------------------------------------- algorithms
    def _initialise(self, v: Tensor, k: int) -> tuple[Tensor, Tensor]:
        gen = self._generator()
        if self.init == "random":
            return solvers.random_init(v, k, generator=gen)
        return solvers.nndsvd_init(v, k, generator=gen, fill_average=self.init == "nndsvda")

    def _hals(self, v: Tensor, wt: Tensor, h: Tensor, sq: Tensor) -> tuple[Tensor, Tensor, int]:
        """Accelerated HALS in memory (``sq`` = ``||V||^2``); returns ``Wt``, ``H``, iterations."""
        n = v.shape[0]
        k = h.shape[0]
        # Inner sweeps are cheap next to the two n x C x K products (Gillis & Glineur).
        inner_w = _INNER_W
        inner_h = min(1 + (n // (2 * k)), 20)
        prev = math.inf
        n_iter = 0
        for n_iter in range(1, self.max_iter + 1):  # noqa: B007 - returned after the loop
            # V H^T with V row-major is about twice as fast as H V^T.
            hht = h @ h.T
            p = (v @ h.T).T.contiguous()
            wt = solvers.hals_sweeps(wt, hht, p, inner_w)
            # Exact objective of (W, H) from products already at hand, reduced in float64
            # (no pass over V; the W^T V form would cancel in float32). It is also the
            # overflow check: an infinite product of this or the last iteration shows in it.
            obj = float(solvers.objective_from_products(sq, wt, p, hht))
            if not math.isfinite(obj):
                refuse_fit_overflow(v)
            wtw, wtv = wt @ wt.T, wt @ v
            h = solvers.hals_sweeps(h, wtw, wtv, inner_h)
            if math.isfinite(prev) and prev - obj <= self.tol * prev:
                break
            prev = obj
        if not bool(torch.isfinite(h).all()):  # the last products W^T W, W^T V
            refuse_fit_overflow(v)
        return wt, h, n_iter

    def _solve_w(self, v: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
        """Exact ``argmin_{W >= 0} ||V - W H||`` for the current ``H`` (n x K, ``dtype``).

        ``V`` has been checked. One pass ``V H^T`` in ``V``'s dtype, then the
        fixed-``H`` solve with the cached factors of ``H``, block by block.

        Raises:
            ValueError: ``V H^T`` (or ``W``) overflows.
        """
        fixed = self._fixed_h(v.device, v.dtype)
        solve_dtype = dtype if fixed.scale is None else torch.float64
        w, suspect = solvers.solve_rows(v, fixed.h, fixed.pinv, fixed.factors, dtype=solve_dtype)
        w = fixed.weights(w, dtype)
        if bool(suspect) or fixed.scale is not None:  # V is checked: only an overflow is left
            refuse_overflow(w, v, scale=fixed.scale)
        return w

    def _solve_w_and_error(self, v: Tensor, h: Tensor, sq: Tensor) -> tuple[Tensor, float]:
        """Exact ``W`` and ``||V - W H||_F`` from the same ``V H^T`` (one pass over V).

        ``h`` should have rows of about unit norm (``fit`` passes them normalised):
        ``H H^T`` is formed in float64, ``V H^T`` in ``V``'s dtype.

        Raises:
            ValueError: ``V H^T`` overflows ``V``'s dtype.
        """
        h64 = h.double()
        hht, p = h64 @ h64.T, v @ h.T
        if not bool(torch.isfinite(p).all()):
            refuse_fit_overflow(v)
        w = solvers.nnls(hht, p)
        obj = solvers.objective_from_products(sq, w.T.to(v.dtype), p.T, hht)
        return w, math.sqrt(float(obj))

    def _set_state(self, h: Tensor, weight_sums: Tensor, kind: _Kind) -> tuple[Tensor, Tensor]:
        """Normalise and order ``H`` canonically; return ``order`` and ``scale``.

        Concept k of the result is ``H[order[k]] / ||H[order[k]]||``, so weights of the old
        concepts convert as ``w_new = w_old[:, order] * scale``.
        """
        h_new, order, scale, sums = canonical(h, weight_sums)
        self._commit_h(h_new, sums, kind)
        return order, scale

    def _commit_h(self, h: Tensor, weight_sums: Tensor, kind: _Kind) -> None:
        """Install canonical concepts ``h`` and their weight sums (no computation)."""
        self._h = h
        self._weight_sums = weight_sums
        self.n_components_ = int(h.shape[0])
        self.components_ = self._output(h, kind) if kind.is_numpy else h.clone()
        self._components_is_numpy = kind.is_numpy

    # ------------------------------------------------------------------ fit
    @without_autocast
    def fit(self, X: ArrayLike, y: Any = None) -> NMF:
        """Fit the factorisation on rows held in memory.

        Args:
            X (ndarray or Tensor): n x C non-negative matrix.
            y (None): ignored (scikit-learn convention).

        Returns:
            *NMF*: ``self``.

        Raises:
            TypeError: ``X`` is a complex tensor, or a hyper-parameter has a
                        wrong type.
            ValueError: ``X`` is empty, negative, not finite, ``n_components``
                        is larger than the number of features (or samples with
                        an SVD-based ``init``), or a product of ``X`` in the fit
                        overflows its dtype (float32: pass float64).
        """
        self.fit_transform(X)
        return self

    @without_autocast
    def fit_transform(self, X: ArrayLike, y: Any = None, **params: Any) -> ArrayLike:
        """Fit on ``X`` and return its exact non-negative weights ``W`` (n x K).

        Returns:
            *ndarray or Tensor*: ``W`` of the kind, dtype and device of ``X``
            (half precision: float32).

        Raises:
            TypeError: as :meth:`fit`.
            ValueError: as :meth:`fit`.
        """
        self._check_params()
        v, kind = self._input(X, reset=True)
        k = self._rank(*v.shape)
        wt, h = self._initialise(v, k)
        sq = solvers.sq_norm(v)
        wt, h, n_iter = self._hals(v, wt, h, sq)
        # Solve W with unit-norm concepts: the HALS rows can differ in norm by 1e12, and the
        # final order and scale are canonical's (below) anyway.
        norms = torch.linalg.vector_norm(h.double(), dim=1)
        h = (h.double() / torch.where(norms > 0, norms, 1.0)[:, None]).to(h.dtype)
        w, error = self._solve_w_and_error(v, h, sq)
        order, scale = self._set_state(h, w.sum(dim=0), kind)
        w = w[:, order] * scale
        self.n_iter_ = n_iter
        self.n_samples_seen_ = int(v.shape[0])
        self._reset_stream()
        self.reconstruction_err_ = error
        return self._output(w, kind)

    @classmethod
    def from_components(cls, components: ArrayLike, **params: Any) -> NMF:
        """An estimator that transforms with given concept vectors (no fitting).

        Args:
            components (ndarray or Tensor): K x C non-negative, finite concept
                        vectors, used as they are (not re-normalised).
            **params: hyper-parameters of :class:`NMF`, recorded unchanged;
                        K is the number of rows of ``components`` (an
                        ``n_components`` equal to it is accepted).

        Returns:
            *NMF*: a fitted estimator whose ``transform`` uses ``components``.

        Raises:
            TypeError: ``components`` is complex.
            ValueError: ``components`` is not a 2-D finite non-negative matrix,
                        or ``n_components`` differs from its number of rows.
        """
        h, is_numpy = components_matrix(components)
        k = int(h.shape[0])
        given = params.pop("n_components", k)
        if given is not None and (isinstance(given, bool) or given != k):
            raise ValueError(
                f"from_components takes K from components ({k} rows), got n_components={given!r}; "
                "leave n_components out (or pass components with that many rows)."
            )
        if not h.is_floating_point():
            h = h.double()
        check_finite_non_negative(h)
        model = cls(n_components=k, **params)
        model._check_params()
        model._h = h.clone()
        model._weight_sums = torch.zeros(h.shape[0], dtype=torch.float64, device=h.device)
        model._components_is_numpy = is_numpy
        model.components_ = h.cpu().numpy() if is_numpy else model._h.clone()
        model.n_components_ = int(h.shape[0])
        model.n_features_in_ = int(h.shape[1])
        model.n_samples_seen_ = 0
        return model

    # ------------------------------------------------------------ inference
    @without_autocast
    def transform(self, X: ArrayLike) -> ArrayLike:
        """Concept weights of new rows with ``H`` fixed: exact ``argmin_{W>=0} ||X - W H||``.

        A tensor is solved on its own device (``H`` and its solve factors are
        cast there once and cached), unless the estimator's ``device`` is set;
        a NumPy array on ``H``'s device. ``X`` is read once: the check for
        negative, NaN and infinite entries is folded into the product pass.

        Args:
            X (ndarray or Tensor): n x C non-negative matrix.

        Returns:
            *ndarray or Tensor*: ``W`` (n x K) of the kind and device of ``X``, in
            its dtype when that is float32 or float64 (half precision is solved,
            and returned, in float32; integers in float64). Never NaN or infinite.

        Raises:
            NotFittedError: before ``fit``/``partial_fit``.
            TypeError: ``X`` is a complex or sparse tensor.
            ValueError: ``X`` is invalid, has another number of features, or
                        ``X @ H^T`` (or ``W``, for tiny concepts) overflows its dtype.
        """
        self._check_fitted()
        v, kind = self._input(X, reset=False, values=False, stay=True)
        fixed = self._fixed_h(v.device, v.dtype)
        solve_dtype = v.dtype if fixed.scale is None else torch.float64
        w, suspect = solvers.solve_rows(v, fixed.h, fixed.pinv, fixed.factors, dtype=solve_dtype)
        if fixed.scale is not None:  # concepts far from unit norm (from_components): rescale
            w = fixed.weights(w, v.dtype)
            suspect = suspect | ~torch.isfinite(w.sum())
        if bool(suspect):  # the one host synchronisation; rare: decide exactly
            check_values(v)  # NaN, infinity or a negative entry: the usual errors
            refuse_overflow(w, v, scale=fixed.scale)
        return self._output(w, kind)

    @without_autocast
    def _transform_maps(self, act: Tensor, pending: PendingCheck | None = None) -> Tensor:
        """Concept maps (N x K x h x w) of N x C x h x w activations the caller has checked.

        :meth:`transform` of every location, solved from the activations' own
        layout (no transposition to rows; :func:`solvers.solve_maps`), on their
        device unless ``device`` is set, in their dtype. ``pending``: the
        activations' value check, finished once the solve is queued and before
        its result is looked at.

        Raises:
            ValueError: the product ``X @ H^T`` overflows the activations' dtype.
            NonFiniteActivationError, NegativeActivationError: from ``pending``.
        """
        return self._solve_checked(
            act,
            lambda x, f: f.weights_maps(solvers.solve_maps(x, f.h, f.pinv, f.factors)),
            pending,
        )

    @without_autocast
    def _products_maps(self, act: Tensor) -> Tensor:
        """``X @ H^T`` (N x K x h x w) of every location of checked N x C x h x w activations.

        Computed where the activations are, in their dtype (:func:`solvers.products_maps`),
        with the rows of ``H`` of extreme norm scaled as the solve uses them
        (:func:`row_scales`; for fitted, unit-norm concepts this is ``X @ H^T``).
        All :meth:`_transform_products` needs of them: the mean of several
        locations' products is the product of their mean, so a slide run
        averages overlapping tiles in K channels instead of C.
        """
        return solvers.products_maps(act, self._fixed_h(act.device, act.dtype).h)

    @without_autocast
    def _transform_products(self, cross: Tensor, pending: PendingCheck | None = None) -> Tensor:
        """Concept weights (n x K, ``cross``'s dtype) of rows given by their products ``X @ H^T``.

        The exact solve of :meth:`transform` from n x K products of checked rows
        (e.g. averaged from :meth:`_products_maps`), on their device unless
        ``device`` is set. ``pending``: the value check of the activations they
        came from, finished once the solve is queued and before its result is
        looked at.

        Raises:
            ValueError: the products overflowed (non-finite weights).
            NonFiniteActivationError, NegativeActivationError: from ``pending``.
        """
        return self._solve_checked(
            cross,
            lambda b, f: f.weights(solvers.solve_products(b, f.pinv, f.factors), b.dtype),
            pending,
            what="products",
            fix=": the layer's activations are too large for this dtype; rescale the model's "
            "input or hook a layer with smaller activations.",
        )

    @without_autocast
    def _solve_checked(
        self,
        x: Tensor,
        solve: Callable[[Tensor, FixedH], Tensor],
        pending: PendingCheck | None,
        **overflow: str,
    ) -> Tensor:
        """``solve(x, fixed H)`` on the estimator's device (if set), then the checks, in order.

        The solve is queued first; then ``pending`` (the activations' value check)
        is read back, so bad values are the error reported; then non-finite
        weights are refused as an overflow of ``x`` (``overflow``: the message's
        ``what`` and ``fix``, see :func:`refuse_overflow`).
        """
        x = x if self.device is None else x.to(check_device("device", self.device))
        refuse_mps(x)  # the products of a model on MPS (transform's rows were checked already)
        fixed = self._fixed_h(x.device, x.dtype)
        w = solve(x, fixed)
        if pending is not None:
            pending.finish()
        refuse_overflow(w, x, scale=fixed.scale, **overflow)
        return w

    @without_autocast
    def inverse_transform(self, X: ArrayLike) -> ArrayLike:
        """Reconstruct rows ``W H`` from weights ``W`` (n x K).

        Returns:
            *ndarray or Tensor*: n x C reconstruction of the kind of ``X``.

        Raises:
            NotFittedError: before ``fit``/``partial_fit``.
            ValueError: ``X`` does not have ``n_components_`` columns.
        """
        self._check_fitted()
        is_numpy = not isinstance(X, Tensor)
        w = torch.as_tensor(np.asarray(X)) if is_numpy else X
        if w.ndim != 2 or w.shape[1] != self.n_components_:
            raise ValueError(
                f"inverse_transform expects an n x {self.n_components_} weight matrix, got "
                f"shape {tuple(w.shape)}."
            )
        if not w.is_floating_point():
            w = w.double()
        h = self._h.to(device=w.device, dtype=w.dtype)
        out = w @ h
        if is_numpy:
            result: NDArray[Any] = out.cpu().numpy()
            return result
        return out
