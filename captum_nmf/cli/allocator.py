"""glibc's malloc for the command line: keep freed memory for reuse instead of returning it.

glibc serves every allocation above its dynamic threshold (at most 32 MiB) with a
fresh ``mmap`` and gives it back on free, and trims the heap whenever its free top
grows, so each batch of a CPU forward page-faults its activations in again. On the
development machine that tripled the time of an EfficientNet-Lite0 forward (README,
Performance). The ``captum-nmf`` process is ours for the whole job, so it asks glibc to
keep freed memory (``MALLOC_MMAP_MAX_=0`` and a 2 GiB trim threshold, set through
``mallopt``); the library itself never changes the allocator of a user's process.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (``mallopt``) in this process.

    The process's resident memory then stays at its peak instead of shrinking
    after each batch: a CPU forward no longer page-faults its activations in
    for every batch.

    Returns:
        *bool*: True when applied; False on another C library or platform, or
        when the environment sets ``MALLOC_*`` variables or ``glibc.malloc``
        tunables (the user's own tuning wins).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name.startswith("MALLOC_") for name in os.environ):
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
