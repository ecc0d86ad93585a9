"""A description of a callable (a tile transform) that is the same in every process.

Slide runs hash it, so that a resume with another transform is refused, and the
reading threads compare it, so that worker processes started with an older
state of a transform are not reused. Only what can be read without calling the
transform counts; the text never holds a memory address, a hash seed's order
or torch's print options.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = ["describe"]

_DEPTH = 6  # nesting followed (closures over closures, lists of transforms); then the name


def describe(transform: Callable[..., Any] | None) -> str | None:
    """A description of ``transform`` that is the same in every process (no memory address).

    It covers what decides the transform's result and can be read without
    running it: the qualified name; for a Python function (lambdas and closures
    too) a digest of its bytecode and constants, and the values of its defaults,
    closure cells and the plain-data globals it names; for a ``functools.partial``
    its function, arguments and keywords; for a method its function and object;
    for another callable its ``repr``, or, where that shows an address, its
    attributes; for a module also a digest of its parameters and buffers. Values
    are described canonically: tensors and arrays by dtype, shape and a digest of
    their bytes, sets sorted, lists, tuples and dicts element by element. So a
    resume with another ``partial(scale, factor=...)``, lambda, closure value or
    refitted normaliser is refused; state that none of this shows (an opaque
    object's C internals, a global module's contents) is not seen.

    Args:
        transform (Callable or None): the transform.

    Returns:
        *str or None*: the description (None for None).
    """
    if transform is None:
        return None
    return _describe(transform, 0)


def _name(obj: Any) -> str:
    kind = obj if hasattr(obj, "__qualname__") else type(obj)
    return f"{getattr(kind, '__module__', '?')}.{getattr(kind, '__qualname__', '?')}"


def _describe(obj: Any, depth: int) -> str:
    if depth > _DEPTH:
        return _name(obj)
    if isinstance(obj, functools.partial):
        args = [_value(a, depth) for a in obj.args]
        args += [f"{k}={_value(v, depth)}" for k, v in sorted(obj.keywords.items())]
        return f"functools.partial({_describe(obj.func, depth + 1)}, {', '.join(args)})"
    if isinstance(obj, types.MethodType):
        return f"{_describe(obj.__func__, depth + 1)} of {_value(obj.__self__, depth)}"
    if isinstance(obj, types.FunctionType):
        return _function(obj, depth)
    if _is_dataclass(obj):  # its fields canonically: a repr would print a set in seed order
        return f"{_name(obj)}: {_fields(obj, depth)}"
    text = repr(obj)
    if isinstance(obj, torch.nn.Module):
        digest = hashlib.sha256()
        for key, t in obj.state_dict().items():
            digest.update(f"{key}|{_tensor(t)}|".encode())
        text = f"{text} [state {digest.hexdigest()[:16]}]"
        if " at 0x" not in text:
            return f"{_name(obj)}: {text}"
    elif " at 0x" not in text:
        return f"{_name(obj)}: {text}"
    state = getattr(obj, "__dict__", None)
    if isinstance(state, dict) and state:
        shown = {k: _value(v, depth) for k, v in sorted(state.items()) if not k.startswith("__")}
        return f"{_name(obj)}: {shown}"
    return _name(obj)


def _function(fn: types.FunctionType, depth: int) -> str:
    code = fn.__code__
    parts = [f"code {_code_digest(code)[:16]}"]
    if fn.__defaults__:
        parts.append(f"defaults {_value(fn.__defaults__, depth)}")
    if fn.__kwdefaults__:
        parts.append(f"kwdefaults {_value(fn.__kwdefaults__, depth)}")
    if fn.__closure__:
        cells = []
        for name, cell in zip(code.co_freevars, fn.__closure__, strict=True):
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell
                content = None
            cells.append(f"{name}={_value(content, depth)}")
        parts.append(f"closure [{', '.join(cells)}]")
    data = [  # the plain-data globals it names (a module-level constant, a mean tensor)
        f"{name}={_value(fn.__globals__[name], depth)}"
        for name in sorted(set(_global_names(code)))
        if name in fn.__globals__ and _plain(fn.__globals__[name])
    ]
    if data:
        parts.append(f"globals [{', '.join(data)}]")
    return f"{_name(fn)} [{'; '.join(parts)}]"


def _global_names(code: types.CodeType) -> list[str]:
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names += _global_names(const)
    return names


def _plain(value: Any) -> bool:
    """Data, not code or a namespace: what a function may read from its module's globals."""
    if isinstance(value, (bool, int, float, complex, str, bytes, torch.Tensor, np.ndarray)):
        return True
    if isinstance(value, (list, tuple, set, frozenset)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(_plain(k) and _plain(v) for k, v in value.items())
    return False


def _value(value: Any, depth: int) -> str:
    """An argument, attribute or closure value, canonically (no address, seed or print option)."""
    if depth > _DEPTH:
        return _name(value)
    if isinstance(value, torch.Tensor):
        return _tensor(value)
    if isinstance(value, np.ndarray):
        return _array(value)
    if isinstance(value, (set, frozenset)):
        return "{" + ", ".join(sorted(_value(v, depth + 1) for v in value)) + "}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_value(v, depth + 1) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    if isinstance(value, dict):
        items = sorted((_value(k, depth + 1), _value(v, depth + 1)) for k, v in value.items())
        return "{" + ", ".join(f"{k}: {v}" for k, v in items) + "}"
    if callable(value) and not isinstance(value, type):
        return _describe(value, depth + 1)
    if _is_dataclass(value):
        return f"{_name(value)}: {_fields(value, depth + 1)}"
    text = repr(value)
    if " at 0x" not in text:
        return text
    state = getattr(value, "__dict__", None)
    if isinstance(state, dict) and state:
        return f"{_name(value)}: {_value(dict(state), depth + 1)}"
    return _name(value)


def _is_dataclass(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def _fields(obj: Any, depth: int) -> str:
    return _value({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}, depth)


def _tensor(t: torch.Tensor) -> str:
    dense = t.detach()
    if dense.layout != torch.strided:
        dense = dense.to_dense()
    flat = dense.to("cpu").contiguous().reshape(-1)
    digest = hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
    return f"tensor({flat.dtype}, {tuple(t.shape)}, {digest})"


def _array(a: np.ndarray) -> str:
    if a.dtype == object:
        return f"array(object, {a.shape}, {_value(a.tolist(), _DEPTH)})"
    digest = hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]
    return f"array({a.dtype}, {a.shape}, {digest})"


def _code_digest(code: types.CodeType) -> str:
    """SHA-256 of a code object's bytecode, names and constants (nested code included)."""
    digest = hashlib.sha256(code.co_code)
    digest.update(repr((code.co_names, code.co_varnames, code.co_freevars)).encode())
    for const in code.co_consts:
        text = _code_digest(const) if isinstance(const, types.CodeType) else _value(const, 0)
        digest.update(text.encode())
    return digest.hexdigest()
