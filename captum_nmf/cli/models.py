"""Model specs of the command line: --model, --weights, --layer, --normalize and --device."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from captum_nmf._utils.validation import device_problem
from captum_nmf.cli.errors import CLIError
from captum_nmf.demo.zoo import NORMALISATIONS

__all__ = [
    "NORMALISATIONS",
    "load_model",
    "normalisation",
    "normalisation_name",
    "resolve_device",
    "resolve_layer",
]

_SOURCES = {"torchvision": "torchvision.models", "zoo": "captum_nmf.demo.zoo"}
# The normalisation a model of each source expects when --normalize is not given.
_DEFAULT_NORMALISATION = {"torchvision": "imagenet", "zoo": "lite"}


def _split(spec: str) -> tuple[str, str]:
    """``source:name`` as its two parts."""
    if ":" not in spec:
        raise CLIError(
            f"--model {spec!r} must look like 'torchvision:vgg16', 'zoo:efficientnet_lite0' or "
            "'package.module:factory'."
        )
    source, name = spec.split(":", 1)
    return source, name


def _factory(spec: str) -> tuple[str, str, Callable[..., Any]]:
    """The module, the name and the callable of ``source:name``."""
    source, name = _split(spec)
    module_name = _SOURCES.get(source, source)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CLIError(f"--model {spec!r}: cannot import {module_name!r} ({exc}).") from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        raise CLIError(f"--model {spec!r}: {module_name} has no callable {name!r}.")
    return module_name, name, factory


def load_model(spec: str, weights: str | None = None) -> nn.Module:
    """Build a model from ``torchvision:NAME``, ``zoo:NAME`` or ``module:factory``.

    Args:
        spec (str): the ``--model`` value.
        weights (str, optional): the ``--weights`` file; required for
                    ``torchvision:NAME`` (torchvision's builders are random without
                    a download).
                    Default: None (the factory's own weights)

    Returns:
        *nn.Module*: the model in eval mode, on the CPU (unless the factory put it elsewhere).

    Raises:
        CLIError: a bad spec, an unknown model or factory, a torchvision model
                    without ``weights``, or unreadable weights.
    """
    module_name, name, factory = _factory(spec)
    if spec.startswith("torchvision:") and weights is None:  # random, and new in every process
        raise CLIError(
            f"--model {spec} needs --weights FILE (its state dict, .safetensors or .pth): "
            "torchvision builds the network with random weights (its pretrained ones are "
            "downloaded, which this command never does), so fit, explain and export would "
            "each see another random network."
        )
    kwargs: dict[str, Any] = {"weights": None} if spec.startswith("torchvision:") else {}
    try:
        model = factory(**kwargs)
    except Exception as exc:  # whatever the user's factory raises, name the flag
        raise CLIError(
            f"--model {spec!r}: calling {module_name}.{name}() failed ({type(exc).__name__}: "
            f"{exc}); --model module:factory must name a function that takes no required "
            "arguments and returns a torch.nn.Module."
        ) from exc
    if not isinstance(model, nn.Module):
        raise CLIError(
            f"--model {spec!r}: {module_name}.{name}() returned a {type(model).__name__}, not a "
            "torch.nn.Module; --model module:factory must name a function that returns the model."
        )
    if weights is not None:
        state = _state_dict(Path(weights))
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            own = set(model.state_dict())
            missing, unexpected = len(own - set(state)), len(set(state) - own)
            raise CLIError(
                f"--weights {weights} does not fit {spec}: {missing} missing and {unexpected} "
                "unexpected keys (or shapes differ); a checkpoint that nests the weights (e.g. "
                "under 'state_dict') must be unpacked first."
            ) from exc
    return model.eval()


def _state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CLIError(f"--weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise CLIError(f"--weights {path} is not a readable safetensors file ({exc}).") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for anything but tensors and containers
        raise CLIError(
            f"--weights {path} could not be loaded with weights_only=True ({exc}); only plain "
            "state dicts (or .safetensors) are accepted."
        ) from exc
    if not isinstance(state, dict):
        raise CLIError(f"--weights {path} holds a {type(state).__name__}, not a state dict.")
    return state


def resolve_layer(model: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted path such as ``features.29`` or ``layer4.1``.

    Args:
        model (nn.Module): the model.
        path (str): the ``--layer`` value.

    Returns:
        *nn.Module*: the submodule.

    Raises:
        CLIError: no such submodule (the message lists a few valid names).
    """
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        names = [n for n, _ in model.named_modules() if n][-8:]
        raise CLIError(f"--layer {path!r} is not a submodule of the model; e.g. {names}.") from exc


def normalisation(spec: str, name: str | None) -> Callable[[Tensor], Tensor] | None:
    """The input normalisation of ``--normalize`` (by default, the one ``--model``'s source uses).

    Args:
        spec (str): the ``--model`` value.
        name (str or None): the ``--normalize`` value, a key of :data:`NORMALISATIONS`.

    Returns:
        *Callable or None*: a function of 3 x T x T tiles or N x 3 x T x T batches in
        [0, 1], on any device; None for ``none``.

    Raises:
        CLIError: a bad ``--model`` spec, or no ``--normalize`` for a ``module:factory`` model.
    """
    if name is None:
        name = _DEFAULT_NORMALISATION.get(_split(spec)[0])
        if name is None:
            raise CLIError(
                f"--model {spec!r}: pass --normalize imagenet, lite or none (the input "
                "normalisation the model was trained with)."
            )
    return NORMALISATIONS[name]


def normalisation_name(spec: str, name: str | None) -> str | None:
    """The name of ``--normalize`` as :func:`normalisation` resolves it (None: not known)."""
    return name if name is not None else _DEFAULT_NORMALISATION.get(_split(spec)[0])


def resolve_device(value: str) -> torch.device:
    """The device of ``--device``: ``auto`` is CUDA when available, else the CPU.

    Args:
        value (str): ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (``mps`` is refused:
                    the solver needs float64, which MPS lacks).

    Returns:
        *torch.device*: a device this machine has.

    Raises:
        CLIError: not a device, a device this machine does not have, or MPS.
    """
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError) as exc:
        raise CLIError(
            f"--device {value!r} is not a device; use auto, cpu, cuda or cuda:N."
        ) from exc
    if device.type not in ("cpu", "cuda", "mps"):
        raise CLIError(f"--device {value!r}: use auto, cpu, cuda or cuda:N.")
    problem = device_problem(device)
    if problem is not None:
        advice = {
            "cuda": "use --device cpu, or auto to take CUDA when there is one",
            "mps": "use --device cpu or auto",
        }
        end = "." if problem.startswith("this machine") else f"; {advice[device.type]}."
        raise CLIError(f"--device {value}: {problem}{end}")
    return device
