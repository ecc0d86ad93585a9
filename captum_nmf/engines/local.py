"""The local engine: this process fits in memory (one tensor) or streams the batches."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from captum_nmf._core.nmf import NMF
from captum_nmf.engines.base import FitOptions, RowSource, worker_generator
from captum_nmf.engines.batches import epochs, rows_of

__all__ = ["LocalEngine"]


class LocalEngine:
    """Fit in this process.

    A tensor is one batch, factorised exactly in memory (:meth:`NMF.fit`;
    more epochs add nothing). Anything else is streamed batch after batch
    (:meth:`NMF.partial_fit`), keeping only the K x C statistics.
    """

    name = "local"

    def fit(self, solver: NMF, rows: RowSource, inputs: Any, options: FitOptions) -> NMF:
        """Fit ``solver`` on the rows of ``inputs`` (see :class:`~captum_nmf.engines.Engine`)."""
        in_memory = isinstance(inputs, Tensor)
        epoch_list: list[Iterable[Any]] = [[inputs]] if in_memory else epochs(inputs, options)
        generator = worker_generator(options.seed, 0)
        for v in rows_of(epoch_list, rows, generator, progress=options.progress):
            if in_memory:
                solver.fit(v)
            else:
                solver.partial_fit(v)
            del v  # one batch of rows alive at a time: dropped before the next forward
        return solver
