"""``NMFStatistics``: the sufficient statistics of streamed rows that distributed workers reduce."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["NMFStatistics"]


@dataclass(frozen=True)
class NMFStatistics:
    r"""Sufficient statistics of streamed rows for fixed concepts ``H``: what workers reduce.

    For rows ``V`` (n x C) and their exact weights ``W`` (n x K) for ``H``,
    the statistics are ``W^T W``, ``W^T V``, ``||V||_F^2``, the column sums
    of ``W`` and n, all float64. Statistics of disjoint chunks for the same
    ``H`` add up (``a + b``) to those of their union, so a distributed fit
    sums them over workers (``sum(stats)`` works too) and applies the sum with
    :meth:`NMF.update`. :meth:`flatten` packs them into one 1-D float64
    tensor for ``torch.distributed.all_reduce`` and :meth:`unflatten` unpacks it.

    When the concepts they were computed for include a dead one (zero norm, or
    no weight on any row so far), :meth:`NMF.statistics` also records
    ``seeds``: up to K of the rows with the largest residual ``||v - w H||^2``
    (each as the positive part of its residual, or the row itself where that
    part is zero) and those residuals in ``seed_scores``, largest first.
    :meth:`NMF.update` re-seeds dead concepts from them. Adding statistics
    keeps the K best seeds of both; :meth:`flatten` does not carry them (an
    all-reduce sums, which would mix rows), so statistics reduced that way
    re-seed nothing.

    Args:
        wtw (Tensor): K x K ``W^T W``.
        wtv (Tensor): K x C ``W^T V``.
        sq (Tensor): 0-d ``||V||_F^2``.
        weight_sums (Tensor): K column sums of ``W``.
        n_samples (int): number of rows n.
        seeds (Tensor, optional): m x C candidate concepts (m <= K), float64.
                    Default: None
        seed_scores (Tensor, optional): their m squared residuals, decreasing.
                    Default: None

    Raises:
        ValueError: the shapes do not fit together.
    """

    wtw: Tensor
    wtv: Tensor
    sq: Tensor
    weight_sums: Tensor
    n_samples: int
    seeds: Tensor | None = None
    seed_scores: Tensor | None = None

    def __post_init__(self) -> None:
        k = self.wtw.shape[0] if self.wtw.ndim == 2 else -1
        if (
            self.wtw.shape != (k, k)
            or self.wtv.ndim != 2
            or self.wtv.shape[0] != k
            or self.sq.ndim != 0
            or self.weight_sums.shape != (k,)
        ):
            raise ValueError(
                f"NMFStatistics needs wtw K x K, wtv K x C, sq 0-d and weight_sums of K; got "
                f"shapes {tuple(self.wtw.shape)}, {tuple(self.wtv.shape)}, "
                f"{tuple(self.sq.shape)}, {tuple(self.weight_sums.shape)}."
            )
        seeds, scores = self.seeds, self.seed_scores
        if (seeds is None) != (scores is None) or (
            seeds is not None
            and scores is not None
            and (
                seeds.ndim != 2
                or seeds.shape[0] > k
                or seeds.shape[1] != self.wtv.shape[1]
                or scores.shape != (seeds.shape[0],)
            )
        ):
            raise ValueError(
                "NMFStatistics needs seeds m x C with m <= K and seed_scores of m, or neither; "
                f"got {_shape(seeds)} and {_shape(scores)} for K x C = {tuple(self.wtv.shape)}."
            )

    @property
    def shape(self) -> tuple[int, int]:
        """``(K, C)``."""
        return int(self.wtv.shape[0]), int(self.wtv.shape[1])

    @classmethod
    def zeros(
        cls, n_components: int, n_features: int, *, device: str | torch.device | None = None
    ) -> NMFStatistics:
        """Statistics of no rows: what a worker without a batch contributes.

        Args:
            n_components (int): K.
            n_features (int): C.
            device (str or torch.device, optional): where to allocate them.
                        Default: None (CPU)

        Returns:
            *NMFStatistics*: all zero, n_samples 0.
        """
        kd: dict[str, Any] = {"dtype": torch.float64, "device": device}
        return cls(
            wtw=torch.zeros(n_components, n_components, **kd),
            wtv=torch.zeros(n_components, n_features, **kd),
            sq=torch.zeros((), **kd),
            weight_sums=torch.zeros(n_components, **kd),
            n_samples=0,
        )

    def __add__(self, other: NMFStatistics) -> NMFStatistics:
        if not isinstance(other, NMFStatistics):
            return NotImplemented
        if other.shape != self.shape:
            raise ValueError(
                f"Cannot add statistics of shape (K, C)={other.shape} to {self.shape}; both "
                "must come from the same stream."
            )
        device = self.wtw.device
        seeds, scores = _best_seeds(self, other, device)
        return NMFStatistics(
            wtw=self.wtw + other.wtw.to(device),
            wtv=self.wtv + other.wtv.to(device),
            sq=self.sq + other.sq.to(device),
            weight_sums=self.weight_sums + other.weight_sums.to(device),
            n_samples=self.n_samples + other.n_samples,
            seeds=seeds,
            seed_scores=scores,
        )

    def __radd__(self, other: object) -> NMFStatistics:
        if isinstance(other, int) and other == 0:  # sum(list_of_stats) starts from 0
            return self
        return NotImplemented

    def to(self, device: str | torch.device) -> NMFStatistics:
        """The same statistics on ``device``.

        Returns:
            *NMFStatistics*: a copy (or ``self`` when already there).
        """
        return NMFStatistics(
            wtw=self.wtw.to(device),
            wtv=self.wtv.to(device),
            sq=self.sq.to(device),
            weight_sums=self.weight_sums.to(device),
            n_samples=self.n_samples,
            seeds=None if self.seeds is None else self.seeds.to(device),
            seed_scores=None if self.seed_scores is None else self.seed_scores.to(device),
        )

    def flatten(self) -> Tensor:
        """One 1-D float64 tensor of ``K*K + K*C + 1 + K + 1`` values (for ``all_reduce``).

        Returns:
            *Tensor*: ``[wtw, wtv, sq, weight_sums, n_samples]`` flattened, on
            the statistics' device; summing flattened statistics and
            :meth:`unflatten` gives the sum of the statistics (without
            ``seeds``: a sum of rows is no row).
        """
        d = self.wtw.device
        return torch.cat(
            [
                self.wtw.double().reshape(-1),
                self.wtv.double().reshape(-1),
                self.sq.double().reshape(1),
                self.weight_sums.double().reshape(-1),
                torch.tensor([float(self.n_samples)], dtype=torch.float64, device=d),
            ]
        )

    @classmethod
    def unflatten(cls, flat: Tensor, n_components: int, n_features: int) -> NMFStatistics:
        """Inverse of :meth:`flatten`.

        Args:
            flat (Tensor): 1-D tensor of ``K*K + K*C + K + 2`` values.
            n_components (int): K.
            n_features (int): C.

        Returns:
            *NMFStatistics*: float64 views into ``flat`` (a float64 ``flat`` is
            not copied).

        Raises:
            ValueError: ``flat`` has another size.
        """
        k, c = n_components, n_features
        size = k * k + k * c + k + 2
        if flat.ndim != 1 or flat.numel() != size:
            raise ValueError(
                f"flat must be 1-D with K*K + K*C + K + 2 = {size} values for K={k}, C={c}, "
                f"got shape {tuple(flat.shape)}; pass the K and C it was flattened with."
            )
        flat = flat.double()
        i = 0
        wtw = flat[i : i + k * k].reshape(k, k)
        i += k * k
        wtv = flat[i : i + k * c].reshape(k, c)
        i += k * c
        sq = flat[i]
        i += 1
        weight_sums = flat[i : i + k]
        n = float(flat[i + k])
        return cls(wtw=wtw, wtv=wtv, sq=sq, weight_sums=weight_sums, n_samples=round(n))


def _shape(t: Tensor | None) -> str:
    return "None" if t is None else str(tuple(t.shape))


def _best_seeds(
    a: NMFStatistics, b: NMFStatistics, device: torch.device
) -> tuple[Tensor | None, Tensor | None]:
    """The (at most K) seeds of largest residual of ``a`` and ``b`` together, or None, None."""
    seeds = [s.seeds.to(device) for s in (a, b) if s.seeds is not None]
    scores = [s.seed_scores.to(device) for s in (a, b) if s.seed_scores is not None]
    if not seeds:
        return None, None
    all_scores = torch.cat(scores)
    keep = torch.argsort(all_scores, descending=True, stable=True)[: a.wtw.shape[0]]
    return torch.cat(seeds)[keep], all_scores[keep]
