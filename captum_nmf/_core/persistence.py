"""Saving and loading concepts: a ``.safetensors`` file with the K x C vectors and metadata."""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from captum_nmf._core.names import names_from_metadata, names_metadata
from captum_nmf._core.nmf import NMF
from captum_nmf._utils.activations import models_found, models_of, unwrapped
from captum_nmf.exceptions import (
    ConceptModelFormatError,
    ConceptModelMismatchError,
    LayerError,
    LayerNameMismatchWarning,
    ModelMismatchWarning,
)
from captum_nmf.io import load_tensors, save_tensors

if TYPE_CHECKING:
    from captum_nmf._core.nmf_concept import NMFConceptAttribution

__all__ = [
    "MAX_CONCEPT_NORM",
    "check_concept_values",
    "declared_channels",
    "load_concepts",
    "model_fingerprint",
    "save_concepts",
]


def save_concepts(attr: NMFConceptAttribution, path: str | os.PathLike[str]) -> Path:
    """Write ``attr``'s concepts and settings atomically (see :meth:`NMFConceptAttribution.save`).

    Raises:
        NotFittedError: ``attr`` is not fitted.
        ValueError: ``path`` does not end in ``.safetensors``.
    """
    attr.check_fitted("save")
    seed = attr.random_state
    # NumPy integers count (a RandomState or Generator is not a seed: not recorded)
    integral = isinstance(seed, numbers.Integral) and not isinstance(seed, bool)
    solver = {  # plain Python numbers: json cannot write NumPy scalars
        "init": str(attr.init),
        "max_iter": int(attr.max_iter),
        "tol": float(attr.tol),
        "random_state": int(seed) if integral else None,  # type: ignore[arg-type]
        "forget_factor": float(attr.forget_factor),
    }
    metadata = {
        "n_concepts": str(attr.concepts_.shape[0]),
        "n_channels": str(attr.n_channels_in_),
        "layer_name": attr.layer_name_ or "",
        "negative": attr.negative,
        "attribute_to_layer_input": json.dumps(attr.attribute_to_layer_input_),
        "solver": json.dumps(solver, sort_keys=True),
        "n_samples_seen": str(attr.n_samples_seen_),
        "reconstruction_err": repr(attr.reconstruction_err_),
        "torch_version": torch.__version__,
        **names_metadata(getattr(attr, "_concept_names", None)),
        **({} if attr.stability_ is None else {"stability": json.dumps(attr.stability_)}),
        **(
            {"provenance": json.dumps(attr.provenance_, sort_keys=True)} if attr.provenance_ else {}
        ),
    }
    return save_tensors(path, {"concepts": attr.concepts_}, metadata)


def load_concepts(
    cls: type[NMFConceptAttribution],
    path: str | os.PathLike[str],
    forward_func: Callable[..., Any],
    layer: nn.Module,
    *,
    device_ids: list[int] | None,
    strict: bool,
    reshape_transform: Callable[[Tensor], Tensor] | None,
) -> NMFConceptAttribution:
    """A fitted ``cls`` bound to ``layer`` from a file (see :meth:`NMFConceptAttribution.load`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConceptModelFormatError: a pickle-based, corrupt, unknown or newer file.
        ConceptModelMismatchError: the layer has another channel count (or
                    another name with ``strict=True``).
    """
    tensors, meta = load_tensors(path, required=("concepts",))

    def field(key: str, parse: Callable[[str], Any], default: str | None = None) -> Any:
        raw = meta.get(key, default)
        if raw is None:
            raise ConceptModelFormatError(f"{path} has incomplete metadata (no {key!r}).")
        try:
            return parse(raw)
        except (ValueError, TypeError) as exc:
            raise ConceptModelFormatError(
                f"{path} has unreadable metadata {key!r} ({raw!r:.60}: {exc}). The file is "
                "damaged or was not written by captum-nmf; fit the concepts again or load "
                "another copy."
            ) from exc

    k, c = field("n_concepts", int), field("n_channels", int)
    solver = field("solver", lambda raw: _json_of(raw, dict, "a JSON object"))
    negative = field("negative", str)
    to_input = field("attribute_to_layer_input", lambda raw: _json_of(raw, bool, "true or false"))
    saved_name = field("layer_name", str) or None
    n_seen = field("n_samples_seen", int, "0")
    error = field("reconstruction_err", float, "nan")
    concepts = tensors["concepts"]
    if tuple(concepts.shape) != (k, c) or not concepts.is_floating_point():
        raise ConceptModelFormatError(
            f"{path}: concepts tensor has shape {tuple(concepts.shape)} and dtype "
            f"{concepts.dtype}, metadata says {k} x {c} floating point."
        )
    check_concept_values(concepts, f" in {path}")
    try:
        attr = cls(
            forward_func,
            layer,
            k,
            device_ids,
            random_state=solver.get("random_state"),
            negative=negative,
            init=solver.get("init", "nndsvda"),
            max_iter=solver.get("max_iter", 200),
            tol=solver.get("tol", 1e-4),
            forget_factor=solver.get("forget_factor", 1.0),
            reshape_transform=reshape_transform,
        )
        nmf = NMF.from_components(
            concepts,
            init=attr.init,
            max_iter=attr.max_iter,
            tol=attr.tol,
            random_state=attr.random_state,
            forget_factor=attr.forget_factor,
        )
    except (TypeError, ValueError) as exc:
        if isinstance(exc, LayerError):
            raise
        raise ConceptModelFormatError(f"{path} has invalid settings ({exc}).") from exc
    declared = declared_channels(layer, attribute_to_layer_input=to_input)
    name = attr._layer_name
    if declared is not None and declared != c:
        raise ConceptModelMismatchError(
            f"Concept model expects {c} channels from {saved_name!r} but layer {name!r} "
            f"has {declared}; load concepts fitted on this layer."
        )
    if saved_name and name and _bare(saved_name) != _bare(name):
        msg = f"Concepts were fitted on layer {saved_name!r} and are bound to layer {name!r}."
        if strict:
            raise ConceptModelMismatchError(msg + " Pass strict=False to allow it.")
        warnings.warn(msg, LayerNameMismatchWarning, stacklevel=2)
    attr.nmf_ = nmf
    attr.concepts_ = concepts.clone()
    attr.n_channels_in_ = c
    attr.layer_name_ = saved_name
    attr.attribute_to_layer_input_ = to_input
    attr.n_samples_seen_ = n_seen
    attr.reconstruction_err_ = error
    attr._concept_names = names_from_metadata(meta, k, str(path))  # None: an older file
    try:
        attr.stability_ = json.loads(meta["stability"]) if "stability" in meta else None
    except ValueError as exc:
        raise ConceptModelFormatError(
            f"{path} has an unreadable stability record ({exc})."
        ) from exc
    attr.provenance_ = field("provenance", lambda raw: _json_of(raw, dict, "a JSON object"), "{}")
    _check_weights(attr, path, strict)
    return attr


def _check_weights(attr: NMFConceptAttribution, path: object, strict: bool) -> None:
    """Warn (raise with ``strict``) when the model's weights are not those fitted on."""
    recorded = attr.provenance_.get("weights_sha256")
    if not isinstance(recorded, str):
        return  # an older file, or concepts fitted through a function without a model
    now = weights_digest(attr.forward_func, attr.layer)
    if now is None or now == recorded:
        return
    msg = (
        f"Could not confirm that the concepts in {path} are bound to the weights they were "
        f"fitted on: the model's weights differ (SHA-256 {recorded[:12]} then, {now[:12]} "
        "now). Another network (fine-tuned, other weights) gives maps the concepts do not "
        "describe; if only a wrapper or a head around the same layers changed, this can be "
        "ignored."
    )
    if strict:
        raise ConceptModelMismatchError(msg + " (strict=True refuses it.)")
    warnings.warn(msg, ModelMismatchWarning, stacklevel=3)


MAX_CONCEPT_NORM = 1e3


def check_concept_values(concepts: Tensor, where: str = "") -> None:
    """Refuse concept vectors that cannot give meaningful weights.

    Fitted concepts are finite, non-negative rows of unit norm (a zero row is
    allowed); a file edited by hand, or vectors far from that scale, would
    overflow the solve in float32.

    Args:
        concepts (Tensor): K x C concept vectors.
        where (str, optional): appended to the subject of the message, e.g.
                    ``" in concepts.safetensors"``.
                    Default: ``""``

    Raises:
        ConceptModelFormatError: NaN/Inf or negative entries, or a row whose
                    norm exceeds :data:`MAX_CONCEPT_NORM` (fitted rows have norm 1).
    """
    h = concepts.detach().to("cpu", torch.float64)
    fix = "Load a valid concept file, or fit the concepts again."
    if not bool(torch.isfinite(h).all()):
        raise ConceptModelFormatError(f"The concepts{where} hold NaN or Inf. {fix}")
    if bool((h < 0).any()):
        raise ConceptModelFormatError(
            f"The concepts{where} hold negative entries; NMF concepts are non-negative. {fix}"
        )
    norms = torch.linalg.vector_norm(h, dim=1)
    if bool((norms > MAX_CONCEPT_NORM).any()):
        row = int(torch.argmax(norms))
        raise ConceptModelFormatError(
            f"Concept {row}{where} has norm {float(norms[row]):.3g}; fitted concepts have unit "
            f"norm (at most {MAX_CONCEPT_NORM:g} is accepted), so the vectors were altered or "
            f"not written by captum-nmf. {fix}"
        )


def _bare(name: str) -> str:
    """A layer name without DataParallel's ``module.`` or ``torch.compile``'s ``_orig_mod.``.

    Files written before names were recorded without these prefixes still match.
    """
    while name.startswith(("module.", "_orig_mod.")):
        name = name.split(".", 1)[1]
    return name


def _json_of(raw: str, kind: type, what: str) -> Any:
    """``raw`` parsed as JSON, refused unless it is a ``kind`` (``what`` names it)."""
    value = json.loads(raw)
    if not isinstance(value, kind):
        raise TypeError(f"{what} was expected")
    return value


def declared_channels(layer: nn.Module, *, attribute_to_layer_input: bool) -> int | None:
    """Channel count a layer declares statically (convolutions, batch norms), else None."""
    if isinstance(layer, nn.modules.conv._ConvNd):
        return int(layer.in_channels if attribute_to_layer_input else layer.out_channels)
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        return int(layer.num_features)
    return None


def model_fingerprint(attr: NMFConceptAttribution, *, cached: bool = True) -> str:
    """SHA-256 of the model's parameters and buffers, the layer and the concepts, cached.

    The digest is recomputed only when something it covers changed: a
    tensor of the state dict replaced, moved or modified in place (its
    identity, storage, device and version counter are the cache key), the
    concepts, or the layer name. In-place edits that torch does not count
    (through ``.data``, or a NumPy view of a CPU tensor) do not change the
    key: pass ``cached=False`` where a stale digest would matter. A slide run
    that computes does (fresh or resumed: its record names the weights it
    computes with); one that only loads a finished run does not, so a
    restarted cohort does not hash the model again for each finished slide.

    Args:
        attr (NMFConceptAttribution): fitted concepts with their model.
        cached (bool, optional): reuse the cached digest when the key matches.
                    Default: True

    Returns:
        *str*: hex digest (the same value for the same weights in any process).

    Raises:
        NotFittedError: ``attr`` is not fitted.
    """
    attr.check_fitted("model_fingerprint")
    roots = models_of(attr.forward_func, attr.layer)
    states = [root.state_dict(keep_vars=True) for root in roots]
    concepts = attr.concepts_
    key = (
        attr.layer_name_,
        _tensor_key(concepts),
        tuple((name, _tensor_key(t)) for state in states for name, t in state.items()),
    )
    previous: tuple[Any, str] | None = _FINGERPRINTS.get(concepts)  # type: ignore[no-untyped-call]
    if cached and previous is not None and previous[0] == key:
        return previous[1]
    digest = hashlib.sha256()
    _digest_states(digest, states)
    digest.update(f"layer={attr.layer_name_}|".encode())
    digest.update(concepts.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    value = digest.hexdigest()
    _FINGERPRINTS[concepts] = (key, value)
    return value


def _digest_states(digest: Any, states: list[dict[str, Any]], *, comparable: bool = False) -> None:
    """Feed every tensor of ``states`` (names, dtypes, shapes and bytes) to ``digest``.

    ``comparable`` (the weights record): floats as float32 without their dtype,
    and what is not a plain strided tensor (extra state, packed or sparse
    weights) left out.
    """
    for state in states:
        for name, value in state.items():
            if comparable and (
                not isinstance(value, Tensor) or value.is_quantized or value.layout != torch.strided
            ):
                continue  # extra state, packed or sparse weights: not compared
            t = value.detach().to("cpu")
            if comparable and t.is_floating_point():  # another float width: the same values
                t = t.to(torch.float32)
            t = t.contiguous().reshape(-1)
            dtype = "" if comparable else f"{t.dtype}|"
            digest.update(f"{name}|{dtype}{tuple(value.shape)}|".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes())


def weights_digest(forward_func: Callable[..., Any], layer: nn.Module) -> str | None:
    """SHA-256 of the weights of the model behind ``forward_func``, or None when none is found.

    The model is :func:`~captum_nmf._utils.activations.models_of`'s: ``forward_func``
    when it is a module, else the modules holding ``layer`` that it refers to.
    Concepts record it when fitted (``provenance_["weights_sha256"]``), so that
    binding them to another network is noticed (:func:`load_concepts`).
    Floating-point tensors are read as float32 (a float64 copy of the same
    weights is the same); extra state and packed (quantised) or sparse
    tensors are left out. None also when the weights cannot be read: a record
    that cannot be made never fails a fit.
    """
    if not models_found(forward_func, layer):
        return None
    digest = hashlib.sha256()  # the model inside DataParallel / torch.compile: its own names
    try:
        roots = [unwrapped(r) for r in models_of(forward_func, layer)]
        _digest_states(digest, [root.state_dict() for root in roots], comparable=True)
    except Exception:  # a record that cannot be made must never fail a fit
        return None
    return digest.hexdigest()


#: The last fingerprint of each concepts tensor, with what it covered: kept by the tensor,
#: so a copy of the attribution (a slide run's own view of it) shares it with the original.
_FINGERPRINTS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensors compared by identity


def _tensor_key(t: Tensor) -> tuple[Any, ...]:
    """What changes when a tensor is replaced, moved, cast or modified in place."""
    return (id(t), t.data_ptr(), str(t.device), t.dtype, tuple(t.shape), t._version)
