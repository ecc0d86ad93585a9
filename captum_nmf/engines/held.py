"""The first chunks a distributed fit holds until one worker can start the stream from them.

:meth:`NMF.partial_fit` holds its first chunks' non-zero rows until they are
enough to start from (:meth:`NMF.stream_readiness`); the distributed engines
do the same per worker, then replay the held chunks step by step, so that
blank or tiny first batches do not fix the concepts.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from captum_nmf._core.nmf import NMF, NMFStatistics

__all__ = ["HeldChunks"]


class HeldChunks:
    """One worker's chunk of each step before the start: its non-zero rows and its row count.

    A step where the worker had no batch holds None, so that the steps of
    all workers line up when they are replayed.
    """

    def __init__(self) -> None:
        self.steps: list[tuple[Tensor, int] | None] = []

    def add(self, v: Tensor | None) -> None:
        """Hold ``v``'s non-zero rows (None: no batch at this step)."""
        self.steps.append(None if v is None else (_non_zero(v), int(v.shape[0])))

    def rows(self, then: Tensor | None = None) -> Tensor | None:
        """All held non-zero rows (and those of ``then``, not held), or None when there are none."""
        parts = [rows for rows, _ in filter(None, self.steps) if rows.shape[0]]
        if then is not None and then.shape[0]:
            parts.append(_non_zero(then))
        parts = [p for p in parts if p.shape[0]]
        return torch.cat(parts) if parts else None

    @property
    def n_rows(self) -> int:
        """Rows held, rows of zeros included."""
        return sum(total for _, total in filter(None, self.steps))

    def statistics(self, solver: NMF, step: int) -> NMFStatistics | None:
        """The statistics of step ``step``'s chunk for ``solver``'s concepts; None without one.

        Rows of zeros add nothing but their count (as in ``partial_fit``).
        """
        entry = self.steps[step]
        if entry is None:
            return None
        rows, total = entry
        if rows.shape[0] == 0:
            k, c = int(solver.n_components_), int(solver.n_features_in_)
            zeros = NMFStatistics.zeros(k, c, device=rows.device)
            return dataclasses.replace(zeros, n_samples=total)
        return dataclasses.replace(solver.statistics(rows), n_samples=total)


def _non_zero(v: Tensor) -> Tensor:
    return v[torch.amax(v, dim=1) > 0]
