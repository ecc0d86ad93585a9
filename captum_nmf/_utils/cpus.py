"""The CPUs this process may use (joblib's count: affinity and a container's CPU quota)."""

from __future__ import annotations

import os

from joblib import cpu_count

__all__ = ["usable_cpus"]


def usable_cpus() -> int:
    """The logical CPUs this process may use, at least 1.

    :func:`joblib.cpu_count`: the fewest of the machine's logical CPUs, the
    process's affinity (``taskset``), a container's CPU quota (cgroup v1 or v2
    CFS bandwidth, as Docker ``--cpus`` and Kubernetes CPU limits set it,
    rounded up) and ``LOKY_MAX_CPU_COUNT``. ``os.cpu_count()`` sees none of the
    last three.

    Raises:
        ValueError: ``LOKY_MAX_CPU_COUNT`` is set but not a whole number.
    """
    try:
        return max(1, int(cpu_count()))
    except ValueError as exc:  # joblib's int() of the variable
        value = os.environ.get("LOKY_MAX_CPU_COUNT")
        raise ValueError(
            f"LOKY_MAX_CPU_COUNT={value!r} is not a whole number; set it to the number of "
            "CPUs this process may use (e.g. LOKY_MAX_CPU_COUNT=4), or unset it."
        ) from exc
