"""A description of a callable (a tile transform) that is the same in every process.

Slide runs hash it, so that a resume with another transform is refused, and the
reading threads compare it, so that worker processes started with an older
state of a transform are not reused. Only what can be read without calling the
transform counts. The text never depends on a memory address, the hash seed's
order of a set, torch's print options or the logging configuration: objects are
described by their structure (code, fields, attributes, tensors' bytes), and a
``repr`` is trusted only for builtin scalars.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import logging
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = ["describe"]

_DEPTH = 8  # nesting followed (closures over closures, lists of transforms); then the name
_LONG = 4096  # a longer description is stored as its digest (it goes into every manifest)
_SCALARS = (type(None), bool, int, float, complex, str, bytes, range, slice, type(...))


def describe(transform: Callable[..., Any] | None) -> str | None:
    """A description of ``transform`` that is the same in every process.

    It covers what decides the transform's result and can be read without
    running it: for a Python function (lambdas and closures too) a digest of
    its bytecode and constants and the values of its defaults, closure cells
    and the globals it names that are plain data, modules, or functions of its
    own module (described in turn), and what ``functools.wraps`` wraps;
    for a ``functools.partial`` its function, arguments and keywords; for a
    method its function and object; for a module its parameters and buffers
    (by a digest of their bytes), its extra state, its attributes and its
    submodules; for another object its dataclass fields, attributes or slots.
    Values are described canonically: tensors, arrays and images by dtype,
    shape and a digest of their bytes, sets sorted, containers element by
    element, loggers by name. A value that cannot be read (a property that
    raises, a meta tensor) is described by its type. A description longer than
    4,096 characters is given as its SHA-256.

    So a resume with another ``partial(scale, factor=...)``, lambda, closure
    value or refitted normaliser is refused, while the same transform in a new
    process is accepted. A class can state what decides its result itself, for
    objects whose attributes also hold counters or caches: a class attribute
    ``__captum_nmf_description__``, a string or a method returning one, is used
    instead of the attributes. Not seen: state held in C objects without attributes
    (a NumPy ``Generator``), and the code of the library functions (those of
    other modules) and of the classes a transform calls by global name.

    Args:
        transform (Callable or None): the transform.

    Returns:
        *str or None*: the description (None for None).
    """
    if transform is None:
        return None
    text = _Describer().callable(transform, 0)
    if len(text) > _LONG:
        digest = hashlib.sha256(text.encode()).hexdigest()
        return f"{_name(transform)} [description sha256 {digest}]"
    return text


def _name(obj: Any) -> str:
    kind = obj if isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)) else None
    kind = kind or type(obj)
    return f"{getattr(kind, '__module__', '?')}.{getattr(kind, '__qualname__', '?')}"


class _Describer:
    """One description: shared objects are described once, cycles end in ``<cycle>``."""

    def __init__(self) -> None:
        self.done: dict[int, str] = {}
        self.path: set[int] = set()
        self.keep: list[Any] = []  # the ids in `done` stay valid while this lives

    def callable(self, obj: Any, depth: int) -> str:
        return self._guarded(obj, depth, self._callable)

    def value(self, obj: Any, depth: int) -> str:
        return self._guarded(obj, depth, self._value)

    def _guarded(self, obj: Any, depth: int, how: Callable[[Any, int], str]) -> str:
        if isinstance(obj, (*_SCALARS, enum.Enum)):
            return _scalar(obj)
        key = id(obj)
        if key in self.done:
            return self.done[key]
        if key in self.path:
            return f"<cycle {_name(obj)}>"
        if depth > _DEPTH:
            return _name(obj)
        self.path.add(key)
        try:
            text = how(obj, depth)
        except Exception as exc:  # a property that raises, an unreadable tensor: the type
            text = f"{_name(obj)} <not readable: {type(exc).__name__}>"
        finally:
            self.path.discard(key)
        self.done[key] = text
        self.keep.append(obj)
        return text

    # ------------------------------------------------------------------ callables
    def _callable(self, obj: Any, depth: int) -> str:
        declared = _declared(obj)
        if declared is not None:
            return declared
        if isinstance(obj, functools.partial):
            args = [self.value(a, depth + 1) for a in obj.args]
            args += [f"{k}={self.value(v, depth + 1)}" for k, v in sorted(obj.keywords.items())]
            return f"functools.partial({self.callable(obj.func, depth + 1)}, {', '.join(args)})"
        if isinstance(obj, types.MethodType):
            func = self.callable(obj.__func__, depth + 1)
            return f"{func} of {self.value(obj.__self__, depth + 1)}"
        if isinstance(obj, types.FunctionType):
            return self._function(obj, depth)
        return self._value(obj, depth)

    def _function(self, fn: types.FunctionType, depth: int) -> str:
        code = fn.__code__
        parts = [f"code {_code_digest(code)[:16]}"]
        if fn.__defaults__:
            parts.append(f"defaults {self.value(fn.__defaults__, depth + 1)}")
        if fn.__kwdefaults__:
            parts.append(f"kwdefaults {self.value(fn.__kwdefaults__, depth + 1)}")
        if fn.__closure__:
            cells = []
            for name, cell in zip(code.co_freevars, fn.__closure__, strict=True):
                try:
                    content = cell.cell_contents
                except ValueError:  # an empty cell
                    content = None
                cells.append(f"{name}={self.callable(content, depth + 1)}")
            parts.append(f"closure [{', '.join(cells)}]")
        data = [  # the globals it names that decide its result, as cloudpickle sees them
            f"{name}={self.value(fn.__globals__[name], depth + 1)}"
            for name in sorted(set(_global_names(code)))
            if name in fn.__globals__ and _own(fn.__globals__[name], fn.__globals__)
        ]
        if data:
            parts.append(f"globals [{', '.join(data)}]")
        wrapped = fn.__dict__.get("__wrapped__")
        if wrapped is not None:  # functools.wraps: the wrapped function decides too
            parts.append(f"wraps {self.callable(wrapped, depth + 1)}")
        return f"{_name(fn)} [{'; '.join(parts)}]"

    # --------------------------------------------------------------------- values
    def _value(self, value: Any, depth: int) -> str:
        declared = _declared(value)
        if declared is not None:
            return declared
        if isinstance(value, (functools.partial, types.FunctionType, types.MethodType)):
            return self._callable(value, depth)
        if isinstance(value, torch.Tensor):
            return _tensor(value)
        if isinstance(value, np.ndarray):
            if value.dtype == object:  # its items, in this description (cycles, sharing)
                return f"array(object, {value.shape}, {self.value(value.tolist(), depth + 1)})"
            return _array(value)
        if isinstance(value, np.generic):
            return f"{value.dtype}({value.item()!r})"
        if isinstance(value, (torch.dtype, torch.device)):
            return str(value)
        if isinstance(value, logging.Logger):  # process configuration, not the transform's state
            return f"logging.Logger({value.name!r})"
        if isinstance(value, (set, frozenset)):
            return "{" + ", ".join(sorted(self.value(v, depth + 1) for v in value)) + "}"
        if isinstance(value, (list, tuple)):
            inner = ", ".join(self.value(v, depth + 1) for v in value)
            return f"[{inner}]" if isinstance(value, list) else f"({inner})"
        if isinstance(value, dict):
            items = sorted(
                (self.value(k, depth + 1), self.value(v, depth + 1)) for k, v in value.items()
            )
            return "{" + ", ".join(f"{k}: {v}" for k, v in items) + "}"
        if isinstance(value, type):
            return _name(value)
        if isinstance(value, types.ModuleType):
            return f"module {value.__name__}"
        if isinstance(value, torch.nn.Module):
            return self._module(value, depth)
        image = _image(value)
        if image is not None:
            return image
        return f"{_name(value)}: {self._fields(value, depth)}"

    def _module(self, module: torch.nn.Module, depth: int) -> str:
        digest = hashlib.sha256()
        for key, t in module.state_dict(keep_vars=True).items():
            text = _tensor(t) if isinstance(t, torch.Tensor) else self.value(t, depth + 1)
            digest.update(f"{key}|{text}|".encode())
        attrs = {k: v for k, v in vars(module).items() if not k.startswith("_")}
        children = dict(module.named_children())
        return (
            f"{_name(module)} [state {digest.hexdigest()[:16]}] "
            f"{self.value(attrs, depth + 1)} {self.value(children, depth + 1)}"
        )

    def _fields(self, obj: Any, depth: int) -> str:
        """A dataclass's fields, else the attributes and slots of an object."""
        if dataclasses.is_dataclass(obj):
            fields = {f.name: getattr(obj, f.name, "<unset>") for f in dataclasses.fields(obj)}
            return self.value(fields, depth + 1)
        state: dict[str, Any] = {}
        for cls in type(obj).__mro__:
            for slot in getattr(cls, "__slots__", ()):
                if slot not in ("__dict__", "__weakref__"):
                    state[slot] = getattr(obj, slot, "<unset>")
        try:  # not getattr: a __getattr__ of the object's own must not answer
            own = object.__getattribute__(obj, "__dict__")
        except AttributeError:
            own = None
        if isinstance(own, dict):
            state.update(
                (k, v) for k, v in own.items() if not k.startswith("__") or k == "__wrapped__"
            )
        if state:
            return self.value(state, depth + 1)
        text = repr(obj)  # a C object without attributes: its repr, unless an address
        return "{}" if " at 0x" in text else text


def _declared(obj: Any) -> str | None:
    """What the class says decides its result (``__captum_nmf_description__``), if it says."""
    if isinstance(obj, type):
        return None
    hook = getattr(type(obj), "__captum_nmf_description__", None)  # the class's, not __getattr__
    if hook is None:
        return None
    text = hook if isinstance(hook, str) else hook(obj)
    if not isinstance(text, str):
        raise TypeError("__captum_nmf_description__ must be a str or return one")
    return f"{_name(obj)}: {text}"


def _scalar(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return f"{_name(value)}.{value.name}"
    return repr(value)


def _global_names(code: types.CodeType) -> list[str]:
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names += _global_names(const)
    return names


def _own(value: Any, namespace: dict[str, Any]) -> bool:
    """A global a function's result depends on, beyond its name.

    Plain data (a module-level constant, a mean tensor), a torch module (a
    global stain network: its weights), a partial (its arguments), and the
    functions and objects of the function's own module (a notebook's or
    script's helpers and the normaliser it fitted, which may change between a
    run and its resume). Functions, classes and objects of other modules
    (libraries) and namespaces are known by name.
    """
    if isinstance(value, (torch.nn.Module, functools.partial)):
        return True
    if isinstance(value, types.FunctionType):
        return value.__globals__ is namespace
    # classes and modules are of module "builtins", library objects of their library
    return type(value).__module__ == namespace.get("__name__") or _plain(value, set())


def _plain(value: Any, seen: set[int]) -> bool:
    """Data, not code or a namespace: what a function may read from its module's globals."""
    if isinstance(value, (*_SCALARS, torch.Tensor, np.ndarray, np.generic)):
        return True
    if id(value) in seen:
        return True  # a container holding itself: its other items decide
    seen.add(id(value))
    if isinstance(value, (list, tuple, set, frozenset)):
        return all(_plain(v, seen) for v in value)
    if isinstance(value, dict):
        return all(_plain(k, seen) and _plain(v, seen) for k, v in value.items())
    return False


def _tensor(t: torch.Tensor) -> str:
    """dtype, shape and a digest of the values (dense, resolved, on the CPU)."""
    head = f"tensor({t.dtype}, {tuple(t.shape)}"
    if t.is_meta:
        return f"{head}, meta)"
    if t.is_nested:
        return f"tensor(nested, [{', '.join(_tensor(x) for x in t.unbind())}])"
    dense = t.detach()
    if dense.is_quantized:
        dense = dense.dequantize()
    if dense.layout != torch.strided:
        dense = dense.to_dense()
    flat = dense.resolve_conj().resolve_neg().to("cpu").contiguous().reshape(-1)
    digest = hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
    return f"{head}, {digest})"


def _array(a: np.ndarray) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]
    return f"array({a.dtype}, {a.shape}, {digest})"


def _image(value: Any) -> str | None:
    """A PIL image by mode, size and a digest of its pixels (PIL is imported by then)."""
    import sys

    pil = sys.modules.get("PIL.Image")
    if pil is None or not isinstance(value, pil.Image):
        return None
    digest = hashlib.sha256(value.tobytes()).hexdigest()[:16]
    return f"PIL.Image({value.mode}, {value.size}, {digest})"


def _code_digest(code: types.CodeType) -> str:
    """SHA-256 of a code object's bytecode, names and constants (nested code included)."""
    digest = hashlib.sha256(code.co_code)
    digest.update(repr((code.co_names, code.co_varnames, code.co_freevars)).encode())
    for const in code.co_consts:
        text = _code_digest(const) if isinstance(const, types.CodeType) else _const(const)
        digest.update(text.encode())
    return digest.hexdigest()


def _const(const: Any) -> str:
    """A code constant: a scalar, or a tuple or frozenset of them (sorted: no seed order)."""
    if isinstance(const, frozenset):
        return "{" + ", ".join(sorted(_const(c) for c in const)) + "}"
    if isinstance(const, tuple):
        return "(" + ", ".join(_const(c) for c in const) + ")"
    return repr(const)
