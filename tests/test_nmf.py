"""The streaming NMF solver: accuracy against SciPy / scikit-learn, streaming, API contract."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import nnls as scipy_nnls
from sklearn.decomposition import NMF as SklearnNMF
from sklearn.exceptions import NotFittedError as SklearnNotFittedError

from captum_nmf import NMF
from captum_nmf._core.nmf_statistics import NMFStatistics
from captum_nmf._utils import solvers
from captum_nmf.exceptions import CaptumNMFWarning, NotFittedError
from tests.helpers.emulated_cuda import EmulatedCuda


def low_rank(n: int, c: int, k: int, *, noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, k, generator=g) ** 3
    h = torch.rand(k, c, generator=g) ** 3
    return w @ h + noise * torch.rand(n, c, generator=g)


def objective(x: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> float:
    return float(torch.sum((x.double() - w.double() @ h.double()) ** 2))


# --------------------------------------------------------------------------- NNLS
@pytest.mark.parametrize("k", [2, 6, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transform_matches_scipy_nnls_row_by_row(k: int, dtype: torch.dtype) -> None:
    x = low_rank(400, 48, k, seed=k).to(dtype)
    model = NMF(k, random_state=0, max_iter=30).fit(x)
    w = model.transform(x)
    h = model.components_.double()
    for i in range(0, 400, 7):  # sampled rows
        _, residual = scipy_nnls(h.T.numpy(), x[i].double().numpy())
        ours = objective(x[i : i + 1], w[i : i + 1], h)
        assert ours <= residual**2 * (1 + 1e-4) + 1e-10, (i, ours, residual**2)


def test_nnls_exact_on_hand_checkable_problem() -> None:
    # min ||v - w H|| with H = I: w = max(v, 0) exactly.
    gram = torch.eye(3, dtype=torch.float64)
    cross = torch.tensor([[1.0, -2.0, 3.0], [-1.0, -1.0, 0.5]], dtype=torch.float64)
    w = solvers.nnls(gram, cross)
    assert torch.equal(w, torch.tensor([[1.0, 0.0, 3.0], [0.0, 0.0, 0.5]], dtype=torch.float64))


def test_nnls_on_rank_deficient_gram_stays_feasible_and_optimal() -> None:
    h = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    v = torch.tensor([[2.0, 2.0, 1.0], [0.0, 1.0, 3.0]], dtype=torch.float64)
    w = solvers.nnls(h @ h.T, v @ h.T)
    assert bool((w >= 0).all())
    for i in range(2):
        _, res = scipy_nnls(h.T.numpy(), v[i].numpy())
        assert objective(v[i : i + 1], w[i : i + 1], h) == pytest.approx(res**2, abs=1e-10)


# ---------------------------------------------------------------------------- fit
def test_fit_objective_within_one_percent_of_sklearn_cd_on_real_activations(
    real_activations: torch.Tensor,
) -> None:
    x = real_activations
    ours = NMF(6, random_state=0).fit(x)
    ref = SklearnNMF(6, solver="cd", init="nndsvda", random_state=0, max_iter=400).fit(x.numpy())
    assert ours.reconstruction_err_**2 <= 1.01 * ref.reconstruction_err_**2
    # reconstruction_err_ is the Frobenius norm of the exact residual with the fitted H.
    w = ours.transform(x)
    assert objective(x, w, ours.components_) == pytest.approx(ours.reconstruction_err_**2, rel=1e-4)


def test_fit_objective_within_one_percent_of_sklearn_cd_on_synthetic() -> None:
    x = low_rank(3000, 64, 6)
    ours = NMF(6, random_state=0).fit(x)
    ref = SklearnNMF(6, solver="cd", init="nndsvda", random_state=0).fit(x.numpy())
    assert ours.reconstruction_err_**2 <= 1.01 * ref.reconstruction_err_**2


def test_fit_recovers_exact_low_rank_factors() -> None:
    x = low_rank(500, 20, 3, noise=0.0).double()
    model = NMF(3, random_state=0, tol=1e-12, max_iter=600).fit(x)
    assert model.reconstruction_err_ / float(torch.linalg.norm(x)) < 1e-3


def test_components_unit_norm_and_ordered_by_mean_weight() -> None:
    x = low_rank(2000, 32, 5)
    model = NMF(5, random_state=0)
    w = model.fit_transform(x)
    norms = torch.linalg.vector_norm(model.components_.double(), dim=1)
    assert torch.allclose(norms, torch.ones(5, dtype=torch.float64), atol=1e-5)
    means = w.mean(dim=0)
    assert bool((means[:-1] >= means[1:]).all())
    # fit_transform returns what transform returns.
    assert torch.allclose(w, model.transform(x), atol=1e-5)


def test_fit_is_deterministic_and_order_is_canonical() -> None:
    x = low_rank(1500, 24, 4)
    a = NMF(4, random_state=3).fit(x).components_
    b = NMF(4, random_state=3).fit(x).components_
    assert torch.equal(a, b)
    # Row order does not change the concepts or their order (up to float rounding).
    perm = torch.randperm(1500, generator=torch.Generator().manual_seed(1))
    c = NMF(4, random_state=3).fit(x[perm]).components_
    assert torch.allclose(a, c, atol=1e-3)


def test_fit_idempotent_and_refit_resets_stream() -> None:
    x = low_rank(800, 16, 3)
    model = NMF(3, random_state=0)
    model.partial_fit(x[:400])
    model.fit(x)
    first = model.components_.clone()
    model.fit(x)
    assert torch.equal(first, model.components_)
    assert model.n_samples_seen_ == 800


# ---------------------------------------------------------------------- streaming
def _stream_objective(x: torch.Tensor, **params: object) -> tuple[NMF, float, float]:
    epochs = int(params.pop("epochs", 1))  # type: ignore[call-overload]
    full = NMF(6, random_state=0).fit(x)
    stream = NMF(6, random_state=0, **params)  # type: ignore[arg-type]
    for _ in range(epochs):
        for chunk in torch.chunk(x, 64):
            stream.partial_fit(chunk)
    best = objective(x, full.transform(x), full.components_)
    streamed = objective(x, stream.transform(x), stream.components_)
    return stream, streamed, best


def test_partial_fit_64_shuffled_chunks_within_two_percent_of_in_memory(
    real_activations: torch.Tensor,
) -> None:
    x = real_activations
    x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))]
    stream, streamed, best = _stream_objective(x)
    assert stream.n_samples_seen_ == x.shape[0]
    assert streamed <= 1.02 * best
    # The streamed error estimate is an upper bound of the best W for the final H.
    assert stream.reconstruction_err_**2 >= streamed * (1 - 1e-6)


@pytest.mark.parametrize("order", ["by_tile", "by_activation"])
def test_ordered_stream_within_two_percent_after_three_passes(
    real_activations: torch.Tensor, order: str
) -> None:
    # Tiles one after the other (an unshuffled DataLoader) or rows sorted by total
    # activation: one pass is biased by the first chunks; three passes with a mild
    # forget factor are not.
    x = real_activations
    if order == "by_activation":
        x = x[torch.argsort(x.sum(dim=1))]
    _, streamed, best = _stream_objective(x, epochs=3, forget_factor=0.98)
    assert streamed <= 1.02 * best


def _state_numel(model: NMF) -> int:
    return sum(v.numel() for v in vars(model).values() if isinstance(v, torch.Tensor))


def test_partial_fit_state_does_not_grow_with_chunks() -> None:
    x = low_rank(6400, 32, 4)
    model = NMF(4, random_state=0)
    sizes = []
    for chunk in torch.chunk(x, 64):
        model.partial_fit(chunk)
        sizes.append(_state_numel(model))
    assert len(set(sizes)) == 1
    k, c = 4, 32
    assert sizes[0] <= 5 * k * c + 2 * k * k + 4 * k + 1  # O(K * C), no rows kept


def test_partial_fit_checks_features_between_chunks() -> None:
    model = NMF(2, random_state=0).partial_fit(low_rank(50, 8, 2))
    with pytest.raises(ValueError, match="X has 9 features, but NMF is expecting 8"):
        model.partial_fit(low_rank(50, 9, 2))


def test_partial_fit_first_chunk_smaller_than_k() -> None:
    # Since the review of 2026-12-07 a stream holds its first rows until it has enough:
    # 3 rows for K = 4 are kept (not refused), and the estimator is not fitted yet.
    model = NMF(4, random_state=0).partial_fit(low_rank(3, 8, 2))
    assert model.n_samples_seen_ == 3
    with pytest.raises(NotFittedError, match="received 3 rows, 3 of them with a non-zero"):
        _ = model.components
    model.partial_fit(low_rank(30, 8, 2, seed=1))
    assert model.components_.shape == (4, 8)
    assert model.n_samples_seen_ == 33


def test_forget_factor_changes_weighting() -> None:
    x = low_rank(2000, 16, 3)
    a = NMF(3, random_state=0, forget_factor=1.0)
    b = NMF(3, random_state=0, forget_factor=0.5)
    for chunk in torch.chunk(x, 8):
        a.partial_fit(chunk)
        b.partial_fit(chunk)
    assert not torch.equal(a.components_, b.components_)


# ------------------------------------------------------------------ kinds & dtypes
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_in_numpy_out_dtype_preserved(dtype: type) -> None:
    x = low_rank(300, 12, 3).numpy().astype(dtype)
    model = NMF(3, random_state=0).fit(x)
    w = model.transform(x)
    assert isinstance(w, np.ndarray)
    assert w.dtype == dtype
    assert isinstance(model.components_, np.ndarray)
    assert model.components_.dtype == dtype
    assert isinstance(model.inverse_transform(w), np.ndarray)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensor_in_tensor_out_dtype_preserved(dtype: torch.dtype) -> None:
    x = low_rank(300, 12, 3).to(dtype)
    model = NMF(3, random_state=0).fit(x)
    w = model.transform(x)
    assert isinstance(w, torch.Tensor)
    assert w.dtype == dtype
    assert model.components_.dtype == dtype
    recon = model.inverse_transform(w)
    assert recon.shape == x.shape


def test_half_precision_and_integer_inputs_are_upcast() -> None:
    x = low_rank(200, 10, 2)
    model = NMF(2, random_state=0).fit(x)
    assert model.transform(x.half()).dtype == torch.float32
    assert model.transform((x * 10).round().int()).dtype == torch.float64


def test_inputs_are_never_modified() -> None:
    x = low_rank(300, 12, 3)
    before = x.clone()
    model = NMF(3, random_state=0).fit(x)
    NMF(3, random_state=0).partial_fit(x).partial_fit(x)
    model.transform(x)
    assert torch.equal(x, before)
    arr = x.numpy().copy()
    NMF(3, random_state=0).fit(arr).transform(arr)
    assert np.array_equal(arr, before.numpy())


def test_from_components_transform() -> None:
    h = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    model = NMF.from_components(h)
    w = model.transform(torch.tensor([[2.0, 3.0, 3.0]]))
    assert torch.allclose(w, torch.tensor([[2.0, 3.0]]))
    with pytest.raises(ValueError, match="non-negative"):
        NMF.from_components(-h)


def test_cuda_matches_cpu(cuda: EmulatedCuda | None) -> None:
    x = low_rank(2000, 32, 4)
    cpu = NMF(4, random_state=0).fit(x)
    gpu = NMF(4, random_state=0).fit(x.cuda())
    assert gpu.components_.device.type == "cuda"
    assert torch.allclose(cpu.components_, gpu.components_.cpu(), atol=1e-3)
    w = gpu.transform(x.cuda())
    assert w.device.type == "cuda"
    via_param = NMF(4, random_state=0, device="cuda").fit(x.numpy())
    assert isinstance(via_param.transform(x.numpy()), np.ndarray)


# --------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("k", "err", "match"),
    [
        (0, ValueError, "n_components must be >= 1, got 0"),
        (-1, ValueError, "n_components must be >= 1, got -1"),
        (1.5, TypeError, "n_components must be an int >= 1 or None, got 1.5"),
        ("3", TypeError, "n_components must be an int >= 1 or None, got '3'"),
        (True, TypeError, "n_components must be an int"),
        (13, ValueError, "n_components=13 exceeds the 12 features of X"),
    ],
)
def test_bad_n_components(k: object, err: type, match: str) -> None:
    with pytest.raises(err, match=match):
        NMF(k, random_state=0).fit(low_rank(50, 12, 2))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"init": "svd"}, "init must be one of"),
        ({"max_iter": 0}, "max_iter must be >= 1"),
        ({"tol": -1.0}, "tol must be a float >= 0"),
        ({"forget_factor": 0.0}, "forget_factor must be in \\(0, 1\\]"),
    ],
)
def test_bad_hyper_parameters(params: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NMF(2, **params).fit(low_rank(50, 12, 2))  # type: ignore[arg-type]


@pytest.mark.parametrize("as_numpy", [False, True])
def test_negative_nan_inf_empty_inputs(as_numpy: bool) -> None:
    def conv(t: torch.Tensor) -> object:
        return t.numpy() if as_numpy else t

    x = low_rank(20, 4, 2)
    bad_neg, bad_nan, bad_inf = x.clone(), x.clone(), x.clone()
    bad_neg[3, 1] = -1.0
    bad_nan[0, 0] = float("nan")
    bad_inf[0, 0] = float("inf")
    with pytest.raises(ValueError, match="Negative values in data passed to NMF"):
        NMF(2).fit(conv(bad_neg))
    with pytest.raises(ValueError, match="Input X contains NaN"):
        NMF(2).fit(conv(bad_nan))
    with pytest.raises(ValueError, match="Input X contains infinity"):
        NMF(2).fit(conv(bad_inf))
    with pytest.raises(ValueError, match="0 sample\\(s\\)"):
        NMF(2).fit(conv(torch.zeros(0, 4)))
    with pytest.raises(ValueError, match="0 feature\\(s\\)"):
        NMF(2).fit(conv(torch.zeros(5, 0)))


def test_not_fitted_error_is_value_and_attribute_error() -> None:
    model = NMF(2)
    with pytest.raises(NotFittedError, match="not fitted yet") as info:
        model.transform(low_rank(5, 4, 2))
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, AttributeError)
    assert isinstance(info.value, SklearnNotFittedError)
    with pytest.raises(NotFittedError):
        model.inverse_transform(np.ones((2, 2)))


def test_transform_feature_mismatch_and_bad_inverse_shape() -> None:
    model = NMF(2, random_state=0).fit(low_rank(50, 6, 2))
    with pytest.raises(ValueError, match="X has 5 features, but NMF is expecting 6"):
        model.transform(low_rank(5, 5, 2))
    with pytest.raises(ValueError, match="expects an n x 2 weight matrix"):
        model.inverse_transform(torch.ones(3, 3))
    with pytest.raises(ValueError, match="Expected a 2-D tensor"):
        model.transform(torch.ones(2, 3, 6))
    with pytest.raises(TypeError, match="dense tensor"):
        model.transform(torch.ones(2, 6).to_sparse())


@pytest.mark.parametrize("fast", [False, True])
def test_nnls_fallback_when_pivoting_is_cut_short(fast: bool) -> None:
    # max_iter=0 stops the reference solver's pivoting at once: its coordinate-descent
    # fallback must still reach the exact solution, without a ConvergenceWarning. The fast
    # solver with steps=0 hands every row its first guess leaves infeasible to it.
    g = torch.Generator().manual_seed(4)
    h = torch.rand(5, 30, generator=g, dtype=torch.float64) ** 2
    v = torch.rand(40, 30, generator=g, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if fast:
            w = solvers.nnls(h @ h.T, v @ h.T, max_iter=0, steps=0)
        else:
            w = solvers._nnls_bpp(h @ h.T, v @ h.T, max_iter=0)
    for i in range(40):
        _, res = scipy_nnls(h.T.numpy(), v[i].numpy())
        assert objective(v[i : i + 1], w[i : i + 1], h) == pytest.approx(res**2, rel=1e-8)


def test_components_is_a_read_only_copy_and_needs_a_fit() -> None:
    from captum_nmf.exceptions import NotFittedError

    model = NMF(2, random_state=0)
    with pytest.raises(NotFittedError, match="not fitted yet"):
        _ = model.components
    x = torch.rand(20, 5, generator=torch.Generator().manual_seed(0))
    model.fit(x)
    h = model.components
    torch.testing.assert_close(h, model.components_)
    h.zero_()  # the caller's copy only
    assert float(model.components.abs().sum()) > 0
    torch.testing.assert_close(model.components, model.components_)


def test_update_commits_nothing_when_interrupted(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    model = NMF(2, random_state=0).partial_fit(torch.rand(30, 4, generator=g))
    chunk = torch.rand(10, 4, generator=g)
    stats = model.statistics(chunk)
    names = ("_a", "_b", "_a_sum", "_b_sum", "_sq_sum", "_weight_sums")
    before = {n: getattr(model, n).clone() for n in names}
    h_before, seen = model.components, model.n_samples_seen_

    def interrupted(*args: object, **kwargs: object) -> torch.Tensor:
        raise KeyboardInterrupt

    monkeypatch.setattr(solvers, "hals_sweeps", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.update(stats)
    for n in names:
        torch.testing.assert_close(getattr(model, n), before[n], rtol=0, atol=0)
    torch.testing.assert_close(model.components, h_before, rtol=0, atol=0)
    assert model.n_samples_seen_ == seen
    monkeypatch.undo()
    model.update(stats)  # the same statistics apply cleanly afterwards
    assert model.n_samples_seen_ == seen + 10


def test_checking_a_tensor_sets_no_state() -> None:
    model = NMF(2)
    model._check_tensor(torch.rand(3, 4), reset=True)
    assert not hasattr(model, "n_features_in_")
    model.fit(torch.rand(6, 4))
    assert model.n_features_in_ == 4


# ---- review of 2026-12-07 (third session)
def _planted(n: int = 3000, c: int = 32, k: int = 6, seed: int = 0) -> torch.Tensor:
    """A non-negative rank-k product plus clipped noise, float64 (the reviewer's r04 data)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, k, generator=g, dtype=torch.float64) ** 3
    h = torch.rand(k, c, generator=g, dtype=torch.float64) ** 4
    return torch.clamp(w @ h + 0.02 * torch.randn(n, c, generator=g, dtype=torch.float64), min=0)


def _best_w_error(model: NMF, x: torch.Tensor) -> float:
    return float(torch.linalg.norm(x - model.transform(x) @ model.components_))


@pytest.fixture(scope="module")
def planted() -> tuple[torch.Tensor, float]:
    x = _planted()
    return x, _best_w_error(NMF(6, random_state=0).fit(x), x)


def test_stream_opening_with_zero_rows_starts_from_the_first_real_rows(
    planted: tuple[torch.Tensor, float],
) -> None:
    # Before: the zero chunk alone fixed the concepts (all zero, for good: error = ||X||).
    x, best = planted
    model = NMF(6, random_state=0).partial_fit(torch.zeros(300, 32, dtype=torch.float64))
    assert model.n_samples_seen_ == 300
    with pytest.raises(NotFittedError, match="received 300 rows, 0 of them with a non-zero"):
        model.transform(x[:2])
    for chunk in x.split(100):
        model.partial_fit(chunk)
    norms = torch.linalg.vector_norm(model.components_, dim=1)
    torch.testing.assert_close(norms, torch.ones(6, dtype=torch.float64))
    assert _best_w_error(model, x) <= 1.01 * best  # was 22.9 x best
    assert model.n_samples_seen_ == 300 + 3000  # the zero rows are counted, once


def test_stream_whose_first_chunk_has_k_rows_waits_for_enough_rows(
    planted: tuple[torch.Tensor, float],
) -> None:
    # Before: a first chunk of exactly K rows decided the concepts (3.0 x the best error).
    x, best = planted
    model = NMF(6, random_state=0).partial_fit(x[:6])
    assert model.components_.shape == (6, 32)  # a fit of the 6 rows, until more come
    for chunk in x.split(100):
        model.partial_fit(chunk)
    assert _best_w_error(model, x) <= 1.01 * best


def test_stream_opening_with_one_repeated_row_waits_for_k_directions(
    planted: tuple[torch.Tensor, float],
) -> None:
    # 150 copies of one background row span one direction, not K = 6: the stream holds them
    # and starts once real rows come (before: it started from them, 3.4 x the best error).
    x, best = planted
    model = NMF(6, random_state=0).partial_fit(x[:1].expand(150, 32))
    assert model.__dict__["_start_buffer"].rows.shape == (150, 32)
    for chunk in x.split(100):
        model.partial_fit(chunk)
    # 2 %, not 1 %: the 150 copies are data too, and pull the concepts towards that row.
    assert _best_w_error(model, x) <= 1.02 * best
    assert model.n_samples_seen_ == 150 + 3000


def test_held_chunks_start_the_stream_as_initialise_stream_plus_their_updates() -> None:
    # max(100, 10 K) = 100 non-zero rows: a chunk of 50 is held, the second one starts.
    x = low_rank(400, 12, 2).double()
    chunks = [x[:50], x[50:100], x[100:160], x[160:210], x[210:]]
    given = [c.clone() for c in chunks]
    model = NMF(2, random_state=0)
    for i, chunk in enumerate(given):
        model.partial_fit(chunk)
        chunk.zero_()  # the caller reuses its buffer: the stream holds copies
        if i == 0:  # while holding: the in-memory fit of every row seen, then one update
            ref = NMF(2, random_state=0).initialise_stream(chunks[0])
            ref.update(ref.statistics(chunks[0]))
            assert torch.equal(model.components_, ref.components_)
            assert model.reconstruction_err_ == ref.reconstruction_err_
    assert not hasattr(model, "_start_buffer")  # started: no rows kept
    ref = NMF(2, random_state=0).initialise_stream(torch.cat(chunks[:2]))
    for chunk in chunks:  # the held chunks replayed one by one, then the stream
        ref.update(ref.statistics(chunk))
    assert torch.equal(model.components_, ref.components_)
    assert model.reconstruction_err_ == ref.reconstruction_err_
    assert model.n_samples_seen_ == ref.n_samples_seen_ == 400


def test_held_rows_are_bounded_and_dropped_once_the_stream_starts() -> None:
    model = NMF(4, random_state=0)
    x = low_rank(1000, 16, 4)
    x[::2] = 0.0  # rows of zeros are counted but never held
    held = []
    for chunk in x.split(40):
        model.partial_fit(chunk)
        buffer = model.__dict__.get("_start_buffer")
        held.append(0 if buffer is None else int(buffer.rows.shape[0]))
    assert held[:5] == [20, 40, 60, 80, 0]  # 100 non-zero rows: started, dropped
    assert set(held[5:]) == {0}
    assert model.n_samples_seen_ == 1000


def test_update_ends_the_holding_and_the_stream_goes_on_from_its_statistics() -> None:
    x = low_rank(90, 8, 2).double()
    model = NMF(2, random_state=0).partial_fit(x[:30])  # held (fewer than 100 rows)
    assert "_start_buffer" in model.__dict__
    model.update(model.statistics(x[30:60]))  # e.g. a distributed step: held rows dropped
    assert "_start_buffer" not in model.__dict__
    model.partial_fit(x[60:])
    assert model.n_samples_seen_ == 90


def test_zero_concept_is_reseeded_from_the_row_with_the_largest_residual() -> None:
    # H0 = [e0, 0]. Rows: e0 (explained), 2 e1 (residual 4), e1 + e2 (residual 2). The zero
    # concept becomes the worst-explained row, unit norm: e1. The statistics were those of
    # weights that gave it nothing, so the error is unchanged: ||(0,2,0)||^2 + ||(0,1,1)||^2.
    f64 = torch.float64
    model = NMF(2).start_stream(torch.tensor([[1.0, 0, 0], [0, 0, 0]], dtype=f64))
    x = torch.tensor([[1.0, 0, 0], [0, 2, 0], [0, 1, 1]], dtype=f64)
    stats = model.statistics(x)
    assert stats.seeds is not None
    assert stats.seed_scores is not None
    torch.testing.assert_close(stats.seeds, torch.tensor([[0.0, 2, 0], [0, 1, 1]], dtype=f64))
    torch.testing.assert_close(stats.seed_scores, torch.tensor([4.0, 2.0], dtype=f64))
    model.partial_fit(x)
    expected = torch.tensor([[1.0, 0, 0], [0, 1, 0]], dtype=f64)
    torch.testing.assert_close(model.components_, expected, rtol=0, atol=1e-15)
    assert model.reconstruction_err_ == pytest.approx(6.0**0.5, rel=1e-14)
    model.partial_fit(torch.tensor([[0.0, 3, 0]], dtype=f64))  # used (weight 3): now first
    torch.testing.assert_close(model.components_, expected.flip(0), rtol=0, atol=1e-15)
    assert model.reconstruction_err_ == pytest.approx(6.0**0.5, rel=1e-14)  # (0, 3, 0): exact
    torch.testing.assert_close(
        model.transform(torch.tensor([[2.0, 5, 0]], dtype=f64)),
        torch.tensor([[5.0, 2.0]], dtype=f64),
    )


def test_concept_no_row_uses_is_reseeded_at_the_next_chunk() -> None:
    f64 = torch.float64
    model = NMF(2).start_stream(torch.tensor([[1.0, 0, 0], [0, 1, 0]], dtype=f64))
    model.partial_fit(torch.tensor([[2.0, 0, 0]], dtype=f64))  # e1 gets no weight: unused
    assert model.statistics(torch.tensor([[1.0, 0, 0]], dtype=f64)).seeds is not None
    model.partial_fit(torch.tensor([[1.0, 0, 0], [0, 0, 3]], dtype=f64))
    torch.testing.assert_close(
        model.components_, torch.tensor([[1.0, 0, 0], [0, 0, 1]], dtype=f64), rtol=0, atol=0
    )
    assert model.reconstruction_err_ == pytest.approx(3.0, rel=1e-14)  # the row (0, 0, 3)
    # A stream whose rows are all explained re-seeds nothing (no residual to seed from).
    model = NMF(2).start_stream(torch.tensor([[1.0, 0, 0], [0, 0, 0]], dtype=f64))
    model.partial_fit(torch.tensor([[2.0, 0, 0]], dtype=f64))
    assert float(model.components_[1].abs().sum()) == 0.0


def test_seeds_add_up_to_the_k_largest_and_are_not_flattened() -> None:
    f64 = torch.float64
    model = NMF(2).start_stream(torch.tensor([[1.0, 0, 0], [0, 0, 0]], dtype=f64))
    a = model.statistics(torch.tensor([[0.0, 1, 0], [0, 0, 3]], dtype=f64))
    b = model.statistics(torch.tensor([[0.0, 2, 0]], dtype=f64))
    total = a + b
    assert total.seed_scores is not None
    torch.testing.assert_close(total.seed_scores, torch.tensor([9.0, 4.0], dtype=f64))
    assert total.flatten().numel() == 2 * 2 + 2 * 3 + 2 + 2  # the sums only
    assert model.statistics(torch.tensor([[1.0, 0, 0]], dtype=f64)).seeds.shape == (0, 3)


def test_initialise_stream_refuses_a_chunk_without_enough_non_zero_rows() -> None:
    x = torch.zeros(50, 6, dtype=torch.float64)
    x[:2] = 1.0
    with pytest.raises(ValueError, match="at least 3 rows with a non-zero entry .* got 2 of 50"):
        NMF(3).initialise_stream(x)
    assert NMF(3, init="random", random_state=0).initialise_stream(x).n_components_ == 3


def test_fit_is_scale_invariant_for_tiny_data() -> None:
    # Before: the final W solve used the un-normalised HALS H; at X * 1e-13 its H H^T (~1e-20)
    # was truncated next to the identity pad: the error was 11 x the error at scale 1.
    x = _planted(1000, 24, 5)
    ref = NMF(5, random_state=0).fit(x)
    for s in (1e-13, 1e-16):
        model = NMF(5, random_state=0)
        w = model.fit_transform(x * s)
        assert model.reconstruction_err_ / s == pytest.approx(ref.reconstruction_err_, rel=1e-3)
        err = float(torch.linalg.norm(x * s - w @ model.components_)) / s
        assert err == pytest.approx(ref.reconstruction_err_, rel=1e-3)


def test_sq_norm_accumulates_float32_in_float64() -> None:
    x = torch.full((4, 3), 1e20, dtype=torch.float32)  # squares overflow float32
    assert float(solvers.sq_norm(x)) == pytest.approx(12 * float(x[0, 0]) ** 2, rel=1e-12)
    assert float(solvers.row_sq_norms(x)[0]) == pytest.approx(3 * float(x[0, 0]) ** 2)


def test_float32_fit_and_stream_refuse_an_overflow_like_transform() -> None:
    x = (low_rank(400, 16, 4).double() * 1e20).float()  # finite; its products are not
    message = r"overflows torch.float32 \(entries up to 1.*e\+20\); pass X in float64 or rescale"
    with pytest.raises(ValueError, match=message):  # was a raw linalg.eigh error
        NMF(4, random_state=0).fit(x)
    with pytest.raises(ValueError, match=message):
        NMF(4, random_state=0).partial_fit(x[:200]).partial_fit(x[200:])
    model = NMF(2, random_state=0).partial_fit(low_rank(300, 16, 2))
    with pytest.raises(ValueError, match=r"W\^T X overflows torch.float32"):
        model.statistics(torch.full((300, 16), 3e18))  # W ~ 1e19: W^T X ~ 1e40 (was inf)
    # near float32's largest value even the SVD of the start overflows (was linalg.svd's error)
    with pytest.raises(ValueError, match=r"\(its SVD\) overflows torch.float32 \(entries up to 3"):
        NMF(2, random_state=0).fit(torch.full((50, 8), 3e38))
    fit64 = NMF(4, random_state=0).fit(x.double())  # the fix the message names works
    assert bool(torch.isfinite(fit64.components_).all())


def test_update_refuses_non_finite_or_negative_statistics() -> None:
    x = low_rank(300, 8, 2).double()
    model = NMF(2, random_state=0).partial_fit(x)
    stats = model.statistics(x)
    bad = NMFStatistics(stats.wtw, stats.wtv * float("inf"), stats.sq, stats.weight_sums, 300)
    with pytest.raises(ValueError, match="stats hold NaN or infinity"):
        model.update(bad)
    negative = NMFStatistics(-stats.wtw, -stats.wtv, -stats.sq, stats.weight_sums, -5)
    with pytest.raises(ValueError, match="stats are not the statistics of any rows"):
        model.update(negative)
    assert model.n_samples_seen_ == 300


def test_from_components_takes_k_from_the_components() -> None:
    h = torch.rand(3, 5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"takes K from components \(3 rows\), got n_components=5"):
        NMF.from_components(h, n_components=5)  # was: got multiple values for keyword argument
    assert NMF.from_components(h, n_components=3).n_components_ == 3


def test_complex_input_is_refused_naming_the_dtype() -> None:
    x = torch.rand(20, 6, dtype=torch.float64)
    model = NMF(2, random_state=0).fit(x)
    z = (x + 1j * x).to(torch.complex128)
    match = "complex tensor of dtype torch.complex128; pass X.real or X.abs()"
    with pytest.raises(TypeError, match=match.replace("(", r"\(").replace(")", r"\)")):
        model.transform(z)  # was: the imaginary part dropped silently
    with pytest.raises(TypeError, match="complex tensor of dtype torch.complex128"):
        NMF(2).fit(z)
    with pytest.raises(TypeError, match="components, got a complex tensor of dtype"):
        NMF.from_components(model.components_ * (1 + 0j))


@pytest.mark.parametrize("as_numpy", [False, True])
def test_negative_values_message_names_count_first_position_and_fix(as_numpy: bool) -> None:
    x = torch.ones(3, 4, dtype=torch.float64)
    x[1, 2], x[2, 0] = -0.5, -2.0
    match = (
        r"Negative values in data passed to NMF \(input X\): 2 entries below 0, the first "
        r"-0.5 at row 1, column 2 \(the smallest -2\); .*clip X \(X.clamp\(min=0\).*"
        r"negative='relu'"
    )
    with pytest.raises(ValueError, match=match):
        NMF(2).fit(x.numpy() if as_numpy else x)


def test_nan_and_infinity_messages_name_count_and_first_position() -> None:
    x = torch.ones(3, 4, dtype=torch.float64)
    x[0, 1] = x[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"contains NaN \(2 entries, the first at row 0, column 1"):
        NMF(2).fit(x)
    x = torch.ones(3, 4, dtype=torch.float64)
    x[1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"infinity \(1 entry, the first inf at row 1, column 0"):
        NMF(2).fit(x)


def test_transform_docstring_says_half_precision_is_solved_in_float32() -> None:
    doc = NMF.transform.__doc__ or ""
    assert "half precision is solved" in doc
    assert "in float32" in doc
    model = NMF(2, random_state=0).fit(low_rank(50, 6, 2))
    assert model.transform(low_rank(5, 6, 2).half()).dtype == torch.float32


@pytest.mark.parametrize(
    ("h", "match"),
    [
        ([[1.0, float("nan")]], r"1 entry is NaN, the first components\[0, 1\] = nan"),
        ([[1.0, 0.0], [-1.0, -2.0]], r"2 entries are negative, the first components\[1, 0\] = -1"),
        ([[float("inf"), 1.0]], r"1 entry is infinite, the first components\[0, 0\] = inf"),
    ],
)
def test_bad_components_message_says_which_and_where(h: list[list[float]], match: str) -> None:
    with pytest.raises(ValueError, match="components must be finite and non-negative: " + match):
        NMF.from_components(torch.tensor(h))


def test_concept_names_refuse_lone_surrogates() -> None:
    from captum_nmf._core.names import check_concept_names

    with pytest.raises(ValueError, match=r"concept name 0 \('a\\ud800'\) holds a lone surrogate"):
        check_concept_names(["a\ud800", "b"], 2)  # cannot be written as UTF-8
    assert check_concept_names(["a\U0001f600", "b"], 2) == ["a\U0001f600", "b"]  # a real pair


@pytest.mark.parametrize(
    ("seed", "err", "match"),
    [
        (-1, ValueError, r"random_state must be in \[0, 2\*\*32 - 1\].*got -1; pass e.g."),
        (2**32, ValueError, r"random_state must be in \[0, 2\*\*32 - 1\]"),
        (1.5, TypeError, r"random_state must be None, an int .* got 1.5 \(float\)"),
    ],
)
def test_bad_random_state_is_named(seed: object, err: type, match: str) -> None:
    with pytest.raises(err, match=match):
        NMF(2, random_state=seed).fit(low_rank(20, 4, 2))  # type: ignore[arg-type]
    assert NMF(2, random_state=np.int64(3)).fit(low_rank(20, 4, 2)).n_iter_ >= 1


def test_stream_readiness_says_when_partial_fit_would_start() -> None:
    """K = 2: 2 non-zero rows to start at all, 100 spanning 2 directions (or 1,000) to start."""
    f64 = torch.float64
    e0, e1 = torch.tensor([[1.0, 0, 0]], dtype=f64), torch.tensor([[0.0, 1, 1]], dtype=f64)
    zeros = torch.zeros(500, 3, dtype=f64)
    model = NMF(2)
    assert model.stream_readiness(torch.cat([e0, zeros])) == "too few"  # zeros do not count
    assert model.stream_readiness(torch.cat([e0, e1, zeros])) == "possible"
    assert model.stream_readiness(torch.cat([e0, e1] * 49 + [zeros])) == "possible"  # 98 rows
    assert model.stream_readiness(torch.cat([e0, e1] * 50)) == "ready"
    assert model.stream_readiness(e0.repeat(999, 1)) == "possible"  # one direction
    assert model.stream_readiness(e0.repeat(1000, 1)) == "ready"  # 10 x 100: data of rank 1
    assert NMF(2, init="random").stream_readiness(e0) == "possible"
    with pytest.raises(ValueError, match="negative"):
        model.stream_readiness(-torch.ones(3, 3))


def test_tensors_that_require_grad_fit_like_detached_ones() -> None:
    """Activations taken outside ``torch.no_grad()`` require grad: ``fit`` and
    ``fit_transform`` raised "bmm(): functions with out=... arguments don't support
    automatic differentiation" (``partial_fit`` and ``transform`` took them)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 3, generator=gen, requires_grad=True)
    x = torch.relu(torch.rand(200, 3, generator=gen) @ weight.T)  # a graph behind it
    assert x.requires_grad
    plain = NMF(3, random_state=0).fit(x.detach())
    fitted = NMF(3, random_state=0).fit(x)
    assert torch.equal(fitted.components_, plain.components_)
    w = NMF(3, random_state=0).fit_transform(x)
    assert torch.equal(w, NMF(3, random_state=0).fit_transform(x.detach()))
    assert not w.requires_grad
    assert not fitted.transform(x).requires_grad
    assert weight.grad is None  # nothing flowed back into the caller's graph
    streamed = NMF(3, random_state=0).partial_fit(x)
    assert torch.equal(
        streamed.components_, NMF(3, random_state=0).partial_fit(x.detach()).components_
    )


def test_partial_fit_after_fit_warns_and_start_stream_refines() -> None:
    """``partial_fit`` after ``fit``, ``from_components`` or a load started a new stream
    without a word: "load the concepts, refine them on new slides" replaced them."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(600, 8, generator=gen)
    fitted = NMF(3, random_state=0).fit(x)
    h = fitted.components_.clone()
    for start in (fitted, NMF.from_components(h)):
        with pytest.warns(
            CaptumNMFWarning, match=r"new stream: the 3 concepts .* start_stream"
        ) as w:
            start.partial_fit(x[:300])
        assert w[0].filename == __file__  # the caller's line
        fresh = NMF(3, random_state=0).partial_fit(x[:300])
        assert torch.equal(start.components_, fresh.components_)  # as the warning says
    refined = NMF(3, random_state=0).fit(x).start_stream(h)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for: no warning
        refined.partial_fit(x[:300]).partial_fit(x[300:])
    cosine = torch.nn.functional.cosine_similarity(refined.components_, h)
    assert bool((cosine > 0.999).all()), cosine  # the same data: the concepts stay
