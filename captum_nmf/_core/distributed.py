"""Synchronous data-parallel streaming NMF: ``torch.distributed`` ranks or Ray actors.

Every step, each worker takes its next batch, computes the rows' sufficient
statistics (:class:`~captum_nmf._core.nmf.NMFStatistics`) for the current
concepts ``H``, the statistics are summed over workers, and one
:meth:`NMF.update` is applied. With one worker this is exactly the
single-process stream (:meth:`NMF.partial_fit` batch after batch); with W
workers it is the stream whose chunks are the unions of the W batches of a
step. Step 0: the first worker with rows factorises its first batch in memory
(:meth:`NMF.initialise_stream`) and its ``H0`` is shared. Workers whose
batches have run out contribute zero statistics until every worker is done.

Two transports:

* :func:`fit_torch_distributed`: the caller already runs under ``torchrun``
  (a process group is initialised); every rank streams its own shard and the
  statistics are all-reduced (SUM) each step; every rank applies the same
  update, so all end with the same concepts.
* :func:`fit_ray`: a driver deals batches round-robin to Ray actors that each
  hold a copy of the model, sends them ``H`` each step and sums what they return.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from captum_nmf._core.nmf import NMF, NMFStatistics
from captum_nmf._utils.ray_engine import actor_options, check_address, import_ray, ray_session

__all__ = ["RowSource", "fit_ray", "fit_torch_distributed", "worker_generator"]

_SEED_STRIDE = 1_000_003  # worker w > 0 subsamples with seed + w * stride (worker 0: seed)
_FLOAT64, _FLOAT32 = 1.0, 0.0


class RowSource(Protocol):
    """What a worker needs: the feature rows of a batch (``None`` for an empty batch)."""

    def __call__(self, batch: Any, generator: torch.Generator) -> Tensor | None:
        """Rows (n x C) of ``batch``, subsampled with ``generator``; None when empty."""

    def to(self, device: torch.device) -> None:
        """Move the model to ``device`` (a Ray actor that was given a GPU)."""


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


# --------------------------------------------------------------- torch.distributed
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
    if rank == src:
        c = int(solver.n_features_in_)
        is64 = solver._h.dtype == torch.float64
        header = torch.tensor(
            [float(c), float(solver.n_iter_), _FLOAT64 if is64 else _FLOAT32],
            dtype=torch.float64,
            device=comm,
        )
    dist.broadcast(header, src=src)
    c, n_iter = int(header[0]), int(header[1])
    dtype = torch.float64 if float(header[2]) == _FLOAT64 else torch.float32
    h0 = (
        solver._h.to(device=comm, dtype=torch.float64).contiguous()
        if rank == src
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


# ----------------------------------------------------------------------------- Ray
class _StatisticsWorker:
    """A Ray actor: a copy of the model that turns batches into statistics for a given ``H``."""

    def __init__(
        self,
        rows: RowSource,
        load: Callable[[Any], Any] | None,
        solver_params: dict[str, Any],
        index: int,
        seed: int,
        num_cpus: float,
    ) -> None:
        import ray

        torch.set_num_threads(max(1, math.floor(num_cpus)))
        self.device = torch.device("cuda") if ray.get_gpu_ids() else torch.device("cpu")
        if self.device.type == "cuda":
            rows.to(self.device)
        self.rows = rows
        self.load = load
        self.solver_params = solver_params
        self.generator = worker_generator(seed, index)
        self.pending: Tensor | None = None

    def _rows(self, item: Any) -> Tensor | None:
        batch = item if self.load is None else self.load(item)
        return self.rows(batch, self.generator)

    def initialise(self, item: Any) -> tuple[Tensor, int] | None:
        """``H0`` (CPU) and HALS iterations of this batch's in-memory fit; None when empty."""
        v = self._rows(item)
        if v is None:
            return None
        self.pending = v  # its statistics are asked for next, with this H0
        solver = NMF(**self.solver_params).initialise_stream(v)
        return solver._h.cpu(), int(solver.n_iter_)

    def statistics(self, h: Tensor, item: Any, pending: bool) -> Tensor | None:
        """Flattened statistics of the next batch for ``h``; None without rows."""
        if pending:
            v, self.pending = self.pending, None
        else:
            v = None if item is None else self._rows(item)
        if v is None:
            return None
        solver = NMF(**self.solver_params).start_stream(h.to(v.device))
        return solver.statistics(v).flatten().cpu()


def fit_ray(
    solver: NMF,
    rows: RowSource,
    items: Sequence[Any],
    *,
    load: Callable[[Any], Any] | None,
    n_epochs: int,
    workers: int | None,
    address: str | None,
    seed: int,
    progress: bool,
) -> NMF:
    """Fit ``solver`` with Ray actors that each compute statistics of their batches.

    Batches are dealt round-robin: at step s, actor j gets item ``s * n + j``.
    Each actor holds a copy of ``rows`` (and so of the model), made by
    pickling; the caller's model is never touched.

    Args:
        solver (NMF): a fresh estimator; the driver applies the updates.
        rows (RowSource): batch -> rows, run in the actors.
        items (Sequence): one entry per batch of an epoch: a batch, or what
                    ``load`` turns into one in the actor.
        load (Callable, optional): item -> batch in the actor (e.g. indices
                    of a dataset -> collated tensors); None sends the batches.
        n_epochs (int): passes over ``items``.
        workers (int, optional): number of actors (None: one per GPU, or per CPU).
        address (str, optional): Ray cluster; None runs Ray embedded.
        seed (int): subsampling seed (actor j: :func:`worker_generator`).
        progress (bool): show a tqdm progress bar.

    Returns:
        *NMF*: ``solver``, fitted.

    Raises:
        ImportError: Ray is not installed.
        ConnectionError: nothing answers at ``address`` (checked before any work).
        ValueError: ``workers`` is not an int >= 1, or no batch had rows.
        RuntimeError: a worker died during the fit.
    """
    feature = "NMFConceptAttribution.fit(engine='ray')"
    import_ray(feature)
    if address is not None:  # also when a Ray session is already up: the address must work
        check_address(address)
    params = solver.get_params()
    k = int(params["n_components"])
    with ray_session(address, feature=feature) as ray:
        n, options = actor_options(ray, workers, cap=max(len(items), 1))
        actor_class = ray.remote(_StatisticsWorker)
        rows_ref, load_ref = ray.put(rows), ray.put(load)
        actors = [
            actor_class.options(**options).remote(
                rows_ref, load_ref, params, j, seed, float(options.get("num_cpus", 1))
            )
            for j in range(n)
        ]
        bar = tqdm(total=0, disable=True)
        try:
            started = False
            n_steps = -(-len(items) // n)
            for epoch in range(n_epochs):
                bar = tqdm(
                    total=len(items),
                    disable=not progress,
                    desc=f"fit concepts on {n} Ray workers (epoch {epoch + 1}/{n_epochs})",
                    unit="batch",
                )
                for step in range(n_steps):
                    assigned: list[Any] = list(items[step * n : (step + 1) * n])
                    pending = [False] * n
                    if not started:
                        for j, item in enumerate(assigned):
                            result = ray.get(actors[j].initialise.remote(item))
                            if result is not None:
                                h0, n_iter = result
                                solver.start_stream(h0)
                                solver.n_iter_ = n_iter
                                pending[j] = started = True
                                break
                            assigned[j] = None  # empty: already seen
                    if started:
                        h_ref = ray.put(solver._h.cpu())
                        futures = [
                            actor.statistics.remote(
                                h_ref, assigned[j] if j < len(assigned) else None, pending[j]
                            )
                            for j, actor in enumerate(actors)
                        ]
                        c = int(solver.n_features_in_)
                        parts = [
                            NMFStatistics.unflatten(f, k, c)
                            for f in ray.get(futures)
                            if f is not None
                        ]
                        if parts:
                            solver.update(sum(parts[1:], parts[0]))
                    bar.update(len(items[step * n : (step + 1) * n]))
                bar.close()
        except ray.exceptions.RayActorError as exc:
            raise RuntimeError(
                f"A Ray worker of the fit died ({exc.__class__.__name__}); the fit is not "
                "resumable, run it again (e.g. with fewer workers or less memory per batch)."
            ) from exc
        finally:
            bar.close()
            for actor in actors:
                with contextlib.suppress(Exception):  # already dead
                    ray.kill(actor)
    if not started:
        raise ValueError(
            "Cannot fit NMFConceptAttribution on 0 samples (every batch was empty); pass at "
            "least one non-empty batch."
        )
    return solver
