"""The Ray engine: statistics workers for fitting, and a pool of actors for one task per item.

* :class:`RayEngine` / :func:`fit_ray`: a driver deals batches round-robin
  to Ray actors that each hold a copy of the model, sends them ``H`` each
  step and sums the statistics they return (synchronous data parallelism,
  as :mod:`~captum_nmf.engines.torch_dist`).
* :class:`ActorPool`: actors that each hold one copy of a worker object
  (e.g. the model of a cohort) and run one task per item; an actor that dies
  is replaced and its task retried, a task's own error is reported as it is.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from captum_nmf._core.nmf import NMF, NMFStatistics
from captum_nmf.engines.base import FitOptions, RowSource, worker_generator
from captum_nmf.engines.batches import item_batches
from captum_nmf.engines.held import HeldChunks
from captum_nmf.engines.ray_cluster import actor_options, check_address, import_ray, ray_session

__all__ = ["ActorPool", "ActorWorker", "RayEngine", "TaskOutcome", "fit_ray"]

_FEATURE = "NMFConceptAttribution.fit(engine='ray')"


class RayEngine:
    """Fit with ``workers`` Ray actors on the cluster at ``address`` (None: Ray embedded).

    ``inputs`` must be a picklable map-style ``Dataset`` (its index ranges are
    sent) or a list or tuple of batches.
    """

    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None) -> None:
        self.workers = workers
        self.address = address

    def fit(self, solver: NMF, rows: RowSource, inputs: Any, options: FitOptions) -> NMF:
        """Fit ``solver`` on Ray actors (see :class:`~captum_nmf.engines.Engine`)."""
        items, load = item_batches(inputs, options.batch_size)
        return fit_ray(
            solver,
            rows,
            items,
            load=load,
            n_epochs=options.n_epochs,
            workers=self.workers,
            address=self.address,
            seed=options.seed,
            progress=options.progress,
        )


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
        self.held = HeldChunks()  # the batches of the steps before the start

    def _rows(self, item: Any) -> Tensor | None:
        batch = item if self.load is None else self.load(item)
        return self.rows(batch, self.generator)

    def hold(self, item: Any) -> tuple[int, str, int]:
        """Hold this step's batch (None: no batch); then as :meth:`held_state`."""
        self.held.add(None if item is None else self._rows(item))
        return self.held_state()

    def held_state(self) -> tuple[int, str, int]:
        """The held rows with a non-zero entry, their readiness, and all held rows.

        Returns:
            *tuple*: the count of held rows with a non-zero entry,
            :meth:`NMF.stream_readiness` of them (``"too few"`` with none) and
            the count of held rows, rows of zeros included.
        """
        rows = self.held.rows()
        if rows is None:
            return 0, "too few", self.held.n_rows
        state = NMF(**self.solver_params).stream_readiness(rows)
        return int(rows.shape[0]), state, self.held.n_rows

    def initialise(self) -> tuple[Tensor, int]:
        """``H0`` (CPU) and HALS iterations of the in-memory fit of the held rows."""
        solver = NMF(**self.solver_params).initialise_stream(self.held.rows())
        return solver.components.cpu(), int(solver.n_iter_)

    def replay(self, h: Tensor, step: int) -> NMFStatistics | None:
        """Statistics (CPU) of the batch held at ``step`` for ``h``; None without one."""
        solver = NMF(**self.solver_params).start_stream(h.to(self.device))
        stats = self.held.statistics(solver, step)
        if step == len(self.held.steps) - 1:
            self.held = HeldChunks()  # replayed: the stream goes on from statistics alone
        return None if stats is None else stats.to("cpu")

    def statistics(self, h: Tensor, item: Any) -> NMFStatistics | None:
        """Statistics (CPU, re-seeding candidates kept) of the next batch for ``h``, or None."""
        v = None if item is None else self._rows(item)
        if v is None:
            return None
        solver = NMF(**self.solver_params).start_stream(h.to(v.device))
        return solver.statistics(v).to("cpu")


def _apply(solver: NMF, parts: list[NMFStatistics | None]) -> None:
    """Sum the workers' statistics (the K best re-seeding candidates kept) and update ``H``."""
    found = [p for p in parts if p is not None]
    if found:
        total = sum(found[1:], found[0])
        if total.n_samples > 0:
            solver.update(total)


def _hold_step(ray: Any, actors: list[Any], assigned: list[Any]) -> list[tuple[int, str, int]]:
    """Every actor holds its batch of this step (None past the last); their held rows' state."""
    futures = [
        actor.hold.remote(assigned[j] if j < len(assigned) else None)
        for j, actor in enumerate(actors)
    ]
    return list(ray.get(futures))


def _start_held(ray: Any, actors: list[Any], solver: NMF, src: int, n_steps: int) -> None:
    """Actor ``src`` fits its held rows for ``H0``; the held steps are replayed one by one."""
    h0, n_iter = ray.get(actors[src].initialise.remote())
    solver.start_stream(h0)
    solver.n_iter_ = n_iter
    for step in range(n_steps):
        h_ref = ray.put(solver.components.cpu())
        _apply(solver, ray.get([actor.replay.remote(h_ref, step) for actor in actors]))


def _step(ray: Any, actors: list[Any], solver: NMF, assigned: list[Any]) -> None:
    """One synchronous step: every actor's statistics for the current ``H``, summed, applied."""
    h_ref = ray.put(solver.components.cpu())
    futures = [
        actor.statistics.remote(h_ref, assigned[j] if j < len(assigned) else None)
        for j, actor in enumerate(actors)
    ]
    _apply(solver, ray.get(futures))


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
    import_ray(_FEATURE)
    if address is not None:  # also when a Ray session is already up: the address must work
        check_address(address)
    params = solver.get_params()
    started, held_steps, rows_seen = False, 0, 0
    with ray_session(address, feature=_FEATURE) as ray:
        n, options = actor_options(ray, workers, cap=max(len(items), 1))
        actor_class = ray.remote(_StatisticsWorker)
        rows_ref, load_ref = ray.put(rows), ray.put(load)
        cpus = float(options.get("num_cpus", 1))
        actors = [
            actor_class.options(**options).remote(rows_ref, load_ref, params, j, seed, cpus)
            for j in range(n)
        ]
        bar = tqdm(total=0, disable=True)
        try:
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
                    if started:
                        _step(ray, actors, solver, assigned)
                    else:  # held until one actor holds enough to start, as partial_fit does
                        states = _hold_step(ray, actors, assigned)
                        held_steps += 1
                        ready = [j for j, (_, state, _) in enumerate(states) if state == "ready"]
                        if ready:
                            _start_held(ray, actors, solver, ready[0], held_steps)
                            started = True
                    bar.update(len(assigned))
                bar.close()
            if not started and held_steps:  # the data ended first: the most rows start it
                states = ray.get([actor.held_state.remote() for actor in actors])
                possible = [(c, -j) for j, (c, state, _) in enumerate(states) if state != "too few"]
                if possible:
                    _start_held(ray, actors, solver, -max(possible)[1], held_steps)
                    started = True
                rows_seen = sum(n for _, _, n in states)
        except ray.exceptions.RayActorError as exc:
            raise RuntimeError(
                f"A Ray worker of the fit died ({exc.__class__.__name__}); the fit is not "
                "resumable, run it again (e.g. with fewer workers or less memory per batch)."
            ) from exc
        finally:
            bar.close()
            for actor in actors:
                _kill(ray, actor)
    if not started and rows_seen:
        k = params["n_components"]
        raise ValueError(
            f"Cannot fit NMFConceptAttribution: no Ray worker received {k} rows with a non-zero "
            f"entry ({rows_seen} rows in all). The layer's activations were 0 at almost every "
            "location (blank tiles?); pass tiles with content."
        )
    if not started:
        raise ValueError(
            "Cannot fit NMFConceptAttribution on 0 samples (every batch was empty); pass at "
            "least one non-empty batch."
        )
    return solver


# ------------------------------------------------------------------ actor pool
class ActorWorker:
    """Base of a pool's worker: torch's threads set to the actor's CPU share, a pid to report.

    Subclasses hold their state (e.g. a model, moved to the GPU when ``gpu``)
    and define ``run(*task)``.
    """

    def __init__(self, threads: int, gpu: bool) -> None:
        torch.set_num_threads(max(threads, 1))
        self.gpu = gpu and torch.cuda.is_available()

    def pid(self) -> int:
        """This actor's process id."""
        return os.getpid()

    def close(self) -> None:
        """Release what the worker holds before its actor is killed (threads, worker processes).

        Called by :meth:`ActorPool.close`; the default holds nothing.
        """


@dataclass
class TaskOutcome:
    """What happened to one task of an :class:`ActorPool`.

    Attributes:
        index (int): the task's position.
        value (Any): what ``run`` returned (None on failure).
        error (BaseException or None): the task's own error, or the actor's death.
        died (bool): the actor died on it (``retries + 1`` times).
        attempts (int): runs of the task.
        worker (str): ``"ray:<pid>"`` of the actor (``"ray"`` when unknown).
        seconds (float): wall time of the last attempt.
        trace (str): the error's traceback, as the worker printed it.
    """

    index: int
    value: Any
    error: BaseException | None
    died: bool
    attempts: int
    worker: str
    seconds: float
    trace: str = ""


class ActorPool:
    """Actors that each hold a copy of a worker, running one task at a time.

    Args:
        ray (module): an initialised ``ray`` (see :func:`ray_session`).
        worker_class (type): an :class:`ActorWorker` subclass; constructed in
                    each actor as ``worker_class(*args, threads, gpu)``.
        args (tuple): constructor arguments, put in Ray's object store once.
        workers (int, optional): number of actors (None: one per GPU, else per CPU).
        cap (int): at most this many actors (e.g. the number of tasks).

    Raises:
        RuntimeError: the actors could not be started (e.g. ``args`` do not
                    unpickle there); every started actor is killed first.
    """

    def __init__(
        self, ray: Any, worker_class: type, args: tuple[Any, ...], *, workers: int | None, cap: int
    ) -> None:
        self.ray = ray
        self.n, options = actor_options(ray, workers, cap=cap)
        self._threads = max(int(options.get("num_cpus", 1)), 1)
        self._gpu = bool(options.get("num_gpus"))
        self._remote = ray.remote(worker_class).options(**options, max_concurrency=1)
        self._args = tuple(ray.put(a) for a in args)
        self.actors = [self._new() for _ in range(self.n)]
        try:  # what cannot be rebuilt there fails once here, not once per task
            self.pids: list[int | None] = ray.get([a.pid.remote() for a in self.actors])
        except ray.exceptions.RayError as exc:
            self.close()
            cause = _cause(exc)
            raise RuntimeError(
                f"Could not start the Ray workers: {type(cause).__name__}: {cause}. Their "
                "state (the model, the concepts, the options) must unpickle in the workers "
                "(importable modules, same library versions)."
            ) from exc

    def _new(self) -> Any:
        return self._remote.remote(*self._args, self._threads, self._gpu)

    def _worker(self, a: int) -> str:
        return f"ray:{self.pids[a]}" if self.pids[a] is not None else "ray"

    def map(
        self,
        tasks: Sequence[tuple[Any, ...]],
        on_outcome: Callable[[TaskOutcome], None],
        *,
        retries: int = 1,
        progress: bool = True,
        desc: str = "tasks (ray)",
    ) -> None:
        """Run ``run(*task)`` for every task, calling ``on_outcome`` as each finishes.

        A task whose actor died is run again on a fresh actor up to
        ``retries`` times; a task that raises is reported at once.
        """
        ray = self.ray
        queue: deque[int] = deque(range(len(tasks)))
        attempts: Counter[int] = Counter()
        started: dict[int, float] = {}
        pending: dict[Any, tuple[int, int]] = {}
        idle = list(range(self.n))
        with tqdm(total=len(tasks), disable=not progress, desc=desc, unit="item") as bar:
            while queue or pending:
                while idle and queue:
                    a, s = idle.pop(0), queue.popleft()
                    attempts[s] += 1
                    pending[self.actors[a].run.remote(*tasks[s])] = (a, s)
                    started[s] = time.perf_counter()
                ready, _ = ray.wait(list(pending), num_returns=1)
                a, s = pending.pop(ready[0])
                outcome = TaskOutcome(s, None, None, False, attempts[s], self._worker(a), 0.0)
                try:
                    outcome.value = ray.get(ready[0])
                except ray.exceptions.RayTaskError as exc:  # the task's own error: no retry
                    outcome.error, outcome.trace = _cause(exc), str(exc)
                except ray.exceptions.RayError as exc:  # the actor died: replace it
                    _kill(ray, self.actors[a])
                    self.actors[a], self.pids[a] = self._new(), None
                    if attempts[s] <= retries:
                        queue.appendleft(s)
                        idle.append(a)
                        continue
                    outcome.error, outcome.died = exc, True
                    outcome.trace = "".join(traceback.format_exception(exc))
                outcome.seconds = time.perf_counter() - started[s]
                idle.append(a)
                bar.update(1)
                on_outcome(outcome)

    def close(self, grace: float = 10.0) -> None:
        """Let every actor release what it holds, for at most ``grace`` seconds, then kill it.

        Already dead actors are skipped; one that does not answer in time is
        killed all the same.
        """
        refs = []
        for actor in self.actors:
            with contextlib.suppress(Exception):  # already dead
                refs.append(actor.close.remote())
        if refs:
            with contextlib.suppress(Exception):
                self.ray.wait(refs, num_returns=len(refs), timeout=grace)
        for actor in self.actors:
            _kill(self.ray, actor)


def _cause(exc: Any) -> BaseException:
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _kill(ray: Any, actor: Any) -> None:
    with contextlib.suppress(Exception):  # already dead
        ray.kill(actor)
