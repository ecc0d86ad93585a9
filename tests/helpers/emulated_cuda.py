"""An emulated CUDA device on the CPU: CUDA's rules without a GPU.

Tensors "on the device" are CPU tensors whose storage is marked as such. While
:func:`emulated_cuda` is active, a ``TorchFunctionMode`` sees every torch call
(in every thread started meanwhile) and applies the rules that make code
written on a CPU crash on its first CUDA call:

- ``.device`` / ``.is_cuda`` of a marked tensor say ``cuda:0``; ``.to("cuda")``,
  ``.cuda()`` and ``device="cuda"`` give marked copies, ``.cpu()`` unmarked ones;
  the results of a call with a marked argument are marked.
- An operation mixing marked tensors with CPU tensors raises CUDA's
  ``RuntimeError`` ("Expected all tensors to be on the same device"). As on
  CUDA, ``copy_`` may cross devices, a device tensor may be indexed with CPU
  indices (a CPU tensor never with device ones), a value written through tensor
  indices must be on the device unless it is one element, and one CPU 0-dim
  tensor may join device tensors as a scalar operand of an elementwise op (not
  as the tensor written in place).
- ``.numpy()`` / ``np.asarray`` of a marked tensor raises CUDA's ``TypeError``;
  ``.pin_memory()`` of a marked tensor raises.
- A matmul of integer tensors on the device raises ``NotImplementedError``
  (CUDA has none: the first CUDA call of our NNLS crashed on one).
- Random numbers drawn on the device from a CPU ``torch.Generator`` raise
  CUDA's ``RuntimeError``.
- ``torch.cuda.is_available()`` and ``torch.accelerator.is_available()`` say
  True (one device); ``pin_memory=True`` is accepted; ``torch.autocast("cuda")``
  casts as the CPU's autocast does (so bf16 tensors do flow through the code).

What it cannot show: speed, asynchrony (a missing synchronisation), kernels
CUDA lacks for other dtypes, numerical differences of CUDA's kernels, and work
done by C++ threads or other processes (gradients handed to tensor hooks are
made in C++ and stay unmarked; ``.grad`` and ``torch.autograd.grad`` are
marked). Memory re-allocated in place (``resize_``, ``set_``) keeps its old
mark. It is no substitute for running on a GPU: the tests that use it run on a
real one whenever there is one.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any
from unittest import mock

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

CUDA0 = torch.device("cuda", 0)

# factories that copy host data (a sequence, an array, a tensor) to the device they are given
_FROM_DATA = frozenset({"tensor", "as_tensor", "asarray"})

_MATMULS = frozenset(
    {"matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "addmv", "mv", "dot", "einsum"}
    | {"baddbmm", "addbmm", "tensordot", "linear", "inner", "outer", "chain_matmul"}
)
# calls that may take tensors of both devices on CUDA too (indexing has rules of its own)
_CROSS_DEVICE = frozenset(
    {"copy_", "__repr__", "__format__", "__str__", "_has_compatible_shallow_copy_type"}
    | {"__reduce_ex__", "__deepcopy__", "new_tensor", "tensor"}
)
_INDEXING = frozenset({"__getitem__", "__setitem__", "index_put_", "index_put"})
_NO_CHECK = frozenset({"__get__", "__set__", "grad"})  # handled on their own
# TensorIterator ops: the only ones where CUDA takes one host 0-dim tensor as a scalar
# (every other op checks the device of each tensor argument, 0-dim ones included)
_ARITHMETIC = ("add", "sub", "mul", "div", "truediv", "floordiv", "pow", "mod", "and", "or", "xor")
_COMPARISONS = ("eq", "ne", "lt", "le", "gt", "ge")
_IN_PLACE_DUNDERS = frozenset(f"__i{op}__" for op in _ARITHMETIC)
_SCALAR_OPS = frozenset(
    {f"__{op}__" for op in (*_ARITHMETIC, *_COMPARISONS)}
    | {f"__r{op}__" for op in _ARITHMETIC}
    | {f"__i{op}__" for op in _ARITHMETIC}
    | {"add", "sub", "mul", "div", "true_divide", "floor_divide", "pow", "remainder", "fmod"}
    | {"add_", "sub_", "mul_", "div_", "pow_", "fill_", "masked_fill", "masked_fill_", "where"}
    | {"eq", "ne", "lt", "le", "gt", "ge", "maximum", "minimum", "fmax", "fmin", "atan2"}
    | {"addcmul", "addcdiv", "addcmul_", "addcdiv_", "lerp", "lerp_", "logical_and", "logical_or"}
    | {"bitwise_and", "bitwise_or", "bitwise_xor", "hypot", "copysign", "xlogy", "rsub"}
)


def _tensors(value: Any) -> list[Tensor]:
    """The tensors in ``value`` and in its nested tuples (named ones too), lists and dicts.

    Those are the containers torch calls take. Walked by hand because this runs
    for every torch call: ``torch.utils._pytree.tree_flatten`` made the mode
    cost twice as much.
    """
    found: list[Tensor] = []
    _collect(value, found)
    return found


def _call_tensors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Tensor]:
    """:func:`_tensors` of a call's ``args``, then its ``kwargs``."""
    found: list[Tensor] = []
    _collect(args, found)
    _collect(kwargs, found)
    return found


def _collect(value: Any, found: list[Tensor]) -> None:
    if isinstance(value, Tensor):
        found.append(value)
    elif isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, (Tensor, tuple, list, dict)):
                _collect(item, found)
    elif isinstance(value, dict):
        for item in value.values():
            _collect(item, found)


def _has_list(index: Any) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, list) for p in parts)


def _device_of(value: Any) -> torch.device | None:
    if value is None:
        return None
    if isinstance(value, torch.device):
        return value
    if isinstance(value, int):
        return torch.device("cuda", value)
    return torch.device(value)


class EmulatedCuda(TorchFunctionMode):
    """The mode behind :func:`emulated_cuda` (see the module's docstring).

    ``calls`` counts the torch calls that touched a device tensor, so a test can
    tell that work really ran "on the device".
    """

    def __init__(self) -> None:
        super().__init__()
        self._storages: dict[int, bool] = {}  # data_ptrs of the live device storages
        self._empty: dict[int, Any] = {}  # id -> weakref of marked tensors without memory
        self._lock = threading.RLock()
        self.calls = 0
        self._pinned: dict[int, bool] = {}  # data_ptrs of live pinned host storages
        # host-to-device copies that make CUDA's host wait for the device: blocking ones,
        # and non_blocking ones from pageable memory (name, shape)
        self.waiting_uploads: list[tuple[str, tuple[int, ...]]] = []

    # ------------------------------------------------------------------ marks
    def on_device(self, t: Tensor) -> bool:
        """Whether ``t`` is (emulated) on the device."""
        storage = t.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() == 0:  # empty, or meta
            ref = self._empty.get(id(t))
            return ref is not None and ref() is t
        return storage.data_ptr() in self._storages

    def _mark(self, value: Any) -> None:
        for t in _tensors(value):
            storage = t.untyped_storage()
            with self._lock:
                if storage.nbytes() == 0 or storage.data_ptr() == 0:
                    self._empty[id(t)] = weakref.ref(t, partial(self._forget, id(t)))
                elif storage.data_ptr() not in self._storages:
                    ptr = storage.data_ptr()
                    self._storages[ptr] = True
                    # the storage's Python object lives as long as its memory: forget the
                    # address when that is freed (the allocator may reuse it for the host)
                    weakref.finalize(storage, self._storages.pop, ptr, None)

    def _pin(self, t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        with self._lock:
            ptr = storage.data_ptr()
            if ptr and ptr not in self._pinned:
                self._pinned[ptr] = True
                weakref.finalize(storage, self._pinned.pop, ptr, None)
        return t

    def is_pinned(self, t: Tensor) -> bool:
        """Whether ``t`` is (emulated) pinned host memory."""
        return t.untyped_storage().data_ptr() in self._pinned

    def _upload(self, name: str, t: Tensor, non_blocking: bool) -> None:
        if t.numel() and not (non_blocking and self.is_pinned(t)):
            with self._lock:
                self.waiting_uploads.append((name, tuple(t.shape)))

    def _forget(self, key: int, _: Any) -> None:
        self._empty.pop(key, None)

    # ------------------------------------------------------------------ calls
    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name in ("__get__", "__set__"):
            return self._attribute(func, name, args, kwargs)
        if name in ("to", "cuda", "cpu", "type_as"):
            return self._transfer(func, name, args, kwargs)
        tensors = _call_tensors(args, kwargs)
        marked = [t for t in tensors if self.on_device(t)]
        if name == "numpy" and marked and kwargs.get("force"):  # a host copy, as on CUDA
            return func(args[0].to(args[0].dtype, copy=True), **kwargs)
        if name in ("numpy", "__array__") and marked:
            raise TypeError(
                "can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy "
                "the tensor to host memory first."
            )
        if name == "pin_memory":
            if marked:
                raise RuntimeError("cannot pin 'torch.cuda.FloatTensor' only dense CPU tensors")
            return self._pin(args[0].clone())
        if name == "is_pinned":
            return self.is_pinned(args[0])
        if name == "get_device":
            return 0 if marked else -1
        target = _device_of(kwargs.get("device"))
        to_device = False
        if target is not None and target.type == "cuda":
            self._check_ordinal(target)
            kwargs["device"], to_device = "cpu", True
        pinned = bool(kwargs.get("pin_memory"))
        if pinned:
            kwargs["pin_memory"] = False
        generator = kwargs.get("generator")
        # `is not None` first: most calls have no generator, and isinstance of torch.Generator
        # (a custom class) is slow
        if (
            generator is not None
            and isinstance(generator, torch.Generator)
            and generator.device.type != "cuda"
            and (to_device or marked)
        ):
            raise RuntimeError(
                f"Expected a 'cuda' device type for generator but found '{generator.device.type}'"
            )
        if marked and name not in _NO_CHECK:
            self.calls += 1
            if name in _MATMULS:
                ints = [t for t in tensors if not (t.is_floating_point() or t.is_complex())]
                if ints:
                    raise NotImplementedError(
                        f"\"{name}_cuda\" not implemented for '{str(ints[0].dtype)[6:].title()}'"
                    )
            if name in _INDEXING:
                self._check_indexing(name, args, kwargs)
            elif name not in _CROSS_DEVICE:
                self._check_same_device(name, args, kwargs, tensors)
        out = func(*args, **kwargs)
        if pinned and isinstance(out, Tensor):
            self._pin(out)
        if to_device and name in _FROM_DATA and args and not marked:
            data = args[0]  # host data copied to the device: a blocking copy on CUDA
            self._upload(name, data if isinstance(data, Tensor) else out, False)
        if name == "grad" and marked:  # torch.autograd.grad: gradients live where their inputs do
            return self._grads_like(out, kwargs.get("inputs", args[1] if len(args) > 1 else ()))
        if to_device:  # a copy on the device, never memory shared with a host array or tensor
            shared = {t.untyped_storage().data_ptr() for t in tensors}
            if isinstance(out, Tensor) and (
                name in ("as_tensor", "asarray") or out.untyped_storage().data_ptr() in shared
            ):
                out = out.clone()
            self._mark(out)
        elif marked and target is None and name not in ("__setitem__", "copy_"):
            if name == "tensor" and not isinstance(args[0], Tensor):
                return out  # built from a sequence: on the default (host) device, as on CUDA
            # never what was written into a host tensor (in place, out=): that stays host memory
            host = {t.untyped_storage().data_ptr() for t in tensors if not self.on_device(t)}
            self._mark([o for o in _tensors(out) if o.untyped_storage().data_ptr() not in host])
        return out

    def _check_ordinal(self, device: torch.device) -> None:
        if device.index not in (None, 0):
            raise RuntimeError(
                "CUDA error: invalid device ordinal (the emulated machine has one device)"
            )

    def _check_same_device(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], tensors: list[Tensor]
    ) -> None:
        """CUDA's device check: a host tensor beside a device one only as one scalar operand."""
        host = [t for t in tensors if not self.on_device(t)]
        written = _tensors((args[0] if args else None, kwargs.get("out")))
        in_place = name in _IN_PLACE_DUNDERS or (name.endswith("_") and not name.startswith("__"))
        in_place = in_place or kwargs.get("out") is not None
        scalars = [t for t in host if t.dim() == 0]
        allowed = (
            name in _SCALAR_OPS
            and len(scalars) == len(host)
            and (len(scalars) <= 1 or name == "where")
            and not (in_place and any(w is s for w in written for s in scalars))
        )
        if host and not allowed:
            raise RuntimeError(
                "Expected all tensors to be on the same device, but found at least two "
                f"devices, cuda:0 and cpu! (when checking argument for {name}, emulated CUDA)"
            )

    def _check_indexing(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Indices may be on the host for a device tensor, never on the device for a host one.

        A value written through tensor indices must be on the device, unless it is
        a single host element (``__setitem__``/``index_put_``).
        """
        target = args[0]
        index = args[1] if len(args) > 1 else kwargs.get("indices")
        indices = _tensors(index)
        if not self.on_device(target):
            if any(self.on_device(i) for i in indices):
                raise RuntimeError(
                    "indices should be either on cpu or on the same device as the indexed "
                    "tensor (cpu) (emulated CUDA)"
                )
            return
        value = args[2] if len(args) > 2 else kwargs.get("values")
        advanced = bool(indices) or _has_list(index)
        if not (advanced and isinstance(value, Tensor)) or self.on_device(value):
            return
        if value.numel() > 1:
            raise RuntimeError(
                f"{name}: values of {value.numel()} elements on cpu written into a cuda:0 "
                "tensor through tensor indices: expected them on cuda:0 (emulated CUDA)"
            )

    def _grads_like(self, grads: Any, inputs: Any) -> Any:
        inputs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
        for g, i in zip(grads, inputs, strict=False):
            if g is not None and self.on_device(i):
                self._mark(g)
        return grads

    def _attribute(
        self, func: Callable[..., Any], kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        attr = getattr(getattr(func, "__self__", None), "__name__", "")
        t = args[0]
        if kind == "__get__" and isinstance(t, Tensor):
            if attr == "device":
                return CUDA0 if self.on_device(t) else func(*args, **kwargs)
            if attr == "is_cuda":
                return self.on_device(t)
            if attr == "is_cpu":
                return not self.on_device(t)
            out = func(*args, **kwargs)
            if attr in ("grad", "data", "T", "mT", "H", "mH", "real") and self.on_device(t):
                self._mark(out)
            return out
        return func(*args, **kwargs)

    def _transfer(
        self, func: Callable[..., Any], name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        t = args[0]
        if not isinstance(t, Tensor):
            return func(*args, **kwargs)
        source_on_device = self.on_device(t)
        fmt = kwargs.get("memory_format")
        target: torch.device | None
        dtype: torch.dtype | None = None
        non_blocking = bool(kwargs.get("non_blocking", False))
        if name == "cpu":
            target = torch.device("cpu")
        elif name == "type_as":
            other = args[1]
            target = CUDA0 if self.on_device(other) else torch.device("cpu")
            dtype = other.dtype
        elif name == "cuda":
            target = _device_of(args[1] if len(args) > 1 else kwargs.get("device")) or CUDA0
        else:
            rest = args[1:]
            other = rest[0] if rest and isinstance(rest[0], Tensor) else kwargs.get("other")
            if isinstance(other, Tensor):
                target = CUDA0 if self.on_device(other) else torch.device("cpu")
                dtype = other.dtype
            else:
                target, dtype, non_blocking, fmt = torch._C._nn._parse_to(*rest, **kwargs)
        if target is None or target.type not in ("cuda", "cpu"):
            out = func(*args, **kwargs)
            if source_on_device:
                self._mark(out)
            return out
        crossing = source_on_device != (target.type == "cuda")
        if crossing and target.type == "cuda":
            self._upload(name, t, non_blocking)
        if target.type == "cuda":
            self._check_ordinal(target)
        out = t.to(
            dtype or t.dtype,
            copy=crossing or bool(kwargs.get("copy", False)),
            memory_format=fmt or torch.preserve_format,
        )
        if target.type == "cuda":
            self._mark(out)
        return out


@contextmanager
def emulated_cuda() -> Iterator[EmulatedCuda]:
    """Run the block with an emulated CUDA device (see the module's docstring).

    Threads started inside the block run their work under the same rules.
    """
    mode = EmulatedCuda()
    original_run = threading.Thread.run

    def run(thread: threading.Thread) -> None:
        with mode:
            original_run(thread)

    autocast_init = torch.amp.autocast_mode.autocast.__init__

    def autocast(amp: Any, device_type: str, *args: Any, **kwargs: Any) -> None:
        # CUDA's autocast would change no CPU kernel: the CPU's casts the same way instead
        autocast_init(amp, "cpu" if device_type == "cuda" else device_type, *args, **kwargs)

    with ExitStack() as stack:
        patches: list[tuple[Any, str, Any]] = [
            (torch.amp.autocast_mode.autocast, "__init__", autocast),
            (threading.Thread, "run", run),
            (torch.cuda, "is_available", lambda: True),
            (torch.cuda, "device_count", lambda: 1),
            (torch.cuda, "current_device", lambda: 0),
            (torch.cuda, "get_device_name", lambda device=None: "emulated CUDA device"),
            (torch.cuda, "set_device", lambda device: None),
            (torch.cuda, "synchronize", lambda device=None: None),
            (torch.cuda, "is_bf16_supported", lambda including_emulation=True: True),
            (torch.accelerator, "is_available", lambda: True),
            (torch.accelerator, "current_accelerator", lambda check_available=False: CUDA0),
            (torch.accelerator, "set_device_index", lambda device: None),
            (torch.accelerator, "current_device_index", lambda: 0),
        ]
        for owner, attr, value in patches:
            stack.enter_context(mock.patch.object(owner, attr, value))
        stack.enter_context(mode)
        yield mode
