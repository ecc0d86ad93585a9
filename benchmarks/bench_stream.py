"""Streaming NMF: memory stays flat while ``NMF.partial_fit`` eats rows from a memory map.

Data: a float32 ``.npy`` file read through ``np.load(..., mmap_mode="r")`` holding 4 copies
of the real activation matrix of ``_activations.py`` (full: 4 x 1,000,000 = 4,000,000 x 512,
8.2 GB; ``--small``: 4 x 100,000 = 400,000 x 512). Copy ``c`` is the matrix with its rows in
a fixed random order (numpy seed ``c``) times i.i.d. multiplicative noise uniform in
[0.95, 1.05] (seed ``100 + c``), so no two rows are identical. It is written once, in chunks
of 62,500 rows, by a child process (so this process never holds the source matrix) and
cached in ``bench_out/``.

Measured: ``captum_nmf.NMF(6, random_state=0).partial_fit(chunk)`` over consecutive chunks
of ``n / 64`` rows (62,500 full, 6,250 small) read from the memory map. At each quarter of
the file (1M, 2M, 3M, 4M rows) the table reports wall time, throughput (cumulative, and over
the last quarter), and the process memory from ``/proc/self/status``:

* ``VmRSS``: resident set, *including* the file-backed pages of the memory map (page cache
  that the kernel can drop at will; they grow with the rows read and mean nothing);
* ``RssAnon``: anonymous resident memory (heap, tensors): the real footprint, which should
  stay flat as rows grow;
* ``VmHWM``: peak VmRSS so far (includes file-backed pages too).

Before the first chunk the same figures are printed as a baseline. Optionally
(``--compare``, off by default: it costs an in-memory fit of 1M rows) the streamed
concepts are compared with an in-memory ``fit`` on the first quarter of the file: both
objectives ``||V_q - W H||_F^2`` are evaluated on that quarter with the exact
``W = transform(V_q)``.
The first chunk's time includes the in-memory HALS fit that starts the stream. Whether the
file is in the page cache affects throughput (it usually is right after it was written).
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _activations import (
    OUT,
    activation_matrix,
    base_parser,
    machine_header,
    objective,
    print_table,
    resolve_device,
)

from captum_nmf import NMF

K = 6
COPIES = 4
N_CHUNKS = 64  # chunks per file; 16 per quarter


def stream_path(small: bool) -> Path:
    """Where the 4-copy memory-mapped file lives."""
    return OUT / f"stream_{'small' if small else 'full'}.npy"


def build_file(small: bool) -> None:
    """Write the 4-copy file in chunks (never the whole file in RAM)."""
    v = activation_matrix(small)
    n, c = v.shape
    path = stream_path(small)
    tmp = path.with_suffix(".tmp.npy")
    mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(COPIES * n, c))
    step = n // 16
    for copy in range(COPIES):
        perm = np.random.default_rng(copy).permutation(n)
        noise_rng = np.random.default_rng(100 + copy)
        for start in range(0, n, step):
            rows = v[perm[start : start + step]]
            noise = noise_rng.uniform(0.95, 1.05, size=rows.shape).astype(np.float32)
            mm[copy * n + start : copy * n + start + rows.shape[0]] = rows * noise
        mm.flush()
    del mm
    tmp.replace(path)


def proc_status() -> dict[str, float]:
    """VmRSS, RssAnon, RssFile and VmHWM of this process, in MiB."""
    out: dict[str, float] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = float(rest.split()[0]) / 1024.0  # kB -> MiB
    return out


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also fit the first quarter in memory and compare objectives (slow)",
    )
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_only:
        build_file(args.small)
        return
    device = resolve_device(args.device)
    path = stream_path(args.small)
    if not path.exists():
        print(f"# writing {path.name} in a child process (one-time cost) ...")
        cmd = [sys.executable, __file__, "--build-only"] + (["--small"] if args.small else [])
        subprocess.run(cmd, check=True)
    gc.collect()

    mm = np.load(path, mmap_mode="r")
    n, c = mm.shape
    chunk = n // N_CHUNKS
    quarter = n // COPIES
    machine_header(
        f"bench_stream: {n:,} x {c} float32 memmap ({path.stat().st_size / 2**30:.2f} GiB), "
        f"K = {K}, chunks of {chunk:,} rows",
        device,
    )
    base = proc_status()
    print(
        f"# baseline before streaming: VmRSS {base['VmRSS']:.0f} MiB, RssAnon "
        f"{base['RssAnon']:.0f} MiB, VmHWM {base['VmHWM']:.0f} MiB"
    )

    model = NMF(K, random_state=0, device=None if device.type == "cpu" else device)
    rows: list[list[str]] = []
    t0 = time.perf_counter()
    t_last, seen_last = t0, 0
    first_chunk_s = 0.0
    for start in range(0, n, chunk):
        x = np.asarray(mm[start : start + chunk])
        t = time.perf_counter()
        model.partial_fit(torch.from_numpy(x).to(device) if device.type == "cuda" else x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if start == 0:
            first_chunk_s = time.perf_counter() - t
        seen = start + x.shape[0]
        if seen % quarter == 0:
            now = time.perf_counter()
            st = proc_status()
            rows.append(
                [
                    f"{seen:,}",
                    f"{now - t0:.1f}",
                    f"{seen / (now - t0):,.0f}",
                    f"{(seen - seen_last) / (now - t_last):,.0f}",
                    f"{st['VmRSS']:.0f}",
                    f"{st['RssFile']:.0f}",
                    f"{st['RssAnon']:.0f}",
                    f"{st['RssAnon'] - base['RssAnon']:+.0f}",
                    f"{st['VmHWM']:.0f}",
                ]
            )
            t_last, seen_last = now, seen
    total_s = time.perf_counter() - t0
    print()
    print_table(
        [
            "rows seen",
            "time (s)",
            "rows/s cum.",
            "rows/s last quarter",
            "VmRSS MiB",
            "RssFile MiB",
            "RssAnon MiB",
            "RssAnon vs baseline",
            "VmHWM MiB",
        ],
        rows,
    )
    steady = (n - chunk) / (total_s - first_chunk_s)
    print(
        f"\n# first chunk (in-memory HALS fit, {model.n_iter_} iterations): {first_chunk_s:.2f} s; "
        f"steady state after it: {steady:,.0f} rows/s"
    )
    print(
        f"# streamed objective over all {n:,} rows (reconstruction_err_^2, upper bound): "
        f"{model.reconstruction_err_**2:.6e}"
    )

    if not args.compare:
        return
    v = np.ascontiguousarray(mm[:quarter])
    h_stream = model.components_
    h_stream = h_stream.cpu().numpy() if isinstance(h_stream, torch.Tensor) else h_stream
    obj_stream = objective(v, np.asarray(model.transform(v)), h_stream)
    t = time.perf_counter()
    mem = NMF(K, random_state=0).fit(v)
    t_mem = time.perf_counter() - t
    obj_mem = float(mem.reconstruction_err_) ** 2
    print(
        f"# on the first {quarter:,} rows, exact W: streamed-concepts objective {obj_stream:.6e}, "
        f"in-memory fit objective {obj_mem:.6e} (fit {t_mem:.1f} s); "
        f"ratio streamed / in-memory = {obj_stream / obj_mem:.5f}"
    )


if __name__ == "__main__":
    main()
