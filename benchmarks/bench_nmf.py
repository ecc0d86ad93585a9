"""In-memory NMF: ``captum_nmf.NMF`` vs scikit-learn, time and objective on real activations.

Data: the real post-ReLU6 EfficientNet-Lite0 activation matrix of ``_activations.py``
(1,000,000 x 512 float32; ``--small``: 100,000 x 512), K = 6.

Measured one after the other in the same process (wall clock, ``time.perf_counter``):

(a) ``sklearn.decomposition.NMF(6, solver="cd", init="nndsvda", random_state=0)`` with its
    default ``tol``/``max_iter``: ``fit_transform`` time and objective.
(b) ``sklearn.decomposition.MiniBatchNMF(6, init="nndsvda", random_state=0)``: the same.
(c) ``captum_nmf.NMF(6, random_state=0)`` with its defaults: ``fit`` time and objective.
(d) time to reach (a)'s objective: fresh ``captum_nmf.NMF(6, tol=0, max_iter=N)`` fits for
    N = 10, 20, 30, ... (``--start`` sets the first N; each fit timed on its own: init +
    N iterations + final exact ``W``); the first N whose objective is ``<=`` the target
    gives the time. Nothing is patched.

Every objective is ``||V - W H||_F^2`` recomputed by this script in float64, in row chunks,
from the method's own ``W`` and ``H``: scikit-learn's float32 ``reconstruction_err_`` is off
by several percent on this matrix (its ``||V||^2 - 2 <WH, V> + ||WH||^2`` form cancels).
Ratios below 1 mean ours is faster / reaches a lower objective.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from _activations import (
    activation_matrix,
    base_parser,
    machine_header,
    objective,
    print_table,
    resolve_device,
    sync,
)
from sklearn.decomposition import NMF as SkNMF
from sklearn.decomposition import MiniBatchNMF
from sklearn.exceptions import ConvergenceWarning

from captum_nmf import NMF

K = 6


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def to_np(a: Any) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--cap", type=int, default=200, help="largest N tried in (d)")
    parser.add_argument("--start", type=int, default=10, help="first N tried in (d)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    v = activation_matrix(args.small)
    machine_header(f"bench_nmf: V = {v.shape[0]:,} x {v.shape[1]} float32, K = {K}", device)
    x = torch.from_numpy(v).to(device)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sk = SkNMF(K, solver="cd", init="nndsvda", random_state=0)
        w_sk, t_sk = timed(lambda: sk.fit_transform(v), torch.device("cpu"))
        obj_sk = objective(v, w_sk, sk.components_)
        mb = MiniBatchNMF(K, init="nndsvda", random_state=0)
        w_mb, t_mb = timed(lambda: mb.fit_transform(v), torch.device("cpu"))
        obj_mb = objective(v, w_mb, mb.components_)

    ours = NMF(K, random_state=0)
    w_ours, t_ours = timed(lambda: ours.fit_transform(x), device)
    obj_ours = objective(v, to_np(w_ours), to_np(ours.components_))

    rows = [
        ["sklearn NMF cd", f"{t_sk:.1f}", f"{obj_sk:.6e}", "1.00000", str(sk.n_iter_)],
        [
            "sklearn MiniBatchNMF",
            f"{t_mb:.1f}",
            f"{obj_mb:.6e}",
            f"{obj_mb / obj_sk:.5f}",
            str(mb.n_iter_),
        ],
        [
            "captum_nmf NMF",
            f"{t_ours:.1f}",
            f"{obj_ours:.6e}",
            f"{obj_ours / obj_sk:.5f}",
            str(ours.n_iter_),
        ],
    ]
    print()
    print_table(
        ["method (defaults)", "fit time (s)", "objective", "obj / sklearn-cd", "iter"], rows
    )

    print()
    print(f"# (d) fresh tol=0 fits of ours until the objective is <= sklearn-cd's {obj_sk:.6e}")
    reached = None
    for n_iter in range(args.start, args.cap + 1, 10):
        model = NMF(K, random_state=0, tol=0.0, max_iter=n_iter)
        w, t = timed(lambda m=model: m.fit_transform(x), device)
        obj = objective(v, to_np(w), to_np(model.components_))
        print(
            f"#   max_iter={n_iter:<4} time {t:7.1f} s  objective {obj:.6e}  "
            f"ratio {obj / obj_sk:.5f}"
        )
        if obj <= obj_sk:
            reached = (n_iter, t, obj)
            break
    print()
    if reached is None:
        print(f"ours did not reach sklearn-cd's objective within {args.cap} iterations")
    else:
        n_iter, t, obj = reached
        print_table(
            ["vs sklearn NMF cd", "ours: iterations", "ours time (s)", "theirs (s)", "time ratio"],
            [["equal objective", str(n_iter), f"{t:.1f}", f"{t_sk:.1f}", f"{t / t_sk:.3f}"]],
        )
    print(
        f"# defaults: time ratio ours/sklearn-cd {t_ours / t_sk:.3f}, objective ratio "
        f"{obj_ours / obj_sk:.5f}; vs MiniBatchNMF: time {t_ours / t_mb:.3f}, objective "
        f"{obj_ours / obj_mb:.5f}"
    )
    print("# target: time ratio <= 0.5 at equal objective")


if __name__ == "__main__":
    main()
