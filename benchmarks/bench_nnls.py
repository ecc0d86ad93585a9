"""The fixed-H solve: ``NMF.transform`` time against one ``X @ H^T`` pass over the same rows.

Data: the real post-ReLU6 EfficientNet-Lite0 activation matrix of ``_activations.py``
(1,000,000 x 512 float32; ``--small``: 100,000 x 512). For K = 4, 6 and 8 the concepts are
an ``NMF(K, random_state=0, max_iter=100)`` fit on the first 100,000 rows, stored in
float32 (what ``NMFConceptAttribution`` solves with).

Measured in one run, per K, each call warmed up once, then ``--repeats`` rounds in which
the calls run one after the other (order rotated each round); the median is reported:

* ``X @ H^T``: one float32 matrix product over all rows, the one pass ``transform`` cannot
  avoid (the floor);
* ``transform``: ``NMF.from_components(H).transform(X)``, everything included (input
  checks, the product, the solve; the per-H factors cached as in every later call). It runs
  block by block: per block of rows the product (on a CPU in 8 MiB chunks of X, each checked
  for negative / NaN / inf right after its product, from the cache), the guess of the
  starting passive sets and the first table-driven step; then the few rows that still
  violate KKT are pivoted together;
* ``old transform``: what ``transform`` did before the fast path: a separate ``aminmax``
  pass over X for the check, one product over all rows, the reference block principal
  pivoting (``torch.unique`` over passive sets and one pseudo-inverse per set);
* the solve alone (fast and old) on the same float32 ``X H^T``, and how many rows the fast
  path left to the reference solver.

Printed ratios: ``transform / (X @ H^T)`` (target <= 2.5 on 2 CPU cores) and the speed-up
over the old solver. Results of the two solvers are compared (largest difference relative
to the row's largest weight).

With ``--device cuda`` the same is measured on the GPU only (the CPU table is this script
run on a CPU; a lent GPU's minutes are few) and, in addition, the device's copy bandwidth
(``y.copy_(x)`` of the 2 GB matrix, read + write) gives the bound ``bandwidth / (4 C)``
rows/s of any method that reads X once; rows/s of ``transform`` and of ``X @ H^T`` are
printed beside it (target >= 25 % of the bound).
Each row is printed as soon as it is measured, and the table again at the end.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from _activations import (
    activation_matrix,
    base_parser,
    machine_header,
    median_times,
    print_table,
    resolve_device,
    sync,
)

from captum_nmf import NMF
from captum_nmf._core.nmf_input import check_values
from captum_nmf._utils import solvers

KS = (4, 6, 8)
FIT_ROWS = 100_000


def old_transform(model: NMF, x: torch.Tensor) -> torch.Tensor:
    """``transform`` as it was before the fixed-H fast path, on the same input.

    A separate pass over X for the value check (``aminmax``), one ``X @ H^T`` over all rows,
    then the reference block principal pivoting (``torch.unique`` over passive sets, one
    pseudo-inverse per set) in float64 over all rows at once.
    """
    check_values(x)
    h = model._h.to(x.dtype)
    cross = x @ h.T
    return solvers._nnls_bpp(h @ h.T, cross).to(x.dtype)


def copy_bandwidth(x: torch.Tensor, repeats: int) -> float:
    """Bytes per second of ``y.copy_(x)`` (read + write), median of ``repeats``."""
    y = torch.empty_like(x)
    y.copy_(x)
    ts = []
    for _ in range(repeats):
        sync(x.device)
        t = time.perf_counter()
        y.copy_(x)
        sync(x.device)
        ts.append(time.perf_counter() - t)
    return 2.0 * x.numel() * x.element_size() / statistics.median(ts)


def bench(
    x: torch.Tensor, hs: dict[int, torch.Tensor], repeats: int, bound: float | None = None
) -> list[list[str]]:
    """One table row per K on ``x``'s device, each also printed as soon as it is measured.

    With ``bound`` (rows/s of one read of X at the copy bandwidth) each row's
    share of it follows the row.
    """
    device = x.device
    n = x.shape[0]
    rows = []
    for k, h_cpu in hs.items():
        h = h_cpu.to(device)
        model = NMF.from_components(h)
        factors = solvers.NNLSFactors(h @ h.T)
        cross = x @ h.T
        calls: dict[str, Callable[[], Any]] = {
            "matmul": lambda h=h: x @ h.T,
            "transform": lambda m=model: m.transform(x),
            "old transform": lambda m=model: old_transform(m, x),
            "solve": lambda f=factors, c=cross: solvers.nnls_factored(f, c),
            "old solve": lambda f=factors, c=cross: solvers._nnls_bpp(f.gram, c),
        }
        med = median_times(calls, repeats, device)
        w_new = model.transform(x).double()
        w_old = old_transform(model, x).double()
        scale = torch.amax(w_old.abs(), dim=1, keepdim=True).clamp_min(1e-30)
        diff = float(torch.amax(torch.abs(w_new - w_old) / scale))
        left = count_fallback_rows(factors, cross)
        row = [
            str(k),
            f"{med['matmul']:.3f}",
            f"{med['transform']:.3f}",
            f"{med['old transform']:.3f}",
            f"{med['solve']:.3f}",
            f"{med['old solve']:.3f}",
            f"{med['transform'] / med['matmul']:.2f}",
            f"{med['old transform'] / med['matmul']:.2f}",
            f"{med['old transform'] / med['transform']:.2f}",
            f"{n / med['transform'] / 1e6:.1f}",
            str(left),
            f"{diff:.1e}",
        ]
        rows.append(row)
        print("| " + " | ".join(row) + " |", flush=True)
        if bound is not None:
            rate = n / med["transform"]
            print(f"#   K = {k}: transform {rate / bound:.1%} of the bound", flush=True)
    return rows


def count_fallback_rows(factors: solvers.NNLSFactors, cross: torch.Tensor) -> int:
    """Rows the batched steps leave to the reference solver (counted on a copy of the call)."""
    seen: list[int] = []
    original = solvers._nnls_bpp

    def counting(g: torch.Tensor, b: torch.Tensor, **kw: Any) -> torch.Tensor:
        seen.append(int(b.shape[0]))
        return original(g, b, **kw)

    solvers._nnls_bpp = counting
    try:
        solvers.nnls_factored(factors, cross)
    finally:
        solvers._nnls_bpp = original
    return sum(seen)


HEADER = [
    "K",
    "X@H^T (s)",
    "transform (s)",
    "old transform (s)",
    "solve (s)",
    "old solve (s)",
    "transform / X@H^T",
    "old / X@H^T",
    "speed-up",
    "M rows/s",
    "fallback rows",
    "max rel diff",
]


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5, 3)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    repeats = args.repeats or (3 if args.small else 5)
    v = torch.from_numpy(activation_matrix(args.small))
    n, c = v.shape
    machine_header(
        f"bench_nnls: X = {n:,} x {c} float32, K = {KS}, median of {repeats} rounds", device
    )
    hs = {
        k: NMF(k, random_state=0, max_iter=100).fit(v[:FIT_ROWS])._h.float().contiguous()
        for k in KS
    }
    print()
    print("| " + " | ".join(HEADER) + " |")
    print("|" + " --- |" * len(HEADER), flush=True)
    if device.type == "cpu":
        print("# CPU")
        results = bench(v, hs, repeats)
        print()
        print_table(HEADER, results)
        print("# target on 2 CPU cores: transform / X@H^T <= 2.5")
    else:  # the device only: its minutes are few (the CPU table is this script on a CPU)
        x = v.to(device)
        bandwidth = copy_bandwidth(x, repeats)
        bound = bandwidth / (c * x.element_size())
        print(f"# {device}: copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)")
        print(f"# bound for one read of X: {bound / 1e6:,.0f} M rows/s", flush=True)
        results = bench(x, hs, repeats, bound)
        print()
        print_table(HEADER, results)
        print("# target on a GPU: transform rows/s >= 25 % of the bound")


if __name__ == "__main__":
    main()
