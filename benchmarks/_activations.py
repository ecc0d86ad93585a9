"""Shared helpers of the benchmarks: a real post-ReLU activation matrix and small utilities.

The matrix
----------
``activation_matrix(small)`` returns a float32 C-contiguous matrix of **512 columns** whose
rows are the feature vectors of a real post-ReLU6 layer of EfficientNet-Lite0 (ImageNet
weights from ``captum_nmf.zoo.efficientnet_lite0``) on the two real 1500 x 1500 H&E images
shipped in ``captum_nmf.data`` (``hgsc_nest.jpg``, ``hgsc_stromal_he.jpg``).

* Layer: the output of ReLU6 after the depthwise convolution of ``blocks[10]`` (the last
  672-channel block of stage 5, at stride 16 of the input). The upstream ``MBConvBlock``
  applies **one** ``self._swish`` (ReLU6) module instance twice in its forward (after the
  expansion ``_bn0`` and after the depthwise ``_bn1``), so a hook on ``_swish`` would fire
  twice per call and be ambiguous. We therefore capture the output of ``blocks[10]._bn1``
  with Captum's ``LayerActivation`` and apply ``clamp(0, 6)`` ourselves: that is exactly the
  value the block's second ReLU6 call produces (``_swish`` is ``nn.ReLU6`` and nothing happens
  between ``_bn1`` and it).
* Inputs: RGB in [0, 1], normalised with ``captum_nmf.zoo.normalize``. Each image is fed whole
  (one image per forward), under the 8 dihedral transforms (rotations by 0/90/180/270 degrees,
  each with and without a horizontal flip, applied to the *image*, so activations genuinely
  differ) at the scales ``SCALES`` (bilinear, antialiased resize of the 1500 px image).
  No colour jitter. At scale 1 a forward gives 93 x 93 = 8,649 rows.
* Channels: a fixed selection of 512 of the 672 channels: those with the highest mean
  activation over the two *untransformed* images at scale 1 (identical for the full and
  ``--small`` matrices), kept in increasing channel-index order.
* Rows: full: all 2 images x 8 transforms x 4 scales (1.0, 1.25, 1.5, 1.75) =
  16 x (93^2 + 117^2 + 140^2 + 164^2) = 1,101,344 rows, of which a fixed random subset
  (numpy seed 0) of exactly ``N_FULL = 1,000,000`` rows is kept, in shuffled order.
  ``--small``: 2 images x 6 transforms at scale 1 (103,788 rows), a fixed random subset of
  ``N_SMALL = 100,000`` rows.

The matrix is cached as ``bench_out/activations_{full,small}.npy`` (about 2 GB / 200 MB);
building the full one took 17 minutes on 2 CPU cores (the small one 70 s), once. Where CUDA
is available the forwards run on the GPU (TF32 off, so the values are float32 convolutions
as on the CPU, up to the order of summation): a lent GPU machine starts bare, and its
minutes are few.
About 67 % of the entries are exactly 0 (post-ReLU6); the maximum is 6.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from captum.attr import LayerActivation
from numpy.typing import NDArray
from PIL import Image

from captum_nmf import data, zoo

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench_out"
IMAGES = ("hgsc_nest.jpg", "hgsc_stromal_he.jpg")
SCALES = (1.0, 1.25, 1.5, 1.75)
BLOCK = 10
N_CHANNELS = 512
N_FULL = 1_000_000
N_SMALL = 100_000
ROW_CHUNK = 1 << 16


# ----------------------------------------------------------------------------- utilities
def base_parser(description: str) -> argparse.ArgumentParser:
    """Parser with the options every benchmark has: ``--small`` and ``--device``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--small", action="store_true", help="quick smoke configuration")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    return parser


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, falling back to CPU when CUDA is asked for but absent."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        print(f"# --device {name} requested but CUDA is not available: using cpu")
        return torch.device("cpu")
    return torch.device(name)


def machine_header(title: str, device: torch.device) -> None:
    """Print what the numbers below were measured on (glibc's malloc settings included)."""
    print(f"# {title}")
    tuned = [f"{k}={os.environ[k]}" for k in sorted(os.environ) if k.startswith("MALLOC_")]
    # glibc mmaps (and page-faults again) every block above its dynamic threshold: the
    # absolute times of a CPU forward depend on that state, see README "Performance"
    print(f"# glibc malloc: {' '.join(tuned) if tuned else 'defaults'}")
    print(
        f"# machine: {platform.machine()} {platform.processor() or ''}".rstrip()
        + f", {os.cpu_count()} CPUs (torch threads {torch.get_num_threads()}), "
        f"{_total_ram_gib():.0f} GiB RAM"
    )
    dev = str(device)
    if device.type == "cuda":
        dev += (
            f" ({torch.cuda.get_device_name(device)}; TF32: convolutions "
            f"{torch.backends.cudnn.allow_tf32}, matmul {torch.backends.cuda.matmul.allow_tf32})"
        )
    print(f"# torch {torch.__version__}, numpy {np.__version__}, device {dev}")


def _total_ram_gib() -> float:
    try:
        import psutil

        return float(psutil.virtual_memory().total) / 2**30
    except ImportError:  # pragma: no cover
        return float("nan")


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work so wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_times(
    calls: dict[str, Callable[[], Any]], repeats: int, device: torch.device
) -> dict[str, float]:
    """Median wall time of each call over ``repeats`` rounds, order rotated per round.

    Each call runs once first, untimed (caches such as the per-H solve factors, kernels,
    cuDNN plans); with two calls the rotation alternates which goes first.
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    for fn in calls.values():  # warm-up
        fn()
    names = list(calls)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync(device)
            t = time.perf_counter()
            calls[name]()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def objective(v: NDArray[np.floating], w: NDArray[np.floating], h: NDArray[np.floating]) -> float:
    """``||V - W H||_F^2`` in float64, computed in row chunks (no n x C float64 temporary)."""
    h64 = np.asarray(h, dtype=np.float64)
    total = 0.0
    for start in range(0, v.shape[0], ROW_CHUNK):
        r = np.asarray(v[start : start + ROW_CHUNK], dtype=np.float64)
        r -= np.asarray(w[start : start + ROW_CHUNK], dtype=np.float64) @ h64
        total += float(np.einsum("ij,ij->", r, r))
    return total


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """Print a left-aligned plain-text table."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    line = "  ".join(f"{h:<{w}}" for h, w in zip(header, widths, strict=True))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(f"{c:<{w}}" for c, w in zip(row, widths, strict=True)))


# ------------------------------------------------------------------------- the matrix
def load_image(name: str) -> torch.Tensor:
    """A packaged H&E image as a 1 x 3 x H x W float tensor in [0, 1]."""
    with Image.open(data.path(name)) as img:
        arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def dihedral(x: torch.Tensor, index: int) -> torch.Tensor:
    """The ``index``-th (0..7) of the 8 rotations/flips of an N x C x H x W tensor."""
    if index >= 4:
        x = torch.flip(x, dims=[3])
    return torch.rot90(x, k=index % 4, dims=[2, 3]).contiguous()


class _Stage5:
    """Forward of EfficientNet-Lite0 up to ``blocks[BLOCK]``; captures post-ReLU6 after ``_bn1``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.model = zoo.efficientnet_lite0().to(device)
        self.layer = self.model.blocks[BLOCK]._bn1
        self.capture = LayerActivation(self._trunk, self.layer)

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.stem_relu(m.stem(x))
        for idx in range(BLOCK + 1):
            x = m.blocks[idx](x, drop_connect_rate=0.0)
        return x

    @torch.no_grad()
    def rows(self, image01: torch.Tensor) -> torch.Tensor:
        """(h*w) x 672 post-ReLU6 feature vectors of one image in [0, 1]."""
        act = self.capture.attribute(zoo.normalize(image01.to(self.device)))
        act = torch.clamp(act, 0.0, 6.0)  # the block's ReLU6 applied to _bn1's output
        return act[0].flatten(1).T.contiguous().cpu()


def _resize(x: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1.0:
        return x
    return torch.nn.functional.interpolate(
        x, scale_factor=scale, mode="bilinear", antialias=True, align_corners=False
    ).clamp_(0.0, 1.0)


def _build(small: bool, verbose: bool) -> NDArray[np.float32]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if verbose:
        print(f"#   forwards on {device}")
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # float32 convolutions, as on the CPU
    try:
        return _build_on(_Stage5(device), small, verbose)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def _build_on(net: _Stage5, small: bool, verbose: bool) -> NDArray[np.float32]:
    images = [load_image(name) for name in IMAGES]
    # Fixed channel selection from the two untransformed images at scale 1.
    base = torch.cat([net.rows(img) for img in images])
    channels = torch.sort(torch.argsort(base.mean(dim=0), descending=True)[:N_CHANNELS]).values
    scales = (1.0,) if small else SCALES
    transforms = range(6) if small else range(8)
    parts: list[NDArray[np.float32]] = []
    t0 = time.perf_counter()
    for scale in scales:
        for img in images:
            scaled = _resize(img, scale)
            for t in transforms:
                parts.append(net.rows(dihedral(scaled, t))[:, channels].numpy())
            if verbose:
                n = sum(p.shape[0] for p in parts)
                print(f"#   built {n:,} rows (scale {scale}) in {time.perf_counter() - t0:.0f} s")
    allrows = np.concatenate(parts)
    del parts
    n_keep = N_SMALL if small else N_FULL
    if allrows.shape[0] < n_keep:
        raise RuntimeError(f"only {allrows.shape[0]} rows built, need {n_keep}")
    keep = np.random.default_rng(0).permutation(allrows.shape[0])[:n_keep]
    return np.ascontiguousarray(allrows[keep], dtype=np.float32)


def cache_path(small: bool) -> Path:
    """Where the matrix is cached."""
    return OUT / f"activations_{'small' if small else 'full'}.npy"


def activation_matrix(small: bool = False, *, verbose: bool = True) -> NDArray[np.float32]:
    """The real post-ReLU6 activation matrix (1M x 512, or 100k x 512 when ``small``)."""
    path = cache_path(small)
    if path.exists():
        return np.load(path)
    if verbose:
        print(f"# building {path.name} from real H&E images (one-time cost) ...")
    mat = _build(small, verbose)
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, mat)
    tmp.replace(path)
    return mat


if __name__ == "__main__":
    args = base_parser("Build (or load) the cached activation matrix.").parse_args()
    t = time.perf_counter()
    v = activation_matrix(args.small)
    print(
        f"shape {v.shape} {v.dtype}, zeros {np.mean(v == 0):.3f}, mean {v.mean():.4f}, "
        f"max {v.max():.3f}, {time.perf_counter() - t:.1f} s"
    )
