"""The fixed-H solve: exactness against SciPy and the reference solver, degenerate rows,
no integer matmul, no host synchronisation before the fallback, and the per-H factor cache."""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from scipy.optimize import nnls as scipy_nnls

from captum_nmf import NMF
from captum_nmf._utils import solvers
from captum_nmf.exceptions import CaptumNMFWarning
from tests.helpers.calls import CallRecorder
from tests.helpers.emulated_cuda import EmulatedCuda

F64 = torch.float64


def scipy_rows(h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SciPy's NNLS of every row of ``v`` (float64) for ``min ||v_i - w H||``."""
    a = h.double().T.numpy()
    return torch.from_numpy(np.stack([scipy_nnls(a, r)[0] for r in v.double().numpy()]))


def kkt_violation(h: torch.Tensor, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per row, the largest violation of the NNLS optimality conditions, relative to the row.

    ``w >= 0``, gradient ``y = w G - v H^T >= 0`` and ``y = 0`` where ``w > 0``.
    """
    h, v, w = h.double(), v.double(), w.double()
    b = v @ h.T
    y = w @ (h @ h.T) - b
    scale = torch.amax(torch.abs(b), dim=1).clamp_min(1e-300)
    bad = torch.maximum(torch.clamp_min(-y, 0.0), torch.where(w > 0, torch.abs(y), 0.0))
    return torch.amax(torch.maximum(bad, torch.clamp_min(-w, 0.0)), dim=1) / scale


def fitted_h(x: torch.Tensor, k: int) -> torch.Tensor:
    return NMF(k, random_state=0, max_iter=40).fit(x)._h


@pytest.fixture(scope="module")
def real_rows(real_activations: torch.Tensor) -> torch.Tensor:
    """2048 real post-ReLU6 feature vectors (every other row of the shared fixture)."""
    return real_activations[::2].contiguous()


# ------------------------------------------------------------------- exactness
@pytest.mark.parametrize("k", [4, 6, 8])
def test_float64_equals_scipy_row_by_row_on_real_activations(
    real_rows: torch.Tensor, k: int
) -> None:
    v = real_rows.double()
    h = fitted_h(v, k)
    w = NMF.from_components(h).transform(v)
    sample = slice(0, None, 5)
    ref = scipy_rows(h, v[sample])
    # Row-relative: |w - w_scipy| <= 1e-10 * max|w_scipy| (plus a floor for all-zero rows).
    scale = torch.amax(torch.abs(ref), dim=1, keepdim=True).clamp_min(1e-300)
    assert bool((torch.abs(w[sample] - ref) <= 1e-10 * scale).all())
    assert float(kkt_violation(h, v, w).max()) < 1e-9


@pytest.mark.parametrize("k", [2, 5, 9, 14])
def test_float64_equals_scipy_on_synthetic(k: int) -> None:
    # K = 14 is above the table limit: the pattern path of the fast solver.
    g = torch.Generator().manual_seed(k)
    h = torch.rand(k, 40, generator=g, dtype=F64) ** 3
    v = torch.rand(300, 40, generator=g, dtype=F64)
    w = solvers.nnls(h @ h.T, v @ h.T)
    ref = scipy_rows(h, v)
    scale = torch.amax(torch.abs(ref), dim=1, keepdim=True).clamp_min(1e-300)
    assert bool((torch.abs(w - ref) <= 1e-10 * scale).all())


@pytest.mark.parametrize("k", [4, 6, 8])
def test_float32_equals_reference_solver_on_real_activations(
    real_rows: torch.Tensor, k: int
) -> None:
    # Both solvers take the same float32 V H^T and the float64 H H^T of the float32 H (formed
    # in float64 since the review of 2026-12-07: in float32 near-duplicate concepts cycled)
    # and solve in float64, so they differ only by float64 rounding (<= 1e-12 of the row);
    # after the cast to float32 that is at most one rounding step: |dw| <= 2^-23 * max|w|.
    v = real_rows
    h = fitted_h(v, k).float()
    w = NMF.from_components(h).transform(v)
    assert w.dtype == torch.float32
    h64 = h.double()
    ref64 = solvers._nnls_bpp(h64 @ h64.T, v @ h.T)
    scale = torch.amax(torch.abs(ref64), dim=1, keepdim=True)
    assert bool((torch.abs(w.double() - ref64) <= 2.0**-23 * scale).all())
    fast64 = solvers.nnls(h64 @ h64.T, v @ h.T)
    assert bool((torch.abs(fast64 - ref64) <= 1e-12 * scale).all())


@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("steps", [0, 1, 3])
def test_masked_and_compacted_paths_and_any_step_count_agree(
    real_rows: torch.Tensor, compact: bool, steps: int
) -> None:
    # steps=0 sends every row the unconstrained guess leaves infeasible to the fallback.
    v = real_rows.double()
    h = fitted_h(v, 6)
    gram, cross = h @ h.T, v @ h.T
    ref = solvers._nnls_bpp(gram, cross)
    w = solvers.nnls(gram, cross, steps=steps, compact=compact)
    scale = torch.amax(torch.abs(ref), dim=1, keepdim=True).clamp_min(1e-300)
    assert bool((torch.abs(w - ref) <= 1e-12 * scale).all())


def test_fallback_is_used_for_the_rows_left_and_only_for_them(
    monkeypatch: pytest.MonkeyPatch, real_rows: torch.Tensor
) -> None:
    v = real_rows.double()
    h = fitted_h(v, 8)
    gram, cross = h @ h.T, v @ h.T
    seen: list[int] = []
    original = solvers._nnls_bpp

    def counting(g: torch.Tensor, b: torch.Tensor, **kw: Any) -> torch.Tensor:
        seen.append(int(b.shape[0]))
        return original(g, b, **kw)

    monkeypatch.setattr(solvers, "_nnls_bpp", counting)
    w0 = solvers.nnls(gram, cross, steps=0, compact=False)
    z = cross @ torch.linalg.pinv(gram, hermitian=True)
    assert seen  # some rows, not all
    assert 0 < seen[0] < int((~(z > 0).all(dim=1)).sum())
    seen.clear()
    w3 = solvers.nnls(gram, cross)
    assert seen == []  # three batched steps finish every real row
    assert torch.allclose(w0, w3, rtol=0, atol=1e-12 * float(w3.abs().max()))


# ------------------------------------------------------------ degenerate cases
def test_hand_checkable_identity_and_ties() -> None:
    # H = I: w = max(v, 0); exact zeros in the unconstrained solution are ties (0 is both
    # passive-optimal and active-optimal) and must come back exactly 0.
    gram = torch.eye(3, dtype=F64)
    cross = torch.tensor([[1.0, -2.0, 3.0], [-1.0, -1.0, 0.5], [0.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    for compact in (True, False):
        w = solvers.nnls(gram, cross, compact=compact)
        expected = torch.tensor(
            [[1.0, 0.0, 3.0], [0.0, 0.0, 0.5], [0.0, 0.0, 0.0], [0.0, 2.0, 0.0]], dtype=F64
        )
        assert torch.equal(w, expected)


def test_rows_equal_to_a_concept_get_that_concept_exactly() -> None:
    g = torch.Generator().manual_seed(1)
    h = torch.rand(5, 20, generator=g, dtype=F64)
    v = torch.cat([h, 2.5 * h[2:3], torch.zeros(1, 20, dtype=F64)])
    w = NMF.from_components(h).transform(v)
    expected = torch.cat([torch.eye(5, dtype=F64), 2.5 * torch.eye(5, dtype=F64)[2:3]])
    assert torch.allclose(w[:6], expected, rtol=0, atol=1e-12)
    assert torch.equal(w[6], torch.zeros(5, dtype=F64))  # all-zero row: exactly 0


@pytest.mark.parametrize("compact", [True, False])
def test_duplicated_zero_and_rank_deficient_concepts_are_solved_finite_and_optimal(
    compact: bool,
) -> None:
    g = torch.Generator().manual_seed(2)
    base = torch.rand(4, 30, generator=g, dtype=F64) ** 2
    cases = {
        "duplicated": torch.cat([base, base[1:2]]),  # concepts 1 and 4 equal
        "zero row": torch.cat([base, torch.zeros(1, 30, dtype=F64)]),
        "rank deficient": torch.cat([base, (base[0:1] + base[2:3]) / 2]),
    }
    v = torch.rand(200, 30, generator=g, dtype=F64)
    v[:3] = 0.0
    for name, h in cases.items():
        w = solvers.nnls(h @ h.T, v @ h.T, compact=compact)
        assert bool(torch.isfinite(w).all()), name
        assert bool((w >= 0).all()), name
        assert float(kkt_violation(h, v, w).max()) < 1e-9, name
        ref = scipy_rows(h, v)
        res = torch.sum((v - w @ h) ** 2, dim=1)
        res_ref = torch.sum((v - ref @ h) ** 2, dim=1)
        assert torch.allclose(res, res_ref, rtol=1e-10, atol=1e-12), name
        assert torch.equal(w[:3], torch.zeros(3, 5, dtype=F64)), name
    # The zero concept never gets weight (any weight there is wasted).
    h0 = cases["zero row"]
    assert torch.equal(solvers.nnls(h0 @ h0.T, v @ h0.T)[:, 4], torch.zeros(200, dtype=F64))


def test_from_components_with_duplicated_concepts_never_returns_nan() -> None:
    h = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    v = torch.tensor([[2.0, 1.0, 2.0], [0.0, 0.0, 0.0], [1.0, 0.0, 1.0]])
    w = NMF.from_components(h).transform(v)
    assert bool(torch.isfinite(w).all())
    assert torch.allclose(w @ h, v, atol=1e-6)  # exact fit: the duplicates share the weight


@pytest.mark.parametrize("as_numpy", [False, True])
def test_transform_refuses_nan_inf_negative_as_before(as_numpy: bool) -> None:
    model = NMF.from_components(torch.rand(2, 4, dtype=F64))
    x = torch.rand(10, 4, dtype=F64)
    for value, match in (
        (float("nan"), "Input X contains NaN"),
        (float("inf"), "Input X contains infinity"),
        (-1.0, "Negative values in data passed to NMF"),
    ):
        bad = x.clone()
        bad[7, 2] = value
        with pytest.raises(ValueError, match=match):
            model.transform(bad.numpy() if as_numpy else bad)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_folded_check_catches_nan_inf_where_the_concepts_are_zero(dtype: torch.dtype) -> None:
    # transform checks X inside its product pass: NaN / inf must show in X @ H^T even in a
    # column every concept ignores (IEEE: NaN * 0 and inf * 0 are NaN).
    h = torch.tensor([[1.0, 0.0, 2.0, 1.0], [0.5, 0.0, 0.0, 1.0]], dtype=dtype)
    model = NMF.from_components(h)
    x = torch.rand(50, 4, dtype=dtype)
    for value, match in (
        (float("nan"), "Input X contains NaN"),
        (-float("nan"), "Input X contains NaN"),  # a NaN with its sign bit set
        (float("inf"), "Input X contains infinity"),
        (-float("inf"), "Input X contains infinity"),
        (-1e-30, "Negative values in data passed to NMF"),
    ):
        bad = x.clone()
        bad[31, 1] = value
        with pytest.raises(ValueError, match=match):
            model.transform(bad)


def test_negative_zero_is_zero_and_an_overflowing_product_is_refused() -> None:
    h = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]])
    model = NMF.from_components(h)
    x = torch.rand(20, 3)
    signed = x.clone()
    signed[:, 0] = -0.0  # the flag goes up (sign bit), the exact check lets it through
    zero = signed.clone()
    zero[:, 0] = 0.0
    assert torch.equal(model.transform(signed), model.transform(zero))
    huge = torch.full((4, 3), 3e38)  # finite, but X @ H^T overflows float32
    with pytest.raises(ValueError, match="X @ H\\^T overflows torch.float32"):
        model.transform(huge)
    w = model.transform(huge.double())  # in float64 it is fine
    assert bool(torch.isfinite(w).all())


@pytest.mark.parametrize("compact", [True, False])
def test_blocked_solve_equals_one_block_and_the_reference(
    monkeypatch: pytest.MonkeyPatch, real_rows: torch.Tensor, compact: bool
) -> None:
    # Many small blocks and product chunks (rows set aside by several blocks, pivoted
    # together) give the one-block result; float64 equals the reference solver.
    v = real_rows.double()
    h = fitted_h(v, 8)
    factors = solvers.NNLSFactors(h @ h.T)
    pinv = factors.pinv
    whole, flag = solvers.solve_rows(v, h, pinv, factors, compact=compact)
    assert not bool(flag)
    monkeypatch.setattr(solvers, "_BLOCK_BYTES_CPU", 1)  # 1024-row blocks
    monkeypatch.setattr(solvers, "_CHUNK_BYTES_CPU", 1)  # 256-row product chunks
    monkeypatch.setattr(solvers, "_BLOCK_BYTES_DEVICE", 1)
    assert solvers.block_rows(8, v.device) == 1024
    blocked, flag = solvers.solve_rows(v, h, pinv, factors, compact=compact)
    assert not bool(flag)
    ref = solvers._nnls_bpp(h @ h.T, v @ h.T)
    scale = torch.amax(torch.abs(ref), dim=1, keepdim=True).clamp_min(1e-300)
    assert bool((torch.abs(blocked - ref) <= 1e-12 * scale).all())
    assert bool((torch.abs(blocked - whole) <= 1e-12 * scale).all())
    cross = v @ h.T
    for steps in (0, 3):  # steps=0: every row set aside goes to the fallback, across blocks
        w = solvers.nnls_factored(factors, cross, steps=steps, compact=compact)
        assert bool((torch.abs(w - ref) <= 1e-12 * scale).all())


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_maps_solve_equals_the_row_solve(
    real_rows: torch.Tensor, dtype: torch.dtype, channels_last: bool
) -> None:
    # attribute solves N x C x h x w activations from their own layout (one batched
    # H @ act[i] per image); the result is transform() of the rows, rearranged.
    x = real_rows[:768].to(dtype)  # 3 images of 16 x 16 locations
    h = fitted_h(real_rows.double(), 6).to(dtype)
    act = x.reshape(3, 16, 16, -1).permute(0, 3, 1, 2)  # N x C x h x w
    act = act.contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    model = NMF.from_components(h)
    maps = model._transform_maps(act)
    assert maps.shape == (3, 6, 16, 16)
    assert maps.dtype == dtype
    rows = model.transform(act.permute(0, 2, 3, 1).reshape(-1, act.shape[1]))
    expected = rows.reshape(3, 16, 16, 6).permute(0, 3, 1, 2)
    scale = float(expected.abs().max())
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert torch.allclose(maps, expected, rtol=0, atol=tol * scale)


def test_inputs_that_require_grad_are_solved_without_history() -> None:
    # Activations straight from a forward with autograd on: the solve runs on their values.
    h = torch.rand(2, 5, dtype=F64)
    model = NMF.from_components(h)
    x = torch.rand(20, 5, dtype=F64, requires_grad=True)
    w = model.transform(x)
    assert not w.requires_grad
    assert torch.equal(w, model.transform(x.detach()))
    act = torch.rand(2, 5, 3, 3, dtype=F64, requires_grad=True)
    maps = model._transform_maps(act)
    assert not maps.requires_grad
    assert torch.equal(maps, model._transform_maps(act.detach()))


def test_maps_solve_refuses_an_overflowing_product() -> None:
    model = NMF.from_components(torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
    act = torch.full((1, 2, 2, 2), 3e38)
    with pytest.raises(ValueError, match="overflows torch.float32"):
        model._transform_maps(act)
    assert bool(torch.isfinite(model._transform_maps(act.double())).all())


def test_averaged_products_solve_to_the_weights_of_the_averaged_rows(
    real_rows: torch.Tensor,
) -> None:
    # a slide run averages x H^T over the tiles covering a cell and solves from that mean:
    # the same weights as transform() of the averaged rows (the solve needs only x H^T)
    h = fitted_h(real_rows.double(), 6).float()
    model = NMF.from_components(h)
    x = real_rows[:1024].float()
    act = x.reshape(4, 16, 16, -1).permute(0, 3, 1, 2)  # 4 overlapping "tiles" of one place
    products = model._products_maps(act)
    assert products.shape == (4, 6, 16, 16)
    expected_products = (act.permute(0, 2, 3, 1) @ h.T).permute(0, 3, 1, 2)
    torch.testing.assert_close(products, expected_products, rtol=1e-5, atol=1e-5)
    mean_products = products.mean(0).permute(1, 2, 0).reshape(-1, 6)  # 256 x K
    w = model._transform_products(mean_products)
    assert w.shape == (256, 6)
    assert w.dtype == torch.float32
    expected = model.transform(act.mean(0).permute(1, 2, 0).reshape(-1, act.shape[1]))
    scale = float(expected.abs().max())
    assert torch.allclose(w, expected, rtol=0, atol=1e-5 * scale)
    # the maps solve is these two steps
    assert torch.equal(model._transform_maps(act), solve_in_two_steps(model, act))


def solve_in_two_steps(model: NMF, act: torch.Tensor) -> torch.Tensor:
    products = model._products_maps(act)
    n, k, hh, ww = products.shape
    rows = products.permute(0, 2, 3, 1).reshape(-1, k)
    w = model._transform_products(rows)
    return w.reshape(n, hh, ww, k).permute(0, 3, 1, 2)


def test_products_solve_refuses_overflowed_products() -> None:
    model = NMF.from_components(torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
    products = model._products_maps(torch.full((1, 2, 2, 2), 3e38))
    assert not bool(torch.isfinite(products).all())  # 6e38 overflows float32
    with pytest.raises(ValueError, match=r"X @ H\^T overflows torch.float32 \(products up to inf"):
        model._transform_products(products.permute(0, 2, 3, 1).reshape(-1, 2))


def test_solve_rows_flags_negative_and_non_finite_rows_without_raising() -> None:
    h = torch.rand(3, 5, dtype=F64)
    factors = solvers.NNLSFactors(h @ h.T)
    x = torch.rand(40, 5, dtype=F64)
    assert not bool(solvers.solve_rows(x, h, factors.pinv, factors)[1])
    for value in (-2.0, float("nan"), float("inf"), -0.0):
        bad = x.clone()
        bad[39, 4] = value
        assert bool(solvers.solve_rows(bad, h, factors.pinv, factors)[1]), value
    for half in (torch.float16, torch.bfloat16):  # any float width: the sign bit is on top
        xh = x.to(half)
        assert not bool(solvers.solve_rows(xh, h.to(half), factors.pinv.to(half), factors)[1])
        xh[5, 1] = -0.5
        assert bool(solvers.solve_rows(xh, h.to(half), factors.pinv.to(half), factors)[1])
    empty, flag = solvers.solve_rows(x[:0], h, factors.pinv, factors)
    assert empty.shape == (0, 3)
    assert not bool(flag)


def test_bfloat16_activations_are_solved_in_float32() -> None:
    g = torch.Generator().manual_seed(3)
    h = torch.rand(4, 16, generator=g)
    x = torch.rand(64, 16, generator=g).to(torch.bfloat16)
    model = NMF.from_components(h)
    w = model.transform(x)
    assert w.dtype == torch.float32
    assert torch.equal(w, model.transform(x.float()))


# ------------------------------------------------ device-agnostic kernels (on CPU)
class _Recorder(CallRecorder):
    """Also records integer matmuls and the calls that would synchronise a GPU with the host."""

    _MATMULS = ("matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "mv", "einsum")
    _SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "unique")

    def __init__(self) -> None:
        super().__init__()
        self.int_matmuls: list[str] = []
        self.syncs: list[str] = []

    def record(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().record(name, args, kwargs)
        flat = [*args, *kwargs.values()]
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        if name in self._MATMULS and any(not t.is_floating_point() for t in tensors):
            self.int_matmuls.append(name)
        if name in self._SYNCS:
            self.syncs.append(name)
        if name in ("__getitem__", "__setitem__") and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                self.syncs.append(f"{name}[bool]")


@contextmanager
def recording() -> Iterator[_Recorder]:
    with _Recorder() as rec:
        yield rec


def test_no_integer_matmul_anywhere_in_the_solvers() -> None:
    # CUDA has no integer matmul: the old ``passive.long() @ bits`` crashed there.
    g = torch.Generator().manual_seed(5)
    for k in (6, 14):  # table path and pattern path
        h = torch.rand(k, 24, generator=g, dtype=F64) ** 3
        v = torch.rand(100, 24, generator=g, dtype=F64)
        with recording() as rec:
            solvers.nnls(h @ h.T, v @ h.T, compact=False)
            solvers.nnls(h @ h.T, v @ h.T, compact=True, steps=0)
            solvers._nnls_bpp(h @ h.T, v @ h.T)
        assert rec.int_matmuls == []


def test_masked_path_synchronises_once_before_the_fallback(real_rows: torch.Tensor) -> None:
    v = real_rows.double()
    h = fitted_h(v, 6)
    factors = solvers.NNLSFactors(h @ h.T)
    cross = v @ h.T
    with recording() as rec:
        solvers.nnls_factored(factors, cross, compact=False)
    assert rec.syncs == ["nonzero"]  # the count of rows left for the fallback (none here)


def test_cuda_equals_cpu_and_syncs_once(real_rows: torch.Tensor, cuda: EmulatedCuda | None) -> None:
    v = real_rows
    h = fitted_h(v, 6).float()
    model = NMF.from_components(h.cuda())
    w = model.transform(v.cuda())
    ref = NMF.from_components(h).transform(v)
    assert torch.allclose(w.cpu(), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    factors = solvers.NNLSFactors((h @ h.T).cuda())
    cross = (v @ h.T).cuda()
    solvers.nnls_factored(factors, cross)  # warm-up
    if cuda is not None:  # emulated: no synchronisation to count (the CPU test counts the calls)
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            solvers.nnls_factored(factors, cross)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len([c for c in caught if "synchroniz" in str(c.message)]) <= 1


# ------------------------------------------------------------------ the cache
class _CountingFactors(solvers.NNLSFactors):
    built = 0

    def __init__(self, gram: torch.Tensor) -> None:
        type(self).built += 1
        super().__init__(gram)


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> type[_CountingFactors]:
    _CountingFactors.built = 0
    monkeypatch.setattr(solvers, "NNLSFactors", _CountingFactors)
    return _CountingFactors


def reference_w(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    h = h.to(x.dtype)
    return solvers._nnls_bpp(h @ h.T, x @ h.T).to(x.dtype)


def data(seed: int, n: int = 300, c: int = 12, k: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, k, generator=g, dtype=F64) ** 2) @ torch.rand(
        k, c, generator=g, dtype=F64
    ) + 0.05 * torch.rand(n, c, generator=g, dtype=F64)


def assert_fresh(model: NMF, x: torch.Tensor) -> None:
    """``transform`` solves with the model's current ``H``, not a stale one."""
    assert torch.allclose(model.transform(x), reference_w(model._h, x), rtol=0, atol=1e-10)


def test_factors_are_cached_per_h_device_and_dtype(counting: type[_CountingFactors]) -> None:
    x = data(0)
    model = NMF(3, random_state=0, max_iter=20).fit(x)
    built = counting.built
    model.transform(x)
    model.transform(x[:50])
    assert counting.built == built + 1  # one factorisation for two calls
    model.transform(x.float())  # another dtype: its own entry
    model.transform(x)
    assert counting.built == built + 2


def test_cache_invalidated_by_fit_partial_fit_update_and_assignments(
    counting: type[_CountingFactors],
) -> None:
    x, y = data(0), data(1)
    model = NMF(3, random_state=0, max_iter=20).fit(x)
    assert_fresh(model, x)
    stale = model.transform(y)

    model.fit(y)  # refit: new H
    assert_fresh(model, y)
    assert not torch.allclose(model.transform(y), stale)

    with pytest.warns(CaptumNMFWarning, match="starts a new stream"):
        model.partial_fit(x)  # first chunk of a new stream, after the fit
    assert_fresh(model, x)
    before = counting.built
    model.statistics(y)
    model.statistics(x)  # same H: the factors cached by transform serve both chunks
    assert counting.built == before
    model.partial_fit(y)  # statistics of y, then update: H moves
    assert_fresh(model, x)
    model.update(model.statistics(x))
    assert_fresh(model, x)

    model.start_stream(torch.rand(3, 12, dtype=F64))
    assert_fresh(model, x)

    with torch.no_grad():  # an in-place change of H is seen through its version counter
        model._h.mul_(torch.linspace(0.5, 2.0, 3, dtype=F64)[:, None])
    assert_fresh(model, x)

    model._h = torch.rand(3, 12, dtype=F64)  # any assignment of the concepts
    assert_fresh(model, x)

    before = counting.built
    model.transform(x)
    model.set_params(tol=1e-3)
    model.transform(x)
    assert counting.built == before + 1  # set_params dropped the factors


def test_loaded_and_unpickled_models_solve_with_their_own_h() -> None:
    x = data(0)
    model = NMF(3, random_state=0, max_iter=20).fit(x)
    model.transform(x)  # fills the cache
    assert len(model.__dict__["_nnls_cache"].entries) == 1
    clone = pickle.loads(pickle.dumps(model))
    assert clone.__dict__["_nnls_cache"].entries == {}  # derived data is not pickled
    assert torch.equal(clone.transform(x), model.transform(x))
    loaded = NMF.from_components(model.components_ * 2.0)
    assert_fresh(loaded, x)
    assert torch.allclose(loaded.transform(x) * 2.0, model.transform(x), atol=1e-10)


def test_distributed_style_workers_share_the_solve() -> None:
    # Workers started from the same H0 produce the statistics the driver would.
    x = data(0)
    driver = NMF(3, random_state=0).initialise_stream(x)
    worker = NMF(3, random_state=0).start_stream(driver._h)
    a, b = driver.statistics(x[:150]), worker.statistics(x[:150])
    assert torch.equal(a.wtw, b.wtw)
    assert torch.equal(a.wtv, b.wtv)
    w = reference_w(driver._h, x[:150])
    assert torch.allclose(a.wtw, (w.T @ w).double(), rtol=1e-12)


# ---- review of 2026-12-07 (third session)
def test_masked_pinv_pads_with_the_scale_of_the_gram() -> None:
    # pinv truncates relative to the largest eigenvalue: a pad of 1 next to a gram of 1e-20
    # dropped the passive block itself (its inverse came back 0).
    gram = torch.diag(torch.tensor([2.0, 3.0, 4.0], dtype=F64)) * 1e-20
    inverse = solvers._masked_pinv(gram, torch.tensor([[True, False, True]]))[0]
    expected = torch.diag(torch.tensor([0.5, 0.0, 0.25], dtype=F64)) * 1e20
    torch.testing.assert_close(inverse, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("scales", [[1e-7] * 6, [1e-155] * 6, [1.0, 1e-6, 1e6, 1e-12, 3.0, 1.0]])
def test_transform_is_scale_invariant_for_tiny_huge_and_mixed_concepts(
    scales: list[float],
) -> None:
    # NNLS is scale-equivariant: the weights for rows s_j H_j are w_j / s_j. Before: W = 0
    # or suboptimal for H * 1e-7 (161 of 300 rows), NaN for H * 1e-155, returned silently.
    g = torch.Generator().manual_seed(0)
    h = torch.rand(6, 32, generator=g, dtype=F64) ** 2
    h = h / torch.linalg.vector_norm(h, dim=1, keepdim=True)
    v = torch.rand(300, 32, generator=g, dtype=F64)
    s = torch.tensor(scales, dtype=F64)
    w1 = NMF.from_components(h).transform(v)
    ws = NMF.from_components(h * s[:, None]).transform(v)
    assert bool(torch.isfinite(ws).all())
    torch.testing.assert_close(ws * s, w1, rtol=1e-9, atol=1e-12 * float(w1.max()))
    ref = scipy_rows(h, v)
    scale = torch.amax(ref, dim=1, keepdim=True).clamp_min(1e-300)
    assert bool((torch.abs(ws * s - ref) <= 1e-10 * scale).all())


def test_weights_that_overflow_their_dtype_are_refused_not_returned() -> None:
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0]]) * 1e-37  # float32: W ~ 1e39 overflows
    with pytest.raises(ValueError, match="The weights W overflow torch.float32: the concepts"):
        NMF.from_components(h).transform(torch.full((3, 2), 100.0))
    w = NMF.from_components(h.double()).transform(torch.full((3, 2), 100.0, dtype=F64))
    torch.testing.assert_close(w, torch.full((3, 2), 1e39, dtype=F64))


def test_float32_near_duplicate_concepts_are_solved_exactly() -> None:
    # H H^T of float32 concepts is formed in float64: in float32 two concepts 3e-5 apart lost
    # their difference, pivoting cycled (a ConvergenceWarning) and W was 1e-5 suboptimal.
    g = torch.Generator().manual_seed(0)
    base = torch.rand(6, 40, generator=g, dtype=F64) ** 2
    base = base / base.norm(dim=1, keepdim=True)
    v = (torch.rand(300, 40, generator=g, dtype=F64) ** 2).float()
    d = torch.rand(1, 40, generator=g, dtype=F64)
    h = torch.cat([base, base[1:2] + 3e-5 * d]).float()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = NMF.from_components(h).transform(v)
    h64, v64 = h.double(), v.double()
    ours = torch.sum((v64 - w.double() @ h64) ** 2, dim=1)
    ref = torch.sum((v64 - scipy_rows(h64, v64) @ h64) ** 2, dim=1)
    assert bool((ours - ref <= 1e-6 * torch.sum(v64**2, dim=1)).all())
