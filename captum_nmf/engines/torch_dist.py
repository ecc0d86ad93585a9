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

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from captum_nmf._core.nmf import NMF, NMFStatistics
from captum_nmf.engines.base import FitOptions, RowSource, worker_generator
from captum_nmf.engines.batches import epochs, rows_of
from captum_nmf.engines.held import HeldChunks

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


def _backends() -> dict[str, str]:
    """The default group's backend per device type, e.g. ``{"cpu": "gloo", "cuda": "nccl"}``."""
    dist = torch.distributed
    config = str(dist.get_backend_config())
    if ":" not in config:  # one backend named for the device types it serves
        name = str(dist.get_backend())
        return {"cuda": name} if name == "nccl" else {"cpu": name, "cuda": name}
    pairs = (part.split(":", 1) for part in config.split(","))
    return {device.strip(): backend.strip() for device, backend in pairs}


def _comm_device(near: torch.device | None = None) -> torch.device:
    """Where this fit's collectives take their tensors.

    The CPU when one of the group's backends serves it (gloo, mpi; also a group
    of gloo for the CPU and NCCL for CUDA), else CUDA: the GPU of ``near`` (the
    device of this rank's rows) when they are on one, else the current GPU. A
    group initialised without a backend on a GPU machine may hold NCCL only,
    for CUDA: ``get_backend()`` then names no backend, and CPU tensors had no
    backend to go to. With the rows' GPU, ranks whose models are on
    ``cuda:LOCAL_RANK`` need no ``torch.cuda.set_device``.

    Raises:
        RuntimeError: no backend of the group serves the CPU or CUDA.
    """
    served = _backends()
    if "cpu" in served:
        return torch.device("cpu")
    if "cuda" in served:
        if near is not None and near.type == "cuda" and near.index is not None:
            return near
        return torch.device("cuda", torch.cuda.current_device())
    raise RuntimeError(
        f"The process group's backends ({torch.distributed.get_backend_config()}) serve "
        "neither the CPU nor CUDA; initialise it with backend='gloo' (CPU) or 'nccl' (CUDA)."
    )


def _share_start(
    solver: NMF, src: int, rank: int, device: torch.device, n_components: int, comm: torch.device
) -> None:
    """Broadcast ``H0`` from rank ``src``; the other ranks start their stream from it."""
    dist = torch.distributed
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


def _reduce_update(
    solver: NMF, stats: NMFStatistics, n_components: int, comm: torch.device
) -> None:
    """Sum ``stats`` over the ranks (re-seeding candidates gathered too) and apply them."""
    dist = torch.distributed
    k, c = n_components, int(solver.n_features_in_)
    seeded = torch.tensor([float(stats.seeds is not None)], dtype=torch.float64, device=comm)
    flat = torch.cat([stats.flatten().to(comm), seeded])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    total = NMFStatistics.unflatten(flat[:-1], k, c)
    if float(flat[-1]) > 0:  # a concept is dead: every rank's rows of largest residual
        total = total + _gathered_seeds(stats, k, c, comm)
    if total.n_samples > 0:
        solver.update(total)


def _gathered_seeds(stats: NMFStatistics, k: int, c: int, comm: torch.device) -> NMFStatistics:
    """Zero statistics holding the re-seeding candidates of every rank (the K best are kept).

    Each rank's candidates (padded to K, score -1 where there are fewer) are
    gathered, and added up in rank order as statistics add: keeping the K best.
    """
    dist = torch.distributed
    seeds = torch.zeros(k, c, dtype=torch.float64, device=comm)
    scores = torch.full((k,), -1.0, dtype=torch.float64, device=comm)  # -1: no candidate
    if stats.seeds is not None and stats.seed_scores is not None:
        m = int(stats.seeds.shape[0])
        seeds[:m], scores[:m] = stats.seeds.to(comm), stats.seed_scores.to(comm)
    world = dist.get_world_size()
    all_seeds = [torch.empty_like(seeds) for _ in range(world)]
    all_scores = [torch.empty_like(scores) for _ in range(world)]
    dist.all_gather(all_seeds, seeds)
    dist.all_gather(all_scores, scores)
    zeros = NMFStatistics.zeros(k, c, device=comm)
    total = zeros
    for rank_seeds, rank_scores in zip(all_seeds, all_scores, strict=True):
        found = rank_scores >= 0
        if bool(found.any()):
            part = dataclasses.replace(
                zeros, seeds=rank_seeds[found], seed_scores=rank_scores[found]
            )
            total = total + part
    return total


def _start_from_held(
    solver: NMF, held: HeldChunks, src: int, n_components: int, comm: torch.device
) -> None:
    """Rank ``src`` fits its held rows in memory for ``H0``; every rank then replays its chunks.

    As :meth:`NMF.partial_fit` does once it holds enough: each step's chunks
    (summed over the ranks) get their weights for the concepts of their turn.
    """
    rank = torch.distributed.get_rank()
    mine = held.rows()
    if rank == src and mine is not None:
        solver.initialise_stream(mine)
    device = mine.device if mine is not None else comm
    _share_start(solver, src, rank, device, n_components, comm)
    k, c = n_components, int(solver.n_features_in_)
    for step in range(len(held.steps)):
        stats = held.statistics(solver, step)
        _reduce_update(solver, stats if stats is not None else NMFStatistics.zeros(k, c), k, comm)


def fit_torch_distributed(solver: NMF, rows: Iterable[Tensor], *, n_components: int) -> NMF:
    """Fit ``solver`` on every rank's rows, all-reducing the statistics each step.

    Must be called by every rank of the default process group (collective).
    The stream starts as :meth:`NMF.partial_fit` does: every rank holds its
    first chunks' non-zero rows until one rank holds enough to start from
    (:meth:`NMF.stream_readiness`, at least ``max(100, 10 K)`` rows spanning K
    directions), so that blank or tiny first batches do not fix the concepts.
    Then the lowest such rank fits its held rows in memory, broadcasts
    ``H0``, and all ranks replay their held chunks step by step. When the
    data ends first, the rank holding the most non-zero rows starts. A
    concept that dies is re-seeded from the rows of largest residual of all
    ranks.

    Args:
        solver (NMF): a fresh estimator with the same settings on every rank.
        rows (Iterable[Tensor]): this rank's non-empty n_t x C chunks, in order.
        n_components (int): K.

    Returns:
        *NMF*: ``solver``, fitted; identical on every rank.

    Raises:
        ValueError: no rank had any rows, or no rank had K rows with a non-zero entry.
    """
    dist = torch.distributed
    rank, world = dist.get_rank(), dist.get_world_size()
    chunks = iter(rows)
    held = HeldChunks()
    started = False
    comm: torch.device | None = None
    while True:
        v = next(chunks, None)
        if comm is None:  # chosen once, by the first rows' device
            comm = _comm_device(None if v is None else v.device)
        ready = False
        if not started and v is not None:
            candidate = held.rows(then=v)
            ready = candidate is not None and solver.stream_readiness(candidate) == "ready"
        # One collective for both: is anyone left, and the lowest ready rank (MAX of -rank).
        flags = torch.tensor(
            [float(v is not None), -float(rank if ready else world)],
            dtype=torch.float64,
            device=comm,
        )
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if float(flags[0]) == 0.0:
            break
        if started:
            k, c = n_components, int(solver.n_features_in_)
            stats = solver.statistics(v) if v is not None else NMFStatistics.zeros(k, c)
            _reduce_update(solver, stats, k, comm)
            continue
        held.add(v)
        src = int(-float(flags[1]))
        if src < world:
            _start_from_held(solver, held, src, n_components, comm)
            held, started = HeldChunks(), True
    if not started:
        _start_at_the_end(solver, held, n_components, comm)
    return solver


def _start_at_the_end(solver: NMF, held: HeldChunks, n_components: int, comm: torch.device) -> None:
    """No rank held enough to start as ``partial_fit`` does: the rank holding most rows starts.

    Raises:
        ValueError: no rank holds enough non-zero rows for :meth:`NMF.initialise_stream`.
    """
    dist = torch.distributed
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = held.rows()
    count = 0 if mine is None else int(mine.shape[0])
    possible = mine is not None and solver.stream_readiness(mine) != "too few"
    # the most non-zero rows wins, the lowest rank on a tie: count * world + (world - 1 - rank)
    code = torch.tensor(
        [float(count if possible else -1) * world + (world - 1 - rank)],
        dtype=torch.float64,
        device=comm,
    )
    dist.all_reduce(code, op=dist.ReduceOp.MAX)
    best = int(code[0])
    if best < 0:  # every rank raises the same error
        seen = torch.tensor(
            [float(held.n_rows)],
            dtype=torch.float64,
            device=comm,
        )
        dist.all_reduce(seen, op=dist.ReduceOp.SUM)
        raise ValueError(
            "Cannot fit on 0 samples: no rank received a non-empty batch; give every rank "
            "its shard of the data."
            if float(seen[0]) == 0.0
            else f"Cannot fit: no rank received {n_components} rows with a non-zero entry "
            f"({int(seen[0])} rows in all; the layer's activations were 0 almost everywhere: "
            "blank tiles?); pass tiles with content."
        )
    _start_from_held(solver, held, world - 1 - best % world, n_components, comm)
