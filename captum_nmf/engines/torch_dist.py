"""The ``torch.distributed`` engine: every rank streams its shard, statistics are all-reduced.

Every step, each rank takes its next batch, computes the rows' sufficient
statistics (:class:`~captum_nmf._core.nmf.NMFStatistics`) for the current
concepts ``H``, the statistics are summed over ranks, and one
:meth:`NMF.update` is applied on every rank, so all end with the same
concepts. With one rank this is exactly the single-process stream; with W
ranks it is the stream whose chunks are the unions of the W batches of a step.
Step 0: the first rank with rows factorises its first batch in memory
(:meth:`NMF.initialise_stream`) and its ``H0`` is broadcast. Ranks whose
batches have run out contribute zero statistics until every rank is done.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from captum_nmf._core.nmf import NMF, NMFStatistics
from captum_nmf.engines.base import FitOptions, RowSource, worker_generator
from captum_nmf.engines.batches import epochs, rows_of

__all__ = ["TorchDistributedEngine", "fit_torch_distributed"]

_FLOAT64, _FLOAT32 = 1.0, 0.0


class TorchDistributedEngine:
    """Fit on the ranks of the initialised default process group (launch with ``torchrun``).

    Every rank calls ``fit`` with its own shard: a map-style ``Dataset`` is
    split between ranks by striding, a tensor is one batch per rank, any
    other iterable is taken as this rank's batches.
    """

    name = "torch.distributed"

    def fit(self, solver: NMF, rows: RowSource, inputs: Any, options: FitOptions) -> NMF:
        """Fit ``solver`` collectively (see :class:`~captum_nmf.engines.Engine`)."""
        dist = torch.distributed
        rank, world = dist.get_rank(), dist.get_world_size()
        if isinstance(inputs, Tensor):
            epoch_list: list[Iterable[Any]] = [[inputs]]
        else:
            epoch_list = epochs(inputs, options, shard=(rank, world))
        generator = worker_generator(options.seed, rank)
        shard = rows_of(epoch_list, rows, generator, progress=options.progress and rank == 0)
        k = int(solver.get_params()["n_components"])
        return fit_torch_distributed(solver, shard, n_components=k)


def _comm_device() -> torch.device:
    """Where collectives take tensors: the current GPU for NCCL, else the CPU."""
    dist = torch.distributed
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _share_start(solver: NMF, src: int, rank: int, device: torch.device, n_components: int) -> None:
    """Broadcast ``H0`` from rank ``src``; the other ranks start their stream from it."""
    dist = torch.distributed
    comm = _comm_device()
    header = torch.zeros(3, dtype=torch.float64, device=comm)
    h = solver.components if rank == src else None
    if h is not None:
        is64 = h.dtype == torch.float64
        header = torch.tensor(
            [float(solver.n_features_in_), float(solver.n_iter_), _FLOAT64 if is64 else _FLOAT32],
            dtype=torch.float64,
            device=comm,
        )
    dist.broadcast(header, src=src)
    c, n_iter = int(header[0]), int(header[1])
    dtype = torch.float64 if float(header[2]) == _FLOAT64 else torch.float32
    h0 = (
        h.to(device=comm, dtype=torch.float64).contiguous()
        if h is not None
        else torch.zeros(n_components, c, dtype=torch.float64, device=comm)
    )
    dist.broadcast(h0, src=src)
    if rank != src:
        solver.start_stream(h0.to(device=device, dtype=dtype))
        solver.n_iter_ = n_iter


def fit_torch_distributed(solver: NMF, rows: Iterable[Tensor], *, n_components: int) -> NMF:
    """Fit ``solver`` on every rank's rows, all-reducing the statistics each step.

    Must be called by every rank of the default process group (collective).

    Args:
        solver (NMF): a fresh estimator with the same settings on every rank.
        rows (Iterable[Tensor]): this rank's non-empty n_t x C chunks, in order.
        n_components (int): K.

    Returns:
        *NMF*: ``solver``, fitted; identical on every rank.

    Raises:
        ValueError: no rank had any rows.
    """
    dist = torch.distributed
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = _comm_device()
    chunks = iter(rows)
    started = False
    while True:
        v = next(chunks, None)
        has = v is not None
        # One collective for both: is anyone left, and the lowest rank with rows (MAX of -rank).
        flags = torch.tensor(
            [float(has), -float(rank if has else world)], dtype=torch.float64, device=comm
        )
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if float(flags[0]) == 0.0:
            break
        if not started:
            src = int(-float(flags[1]))
            if rank == src and v is not None:
                solver.initialise_stream(v)
            _share_start(solver, src, rank, v.device if v is not None else comm, n_components)
            started = True
        k, c = n_components, int(solver.n_features_in_)
        stats = solver.statistics(v) if v is not None else NMFStatistics.zeros(k, c)
        flat = stats.flatten().to(comm)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        total = NMFStatistics.unflatten(flat, k, c)
        if total.n_samples > 0:
            solver.update(total)
    if not started:
        raise ValueError(
            "Cannot fit on 0 samples: no rank received a non-empty batch; give every rank "
            "its shard of the data."
        )
    return solver
