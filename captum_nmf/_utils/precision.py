"""The solver's arithmetic in the dtypes it chose, whatever ``torch.autocast`` the caller has on.

Inside a caller's ``torch.autocast`` region (common in GPU inference code, and on
the CPU too) ``mm``, ``bmm``, ``matmul`` and ``addmm`` recast float32 inputs to
bfloat16 or float16 (never float64). The fixed-H solve and the NMF updates rely on
their own dtypes: the passive-set code of a row is a float32 product of its 0/1 mask
with the powers of two, which bfloat16 rounds to 8 significant bits (for K >= 9 a
row gathered another passive set's matrix, and K = 10 or 12 indexed past the table:
an ``IndexError`` on the CPU, a device-side assert on CUDA), and ``X H^T`` lost
three decimal digits. :func:`without_autocast` turns every active autocast off for
the call, and only for it: the user's model, run by the attribution before the
solve, still runs under the caller's autocast.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

import torch

__all__ = ["autocast_off", "without_autocast"]

_P = ParamSpec("_P")
_R = TypeVar("_R")

#: device types whose autocast may be active (``torch.amp.is_autocast_available``)
_TYPES: tuple[str, ...] | None = None


def _device_types() -> tuple[str, ...]:
    global _TYPES
    if _TYPES is None:
        candidates = ("cpu", "cuda", "xpu", "mps", "hpu", "xla")
        _TYPES = tuple(t for t in candidates if torch.amp.is_autocast_available(t))
    return _TYPES


@contextlib.contextmanager
def autocast_off() -> Iterator[None]:
    """A context in which no autocast is active (nothing to do when none is)."""
    active = [t for t in _device_types() if torch.is_autocast_enabled(t)]
    if not active:
        yield
        return
    with contextlib.ExitStack() as stack:
        for device_type in active:
            stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def without_autocast(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """``fn`` run with every active autocast turned off (see the module's docstring)."""

    @functools.wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with autocast_off():
            return fn(*args, **kwargs)

    return run
