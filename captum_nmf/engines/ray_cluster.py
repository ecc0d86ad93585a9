"""Ray plumbing: import it with a helpful error, reach a cluster or start one embedded.

captum-nmf does not ship cluster software; slides (``explain_cohort``) and
fitting statistics (``NMFConceptAttribution.fit(engine="ray")``) are spread
over Ray actors. This module holds the little both need:

* :func:`import_ray` raises an ``ImportError`` naming the ``ray`` extra;
* :func:`ray_session` connects to ``address`` (checked with a TCP probe first,
  so an unreachable cluster fails in seconds, before any work starts) or,
  without an address, starts Ray embedded on this machine (its workers get
  this process's import path) and shuts it down afterwards; a Ray the caller
  already initialised is used and left running;
* :func:`actor_options` asks for one GPU per actor when the cluster has GPUs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

from captum_nmf._utils.validation import check_int

__all__ = [
    "RAY_EXTRA",
    "actor_options",
    "check_address",
    "import_ray",
    "ray_session",
]

RAY_EXTRA = "pip install 'captum-nmf[ray]'"
_DEFAULT_PORT = 6379  # Ray's GCS port
_CLIENT_PORT = 10001  # Ray client (ray://) port
_PROBE_TIMEOUT = 5.0


def import_ray(feature: str) -> ModuleType:
    """Import Ray, or raise an ``ImportError`` that says how to install it.

    Args:
        feature (str): what needs Ray, for the message (e.g. ``"engine='ray'"``).

    Returns:
        *module*: ``ray``.

    Raises:
        ImportError: Ray is not installed.
    """
    try:
        import ray
    except ImportError as exc:
        raise ImportError(
            f"{feature} needs Ray, which is not installed; install the 'ray' extra: "
            f"{RAY_EXTRA} (or use engine='local')."
        ) from exc
    return ray


def _host_port(address: str) -> tuple[str, int]:
    text = address if "://" in address else f"ray://{address}"
    parts = urlsplit(text)
    default = _CLIENT_PORT if address.startswith("ray://") else _DEFAULT_PORT
    if not parts.hostname:
        raise ValueError(
            f"address={address!r} is not a Ray address; pass 'HOST:PORT' (e.g. "
            "'10.0.0.5:6379'), 'ray://HOST:10001', 'auto', or no address to run embedded."
        )
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"address={address!r} has an invalid port ({exc}).") from exc
    return parts.hostname, default if port is None else port


def check_address(address: str, timeout: float = _PROBE_TIMEOUT) -> None:
    """Fail fast when nothing listens at a Ray ``address`` (``'auto'`` is left to Ray).

    Args:
        address (str): ``HOST:PORT`` or ``ray://HOST:PORT``.
        timeout (float, optional): seconds to wait for the TCP connection.
                    Default: 5.0

    Raises:
        ValueError: ``address`` cannot be parsed.
        ConnectionError: nothing accepts connections there.
    """
    if address == "auto":
        return
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as exc:
        raise ConnectionError(
            f"Cannot reach a Ray cluster at address={address!r} ({host}:{port}: {exc}). "
            "Start one there with 'ray start --head', check the host and port, or pass no "
            "address to run Ray embedded on this machine."
        ) from exc


@contextlib.contextmanager
def ray_session(
    address: str | None, *, num_cpus: int | None = None, feature: str = "engine='ray'"
) -> Iterator[ModuleType]:
    """Ray, connected for the ``with`` block.

    A Ray this process already initialised is used as it is (and left
    running); ``address`` is then only probed, so connect that session to
    the cluster you want.

    Args:
        address (str, optional): cluster to join; None starts Ray embedded on
                    this machine (with ``num_cpus`` CPUs) and shuts it down at
                    the end of the block.
        num_cpus (int, optional): CPUs of an embedded Ray.
                    Default: None (all)
        feature (str, optional): named in the ``ImportError``.

    Yields:
        *module*: ``ray``, initialised.

    Raises:
        ImportError: Ray is not installed.
        ValueError: ``address`` cannot be parsed.
        ConnectionError: the cluster at ``address`` cannot be reached.
    """
    ray = import_ray(feature)
    if address is not None:  # fail fast, also when a session is already running
        check_address(address)
    if ray.is_initialized():  # the caller's session: use it, leave it running
        yield ray
        return
    options: dict[str, Any] = {
        "logging_level": logging.WARNING,
        "log_to_driver": True,
        "configure_logging": False,
    }
    if address is not None:
        try:
            ray.init(address=address, **options)
        except (ConnectionError, TimeoutError, RuntimeError) as exc:
            raise ConnectionError(
                f"Could not join the Ray cluster at address={address!r}: {exc}. Check that "
                "it runs the same Ray and Python versions, or pass no address to run embedded."
            ) from exc
    else:  # embedded workers import what this process imports (models defined in its modules)
        dirs = (str(Path(p).absolute() if p else Path.cwd()) for p in sys.path)
        path = os.pathsep.join(dict.fromkeys(d for d in dirs if Path(d).is_dir()))
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            runtime_env={"env_vars": {"PYTHONPATH": path}},
            **options,
        )
    try:
        yield ray
    finally:
        ray.shutdown()


def actor_options(
    ray: ModuleType, n_workers: int | None, cap: int | None = None
) -> tuple[int, dict[str, Any]]:
    """How many actors to start and the resources each asks for.

    With GPUs in the cluster: one actor per GPU (or ``n_workers``; more
    actors than GPUs share them, ``num_gpus`` a fraction), each also holding
    an equal share of the CPUs. Without GPUs: ``n_workers`` actors (default:
    one per CPU of the cluster), each holding an equal share of the CPUs
    (``num_cpus``; actors set torch's thread count to it). At most ``cap``
    actors (e.g. the number of slides).

    Returns:
        *tuple*: ``(n_actors, options)`` for ``ActorClass.options(**options)``.

    Raises:
        TypeError: ``n_workers`` is not an int or None.
        ValueError: ``n_workers < 1``.
    """
    n_workers = check_int("workers", n_workers, optional=True)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = max(int(resources.get("CPU", 1)), 1)
    n = (gpus or cpus) if n_workers is None else n_workers
    n = max(1, min(n, cap)) if cap is not None else n
    options: dict[str, Any] = {"num_cpus": cpus // n if n <= cpus else cpus / n}
    if gpus:
        options["num_gpus"] = 1 if n <= gpus else gpus / n
    return n, options
