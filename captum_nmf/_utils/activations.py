"""Capturing and checking a layer's activations.

:func:`capture` is the one way activations are taken: a forward hook
registered for one call and removed in ``finally`` that stores what the layer
saw per device, as :class:`captum.attr.LayerActivation` does (so DataParallel
models work), optionally with the model's output from the same forward. Around
it: a per-model lock (threads sharing a model get sequential results), the
model in eval mode for the call
(every module's ``training`` flag restored afterwards, even on error), a check
that the layer ran, that its output is N x C x H x W, finite and non-negative
(or an explicit ``negative="relu"`` policy), and the reshaping of maps into
rows of feature vectors.

The capture takes the device options of the forward pass:
``autocast`` (e.g. ``torch.bfloat16``) runs it under :func:`torch.autocast`
on the inputs' device type and gives activations and outputs back in float32;
``channels_last`` hands the model channels-last copies of 4-D inputs. Neither
touches the caller's tensors or model (convert the model itself with
``model.to(memory_format=torch.channels_last)`` for the full effect).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import signal
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from captum_nmf._utils.validation import value_range
from captum_nmf.exceptions import LayerError, NegativeActivationError, NonFiniteActivationError

__all__ = [
    "NegativePolicy",
    "capture",
    "PendingCheck",
    "check_activations",
    "reported_first",
    "start_check",
    "check_device_options",
    "device_options",
    "eval_mode",
    "layer_name",
    "maps_to_rows",
    "model_device",
    "model_lock",
    "found_models",
    "models_found",
    "models_of",
    "module_of",
    "rows_to_maps",
]

NegativePolicy = Literal["raise", "relu"]
_NEGATIVE_POLICIES = ("raise", "relu")


def models_of(forward_func: Callable[..., Any], layer: nn.Module) -> list[nn.Module]:
    """Modules whose train/eval state, device and weights a call of ``forward_func`` depends on.

    ``forward_func`` itself when it is a module, or the module it is a bound
    method of; for a function of the model (Captum's usual
    ``lambda x: model(x).softmax(1)``, a ``functools.partial``, a method of a
    plain object) the modules it refers to that hold ``layer``, found by
    :func:`found_models`; only ``layer`` itself when none is found
    (:func:`models_found` says which case it is).
    """
    roots: list[nn.Module] = []
    if isinstance(forward_func, nn.Module):
        roots.append(forward_func)
    owner = getattr(forward_func, "__self__", None)
    if isinstance(owner, nn.Module):
        roots.append(owner)
    if not roots:
        roots += found_models(forward_func, layer)
    if not roots:
        roots.append(layer)
    return roots


def models_found(forward_func: Callable[..., Any], layer: nn.Module) -> bool:
    """Whether ``forward_func`` is, or names, a module holding ``layer`` (see :func:`models_of`).

    False when :func:`models_of` falls back to ``layer`` alone; a function whose
    model is ``layer`` itself counts as found.
    """
    return module_of(forward_func) is not None or bool(found_models(forward_func, layer))


def found_models(forward_func: Callable[..., Any], layer: nn.Module) -> list[nn.Module]:
    """The outermost modules holding ``layer`` that a function refers to, one level deep.

    Looked at: a ``functools.partial``'s function, arguments and keywords; a
    function's closure cells, default arguments and the globals its code names; the attributes of
    the object a method is bound to. Each such value that is a module holding
    ``layer`` counts; a module inside another found one is dropped.
    """
    values: list[Any] = []
    func: Any = forward_func
    if isinstance(func, functools.partial):
        values += [*func.args, *func.keywords.values()]
        func = func.func
        values += [func, getattr(func, "__self__", None)]  # partial(model.forward) names model
    owner = getattr(func, "__self__", None)
    if owner is not None and not isinstance(owner, nn.Module):
        values += list(getattr(owner, "__dict__", {}).values())
    code = getattr(func, "__code__", None)
    if code is not None:
        values += [cell.cell_contents for cell in (func.__closure__ or ()) if _filled(cell)]
        values += [*(func.__defaults__ or ()), *(func.__kwdefaults__ or {}).values()]
        scope = getattr(func, "__globals__", {})
        values += [scope[n] for n in code.co_names if n in scope]
    found: list[nn.Module] = []
    for value in values:
        new = isinstance(value, nn.Module) and all(value is not f for f in found)
        if new and _holds(value, layer):
            found.append(value)
    return [r for r in found if not any(r is not o and _holds(o, r) for o in found)]


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises ValueError
    except ValueError:
        return False
    return True


def _holds(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def module_of(forward_func: Callable[..., Any]) -> nn.Module | None:
    """The module ``forward_func`` is, or is a bound method of (None for a plain function)."""
    if isinstance(forward_func, nn.Module):
        return forward_func
    owner = getattr(forward_func, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def unwrapped(root: nn.Module) -> nn.Module:
    """The model inside DataParallel, DistributedDataParallel or ``torch.compile`` wrappers."""
    while True:
        if isinstance(root, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            root = root.module
        elif isinstance(getattr(root, "_orig_mod", None), nn.Module):  # torch.compile's module
            root = root._orig_mod  # type: ignore[assignment]
        else:
            return root


def layer_name(forward_func: Callable[..., Any], layer: nn.Module) -> str | None:
    """Dotted name of ``layer`` inside ``forward_func`` (``None`` when unknown).

    The name inside the model itself: a DataParallel, DistributedDataParallel
    or ``torch.compile`` wrapper adds no ``module.`` or ``_orig_mod.`` prefix, so
    concepts fitted through a wrapper load onto the bare model with ``strict=True``.
    """
    for root in models_of(forward_func, layer):
        for name, module in unwrapped(root).named_modules():
            if module is layer:
                return str(name)
    return None


def model_device(forward_func: Callable[..., Any], layer: nn.Module) -> torch.device | None:
    """Device of the model's first parameter or buffer; None when it has neither.

    The one device helper of the package: callers that need a device anyway
    use the inputs' device, or the CPU, when this is None.
    """
    for root in models_of(forward_func, layer):
        for tensor in itertools.chain(root.parameters(), root.buffers()):
            return tensor.device
    return None


#: The eval-mode calls in progress, oldest first: each the flags its modules had before the
#: oldest call holding them came in, by module id. A module's flag is set back by the last
#: call out that holds it, so calls on overlapping models in several threads (a model and
#: its backbone, a DataParallel wrapper and its module: different locks) leave every flag as
#: they found it. No counters: a call that fails anywhere leaves nothing that outlives it.
_EVAL_CALLS: list[dict[int, tuple[nn.Module, bool]]] = []
_EVAL_GUARD = threading.Lock()


@contextlib.contextmanager
def eval_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Put ``modules`` in eval mode; restore every submodule's ``training`` flag on exit.

    A model already in eval mode (the usual case) is left alone, and on exit only
    the flags that differ are set back: ``eval()`` and a full restore write the flag
    of every submodule through ``nn.Module.__setattr__``, about 1 ms a call on
    EfficientNet-Lite0 or ResNet-50 (measured on a CPU): host time that a fast GPU
    forward would not hide.
    ``eval()`` is still called when a module overrides ``train`` (it may switch
    modules the tree does not hold). Calls in several threads on models that share
    modules restore a shared module's flag when the last of them is done, to what it
    was before the first came in. A ``KeyboardInterrupt`` (Ctrl-C in the main thread)
    that arrives while the flags are switched or set back is raised once they are set.
    """
    tree = list({id(m): m for root in modules for m in root.modules()}.values())
    record: dict[int, tuple[nn.Module, bool]] = {}
    flipped = False
    try:  # from before the record is made: whatever fails, the record does not outlive us
        with _uninterrupted(), _EVAL_GUARD:
            earlier: dict[int, tuple[nn.Module, bool]] = {}
            for call in _EVAL_CALLS:
                for key, value in call.items():
                    earlier.setdefault(key, value)
            record.update((id(m), earlier.get(id(m), (m, m.training))) for m in tree)
            _EVAL_CALLS.append(record)
            if any(m.training or _overrides_train(m) for m in tree):
                flipped = True
                for root in modules:
                    root.eval()
        yield
    finally:  # also what the forward itself flipped
        _release(modules, record, flipped)


def _release(
    modules: Sequence[nn.Module], record: dict[int, tuple[nn.Module, bool]], flipped: bool
) -> None:
    """End an eval-mode call: drop its record, set back the flags no other call holds.

    Done again if an exception interrupts it (it is idempotent), and the first
    such exception raised once it is done: SIGINT is held back by
    :func:`_uninterrupted`, but another signal's handler may raise too.
    """
    interrupted: BaseException | None = None
    for _ in range(3):
        try:
            with _uninterrupted(), _EVAL_GUARD:
                for i, call in enumerate(_EVAL_CALLS):
                    if call is record:
                        del _EVAL_CALLS[i]
                        break
                held = {key for call in _EVAL_CALLS for key in call}
                released = [value for key, value in record.items() if key not in held]
                _restore_training(modules, released, flipped)
            break
        except BaseException as exc:  # raised below, once the flags are set
            interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted


@contextlib.contextmanager
def _uninterrupted() -> Iterator[None]:
    """Hold a SIGINT that arrives in the block back until its end (main thread only).

    Ctrl-C in a notebook lands anywhere: in the middle of setting a model's
    flags back it left modules in eval mode. The handler in place (Python's
    ``KeyboardInterrupt``, or the user's) runs once the block is done.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):  # SIG_IGN, SIG_DFL or not set from Python: as it is
        yield
        return
    caught: list[tuple[int, Any]] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            previous(*caught[0])


def _overrides_train(module: nn.Module) -> bool:
    return type(module).train is not nn.Module.train


def _restore_training(
    modules: Sequence[nn.Module], saved: list[tuple[nn.Module, bool]], flipped: bool
) -> None:
    """Set back the flags that differ: through ``train(flag)`` where a module overrides it.

    A module's own ``train`` may do more than set flags (switch modules outside the
    tree, ``requires_grad``): after ``eval()`` (``flipped``) each root whose whole
    tree is released (``saved`` holds it: no other call holds any of it) and
    overrides it is called back with its saved flag first, then the flags that
    still differ are set back one by one.
    """
    before = {id(m): t for m, t in saved}
    for root in modules if flipped else ():
        tree = list(root.modules())
        if all(id(m) in before for m in tree) and any(_overrides_train(m) for m in tree):
            root.train(before[id(root)])
    for module, training in saved:
        if module.training != training:
            if _overrides_train(module):
                module.train(training)
            else:
                module.training = training


_MODEL_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(forward_func: Callable[..., Any], layer: nn.Module) -> threading.RLock:
    """The lock that serialises forwards of one model (its eval-mode flip and per-call hooks).

    Two threads that run the same model through :func:`capture` would otherwise
    flip each other's ``training`` flags and see each other's activations in
    their hooks. One re-entrant lock per model (the first of
    :func:`models_of`), created on first use and dropped with the model.
    """
    root = models_of(forward_func, layer)[0]
    with _LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(root)
        if lock is None:
            lock = _MODEL_LOCKS[root] = threading.RLock()
        return lock


# Whether the rest of a forward leaves a layer's output (or input) as the layer gave it:
# True once a forward was seen not to change it in place, False once one did. Unknown and
# False layers are cloned in the hook; True layers are kept by reference and checked, in
# transient captures (see capture).
# Keyed by the layer, then by whether its input (True) or output (False) is captured.
_UNTOUCHED: weakref.WeakKeyDictionary[nn.Module, dict[bool, bool]] = weakref.WeakKeyDictionary()


class _Saved:
    """What the hook saw, per device, and the version of every tensor it kept by reference."""

    def __init__(self, clone: bool, layer: nn.Module) -> None:
        self.clone = clone
        self.layer = layer
        self.owner = threading.get_ident()  # the thread whose forward this capture runs
        self.values: dict[torch.device, Any] = {}
        self.calls: dict[torch.device, list[str]] = {}  # the shapes of each call, per device
        self.watched: list[tuple[Tensor, int]] = []
        # calls of the layer from threads without a capture of it (a forward_func that runs
        # the model in a worker thread): used when this thread's forward made none
        self.others: dict[torch.device, Any] = {}
        self.other_calls: dict[torch.device, list[str]] = {}
        self.guard = threading.Lock()

    def take_others(self) -> None:
        """Use the other threads' calls when this thread's forward made no call of the layer."""
        if not self.values and self.others:
            self.values, self.calls, self.clone = self.others, self.other_calls, True

    def repeated(self) -> list[str] | None:
        """The shapes of the layer's calls on a device where it ran with different shapes.

        A module reused at one shape (the ReLU of a torchvision ResNet block) gives
        its last call, as Captum's ``LayerActivation`` does: the block's output.
        """
        return next((s for s in self.calls.values() if len(set(s)) > 1), None)

    def touched(self) -> bool:
        """Whether the forward changed a kept tensor in place after the hook."""
        return any(t._version != v for t, v in self.watched)


def _storages(value: Any) -> set[int]:
    """Data pointers of the storages of the tensors in ``value`` (tensors, tuples, lists, dicts)."""
    if isinstance(value, Tensor):  # sparse and other layouts have no storage of their own
        return {value.untyped_storage().data_ptr()} if value.layout == torch.strided else set()
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return set().union(*(_storages(v) for v in value))
    return set()


def _hook(saved: _Saved, attribute_to_layer_input: bool) -> Callable[..., None]:
    """A forward (pre-)hook that keeps what the layer saw in ``saved``, keyed by device.

    It clones, as :class:`captum.attr.LayerActivation` does, unless the layer is
    known to be left untouched by the rest of the forward: then it keeps a
    reference and the tensor's version counter (the one autograd uses to detect
    in-place changes), which :func:`capture` checks after the forward.
    """

    def hook(_module: nn.Module, layer_in: Any, layer_out: Any = None) -> None:
        other = False
        if _module is saved.layer:
            current = _innermost(saved.layer, threading.get_ident())
            if current is not None and current is not saved:
                # the calling thread's own capture of the layer is another: one nested in this
                # forward (a user's hook calling attribute), or another thread's: theirs
                return
            # None: a thread without a capture of the layer, Captum's LayerGradCam beside us
            # (it does not take our lock) or our forward_func's worker thread: kept aside (a
            # DataParallel replica is another module object, run from its own thread: ours)
            other = current is None
        value = layer_in if attribute_to_layer_input else layer_out
        if isinstance(value, dict):  # e.g. IntermediateLayerGetter's {"out": ...}
            keys, items = list(value), tuple(value.values())
        else:
            keys, items = [], tuple(value) if isinstance(value, (tuple, list)) else (value,)
        first = next((t for t in items if isinstance(t, Tensor)), None)
        device = first.device if first is not None else torch.device("cpu")
        tensors = [t for t in items if isinstance(t, Tensor)]
        # inference tensors carry no version counter: always cloned
        watch = [(t, t._version) for t in tensors if not t.is_inference()]
        clone = saved.clone or other or len(watch) < len(tensors)
        copy = tuple(
            (t.detach() if other else t).clone() if clone and isinstance(t, Tensor) else t
            for t in items
        )  # another thread runs outside our no_grad (it is per thread): detached
        if isinstance(value, dict):
            kept: Any = type(value)(zip(keys, copy, strict=True))
        else:
            kept = copy if isinstance(value, (tuple, list)) else copy[0]
        shape = " ".join(str(tuple(t.shape)) for t in tensors) or type(value).__name__
        with saved.guard:  # DataParallel replicas call it from their own threads, as in Captum
            if other:
                saved.others[device] = kept
                saved.other_calls.setdefault(device, []).append(shape)
                return
            saved.values[device] = kept
            saved.calls.setdefault(device, []).append(shape)
            saved.watched.extend(watch)

    return hook


def _forward_once(
    forward_func: Callable[..., Any],
    layer: nn.Module,
    args: tuple[Any, ...],
    amp: contextlib.AbstractContextManager[Any],
    attribute_to_layer_input: bool,
    clone: bool,
) -> tuple[_Saved, Any]:
    """One forward in eval mode with the hook registered for it and removed in ``finally``."""
    saved = _Saved(clone, layer)
    hook = _hook(saved, attribute_to_layer_input)
    handle = (
        layer.register_forward_pre_hook(hook)
        if attribute_to_layer_input
        else layer.register_forward_hook(hook)
    )
    with _CAPTURES_GUARD:
        _CAPTURES.append(saved)
    try:
        with eval_mode(models_of(forward_func, layer)), torch.no_grad(), amp:
            output = forward_func(*args)
    finally:
        with _CAPTURES_GUARD:
            _CAPTURES.remove(saved)
        handle.remove()
    saved.take_others()
    return saved, output


#: The captures in progress in every thread, oldest first (one nested in a forward after the
#: one it runs in): whose a call of a layer is, by its layer and the thread that runs it.
_CAPTURES: list[_Saved] = []
_CAPTURES_GUARD = threading.Lock()


def _innermost(layer: nn.Module, thread: int) -> _Saved | None:
    """The innermost capture of ``layer`` in progress in ``thread``, or None."""
    with _CAPTURES_GUARD:
        captures = list(_CAPTURES)
    return next((c for c in reversed(captures) if c.layer is layer and c.owner == thread), None)


def _gather(saved: dict[torch.device, Any], device_ids: list[int] | None, label: str) -> Any:
    """One result from the per-device results, concatenated in ``device_ids`` order."""
    if len(saved) == 1:
        return next(iter(saved.values()))
    if device_ids is None:
        raise LayerError(
            f"Layer {label} ran on {len(saved)} devices ({sorted(map(str, saved))}) but no "
            "device_ids were given; pass the DataParallel model itself as forward_func or "
            "device_ids=model.device_ids."
        )
    by_index = {d.index: d for d in saved}
    order = [by_index[i] for i in device_ids if i in by_index]
    if len(order) != len(saved):
        raise LayerError(
            f"Layer {label} ran on devices {sorted(map(str, saved))}, which device_ids="
            f"{device_ids} do not all name; pass the DataParallel model's device_ids."
        )
    parts = [saved[d] for d in order]
    target = order[0]
    if isinstance(parts[0], Tensor):
        return torch.cat([p.to(target) for p in parts])
    return type(parts[0])(torch.cat([p[i].to(target) for p in parts]) for i in range(len(parts[0])))


def capture(
    forward_func: Callable[..., Any],
    layer: nn.Module,
    inputs: Tensor | tuple[Tensor, ...],
    *,
    additional_forward_args: Any = None,
    attribute_to_layer_input: bool = False,
    device_ids: list[int] | None = None,
    reshape_transform: Callable[[Tensor], Tensor] | None = None,
    name: str | None = None,
    autocast: torch.dtype | None = None,
    channels_last: bool = False,
    return_output: bool = False,
    transient: bool = False,
) -> Any:
    """Run ``forward_func`` once in eval mode and return the layer's N x C x H x W activations.

    One hook, registered for the call and removed in ``finally``, clones what
    the layer saw per device, as :class:`captum.attr.LayerActivation` does
    (a DataParallel model's replicas each add their part; the parts are
    concatenated in ``device_ids`` order, or the model's own).

    With ``transient=True`` (the caller is done with the activations before
    the model's next forward, holding :func:`model_lock` until then: the
    attribution's solve, a slide run's stitching) the clone is skipped once a
    forward has shown that the rest of the model leaves the layer's tensor as
    it was: the hook keeps a reference
    and the tensor's version counter (the one autograd uses to detect in-place
    changes), checked after each forward. Should a later forward change it in
    place after all, that forward runs once more with a clone, and the layer
    is cloned from then on. A change autograd cannot see (through ``.data``
    or a NumPy view) is not detected, as it is not by autograd. The forward,
    the eval-mode flip and the hook hold the model's :func:`model_lock`, so
    threads sharing a model get the results of sequential calls.
    ``autocast`` and ``channels_last`` are checked and applied as in
    :func:`device_options`; with ``autocast`` the activations (and the
    output) come back in float32.

    Returns:
        *Tensor* or *tuple*: the activations, and with ``return_output=True``
        ``(activations, output)`` from the same forward.

    Raises:
        LayerError: the layer did not run, ran more than once in the forward
                    with outputs of different shapes (a reused module; at one
                    shape its last call is taken, as in Captum), produced several tensors, or its
                    (reshaped) output is not a 4-D tensor.
        TypeError: ``autocast`` is not a dtype or ``channels_last`` not a bool.
        ValueError: ``autocast`` is unsupported on the inputs' device, or
                    ``channels_last=True`` without a 4-D input.
    """
    label = repr(name) if name else type(layer).__name__
    inputs, amp = device_options(inputs, autocast=autocast, channels_last=channels_last)
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    extra = (
        ()
        if additional_forward_args is None
        else additional_forward_args
        if isinstance(additional_forward_args, tuple)
        else (additional_forward_args,)
    )
    with model_lock(forward_func, layer):
        with _LOCKS_GUARD:  # other models' threads may add their layers meanwhile
            known = _UNTOUCHED.setdefault(layer, {})
        untouched = known.get(attribute_to_layer_input)
        run = (forward_func, layer, (*args, *extra), amp, attribute_to_layer_input)
        saved, output = _forward_once(*run, clone=not transient or untouched is not True)
        touched = saved.touched()
        if transient and saved.watched and (untouched is None or touched):
            known[attribute_to_layer_input] = not touched
        if touched and not saved.clone:  # changed in place after the layer: once more, cloned
            saved, output = _forward_once(*run, clone=True)
    if not saved.values:
        raise LayerError(
            f"Layer {label} was not executed during the forward pass; pass a module "
            "that forward_func actually calls."
        )
    shapes = saved.repeated()
    if shapes is not None:
        raise LayerError(
            f"Layer {label} ran {len(shapes)} times in one forward pass with different "
            f"outputs ({', '.join(shapes)}): one module object reused at several places of the "
            "model (e.g. one ReLU after two convolutions). Which call to explain is ambiguous; "
            "pass a module that runs once, e.g. the block around it, or give each place its "
            "own module."
        )
    ids = device_ids if device_ids is not None else getattr(forward_func, "device_ids", None)
    act = _as_4d(_gather(saved.values, ids, label), reshape_transform, label)
    if not saved.clone and act.untyped_storage().data_ptr() in _storages((output, args, extra)):
        act = act.clone()  # the output or an input itself: never hand out one tensor twice
    act = _restore(act, autocast, channels_last)
    if not return_output:
        return act
    return act, _to_float32(output) if autocast is not None else output


_AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


def check_device_options(
    autocast: torch.dtype | None, channels_last: bool, *, device_type: str = "cpu"
) -> None:
    """Validate the forward's device options for inputs on ``device_type``.

    Args:
        autocast (torch.dtype or None): reduced-precision dtype of the forward.
        channels_last (bool): whether 4-D inputs are given channels-last.
        device_type (str, optional): ``"cpu"``, ``"cuda"``, ...
                    Default: ``"cpu"``

    Raises:
        TypeError: ``autocast`` is not a ``torch.dtype`` or None, or
                    ``channels_last`` is not a bool.
        ValueError: ``autocast`` is not a reduced floating dtype that autocast
                    supports on ``device_type``.
    """
    if not isinstance(channels_last, bool):
        raise TypeError(
            f"channels_last must be a bool, got {channels_last!r} "
            f"({type(channels_last).__name__}); pass channels_last=True or False."
        )
    if autocast is None:
        return
    if not isinstance(autocast, torch.dtype):
        raise TypeError(
            f"autocast must be a torch.dtype or None, got {autocast!r} "
            f"({type(autocast).__name__}); pass e.g. autocast=torch.bfloat16."
        )
    if autocast not in _AUTOCAST_DTYPES:
        raise ValueError(
            f"autocast={autocast} is not a reduced floating dtype; pass autocast=torch.bfloat16 "
            "(or torch.float16 on GPUs), or None for full precision."
        )
    if not torch.amp.is_autocast_available(device_type):
        raise ValueError(
            f"autocast={autocast} is not available for inputs on device type "
            f"{device_type!r}; pass autocast=None."
        )
    if not _autocast_supported(device_type, autocast):
        other = "torch.float16" if autocast == torch.bfloat16 else "torch.bfloat16"
        raise ValueError(
            f"autocast={autocast} is not supported on {device_type!r} by this PyTorch "
            f"{torch.__version__} and device (e.g. bfloat16 on a GPU older than Ampere); "
            f"pass autocast={other}, or None."
        )


@functools.cache
def _autocast_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.autocast`` takes ``dtype`` on ``device_type`` (asked once per pair).

    torch warns about an unsupported pair, so the warning is caught; the
    filters that ``warnings.catch_warnings`` swaps are process-wide, which is
    why the answer is cached instead of asked on every forward. For bfloat16
    on a GPU without it (older than Ampere) torch raises ``RuntimeError``
    instead: that is an unsupported pair too.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.autocast(device_type=device_type, dtype=dtype)  # warns when unsupported
        except RuntimeError:  # "Current CUDA Device does not support bfloat16"
            return False
    return not any("not supported" in str(w.message) for w in caught)


def device_options(
    inputs: Tensor | tuple[Tensor, ...],
    *,
    autocast: torch.dtype | None,
    channels_last: bool,
) -> tuple[Tensor | tuple[Tensor, ...], contextlib.AbstractContextManager[Any]]:
    """Inputs and context manager of a forward with ``autocast`` and ``channels_last``.

    Args:
        inputs (Tensor or tuple[Tensor, ...]): the forward's inputs (never modified).
        autocast (torch.dtype or None): run the forward under
                    ``torch.autocast(device_type=<inputs' device type>, dtype=autocast)``.
        channels_last (bool): give the model channels-last copies of the
                    4-D inputs (``x.contiguous(memory_format=torch.channels_last)``).

    Returns:
        *tuple*: the inputs to pass (the caller's own when nothing changes)
        and the context manager to run the forward in.

    Raises:
        TypeError, ValueError: as :func:`check_device_options`, and
                    ``ValueError`` when ``channels_last=True`` but no input is 4-D.
    """
    tensors = inputs if isinstance(inputs, tuple) else (inputs,)
    first = next((t for t in tensors if isinstance(t, Tensor)), None)
    device_type = first.device.type if first is not None else "cpu"
    check_device_options(autocast, channels_last, device_type=device_type)
    if channels_last:
        if not any(isinstance(t, Tensor) and t.ndim == 4 for t in tensors):
            shapes = [
                tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in tensors
            ]
            raise ValueError(
                f"channels_last=True needs 4-D N x C x H x W inputs, got {shapes}; pass "
                "channels_last=False."
            )
        converted = tuple(
            t.contiguous(memory_format=torch.channels_last)
            if isinstance(t, Tensor) and t.ndim == 4
            else t
            for t in tensors
        )
        inputs = converted if isinstance(inputs, tuple) else converted[0]
    amp: contextlib.AbstractContextManager[Any] = (
        contextlib.nullcontext()
        if autocast is None
        else torch.autocast(device_type=device_type, dtype=autocast)
    )
    return inputs, amp


def _to_float32(value: Any) -> Any:
    """``value`` with bfloat16/float16 tensors (also in tuples, lists, dicts) as float32."""
    if isinstance(value, Tensor):
        return value.float() if value.dtype in _AUTOCAST_DTYPES else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # named tuple
        return type(value)(*(_to_float32(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_to_float32(v) for v in value)
    if isinstance(value, dict):
        return type(value)((k, _to_float32(v)) for k, v in value.items())
    return value


def _restore(act: Tensor, autocast: torch.dtype | None, channels_last: bool) -> Tensor:
    """Activations in float32 after autocast, in the default memory format after channels_last."""
    if autocast is not None and act.dtype in _AUTOCAST_DTYPES:
        act = act.float()
    if channels_last:
        act = act.contiguous()
    return act


def _as_4d(act: Any, reshape_transform: Callable[[Tensor], Tensor] | None, label: str) -> Tensor:
    if isinstance(act, (tuple, list)):
        if len(act) != 1:
            raise LayerError(
                f"Layer {label} produced {len(act)} tensors; NMF concepts need one N x C x H x W "
                "tensor. Hook a module with a single output."
            )
        act = act[0]
    if reshape_transform is not None:
        act = reshape_transform(act)
    if not isinstance(act, Tensor) or act.ndim != 4:
        shape = tuple(act.shape) if isinstance(act, Tensor) else type(act).__name__
        raise LayerError(
            f"NMF concepts need a 4-D N x C x H x W activation; layer {label} produced shape "
            f"{shape}. Hook a convolutional layer, or pass reshape_transform=... to map "
            "tokens to a grid."
        )
    if act.shape[1] == 0 or act.shape[2] * act.shape[3] == 0:
        raise LayerError(
            f"Layer {label} produced an empty activation of shape {tuple(act.shape)}; "
            "use larger inputs or an earlier layer."
        )
    return act


def check_activations(act: Tensor, *, negative: NegativePolicy, name: str | None) -> Tensor:
    """Check finiteness and sign; apply the negative-value policy without touching ``act``.

    Raises:
        NonFiniteActivationError: NaN or infinite values.
        NegativeActivationError: negative values with ``negative="raise"``.
    """
    act, pending = start_check(act, negative=negative, name=name)
    if pending is not None:
        pending.finish()
    return act


class PendingCheck:
    """The value check of activations, its reading back to the host deferred.

    :func:`start_check` queues the one pass over the values (their minimum and
    maximum); :meth:`finish` reads the two numbers back, which waits for the
    device. A caller that can queue more work on the same values first (the
    solve, the stitching) calls :meth:`finish` after queuing it and before it
    uses any result, so that on a GPU that work is not launched while the
    device sits idle after the forward.
    """

    def __init__(self, act: Tensor, name: str | None) -> None:
        self.act = act
        self.name = name
        self.extremes: Tensor | None = value_range(act)  # None once passed
        self.error: Exception | None = None

    def finish(self) -> None:
        """Read the extremes back; raise for NaN, infinite or negative values.

        Raises:
            NonFiniteActivationError: NaN or infinite values.
            NegativeActivationError: negative values.
        """
        if self.error is not None:  # finished before, and failed: the same error again
            raise self.error
        if self.extremes is None:
            return
        try:
            # one synchronisation; on a GPU an error of any queued kernel surfaces here too
            low, high = (float(v) for v in self.extremes.tolist())
            # NaN makes both extremes NaN, +-Inf shows in them, a negative value in the minimum
            if not (math.isfinite(low) and math.isfinite(high) and low >= 0):
                _refuse(self.act, "raise", _label(self.name))
        except Exception as exc:
            self.error = exc
            raise
        self.extremes = None


@contextlib.contextmanager
def reported_first(pending: PendingCheck | None) -> Iterator[None]:
    """Within the block, an error makes ``pending`` finish first: bad activations are the error.

    For code that queues work on checked-later activations: a solve or a
    shape check that fails on them must not hide that the values were bad.
    """
    try:
        yield
    except Exception:
        if pending is not None:
            pending.finish()
        raise


def start_check(
    act: Tensor, *, negative: NegativePolicy, name: str | None
) -> tuple[Tensor, PendingCheck | None]:
    """:func:`check_activations` with the reading back of its result deferred where it can be.

    Returns:
        *tuple*: the activations (float32 for float16 / bfloat16 ones) and, with
        ``negative="raise"``, the :class:`PendingCheck` whose :meth:`~PendingCheck.finish`
        must run before any result computed from them is used; with ``"relu"``
        (whose result depends on the values) or an empty tensor, the checked
        activations and None.

    Raises:
        NonFiniteActivationError, NegativeActivationError: as
                    :func:`check_activations`, for the values checked now.
    """
    if act.dtype in (torch.float16, torch.bfloat16):
        act = act.float()
    if act.numel() == 0:
        return (torch.relu(act) if negative == "relu" else act), None
    if negative == "raise":
        return act, PendingCheck(act, name)
    # one pass over the batch (and one synchronisation) decides the common, clean case
    low, high = (float(v) for v in value_range(act).tolist())
    if math.isfinite(low) and math.isfinite(high):
        return (torch.relu(act) if low < 0 else act), None
    return _refuse(act, negative, _label(name)), None


def _label(name: str | None) -> str:
    return repr(name) if name else "the hooked layer"


def _refuse(act: Tensor, negative: NegativePolicy, label: str) -> Tensor:
    """The slow path of the check, with counts for the message.

    Raises:
        NonFiniteActivationError: NaN or infinite values.
        NegativeActivationError: negative values with ``negative="raise"``.
    """
    finite = torch.isfinite(act)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(act).sum())
        n_inf = int((~finite).sum()) - n_nan
        items = torch.nonzero((~finite).flatten(1).any(dim=1)).flatten().tolist()
        raise NonFiniteActivationError(
            f"Layer {label} produced {n_nan} NaN and {n_inf} Inf values (batch items "
            f"{items[:10]}); check the input normalisation and the model's dtype."
        )
    if negative == "relu":
        return torch.relu(act)
    negative_mask = act < 0
    if bool(negative_mask.any()):
        share = 100.0 * float(negative_mask.float().mean())
        raise NegativeActivationError(
            f"Layer {label} produced negative activations (min={float(act.min()):.4g}, "
            f"{share:.1f} % of values < 0). NMF needs non-negative input: hook the ReLU that "
            "follows this layer, or pass negative='relu' (saved with the concepts)."
        )
    return act


def maps_to_rows(act: Tensor) -> Tensor:
    """N x C x H x W maps -> (N*H*W) x C rows, one feature vector per location."""
    return act.permute(0, 2, 3, 1).reshape(-1, act.shape[1])


def rows_to_maps(rows: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """(N*H*W) x K rows -> N x K x H x W maps for a batch of ``shape`` (N, H, W)."""
    n, h, w = shape
    return rows.reshape(n, h, w, rows.shape[1]).permute(0, 3, 1, 2).contiguous()


def validate_negative(negative: str) -> None:
    """Raise ``ValueError`` for an unknown negative-activation policy."""
    if negative not in _NEGATIVE_POLICIES:
        raise ValueError(
            f"negative must be one of {_NEGATIVE_POLICIES}, got {negative!r}. 'raise' refuses "
            "negative activations; 'relu' clips them to 0 in fit and attribute alike."
        )
