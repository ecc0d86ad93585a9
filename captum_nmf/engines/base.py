"""The engine protocol: how a fit is run, given a solver, a source of rows and the inputs."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from captum_nmf._core.nmf import NMF

__all__ = ["Engine", "FitOptions", "RowSource", "worker_generator"]

_SEED_STRIDE = 1_000_003  # worker w > 0 subsamples with seed + w * stride (worker 0: seed)


class RowSource(Protocol):
    """What a worker needs: the feature rows of a batch (``None`` for an empty batch)."""

    def __call__(self, batch: Any, generator: torch.Generator) -> Tensor | None:
        """Rows (n x C) of ``batch``, subsampled with ``generator``; None when empty."""

    def to(self, device: torch.device) -> None:
        """Move the model to ``device`` (a Ray actor that was given a GPU)."""


class FitOptions:
    """How the inputs are batched and passed over: the settings every engine shares.

    Args:
        batch_size (int): batch size of a map-style ``Dataset``.
        n_epochs (int): passes over re-iterable inputs.
        seed (int): location-subsampling seed (worker w: :func:`worker_generator`).
        progress (bool): show a progress bar.
        pin_memory (bool): pin the batches a DataLoader builds (the model is on a GPU).
    """

    def __init__(
        self, *, batch_size: int, n_epochs: int, seed: int, progress: bool, pin_memory: bool
    ) -> None:
        self.batch_size = batch_size
        self.n_epochs = n_epochs
        self.seed = seed
        self.progress = progress
        self.pin_memory = pin_memory


class Engine(Protocol):
    """A way of running a fit: in this process, on ``torch.distributed`` ranks, on Ray actors."""

    name: str

    def fit(self, solver: NMF, rows: RowSource, inputs: Any, options: FitOptions) -> NMF:
        """Fit ``solver`` on the rows that ``rows`` makes of the batches of ``inputs``.

        Returns:
            *NMF*: ``solver``, fitted.

        Raises:
            ValueError: no batch had rows.
        """


def worker_generator(seed: int, index: int) -> torch.Generator:
    """The location-subsampling generator of worker ``index``.

    Worker 0 uses ``seed`` itself, so a one-worker fit subsamples exactly as
    the single-process fit.

    Args:
        seed (int): the fit's seed.
        index (int): worker rank.

    Returns:
        *torch.Generator*: seeded with ``seed + index * 1000003``.
    """
    return torch.Generator().manual_seed(seed + index * _SEED_STRIDE)
