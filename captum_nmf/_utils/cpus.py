"""The CPUs this process may use (loky's count: affinity and a container's CPU quota)."""

from __future__ import annotations

import os

from joblib.externals.loky import cpu_count

__all__ = ["usable_cpus"]


def usable_cpus() -> int:
    """The logical CPUs this process may use, at least 1.

    ``loky.cpu_count`` (shipped in joblib, the count behind
    :func:`joblib.cpu_count`): the fewest of the machine's logical CPUs, the
    process's affinity (``taskset``), a container's CPU quota (cgroup v1 or v2
    CFS bandwidth, as Docker ``--cpus`` and Kubernetes CPU limits set it,
    rounded up) and ``LOKY_MAX_CPU_COUNT``; on Windows at most 61.
    ``os.cpu_count()`` sees none of these limits. Unlike
    :func:`joblib.cpu_count` it does not fall to 1 where joblib runs without
    multiprocessing (``JOBLIB_MULTIPROCESSING=0``, no ``/dev/shm``).

    Raises:
        ValueError: ``LOKY_MAX_CPU_COUNT`` is set but not a whole number.
    """
    value = os.environ.get("LOKY_MAX_CPU_COUNT")
    if value is not None:
        try:
            int(value)
        except ValueError:
            raise ValueError(
                f"LOKY_MAX_CPU_COUNT={value!r} is not a whole number; set it to the number of "
                "CPUs this process may use (e.g. LOKY_MAX_CPU_COUNT=4), or unset it."
            ) from None
    return max(1, int(cpu_count()))
