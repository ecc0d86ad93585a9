"""Pure tensor kernels of the NMF solver: no estimator state, no hooks, no I/O.

Notation follows the paper: ``V`` (n x C) holds one feature vector per row,
``H`` (K x C) the concept vectors and ``W`` (n x K) the concept intensities, with
``V ~ W H``. The objective is ``0.5 * ||V - W H||_F^2``. Every kernel keeps ``W``
transposed (``Wt``, K x n) so that each HALS coordinate update works on a
contiguous row.

Why hand-written: scikit-learn's NMF is NumPy/Cython on one device and holds
the whole matrix; it cannot stream sufficient statistics nor run on CUDA, and
``scipy.optimize.nnls`` solves one row at a time in Python. The kernels below
are the standard algorithms, vectorised over rows in torch:

* HALS / accelerated HALS (Cichocki & Phan 2009; Gillis & Glineur 2012) for
  the alternating updates;
* block principal pivoting (Kim & Park 2011) for the exact non-negative
  least-squares solve with a fixed ``H``;
* NNDSVD(a) initialisation (Boutsidis & Gallopoulos 2008) on a randomised SVD
  (Halko, Martinsson & Tropp 2011).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from sklearn.exceptions import ConvergenceWarning
from torch import Tensor

__all__ = [
    "block_rows",
    "hals_sweeps",
    "mean",
    "objective_from_products",
    "nndsvd_init",
    "NNLSFactors",
    "nnls",
    "nnls_factored",
    "objective_from_stats",
    "overflow_message",
    "random_init",
    "randomized_svd",
    "row_sq_norms",
    "products_maps",
    "solve_maps",
    "solve_products",
    "solve_rows",
    "sq_norm",
]

_INNER_DELTA = 0.01  # accelerated-HALS inner stop: change below 1 % of the first change
_MAX_PACKED = 62  # passive sets of up to this many concepts are packed into int64 codes
_CD_SWEEPS = 2000  # coordinate-descent sweeps for the rare rows where pivoting cycles
_SOLVE_BLOCK_ELEMENTS = 1 << 22  # gathered K x K inverses per block of rows (32 MiB in float64)


def hals_sweeps(
    x: Tensor, gram: Tensor, cross: Tensor, max_sweeps: int, *, delta: float = _INNER_DELTA
) -> Tensor:
    """Improve ``x >= 0`` for ``min 0.5 tr(x^T gram x) - tr(x^T cross)`` by HALS sweeps.

    Each sweep updates the rows of ``x`` one after the other in closed form
    (``x_k <- max(0, x_k + (cross_k - gram_k x) / gram_kk)``). Sweeps stop
    early once a sweep changes ``x`` by less than ``delta`` times the change
    made by the first sweep (accelerated HALS).

    Args:
        x (Tensor): K x m current iterate; updated in place and returned.
        gram (Tensor): K x K symmetric positive semi-definite matrix.
        cross (Tensor): K x m matrix.
        max_sweeps (int): maximum number of sweeps.
        delta (float, optional): relative early-stopping threshold.
                    Default: 0.01

    Returns:
        *Tensor*: ``x`` after the sweeps.
    """
    k = x.shape[0]
    diag = torch.diagonal(gram).tolist()
    xt = x.T  # x^T g_j is one matrix-vector product over the rows of x
    first_change = 0.0
    for sweep in range(max_sweeps):
        before = x.clone()
        for j in range(k):
            if diag[j] <= 0.0:
                continue
            # x_j <- max(0, x_j + (cross_j - g_j x) / g_jj), fused into in-place ops.
            new = torch.addmv(cross[j], xt, gram[j], alpha=-1.0)
            new.div_(diag[j]).add_(x[j]).clamp_(min=0.0)
            x[j] = new
        change = float(torch.sum((x - before) ** 2))
        if sweep == 0:
            first_change = change
        elif change <= delta * delta * first_change:
            break
    return x


def objective_from_stats(sq_norm: float | Tensor, h: Tensor, wtw: Tensor, wtv: Tensor) -> Tensor:
    """Return ``||V - W H||_F^2`` from ``||V||^2``, ``W^T W`` and ``W^T V``.

    Uses ``||V - WH||^2 = ||V||^2 - 2 <H, W^T V> + <H H^T, W^T W>``, so the
    objective of a streamed fit is known without the rows.

    Returns:
        *Tensor*: a 0-d float64 tensor, clamped at 0.
    """
    h64 = h.double()
    value = (
        torch.as_tensor(sq_norm, dtype=torch.float64, device=h.device)
        - 2.0 * torch.sum(h64 * wtv.double())
        + torch.sum((h64 @ h64.T) * wtw.double())
    )
    return torch.clamp_min(value, 0.0)


def sq_norm(v: Tensor, *, block_elements: int = 1 << 20) -> Tensor:
    """``||v||_F^2`` as a float64 0-d tensor, accumulated in float64 by row blocks.

    Each block of about ``block_elements`` entries (8 MiB in float64) is cast to
    float64 and reduced with one dot product, so no square is formed in ``v``'s
    dtype: float32 rows up to its largest value (3.4e38) give the exact finite
    sum, where squaring in float32 overflowed from 1.8e19 on. There is never a
    float64 copy of the whole of ``v``.
    """
    total = torch.zeros((), dtype=torch.float64, device=v.device)
    rows_per_block = max(1, block_elements // max(1, v.shape[1] if v.ndim > 1 else 1))
    for start in range(0, v.shape[0], rows_per_block):
        flat = v[start : start + rows_per_block].reshape(-1).double()
        total += torch.dot(flat, flat)
    return total


def overflow_message(
    dtype: torch.dtype,
    largest: float,
    *,
    product: str = "X @ H^T overflows",
    what: str = "entries",
    fix: str | None = None,
) -> str:
    """The message of a product of finite rows that overflowed ``dtype`` (one wording everywhere).

    Args:
        dtype (torch.dtype): the dtype the product was formed in.
        largest (float): the largest value of what was multiplied (``what``).
        product (str, optional): the product and its verb, e.g. ``"X @ H^T overflows"``.
                    Default: ``"X @ H^T overflows"``
        what (str, optional): what ``largest`` is the largest of.
                    Default: ``"entries"``
        fix (str, optional): the end of the message. None: use float64, or for
                    float64 rescale.
                    Default: None

    Returns:
        *str*: e.g. ``"X @ H^T overflows torch.float32 (entries up to 3e+38); pass X in
        float64 or rescale it."``
    """
    if fix is None:
        fix = (
            "; rescale X (divide it by a constant)."
            if dtype == torch.float64
            else "; pass X in float64 or rescale it."
        )
    return f"{product} {dtype} ({what} up to {largest:.3g}){fix}"


def row_sq_norms(v: Tensor, *, block_elements: int = 1 << 20) -> Tensor:
    """``||v_i||^2`` of every row as float64 (n), by row blocks (no float64 copy of ``v``).

    Returns:
        *Tensor*: n float64 squared norms, on ``v``'s device.
    """
    n = int(v.shape[0])
    out = torch.empty(n, dtype=torch.float64, device=v.device)
    rows_per_block = max(1, block_elements // max(1, int(v.shape[1])))
    for start in range(0, n, rows_per_block):
        part = v[start : start + rows_per_block].double()
        out[start : start + rows_per_block] = (part * part).sum(dim=1)
    return out


def mean(v: Tensor, *, block: int = 1 << 16) -> Tensor:
    """Mean of all entries as a float64 0-d tensor, by row blocks (no float64 copy of ``v``)."""
    total = torch.zeros((), dtype=torch.float64, device=v.device)
    for start in range(0, v.shape[0], block):
        total += torch.sum(v[start : start + block]).double()
    return total / max(v.numel(), 1)


def objective_from_products(sq_norm: Tensor, wt: Tensor, p: Tensor, hht: Tensor) -> Tensor:
    """``||V - W H||_F^2`` from ``||V||^2``, ``Wt`` (K x n), ``P = H V^T`` and ``H H^T``.

    ``||V||^2 - 2 <W, V H^T> + <W^T W, H H^T>`` with every reduction over the n rows done
    in float64, so unlike the form with a float32 ``W^T V`` it does not lose the
    residual to cancellation; it costs O(nK), no pass over ``V``.

    Returns:
        *Tensor*: a 0-d float64 tensor, clamped at 0.
    """
    w64 = wt.double()
    cross = torch.sum(w64 * p.double())
    quad = torch.sum((w64 @ w64.T) * hht.double())
    return torch.clamp_min(sq_norm.double() - 2.0 * cross + quad, 0.0)


def randomized_svd(
    v: Tensor,
    rank: int,
    *,
    generator: torch.Generator,
    n_oversamples: int = 10,
    n_iter: int = 4,
) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated SVD ``V ~ U diag(S) Vt`` by a seeded randomised range finder.

    Args:
        v (Tensor): n x C matrix.
        rank (int): number of singular triplets.
        generator (torch.Generator): CPU generator, so results do not depend
                    on the device.
        n_oversamples (int, optional): extra random directions. Default: 10
        n_iter (int, optional): power iterations. Default: 4

    Returns:
        *tuple[Tensor, Tensor, Tensor]*: ``U`` (n x rank), ``S`` (rank),
        ``Vt`` (rank x C), signs fixed so the largest entry of each ``Vt`` row
        is positive.

    Raises:
        ValueError: a product of finite ``v`` overflows its dtype.
    """
    n, c = v.shape
    width = min(rank + n_oversamples, n, c)
    omega = torch.randn(c, width, generator=generator, dtype=torch.float64)
    q = torch.linalg.qr(v @ omega.to(device=v.device, dtype=v.dtype)).Q
    for _ in range(n_iter):
        q = torch.linalg.qr(v.T @ q).Q
        q = torch.linalg.qr(v @ q).Q
    small = (q.T @ v).double()
    if not bool(torch.isfinite(small).all()):  # X @ Omega overflowed X's dtype (X is finite)
        raise ValueError(
            overflow_message(
                v.dtype, float(v.max()), product="A product of X in the fit (its SVD) overflows"
            )
        )
    u_small, s, vt = torch.linalg.svd(small, full_matrices=False)
    u = q.double() @ u_small
    u, s, vt = u[:, :rank], s[:rank], vt[:rank]
    rows = torch.arange(vt.shape[0], device=vt.device)
    signs = torch.sign(vt[rows, torch.argmax(torch.abs(vt), dim=1)])
    signs[signs == 0] = 1.0
    return u * signs, s, vt * signs[:, None]


def nndsvd_init(
    v: Tensor, rank: int, *, generator: torch.Generator, fill_average: bool
) -> tuple[Tensor, Tensor]:
    """NNDSVD initialisation; with ``fill_average`` zeros become ``mean(V)`` (NNDSVDa).

    Returns:
        *tuple[Tensor, Tensor]*: ``Wt`` (rank x n) and ``H`` (rank x C) in ``v``'s dtype.
    """
    u, s, vt = randomized_svd(v, rank, generator=generator)
    wt = torch.zeros(rank, v.shape[0], dtype=torch.float64, device=v.device)
    h = torch.zeros(rank, v.shape[1], dtype=torch.float64, device=v.device)
    wt[0] = torch.sqrt(s[0]) * torch.abs(u[:, 0])
    h[0] = torch.sqrt(s[0]) * torch.abs(vt[0])
    for j in range(1, rank):
        x, y = u[:, j], vt[j]
        xp, yp = torch.clamp_min(x, 0), torch.clamp_min(y, 0)
        xn, yn = torch.clamp_min(-x, 0), torch.clamp_min(-y, 0)
        xpn, ypn = torch.linalg.vector_norm(xp), torch.linalg.vector_norm(yp)
        xnn, ynn = torch.linalg.vector_norm(xn), torch.linalg.vector_norm(yn)
        mp, mn = xpn * ypn, xnn * ynn
        if mp > mn:
            uu, vv, sigma = xp / xpn, yp / ypn, mp
        else:
            uu, vv, sigma = xn / xnn.clamp_min(1e-300), yn / ynn.clamp_min(1e-300), mn
        lbd = torch.sqrt(s[j] * sigma)
        wt[j], h[j] = lbd * uu, lbd * vv
    eps = 1e-6
    wt[wt < eps] = 0.0
    h[h < eps] = 0.0
    if fill_average:
        avg = mean(v)
        wt[wt == 0] = avg
        h[h == 0] = avg
    return wt.to(v.dtype), h.to(v.dtype)


def random_init(v: Tensor, rank: int, *, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Scaled uniform-magnitude random initialisation (scikit-learn's ``init="random"``).

    Returns:
        *tuple[Tensor, Tensor]*: ``Wt`` (rank x n) and ``H`` (rank x C) in ``v``'s dtype.
    """
    avg = math.sqrt(float(mean(v)) / rank)
    h = avg * torch.abs(torch.randn(rank, v.shape[1], generator=generator, dtype=torch.float64))
    wt = avg * torch.abs(torch.randn(rank, v.shape[0], generator=generator, dtype=torch.float64))
    return wt.to(device=v.device, dtype=v.dtype), h.to(device=v.device, dtype=v.dtype)


def _pattern_bits(k: int, device: torch.device) -> Tensor:
    """``[1, 2, 4, ..., 2^(k-1)]`` as int64: a passive set's code is ``(mask * bits).sum(1)``."""
    return torch.ones(k, dtype=torch.long, device=device) << torch.arange(k, device=device)


def _masked_pinv(gram: Tensor, patterns: Tensor) -> Tensor:
    """``pinv(gram_FF)`` embedded in K x K (zero off F) for each boolean pattern F (P x K)."""
    m = patterns.to(gram.dtype)
    outer = m.unsqueeze(2) * m.unsqueeze(1)
    # pinv(blockdiag(G_FF, g I)) masked back to F x F is pinv(G_FF) embedded in K x K. The pad
    # g is max(diag(gram)), not 1: pinv drops eigenvalues below a tolerance relative to the
    # largest one, so a pad of 1 next to a gram of scale 1e-14 truncated G_FF itself.
    pad = torch.amax(torch.abs(torch.diagonal(gram))).clamp_min(torch.finfo(gram.dtype).tiny)
    inverses: Tensor = torch.linalg.pinv(
        gram * outer + torch.diag_embed((1.0 - m) * pad), hermitian=True
    )
    return inverses * outer


def _solve_passive(gram: Tensor, cross: Tensor, passive: Tensor) -> Tensor:
    """Solve ``gram_FF x_F = cross_F`` row by row with ``x = 0`` off the passive set F.

    Each distinct passive pattern costs one small pseudo-inverse (all of them in
    one batched call); each row then costs one K x K matrix-vector product.
    ``torch.unique`` synchronises with the host: this is the reference path
    (and the path for K above ``_TABLE_MAX_K``), not the hot one.
    """
    n, k = cross.shape
    x = torch.zeros_like(cross)
    if n == 0:
        return x
    if k <= _MAX_PACKED:  # one int64 code per row: a 1-D unique, much cheaper than dim=0
        bits = _pattern_bits(k, passive.device)
        # Elementwise product and sum, not ``passive.long() @ bits``: CUDA has no integer matmul.
        codes, inverse = torch.unique((passive.long() * bits).sum(dim=1), return_inverse=True)
        patterns = (codes.unsqueeze(1) & bits) != 0
    else:
        patterns, inverse = torch.unique(passive, dim=0, return_inverse=True)
    inverses = _masked_pinv(gram, patterns)
    block = max(1, _SOLVE_BLOCK_ELEMENTS // (k * k))
    for start in range(0, n, block):
        rows = slice(start, start + block)
        x[rows] = torch.einsum("nij,nj->ni", inverses[inverse[rows]], cross[rows])
    return x


def _nnls_bpp(gram: Tensor, cross: Tensor, *, max_iter: int | None = None) -> Tensor:
    """Block principal pivoting with one pseudo-inverse per distinct passive set.

    The solver :func:`nnls` used before the fixed-H fast path, kept as its exact
    fallback for the rare rows that the batched steps leave unfinished, and as
    the reference of the tests. Same arguments and result as :func:`nnls`.
    Synchronises with the host (``torch.unique``, the convergence test) at every
    pivoting iteration.
    """
    g = gram.double()
    b = cross.double()
    n, k = b.shape
    if max_iter is None:
        max_iter = 10 * k + 20
    # Start from the support of the unconstrained solution.
    passive = (b @ torch.linalg.pinv(g, hermitian=True)) > 0
    x = _solve_passive(g, b, passive)
    tol_x, tol_y, scale = _tolerances(g, b)
    alpha = torch.full((n,), 3, dtype=torch.long, device=b.device)
    beta = torch.full((n,), k + 1, dtype=torch.long, device=b.device)
    rows = torch.arange(n, device=b.device)
    for _ in range(max_iter):
        xr, br, pr = x[rows], b[rows], passive[rows]
        infeasible = _infeasible(g, xr, br, pr, tol_x[rows], tol_y[rows])
        n_inf = infeasible.sum(dim=1)
        todo = n_inf > 0
        if not bool(todo.any()):
            rows = rows[:0]
            break
        rows, infeasible, n_inf = rows[todo], infeasible[todo], n_inf[todo]
        passive[rows], alpha[rows], beta[rows] = _exchange(
            passive[rows], infeasible, n_inf, alpha[rows], beta[rows]
        )
        x[rows] = _solve_passive(g, b[rows], passive[rows])
    x = torch.clamp_min(x, 0.0)
    if rows.numel() > 0:
        # Pivoting can cycle in floating point on (nearly) degenerate rows. Finish those
        # few rows by exact coordinate descent (HALS sweeps on their transpose), which
        # converges on any convex QP; delta=0 runs until a sweep changes nothing.
        xt = x[rows].T.contiguous()
        x[rows] = hals_sweeps(xt, g, b[rows].T.contiguous(), _CD_SWEEPS, delta=0.0).T
        y = x[rows] @ g - b[rows]
        slack = 1e-6 * scale[rows]
        bad = ((x[rows] > 0) & (torch.abs(y) > slack)) | ((x[rows] == 0) & (y < -slack))
        n_bad = int(bad.any(dim=1).sum())
        if n_bad:
            warnings.warn(
                f"NNLS did not converge for {n_bad} of {n} rows ({max_iter} pivoting "
                f"iterations, then {_CD_SWEEPS} coordinate-descent sweeps); their "
                "solutions are the best non-negative iterates found.",
                ConvergenceWarning,
                stacklevel=3,
            )
    return x


def _tolerances(g: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """KKT tolerances ``tol_x``, ``tol_y`` (n x 1) relative to each row's scale, and the scale."""
    scale = torch.amax(torch.abs(b), dim=1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)
    gmax = torch.amax(torch.abs(torch.diagonal(g))).clamp_min(torch.finfo(g.dtype).tiny)
    tol_y = 1e-10 * scale
    return tol_y / gmax, tol_y, scale


def _infeasible(g: Tensor, x: Tensor, b: Tensor, p: Tensor, tol_x: Tensor, tol_y: Tensor) -> Tensor:
    """KKT violations of ``x`` with passive set ``p``: negative passive or descent direction."""
    y = torch.addmm(b, x, g, alpha=1.0, beta=-1.0)  # x G - b, the gradient (G symmetric)
    return (p & (x < -tol_x)) | (~p & (y < -tol_y))


def _exchange(
    passive: Tensor, infeasible: Tensor, n_inf: Tensor, alpha: Tensor, beta: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One block-principal-pivoting exchange (Kim & Park 2011), row by row, without branches.

    Rows whose number of infeasible variables fell below their best so far (or
    still have back-up credit ``alpha``) swap all of them; the others swap only
    the infeasible variable of largest index (the backup rule that guarantees
    termination). Rows without infeasible variables keep their passive set.
    """
    k = passive.shape[1]
    better = n_inf < beta
    full = better | (alpha >= 1)
    alpha = torch.where(better, 3, torch.where(alpha >= 1, alpha - 1, alpha))
    beta = torch.where(better, n_inf, beta)
    last = (k - 1) - torch.argmax(torch.flip(infeasible, dims=[1]).to(torch.uint8), dim=1)
    columns = torch.arange(k, device=passive.device)
    single = (columns == last.unsqueeze(1)) & infeasible  # no one_hot: no range check
    return passive ^ torch.where(full.unsqueeze(1), infeasible, single), alpha, beta


# --------------------------------------------------------------- fixed-H fast path
_TABLE_MAX_K = 12  # all 2^K passive-set solves precomputed up to here (4096 x 12 x 12)
_FAST_STEPS = 3  # batched pivoting steps before the rare remaining rows go to _nnls_bpp
# Rows per solve block: the block's gathered K x K matrices (K * K * 8 bytes a row) take
# about this many bytes, so on a CPU every temporary of a block stays in the L3 cache.
# Measured on 2 cores, 1M x 512, K = 6: 4 MiB blocks 1.6x faster than one pass over all rows
# (where every n x K temporary is a fresh, page-faulting allocation).
_BLOCK_BYTES_CPU = 1 << 24
_BLOCK_BYTES_DEVICE = 1 << 28  # off the CPU: few, large blocks (one host sync per block)
# Rows of X per product chunk on a CPU (8 MiB): the value check reads the chunk right after
# the product, from the cache, instead of making a second pass over X in memory.
_CHUNK_BYTES_CPU = 1 << 23


def block_rows(k: int, device: torch.device) -> int:
    """Rows per block of the fixed-``H`` solve for K concepts on ``device``."""
    budget = _BLOCK_BYTES_CPU if device.type == "cpu" else _BLOCK_BYTES_DEVICE
    per_row = 8 * k * k if k <= _TABLE_MAX_K else 8 * k * 4
    return max(1024, budget // per_row)


class NNLSFactors:
    """What :func:`nnls_factored` needs of a fixed ``gram = H H^T``, computed once per ``H``.

    Holds ``gram`` in float64, its pseudo-inverse (the unconstrained solution
    of every row is one n x K by K x K product) and, for K up to 12, one K x K
    matrix ``S_F`` per passive set F (all ``2^K`` of them) that gives, from a
    row's ``b``, the KKT quantities of its passive-set solution in one
    product ``u = S_F b``:

    * ``u_j = x_j`` for ``j`` in F, where ``x_F = pinv(gram_FF) b_F`` (the
      same batched pseudo-inverses as the reference solver's);
    * ``u_j = y_j / max(diag(gram))`` off F, ``y = gram x - b`` being the
      gradient (which must be ``>= 0`` there).

    So ``u < -tol`` marks the KKT violations of both kinds with one
    comparison (the reference solver's tolerances: ``1e-10`` of the row's
    largest ``|b|``, divided by ``max(diag(gram))`` for ``x``), and
    ``x = u * F``. Building the table is one batched pseudo-inverse of
    ``2^K`` K x K matrices (K = 12: 4096 matrices, 4.7 MB).

    Args:
        gram (Tensor): K x K symmetric positive semi-definite matrix.
    """

    def __init__(self, gram: Tensor) -> None:
        g = gram.detach().double()
        k = int(g.shape[0])
        self.gram = g
        self.k = k
        self.pinv = torch.linalg.pinv(g, hermitian=True)
        self.gmax = torch.amax(torch.abs(torch.diagonal(g))).clamp_min(torch.finfo(g.dtype).tiny)
        self.bits = _pattern_bits(k, g.device)
        # The same powers of two in float32: a passive set's code is one float matrix-vector
        # product (exact: codes stay below 2^13 where the table is used), not an integer one
        # (CUDA has no integer matmul).
        self.bit_values = self.bits.float()
        self.table: Tensor | None = None
        if k <= _TABLE_MAX_K:
            codes = torch.arange(1 << k, dtype=torch.long, device=g.device)
            patterns = (codes.unsqueeze(1) & self.bits) != 0
            t = _masked_pinv(g, patterns)  # x = t b
            eye = torch.eye(k, dtype=g.dtype, device=g.device)
            r = (g @ t - eye) / self.gmax  # y / gmax = r b
            s = torch.where(patterns.unsqueeze(2), t, r)
            # table[F] = S_F^T: a row's u^T = b^T S_F^T is one batched (1 x K) @ (K x K)
            # product over the gathered matrices (measured faster than embedding_bag).
            self.table = s.transpose(1, 2).contiguous()

    def kkt(self, b: Tensor, passive: Tensor, work: _Work | None = None) -> Tensor:
        """``u`` (n x K): passive-set solution on F, scaled gradient off F, for each row.

        With ``work`` (K <= 12) the gathered matrices and ``u`` are written into
        its buffers (``u`` is a view of ``work.u``) instead of fresh allocations.
        """
        if self.table is None:  # K > 12: a pseudo-inverse per pattern
            x = _solve_passive(self.gram, b, passive)
            y = torch.addmm(b, x, self.gram, alpha=1.0, beta=-1.0).div_(self.gmax)
            return torch.where(passive, x, y)
        code = (_mask(passive, torch.float32) @ self.bit_values).long()
        if work is None:
            return torch.bmm(b.unsqueeze(1), self.table.index_select(0, code)).squeeze(1)
        n = b.shape[0]
        gathered = torch.index_select(self.table, 0, code, out=work.gathered[:n])
        u = work.u[:n]
        torch.bmm(b.unsqueeze(1), gathered, out=u.unsqueeze(1))
        return u


@dataclass
class _Work:
    """Buffers reused by every block of one call: no allocation (and page faults) per block."""

    gathered: Tensor  # rows x K x K float64
    u: Tensor  # rows x K float64

    @classmethod
    def for_rows(cls, rows: int, factors: NNLSFactors) -> _Work | None:
        if factors.table is None:
            return None
        k, device = factors.k, factors.gram.device
        return cls(
            torch.empty(rows, k, k, dtype=torch.float64, device=device),
            torch.empty(rows, k, dtype=torch.float64, device=device),
        )


def nnls(
    gram: Tensor,
    cross: Tensor,
    *,
    max_iter: int | None = None,
    steps: int = _FAST_STEPS,
    compact: bool | None = None,
) -> Tensor:
    """Exact non-negative least squares for many right-hand sides and one ``gram``.

    Solves ``min_{w >= 0} 0.5 w^T gram w - cross_i^T w`` for every row
    ``cross_i`` of ``cross``: :func:`nnls_factored` with ``NNLSFactors(gram)``.
    With ``gram = H H^T`` and ``cross = V H^T`` this is ``min_W>=0 ||V - W H||``
    with ``H`` fixed.

    Args:
        gram (Tensor): K x K symmetric positive semi-definite matrix.
        cross (Tensor): n x K matrix.
        max_iter (int, optional): as in :func:`nnls_factored`.
                    Default: ``10 * K + 20``
        steps (int, optional): as in :func:`nnls_factored`. Default: 3
        compact (bool, optional): as in :func:`nnls_factored`.
                    Default: None (True on CPU, False elsewhere)

    Returns:
        *Tensor*: n x K non-negative float64 solution.
    """
    return nnls_factored(NNLSFactors(gram), cross, max_iter=max_iter, steps=steps, compact=compact)


def nnls_factored(
    factors: NNLSFactors,
    cross: Tensor,
    *,
    guess: Tensor | None = None,
    max_iter: int | None = None,
    steps: int = _FAST_STEPS,
    compact: bool | None = None,
) -> Tensor:
    """Exact non-negative least squares with the precomputed factors of a fixed ``gram``.

    Solves ``min_{w >= 0} 0.5 w^T gram w - cross_i^T w`` for every row
    ``cross_i`` of ``cross``, ``gram`` being ``factors.gram``; all in
    float64. Block principal pivoting (Kim & Park 2011) for all rows at once,
    driven by masks, block of rows by block of rows (:func:`block_rows`):

    1. every row starts from the passive set of its unconstrained solution
       ``cross @ pinv(gram)``; one gathered K x K product per row
       (:meth:`NNLSFactors.kkt`) gives its passive-set solution and KKT
       violations: no ``torch.unique``, no per-pattern inverse;
    2. ``steps`` pivoting steps for the rows that violate KKT (the usual
       exchange with Kim & Park's backup rule);
    3. one count of the rows still violating KKT (rare: ties within
       rounding, cycling); they are solved by the reference solver
       :func:`_nnls_bpp`, which ends with exact coordinate descent. This
       count is the only host synchronisation of a block when ``compact``
       is off.

    With ``compact`` the rows that satisfy KKT leave the working set after
    each step (worth it on a CPU, where counting rows costs nothing); without,
    every step touches every row (fixed shapes, nothing to wait for on a GPU).
    Both give the same result.

    Args:
        factors (NNLSFactors): ``NNLSFactors(gram)``, e.g. cached per ``H``.
        cross (Tensor): n x K matrix, on the factors' device.
        guess (Tensor, optional): n x K approximation, in any floating dtype,
                    of the unconstrained solution ``cross @ pinv(gram)``
                    (e.g. ``V @ (H^T pinv(gram))`` from the same pass over V
                    as ``cross``); only its signs are used, as the starting
                    passive sets, so its precision does not matter.
                    Default: None (computed from ``cross`` in float64)
        max_iter (int, optional): pivoting iterations of the fallback before it
                    switches to coordinate descent (and, if that does not
                    converge either, warns with a ``ConvergenceWarning``).
                    Default: ``10 * K + 20``
        steps (int, optional): batched pivoting steps before the fallback.
                    Default: 3
        compact (bool, optional): drop finished rows after each step.
                    Default: None (True on CPU, False elsewhere)

    Returns:
        *Tensor*: n x K non-negative float64 solution.
    """
    n, k = cross.shape
    if compact is None:
        compact = cross.device.type == "cpu"
    x = torch.empty(n, k, dtype=torch.float64, device=cross.device)
    block = block_rows(k, cross.device)
    work = _Work.for_rows(min(n, block), factors)
    pending: list[_Pending] = []
    for start in range(0, n, block):
        rows = slice(start, start + block)
        b = cross[rows].double()
        passive = (b @ factors.pinv if guess is None else guess[rows]) > 0
        if compact:
            x[rows], left = _first_step(factors, b, passive, work, None, start)
            pending.append(left)
        else:
            x[rows] = _solve_block(factors, b, passive, steps, max_iter, work)
    if pending:
        _finish(factors, pending, x, steps, max_iter, work)
    return x


def solve_rows(
    x: Tensor,
    h: Tensor,
    pinv: Tensor,
    factors: NNLSFactors,
    *,
    dtype: torch.dtype = torch.float64,
    steps: int = _FAST_STEPS,
    compact: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """``argmin_{W >= 0} ||X - W H||`` for a fixed ``H``, with the cheap half of the input check.

    One pass over ``X``: block by block, ``X H^T`` (in ``X``'s dtype) and the
    guess ``(X H^T) pinv`` of the starting passive sets, then
    :func:`nnls_factored`'s solve in float64 while the block is in the
    cache. On a CPU the product runs over chunks of 8 MiB of ``X`` and the
    smallest entry of each chunk, read as a signed integer, is taken right
    after it, from the cache: a negative, ``-0.0`` or negative NaN entry makes
    it negative. NaN and infinities propagate into ``X H^T`` (IEEE: also
    ``NaN * 0`` and ``inf * 0`` are NaN) and so into its sum.

    Args:
        x (Tensor): n x C floating rows (``transform`` passes float32 or
                    float64; half precision works but loses the product's
                    accuracy).
        h (Tensor): K x C concepts in ``x``'s dtype and on its device.
        pinv (Tensor): ``pinv(H H^T)`` (K x K) in ``x``'s dtype, for the guess.
        factors (NNLSFactors): the factors of ``H H^T``.
        dtype (torch.dtype, optional): dtype of the returned weights.
                    Default: ``torch.float64``
        steps (int, optional): as in :func:`nnls_factored`. Default: 3
        compact (bool, optional): as in :func:`nnls_factored`.
                    Default: None (True on CPU, False elsewhere)

    Returns:
        *tuple[Tensor, Tensor]*: ``W`` (n x K, ``dtype``, no autograd history)
        and a 0-d boolean tensor on ``x``'s device. False: ``X`` has no
        negative, NaN or infinite entry and ``X H^T`` did not overflow. True:
        it may (``-0.0`` entries also raise it); ``W`` is not to be trusted
        until the caller has checked ``X`` exactly.
    """
    x, h, pinv = x.detach(), h.detach(), pinv.detach()  # the solve is not differentiable
    n, c = x.shape
    k = int(h.shape[0])
    device = x.device
    if compact is None:
        compact = device.type == "cpu"
    out = torch.empty(n, k, dtype=dtype, device=device)
    if n == 0:
        return out, torch.zeros((), dtype=torch.bool, device=device)
    block = block_rows(k, device)
    chunk = max(256, _CHUNK_BYTES_CPU // max(1, c * x.element_size())) if compact else block
    # the same bits as a signed integer: the sign bit makes it negative (any float width)
    signed = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    ht, pinv_t = h.T, pinv.T  # transposed views: MKL's fast path for a skinny product
    lowest: list[Tensor] = []
    sums: list[Tensor] = []
    pending: list[_Pending] = []
    buffer = torch.empty(min(n, block), k, dtype=x.dtype, device=device)
    work = _Work.for_rows(buffer.shape[0], factors)
    for start in range(0, n, block):
        stop = min(n, start + block)
        cross = buffer[: stop - start]
        for first in range(start, stop, chunk):
            last = min(stop, first + chunk)
            part = x[first:last]
            torch.mm(part, ht, out=cross[first - start : last - start])
            lowest.append(torch.amin(part.view(signed)))
        sums.append(cross.sum())
        passive = (cross @ pinv_t) > 0
        # X, H >= 0 make X H^T >= 0, so max |b| is max b, taken in X's dtype (exact: the
        # float64 b holds the same values). Were X negative, the flag discards W anyway.
        scale = torch.amax(cross, dim=1, keepdim=True)
        b = cross.double()
        if compact:
            out[start:stop], left = _first_step(factors, b, passive, work, scale, start)
            pending.append(left)
        else:
            out[start:stop] = _solve_block(factors, b, passive, steps, None, work, scale)
    if pending:
        _finish(factors, pending, out, steps, None, work)
    low = torch.stack(lowest).amin()
    total = torch.stack(sums).sum()
    return out, (low < 0) | ~torch.isfinite(total)


def _mask(passive: Tensor, dtype: torch.dtype) -> Tensor:
    """``passive`` as 0/1 in ``dtype``: multiplying by it is ~25x faster on a CPU than by a bool."""
    return passive.view(torch.uint8).to(dtype)


def products_maps(act: Tensor, h: Tensor) -> Tensor:
    """``X H^T`` of every location of N x C x h x w activations: N x K x h x w.

    One batched product ``H @ act[i]`` per image over its C x (h w) layout
    (contiguous or channels-last), in ``act``'s dtype and on its device. This
    is all of ``X`` that the solve with ``H`` fixed needs (besides ``H H^T``):
    ``argmin_{w >= 0} ||x - H^T w||`` depends on ``x`` only through ``H x``.
    Being linear, the products of several vectors average to the product of
    their mean, which is how a slide run averages overlapping tiles.

    Args:
        act (Tensor): N x C x h x w floating activations.
        h (Tensor): K x C concepts in ``act``'s dtype and on its device.

    Returns:
        *Tensor*: N x K x h x w products (no autograd history).
    """
    act, h = act.detach(), h.detach()
    n, c, height, width = act.shape
    k = h.shape[0]  # named: an empty batch (n = 0) leaves -1 undetermined
    return torch.matmul(h, act.reshape(n, c, height * width)).view(n, k, height, width)


def solve_products(cross: Tensor, pinv: Tensor, factors: NNLSFactors) -> Tensor:
    """``argmin_{w >= 0} ||x - H^T w||`` of every row from its product ``b = x H^T`` (n x K).

    :func:`nnls_factored` started from the signs of ``b @ pinv(H H^T)``.

    Args:
        cross (Tensor): n x K products, on the factors' device.
        pinv (Tensor): ``pinv(H H^T)`` (K x K) in ``cross``'s dtype.
        factors (NNLSFactors): the factors of ``H H^T``.

    Returns:
        *Tensor*: n x K non-negative float64 weights.
    """
    return nnls_factored(factors, cross, guess=cross @ pinv.T)


def solve_maps(act: Tensor, h: Tensor, pinv: Tensor, factors: NNLSFactors) -> Tensor:
    """``argmin_{W >= 0} ||X - W H||`` for every location of N x C x h x w activations.

    The same solve as :func:`solve_rows`, without reshaping the activations to
    rows first: the products are :func:`products_maps` (one batched product per
    image), and only the small N x K x (h w) result is rearranged. The values
    of ``act`` are not checked (the caller has); a product that overflows gives
    non-finite maps, which the caller can test cheaply on the K-channel result.

    Args:
        act (Tensor): N x C x h x w float32 or float64 activations.
        h (Tensor): K x C concepts in ``act``'s dtype and on its device.
        pinv (Tensor): ``pinv(H H^T)`` (K x K) in ``act``'s dtype, for the guess.
        factors (NNLSFactors): the factors of ``H H^T``.

    Returns:
        *Tensor*: N x K x h x w concept maps in ``act``'s dtype (no autograd history).
    """
    cross = products_maps(act, h)
    n, k, height, width = cross.shape
    rows = cross.flatten(2).transpose(1, 2).reshape(-1, k)  # (N h w) x K
    w = solve_products(rows, pinv.detach(), factors)
    return w.to(act.dtype).reshape(n, height, width, k).permute(0, 3, 1, 2).contiguous()


def _tolerance(f: NNLSFactors, b: Tensor, scale: Tensor | None) -> Tensor:
    """The reference solver's KKT tolerance of each row, negated (n x 1).

    ``1e-10`` of the row's largest ``|b|`` (``scale``, when the caller has it),
    divided by ``max(diag(gram))`` to compare with ``u``.
    """
    if scale is None:
        low, high = torch.aminmax(b, dim=1, keepdim=True)
        scale = torch.maximum(high, low.neg_())
    return scale.to(torch.float64).mul_(-1e-10 / f.gmax)


@dataclass
class _Pending:
    """Rows of one block that violate KKT after the first step (compacted path)."""

    rows: Tensor  # indices into the whole result
    b: Tensor
    passive: Tensor
    tol: Tensor
    infeasible: Tensor


def _first_step(
    f: NNLSFactors,
    b: Tensor,
    passive: Tensor,
    work: _Work | None,
    scale: Tensor | None,
    offset: int,
) -> tuple[Tensor, _Pending]:
    """Every row's passive-set solution for its starting set; the rows violating KKT set aside.

    Returns the block's clamped solution (may be a view of ``work.u``: copy it
    out before the next block; the rows set aside are overwritten by
    :func:`_finish`) and those rows, their indices shifted by ``offset``.
    """
    neg_tol = _tolerance(f, b, scale)
    u = f.kkt(b, passive, work)
    rows = torch.nonzero(torch.amin(u, dim=1, keepdim=True) < neg_tol)[:, 0]
    tol = neg_tol[rows]
    left = _Pending(rows + offset, b[rows], passive[rows], tol, u[rows] < tol)
    return u.mul_(_mask(passive, u.dtype)).clamp_min_(0.0), left


def _finish(
    f: NNLSFactors,
    pending: list[_Pending],
    out: Tensor,
    steps: int,
    max_iter: int | None,
    work: _Work | None,
) -> None:
    """Pivot the rows set aside by :func:`_first_step` of all blocks; write them into ``out``.

    Block by block (``work``'s rows at a time): ``steps`` batched pivoting
    steps, rows that satisfy KKT leaving after each, then the reference
    solver :func:`_nnls_bpp` for the rows left.
    """
    rows = torch.cat([p.rows for p in pending])
    b = torch.cat([p.b for p in pending])
    passive = torch.cat([p.passive for p in pending])
    tol = torch.cat([p.tol for p in pending])
    infeasible = torch.cat([p.infeasible for p in pending])
    block = work.u.shape[0] if work is not None else block_rows(f.k, b.device)
    for start in range(0, rows.numel(), block):
        part = slice(start, start + block)
        _pivot(
            f,
            rows[part],
            b[part],
            passive[part],
            tol[part],
            infeasible[part],
            out,
            steps,
            max_iter,
            work,
        )


def _pivot(
    f: NNLSFactors,
    rows: Tensor,
    br: Tensor,
    pr: Tensor,
    tr: Tensor,
    ir: Tensor,
    out: Tensor,
    steps: int,
    max_iter: int | None,
    work: _Work | None,
) -> None:
    """:func:`_finish` on one block of the rows set aside."""
    k = br.shape[1]
    alpha = torch.full((rows.numel(),), 3, dtype=torch.long, device=br.device)
    beta = torch.full((rows.numel(),), k + 1, dtype=torch.long, device=br.device)
    for _ in range(steps):
        if rows.numel() == 0:
            return
        pr, alpha, beta = _exchange(pr, ir, ir.sum(dim=1), alpha, beta)
        u = f.kkt(br, pr, work)
        ir = u < tr
        out.index_copy_(0, rows, u.mul_(_mask(pr, u.dtype)).clamp_min_(0.0).to(out.dtype))
        keep = torch.nonzero(ir.any(dim=1))[:, 0]
        rows, br, pr, tr, ir = rows[keep], br[keep], pr[keep], tr[keep], ir[keep]
        alpha, beta = alpha[keep], beta[keep]
    if rows.numel() > 0:
        out.index_copy_(0, rows, _nnls_bpp(f.gram, br, max_iter=max_iter).to(out.dtype))


def _solve_block(
    f: NNLSFactors,
    b: Tensor,
    passive: Tensor,
    steps: int,
    max_iter: int | None,
    work: _Work | None,
    scale: Tensor | None = None,
) -> Tensor:
    """:func:`nnls_factored` on one block with fixed shapes (no compaction; for GPUs).

    Every step touches every row; rows that satisfy KKT keep their solution.
    The count of rows left for the fallback is the block's one host
    synchronisation. The result may be a view of ``work.u``.
    """
    k = b.shape[1]
    neg_tol = _tolerance(f, b, scale)
    u = f.kkt(b, passive, work)
    infeasible = u < neg_tol
    todo = infeasible.any(dim=1)
    x = u.mul_(_mask(passive, u.dtype))
    alpha = torch.full((b.shape[0],), 3, dtype=torch.long, device=b.device)
    beta = torch.full((b.shape[0],), k + 1, dtype=torch.long, device=b.device)
    for _ in range(steps):
        passive, alpha, beta = _exchange(passive, infeasible, infeasible.sum(dim=1), alpha, beta)
        u = f.kkt(b, passive)
        infeasible = u < neg_tol
        x = torch.where(todo.unsqueeze(1), u.mul_(_mask(passive, u.dtype)), x)
        todo = infeasible.any(dim=1)
    rows = torch.nonzero(todo)[:, 0]  # the one synchronisation with the host
    x.clamp_min_(0.0)
    if rows.numel() > 0:
        x[rows] = _nnls_bpp(f.gram, b[rows], max_iter=max_iter)
    return x
