"""Ways of running a fit: in this process, over ``torch.distributed`` ranks, or on Ray actors.

Every engine follows one small protocol (:class:`Engine`): it takes a solver
(:class:`~captum_nmf.NMF`), a source of rows (:class:`RowSource`: batch ->
feature rows, e.g. an attribution's forward and checks) and the inputs, and
fits the solver. :meth:`NMFConceptAttribution.fit` picks one with
:func:`select_engine`. The engines sit between the solver and the
estimator: they import the solver and the utilities, never the estimator,
the whole-slide wing or anything above; the core names them only through
this module, and Ray itself is imported only when a Ray engine runs.
"""

from __future__ import annotations

import torch

from captum_nmf._utils.validation import check_bool, check_int
from captum_nmf.engines.base import Engine, FitOptions, RowSource, worker_generator
from captum_nmf.engines.local import LocalEngine
from captum_nmf.engines.ray_actors import RayEngine
from captum_nmf.engines.torch_dist import TorchDistributedEngine

__all__ = [
    "ENGINES",
    "Engine",
    "FitOptions",
    "LocalEngine",
    "RayEngine",
    "RowSource",
    "TorchDistributedEngine",
    "check_engine",
    "select_engine",
    "worker_generator",
]

ENGINES = ("local", "ray")


def check_engine(engine: str, workers: int | None, address: str | None) -> None:
    """Validate ``engine``, ``workers`` and ``address`` (shared by the Ray entry points).

    Raises:
        ValueError: an unknown ``engine``, ``workers < 1``, or
                    ``workers``/``address`` with ``engine="local"``.
        TypeError: ``workers`` is not an int or None, or ``address`` not a str.
    """
    if engine not in ENGINES:
        raise ValueError(
            f"engine must be one of {ENGINES}, got {engine!r}; pass engine='local' or engine='ray'."
        )
    check_int("workers", workers, optional=True)
    if address is not None and not isinstance(address, str):
        raise TypeError(
            f"address must be a str or None, got {type(address).__name__}; pass e.g. "
            "address='10.0.0.5:6379'."
        )
    if engine == "local" and (workers is not None or address is not None):
        name = "workers" if workers is not None else "address"
        value = workers if workers is not None else address
        raise ValueError(
            f"{name}={value!r} applies to engine='ray' only; pass engine='ray', or leave "
            f"{name}=None."
        )


def select_engine(
    engine: str,
    *,
    workers: int | None = None,
    address: str | None = None,
    distributed: bool | None = None,
) -> Engine:
    """The engine for ``NMFConceptAttribution.fit``'s options, checked before any work.

    Args:
        engine (str): ``"local"`` or ``"ray"``.
        workers (int, optional): Ray actors (``engine="ray"`` only).
        address (str, optional): Ray cluster (``engine="ray"`` only).
        distributed (bool, optional): all-reduce over ``torch.distributed``;
                    None does it when a process group with more than one
                    rank is initialised.

    Returns:
        *Engine*: a :class:`LocalEngine`, :class:`TorchDistributedEngine` or :class:`RayEngine`.

    Raises:
        ValueError: bad options (see :func:`check_engine`), ``distributed=True``
                    with ``engine="ray"`` or without a process group.
        TypeError: ``distributed`` is not a bool or None, or a bad option type.
    """
    check_engine(engine, workers, address)
    use = check_bool("distributed", distributed, optional=True)
    dist = torch.distributed
    group = dist.is_available() and dist.is_initialized()
    if engine == "ray":
        if use:
            raise ValueError(
                "distributed=True all-reduces over torch.distributed and engine='ray' uses "
                "Ray actors; choose one: engine='local' under torchrun, or engine='ray'."
            )
        return RayEngine(workers, address)
    if use and not group:
        raise ValueError(
            "distributed=True needs an initialised torch.distributed process group; launch "
            "with torchrun and call torch.distributed.init_process_group(), or pass "
            "distributed=None."
        )
    if use is None:
        use = bool(group) and dist.get_world_size() > 1
    return TorchDistributedEngine() if use else LocalEngine()
