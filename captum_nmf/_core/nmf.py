"""``NMF``: a scikit-learn-compatible, streaming, device-agnostic NMF estimator."""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_non_negative, validate_data
from torch import Tensor

from captum_nmf._utils import solvers
from captum_nmf._utils.validation import check_int
from captum_nmf.exceptions import NotFittedError

__all__ = ["NMF", "NMFStatistics"]

ArrayLike = Any  # numpy array, torch tensor or anything numpy.asarray accepts
InitName = Literal["nndsvda", "nndsvd", "random"]
_INITS = ("nndsvda", "nndsvd", "random")
_INNER_W = 5  # HALS sweeps over W per outer iteration (early stop at 1 % change); measured best


@dataclass(frozen=True)
class _Kind:
    """How to give results back: as the caller's array kind, dtype and device."""

    is_numpy: bool
    dtype: torch.dtype
    device: torch.device


@dataclass(frozen=True)
class _FixedH:
    """``H`` cast for one device and dtype, with its NNLS factors.

    ``pinv`` is ``pinv(H H^T)`` in the same dtype: ``(V H^T) @ pinv`` in float32
    is the cheap guess of the starting passive sets (only its signs are used).
    """

    h: Tensor
    pinv: Tensor
    factors: solvers.NNLSFactors


@dataclass(eq=False)
class _FactorCache:
    """Per-``H`` solve factors, valid while ``_h`` is ``h`` at version ``version``."""

    h: Tensor | None
    version: int
    entries: dict[tuple[str, torch.dtype], _FixedH]


@dataclass(frozen=True)
class NMFStatistics:
    r"""Sufficient statistics of streamed rows for fixed concepts ``H``: what workers reduce.

    For rows ``V`` (n x C) and their exact weights ``W`` (n x K) for ``H``,
    the statistics are ``W^T W``, ``W^T V``, ``||V||_F^2``, the column sums
    of ``W`` and n, all float64. Statistics of disjoint chunks for the same
    ``H`` add up (``a + b``) to those of their union, so a distributed fit
    sums them over workers (``sum(stats)`` works too) and applies the sum with
    :meth:`NMF.update`. :meth:`flatten` packs them into one 1-D float64
    tensor for ``torch.distributed.all_reduce`` and :meth:`unflatten` unpacks it.

    Args:
        wtw (Tensor): K x K ``W^T W``.
        wtv (Tensor): K x C ``W^T V``.
        sq (Tensor): 0-d ``||V||_F^2``.
        weight_sums (Tensor): K column sums of ``W``.
        n_samples (int): number of rows n.

    Raises:
        ValueError: the shapes do not fit together.
    """

    wtw: Tensor
    wtv: Tensor
    sq: Tensor
    weight_sums: Tensor
    n_samples: int

    def __post_init__(self) -> None:
        k = self.wtw.shape[0] if self.wtw.ndim == 2 else -1
        if (
            self.wtw.shape != (k, k)
            or self.wtv.ndim != 2
            or self.wtv.shape[0] != k
            or self.sq.ndim != 0
            or self.weight_sums.shape != (k,)
        ):
            raise ValueError(
                f"NMFStatistics needs wtw K x K, wtv K x C, sq 0-d and weight_sums of K; got "
                f"shapes {tuple(self.wtw.shape)}, {tuple(self.wtv.shape)}, "
                f"{tuple(self.sq.shape)}, {tuple(self.weight_sums.shape)}."
            )

    @property
    def shape(self) -> tuple[int, int]:
        """``(K, C)``."""
        return int(self.wtv.shape[0]), int(self.wtv.shape[1])

    @classmethod
    def zeros(
        cls, n_components: int, n_features: int, *, device: str | torch.device | None = None
    ) -> NMFStatistics:
        """Statistics of no rows: what a worker without a batch contributes.

        Args:
            n_components (int): K.
            n_features (int): C.
            device (str or torch.device, optional): where to allocate them.
                        Default: None (CPU)

        Returns:
            *NMFStatistics*: all zero, n_samples 0.
        """
        kd: dict[str, Any] = {"dtype": torch.float64, "device": device}
        return cls(
            wtw=torch.zeros(n_components, n_components, **kd),
            wtv=torch.zeros(n_components, n_features, **kd),
            sq=torch.zeros((), **kd),
            weight_sums=torch.zeros(n_components, **kd),
            n_samples=0,
        )

    def __add__(self, other: NMFStatistics) -> NMFStatistics:
        if not isinstance(other, NMFStatistics):
            return NotImplemented
        if other.shape != self.shape:
            raise ValueError(
                f"Cannot add statistics of shape (K, C)={other.shape} to {self.shape}; both "
                "must come from the same stream."
            )
        device = self.wtw.device
        return NMFStatistics(
            wtw=self.wtw + other.wtw.to(device),
            wtv=self.wtv + other.wtv.to(device),
            sq=self.sq + other.sq.to(device),
            weight_sums=self.weight_sums + other.weight_sums.to(device),
            n_samples=self.n_samples + other.n_samples,
        )

    def __radd__(self, other: object) -> NMFStatistics:
        if isinstance(other, int) and other == 0:  # sum(list_of_stats) starts from 0
            return self
        return NotImplemented

    def to(self, device: str | torch.device) -> NMFStatistics:
        """The same statistics on ``device``.

        Returns:
            *NMFStatistics*: a copy (or ``self`` when already there).
        """
        return NMFStatistics(
            wtw=self.wtw.to(device),
            wtv=self.wtv.to(device),
            sq=self.sq.to(device),
            weight_sums=self.weight_sums.to(device),
            n_samples=self.n_samples,
        )

    def flatten(self) -> Tensor:
        """One 1-D float64 tensor of ``K*K + K*C + 1 + K + 1`` values (for ``all_reduce``).

        Returns:
            *Tensor*: ``[wtw, wtv, sq, weight_sums, n_samples]`` flattened, on
            the statistics' device; summing flattened statistics and
            :meth:`unflatten` gives the sum of the statistics.
        """
        d = self.wtw.device
        return torch.cat(
            [
                self.wtw.double().reshape(-1),
                self.wtv.double().reshape(-1),
                self.sq.double().reshape(1),
                self.weight_sums.double().reshape(-1),
                torch.tensor([float(self.n_samples)], dtype=torch.float64, device=d),
            ]
        )

    @classmethod
    def unflatten(cls, flat: Tensor, n_components: int, n_features: int) -> NMFStatistics:
        """Inverse of :meth:`flatten`.

        Args:
            flat (Tensor): 1-D tensor of ``K*K + K*C + K + 2`` values.
            n_components (int): K.
            n_features (int): C.

        Returns:
            *NMFStatistics*: float64 views into ``flat`` (a float64 ``flat`` is
            not copied).

        Raises:
            ValueError: ``flat`` has another size.
        """
        k, c = n_components, n_features
        size = k * k + k * c + k + 2
        if flat.ndim != 1 or flat.numel() != size:
            raise ValueError(
                f"flat must be 1-D with K*K + K*C + K + 2 = {size} values for K={k}, C={c}, "
                f"got shape {tuple(flat.shape)}; pass the K and C it was flattened with."
            )
        flat = flat.double()
        i = 0
        wtw = flat[i : i + k * k].reshape(k, k)
        i += k * k
        wtv = flat[i : i + k * c].reshape(k, c)
        i += k * c
        sq = flat[i]
        i += 1
        weight_sums = flat[i : i + k]
        n = float(flat[i + k])
        return cls(wtw=wtw, wtv=wtv, sq=sq, weight_sums=weight_sums, n_samples=round(n))


def _canonical(h: Tensor, weight_sums: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
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


class NMF(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):  # type: ignore[misc]
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
                    (and of the first ``partial_fit`` chunk).
                    Default: 200
        tol (float, optional): stop when one iteration lowers the objective
                    (evaluated exactly) by less than ``tol`` times its value.
                    Default: 1e-4
        random_state (int, RandomState or None, optional): seed of the
                    randomised SVD and of ``init="random"``.
                    Default: None
        device (str or torch.device, optional): where to compute. ``None``
                    computes where the data is (numpy arrays: CPU).
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
        n_iter_ (int): outer iterations run by the last ``fit``.
        n_samples_seen_ (int): rows seen by ``fit``/``partial_fit``.

    Raises:
        TypeError: ``n_components`` or ``max_iter`` is not an integer.
        ValueError: a hyper-parameter is out of range, ``X`` is empty, has
                    negative, NaN or infinite values, or has another number
                    of features than at fit time.
        NotFittedError: ``transform`` or ``inverse_transform`` before ``fit``.

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

    @property
    def components(self) -> Tensor:
        """The fitted concepts ``H`` (K x C) as a read-only tensor, on the compute device.

        A detached copy, whatever ``X`` was (``components_`` follows ``X``'s
        kind: a numpy array for numpy input); changing it leaves the estimator
        alone. Use it instead of private state in code that drives the solver
        (distributed fitting, persistence).

        Raises:
            NotFittedError: before fitting.
        """
        h: Tensor | None = self.__dict__.get("_concepts")
        if h is None:
            raise NotFittedError(
                "This NMF instance is not fitted yet. Call 'fit', 'partial_fit', "
                "'initialise_stream' or 'start_stream' first."
            )
        return h.detach().clone()

    def _factor_cache(self) -> _FactorCache:
        """The cache object, created once and afterwards only changed in place.

        Filling it in ``transform`` therefore leaves ``__dict__`` equal to what it
        was (scikit-learn's ``check_dict_unchanged``).
        """
        cache: _FactorCache | None = self.__dict__.get("_nnls_cache")
        if cache is None:
            cache = self.__dict__["_nnls_cache"] = _FactorCache(None, -1, {})
        return cache

    def _forget_factors(self) -> None:
        """Drop the cached per-``H`` solve factors (``H`` or where it is used changed)."""
        cache = self._factor_cache()
        cache.h, cache.version = None, -1
        cache.entries.clear()

    def _fixed_h(self, device: torch.device, dtype: torch.dtype) -> _FixedH:
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
            hc = h.detach().to(device=device, dtype=dtype)
            # H H^T in the compute dtype, as the fit's final solve forms it.
            factors = solvers.NNLSFactors(hc @ hc.T)
            entry = _FixedH(hc, factors.pinv.to(dtype), factors)
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
        state["_nnls_cache"] = _FactorCache(None, -1, {})  # derived from H: not pickled
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
        check_int(
            "n_components", self.n_components, optional=True, hint="pass e.g. n_components=6."
        )
        if self.init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {self.init!r}.")
        check_int("max_iter", self.max_iter, hint="pass e.g. max_iter=200.")
        if not isinstance(self.tol, numbers.Real) or not self.tol >= 0:
            raise ValueError(f"tol must be a float >= 0, got {self.tol!r}.")
        ff = self.forget_factor
        if not isinstance(ff, numbers.Real) or not 0.0 < ff <= 1.0:
            raise ValueError(f"forget_factor must be in (0, 1], got {ff!r}.")

    def _input(self, x: ArrayLike, *, reset: bool) -> tuple[Tensor, _Kind]:
        """Validate ``x`` and return it as a 2-D floating tensor on the compute device."""
        if isinstance(x, Tensor):
            t = self._check_tensor(x, reset=reset)
            if reset:
                self._record_features(int(t.shape[1]))
            kind = _Kind(False, t.dtype, x.device)
        else:
            arr = validate_data(self, x, reset=reset, dtype=[np.float64, np.float32])
            check_non_negative(arr, "NMF (input X)")
            with warnings.catch_warnings():
                # Read-only arrays (e.g. np.memmap(mode="r")) are fine: X is never written.
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                t = torch.from_numpy(np.ascontiguousarray(arr))
            kind = _Kind(True, t.dtype, t.device)
        if self.device is not None:
            t = t.to(self.device)
        elif reset is False and hasattr(self, "_h"):
            t = t.to(self._h.device)
        return t, kind

    def _check_tensor(self, x: Tensor, *, reset: bool) -> Tensor:
        if x.layout != torch.strided:
            raise TypeError(
                f"NMF needs a dense tensor, got layout {x.layout}; call X.to_dense() first."
            )
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
        # One pass, one host synchronisation, no temporary: NaN propagates into the
        # minimum and maximum, infinities show in them.
        low, high = torch.stack(torch.aminmax(x)).tolist()
        if not (math.isfinite(low) and math.isfinite(high)):
            what = "NaN" if bool(torch.isnan(x).any()) else "infinity"
            raise ValueError(f"Input X contains {what}; NMF needs finite values.")
        if low < 0:
            raise ValueError("Negative values in data passed to NMF (input X).")
        if not reset and c != self.n_features_in_:
            raise ValueError(
                f"X has {c} features, but NMF is expecting {self.n_features_in_} features as input."
            )
        return x

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
        k = n_features if self.n_components is None else int(self.n_components)
        if k > n_features:
            raise ValueError(
                f"n_components={k} exceeds the {n_features} features of X; "
                f"choose n_components <= {n_features}."
            )
        if self.init != "random" and k > n_samples:
            raise ValueError(
                f"init={self.init!r} needs n_components <= min(n_samples, n_features), got "
                f"n_components={k} with {n_samples} samples; pass more rows or init='random'."
            )
        return k

    def _generator(self) -> torch.Generator:
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        return torch.Generator().manual_seed(seed)

    def _check_fitted(self) -> None:
        if not hasattr(self, "_h"):
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet. Call 'fit' or "
                "'partial_fit' with appropriate arguments before using this estimator."
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
            # (no pass over V; the W^T V form would cancel in float32).
            obj = float(solvers.objective_from_products(sq, wt, p, hht))
            wtw, wtv = wt @ wt.T, wt @ v
            h = solvers.hals_sweeps(h, wtw, wtv, inner_h)
            if math.isfinite(prev) and prev - obj <= self.tol * prev:
                break
            prev = obj
        return wt, h, n_iter

    def _solve_w(self, v: Tensor) -> Tensor:
        """Exact ``argmin_{W >= 0} ||V - W H||`` for the current ``H`` (n x K, float64).

        One pass ``V H^T`` in ``V``'s dtype, then the fixed-``H`` solve with the
        cached factors of ``H``.
        """
        fixed = self._fixed_h(v.device, v.dtype)
        cross = v @ fixed.h.T  # the one pass over V (H^T as a transposed view: MKL's fast path)
        # pinv is symmetric; its transposed view takes the same fast path.
        return solvers.nnls_factored(fixed.factors, cross, guess=cross @ fixed.pinv.T)

    def _solve_w_and_error(self, v: Tensor, h: Tensor, sq: Tensor) -> tuple[Tensor, float]:
        """Exact ``W`` and ``||V - W H||_F`` from the same ``V H^T`` (one pass over V)."""
        hht, p = h @ h.T, v @ h.T
        w = solvers.nnls(hht, p)
        obj = solvers.objective_from_products(sq, w.T.to(v.dtype), p.T, hht)
        return w, math.sqrt(float(obj))

    def _set_state(self, h: Tensor, weight_sums: Tensor, kind: _Kind) -> tuple[Tensor, Tensor]:
        """Normalise and order ``H`` canonically; return ``order`` and ``scale``.

        Concept k of the result is ``H[order[k]] / ||H[order[k]]||``, so weights of the old
        concepts convert as ``w_new = w_old[:, order] * scale``.
        """
        h_new, order, scale, sums = _canonical(h, weight_sums)
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
    def fit(self, X: ArrayLike, y: Any = None) -> NMF:
        """Fit the factorisation on rows held in memory.

        Args:
            X (ndarray or Tensor): n x C non-negative matrix.
            y (None): ignored (scikit-learn convention).

        Returns:
            *NMF*: ``self``.

        Raises:
            ValueError: ``X`` is empty, negative, not finite, or ``n_components``
                        is larger than the number of features (or samples with
                        an SVD-based ``init``).
        """
        self.fit_transform(X)
        return self

    def fit_transform(self, X: ArrayLike, y: Any = None, **params: Any) -> ArrayLike:
        """Fit on ``X`` and return its exact non-negative weights ``W`` (n x K).

        Returns:
            *ndarray or Tensor*: ``W`` of the kind, dtype and device of ``X``.

        Raises:
            ValueError: as :meth:`fit`.
        """
        self._check_params()
        v, kind = self._input(X, reset=True)
        k = self._rank(*v.shape)
        wt, h = self._initialise(v, k)
        sq = solvers.sq_norm(v)
        wt, h, n_iter = self._hals(v, wt, h, sq)
        w, error = self._solve_w_and_error(v, h, sq)
        order, scale = self._set_state(h, w.sum(dim=0), kind)
        w = w[:, order] * scale
        self.n_iter_ = n_iter
        self.n_samples_seen_ = int(v.shape[0])
        self._reset_stream()
        self.reconstruction_err_ = error
        return self._output(w, kind)

    def _reset_stream(self) -> None:
        """Forget streaming statistics (a fresh ``fit`` restarts ``partial_fit``)."""
        for name in ("_a", "_b", "_a_sum", "_b_sum", "_sq_sum"):
            if hasattr(self, name):
                delattr(self, name)

    def partial_fit(self, X: ArrayLike, y: Any = None) -> NMF:
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
        return self.update(self._statistics(v))

    # --------------------------------------------------------- stream pieces
    def initialise_stream(self, X: ArrayLike) -> NMF:
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

    def start_stream(self, components: ArrayLike) -> NMF:
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
        is_numpy = not isinstance(components, Tensor)
        h = torch.as_tensor(np.asarray(components)) if is_numpy else components.detach()
        if h.ndim != 2 or h.shape[0] < 1 or h.shape[1] < 1:
            raise ValueError(
                f"components must be a K x C matrix, got shape {tuple(h.shape)}; pass the "
                "stream's H0."
            )
        if not h.is_floating_point():
            raise TypeError(
                f"components must be floating point, got dtype {h.dtype}; pass components.double()."
            )
        if self.n_components is not None and h.shape[0] != self.n_components:
            raise ValueError(
                f"components has {h.shape[0]} rows but n_components={self.n_components}; "
                "pass H0 of the same rank."
            )
        if not bool(torch.isfinite(h).all()) or bool((h < 0).any()):
            raise ValueError("components must be finite and non-negative.")
        if self.device is not None:
            h = h.to(self.device)
        self.n_features_in_ = int(h.shape[1])
        if hasattr(self, "feature_names_in_"):
            del self.feature_names_in_
        self.n_iter_ = 0
        self._start(h.clone(), is_numpy)
        return self

    def _initialise_stream(self, v: Tensor, kind: _Kind) -> None:
        sq = solvers.sq_norm(v)
        k = self._rank(*v.shape)
        wt, h = self._initialise(v, k)
        _, h, n_iter = self._hals(v, wt, h, sq)
        self.n_iter_ = n_iter
        self._start(h, kind.is_numpy)

    def _start(self, h: Tensor, is_numpy: bool) -> None:
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

    def _check_streaming(self) -> None:
        if not hasattr(self, "_a"):
            raise NotFittedError(
                f"This {type(self).__name__} instance has no stream; call 'initialise_stream' "
                "(or 'start_stream', or 'partial_fit') first."
            )

    def statistics(self, X: ArrayLike) -> NMFStatistics:
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

    def _statistics(self, v: Tensor) -> NMFStatistics:
        w = self._solve_w(v).to(v.dtype)
        return NMFStatistics(
            wtw=(w.T @ w).double(),
            wtv=(w.T @ v).double(),
            sq=solvers.sq_norm(v),
            weight_sums=w.double().sum(dim=0),
            n_samples=int(v.shape[0]),
        )

    def update(self, stats: NMFStatistics) -> NMF:
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
        h_new, order, scale, sums = _canonical(h64.to(h.dtype), weight_sums)
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

    @classmethod
    def from_components(cls, components: ArrayLike, **params: Any) -> NMF:
        """An estimator that transforms with given concept vectors (no fitting).

        Args:
            components (ndarray or Tensor): K x C non-negative, finite concept
                        vectors, used as they are (not re-normalised).
            **params: hyper-parameters of :class:`NMF`, recorded unchanged.

        Returns:
            *NMF*: a fitted estimator whose ``transform`` uses ``components``.

        Raises:
            ValueError: ``components`` is not a 2-D finite non-negative matrix.
        """
        is_numpy = not isinstance(components, Tensor)
        h = torch.as_tensor(np.asarray(components)) if is_numpy else components.detach()
        if h.ndim != 2 or h.shape[0] < 1 or h.shape[1] < 1:
            raise ValueError(f"components must be a K x C matrix, got shape {tuple(h.shape)}.")
        if not h.is_floating_point():
            h = h.double()
        if not bool(torch.isfinite(h).all()) or bool((h < 0).any()):
            raise ValueError("components must be finite and non-negative.")
        model = cls(n_components=int(h.shape[0]), **params)
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
    def transform(self, X: ArrayLike) -> ArrayLike:
        """Concept weights of new rows with ``H`` fixed: exact ``argmin_{W>=0} ||X - W H||``.

        Args:
            X (ndarray or Tensor): n x C non-negative matrix.

        Returns:
            *ndarray or Tensor*: ``W`` (n x K) of the kind, dtype and device of ``X``.

        Raises:
            NotFittedError: before ``fit``/``partial_fit``.
            ValueError: ``X`` is invalid or has another number of features.
        """
        self._check_fitted()
        v, kind = self._input(X, reset=False)
        return self._output(self._solve_w(v), kind)

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
