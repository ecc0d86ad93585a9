"""torch's threads for the command line: no more than the CPUs the process may use.

torch starts one intra-op thread per physical core it sees. In a container with a
CPU quota (Docker ``--cpus``, a Kubernetes CPU limit: cgroup CFS bandwidth) it still
sees every core of the host, and its OpenMP team, whose threads wait for each other
at every operation, is throttled by the kernel whenever the team exceeds the quota.
The ``captum-nmf`` process is ours for the whole job, so it lowers torch's threads to
:func:`~captum_nmf._utils.cpus.usable_cpus` (affinity, the quota rounded up,
``LOKY_MAX_CPU_COUNT``); the library itself never changes the threads of a user's
process (:func:`captum_nmf.cli.main` called in a user's process does: it is the command).
"""

from __future__ import annotations

import os

import torch

from captum_nmf._utils.cpus import usable_cpus

__all__ = ["fit_threads_to_cpus"]

# set by the user: their threads win
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def fit_threads_to_cpus() -> int | None:
    """Lower torch's intra-op threads to the CPUs this process may use.

    Returns:
        *int* or None: the new number of threads; None when nothing changed
        (torch's threads already fit, or the environment sets
        ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS``: the user's own setting wins).

    Raises:
        ValueError: ``LOKY_MAX_CPU_COUNT`` is set but not a whole number
                    (checked even when the user's thread setting wins).
    """
    cpus = usable_cpus()
    if any(os.environ.get(name, "").strip() for name in _THREAD_VARIABLES):
        return None
    if torch.get_num_threads() <= cpus:
        return None
    torch.set_num_threads(cpus)
    return cpus
