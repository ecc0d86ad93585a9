"""``NMFConceptAttribution``: NMF concepts of a layer, behind Captum's layer interface."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal, cast

import numpy as np
import torch
from captum.attr import LayerAttribution
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from captum_nmf._core import persistence
from captum_nmf._core.concept_set import ConceptSetMixin
from captum_nmf._core.nmf import NMF
from captum_nmf._core.nmf_input import InitName, check_random_state_param
from captum_nmf._core.persistence import check_concept_values
from captum_nmf._core.rows import BatchRows
from captum_nmf._utils import activations as acts
from captum_nmf._utils.validation import check_int
from captum_nmf.engines import FitOptions, select_engine
from captum_nmf.engines.batches import check_batch_inputs, is_map_dataset
from captum_nmf.exceptions import (
    CaptumNMFWarning,
    ConceptModelMismatchError,
    LayerError,
    NotFittedError,
)

__all__ = ["NMFConceptAttribution", "check_concept_values"]

Inputs = Tensor | tuple[Tensor, ...]
Engine = Literal["local", "ray"]
_FITTED_ATTRIBUTES = (
    "nmf_",
    "concepts_",
    "n_channels_in_",
    "layer_name_",
    "attribute_to_layer_input_",
    "n_samples_seen_",
    "reconstruction_err_",
)


class NMFConceptAttribution(ConceptSetMixin, LayerAttribution):  # type: ignore[misc]
    r"""Concept maps of a layer from a non-negative matrix factorisation of its activations.

    Every spatial location of a layer's post-ReLU output is a C-dimensional
    feature vector. ``fit`` factorises the feature vectors of many inputs as
    ``V ~ W H`` with ``W, H >= 0``; the K rows of ``H`` are the *concepts*
    (unit-norm vectors of the layer's channel space). ``attribute`` keeps ``H``
    fixed and solves ``W >= 0`` for new inputs exactly, giving, for every
    location, how strongly each concept is present. The argmax over concepts
    (:meth:`assign`) clusters the locations. Method: "Explaining digital
    pathology models via clustering activations"; NMF concepts follow Collins
    et al., "Deep Feature Factorization for Concept Discovery" (ECCV 2018),
    https://arxiv.org/abs/1806.10206, but with concepts learned once over a
    training set (streamed) instead of refitted per image.

    Like :class:`captum.attr.LayerGradCam` it returns maps at the layer's
    resolution: the output has shape N x K x h x w (a second dimension of K
    concepts instead of GradCAM's 1), is non-negative, and can be upsampled
    with :meth:`LayerAttribution.interpolate`. Unlike GradCAM it needs no
    target: concepts describe what the layer represents, not one class score.

    The model runs in eval mode during every call and each module's
    ``training`` flag is restored afterwards, even on error; hooks are
    registered per call (by :class:`captum.attr.LayerActivation`) and removed
    in ``finally``; inputs are never modified.

    Args:
        forward_func (Callable): the model or any function of it. For a
                    function (``lambda x: model(x).softmax(1)``, a
                    ``functools.partial``, a method of a plain object) the
                    model is the module it refers to that holds ``layer`` (a
                    closure variable, a global it names, an argument of the
                    partial, an attribute of the object): that model is put in
                    eval mode, gives the device and its weights are
                    fingerprinted. When none is found, a
                    :class:`~captum_nmf.exceptions.CaptumNMFWarning` says so.
        layer (torch.nn.Module): layer whose output (or input) is factorised.
                    It must produce one N x C x H x W tensor of non-negative
                    values (hook the ReLU, not the convolution before it), or
                    see ``negative`` and ``reshape_transform``.
        n_concepts (int, optional): number of concepts K (the paper: 4, 6, 8).
                    Default: 6
        device_ids (list[int], optional): device ids, only needed when
                    ``forward_func`` applies a DataParallel model (as in Captum).
                    Default: None
        random_state (int, optional): seed of the NMF initialisation and of
                    the per-batch location subsampling in ``fit``.
                    Default: None
        negative (str, optional): what to do with negative activations:
                    ``"raise"`` refuses them; ``"relu"`` clips them to 0 in
                    ``fit`` and ``attribute`` alike. Saved with the concepts.
                    Default: ``"raise"``
        init (str, optional): NMF initialisation (see :class:`captum_nmf.NMF`).
                    Default: ``"nndsvda"``
        max_iter (int, optional): HALS iterations of the in-memory fit.
                    Default: 200
        tol (float, optional): relative objective decrease that stops HALS.
                    Default: 1e-4
        forget_factor (float, optional): weight of earlier batches' statistics
                    when streaming (1 = exact sums).
                    Default: 1.0
        reshape_transform (Callable, optional): maps the layer's raw output to
                    an N x C x H x W tensor (e.g. ViT tokens to a grid).
                    Default: None

    Attributes:
        concepts_ (Tensor): K x C concept vectors, unit norm, sorted by
                    decreasing mean weight over the fitted locations.
        n_channels_in_ (int): C, the layer's channel count.
        layer_name_ (str or None): dotted name of ``layer`` in the model, when known.
        nmf_ (NMF): the fitted solver.

    Raises:
        TypeError: ``n_concepts`` is not an int.
        ValueError: ``n_concepts < 1``, an unknown ``negative`` policy, or
                    ``layer`` is not a submodule of ``forward_func``.

    Examples::

        >>> import torch
        >>> from torch import nn
        >>> from captum_nmf import NMFConceptAttribution
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        ...                     nn.Flatten(), nn.Linear(8, 2))
        >>> concepts = NMFConceptAttribution(net, net[1], n_concepts=3, random_state=0)
        >>> _ = concepts.fit(torch.rand(4, 3, 16, 16), progress=False)
        >>> maps = concepts.attribute(torch.rand(2, 3, 16, 16))
        >>> tuple(maps.shape)  # N x K x h x w
        (2, 3, 14, 14)
        >>> tuple(NMFConceptAttribution.interpolate(maps, (16, 16)).shape)
        (2, 3, 16, 16)
    """

    def __init__(
        self,
        forward_func: Callable[..., Any],
        layer: nn.Module,
        n_concepts: int = 6,
        device_ids: list[int] | None = None,
        *,
        random_state: int | None = None,
        negative: acts.NegativePolicy = "raise",
        init: InitName = "nndsvda",
        max_iter: int = 200,
        tol: float = 1e-4,
        forget_factor: float = 1.0,
        reshape_transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        check_int("n_concepts", n_concepts, hint="pass e.g. n_concepts=6.")
        acts.validate_negative(negative)
        if not isinstance(layer, nn.Module):
            hint = f", e.g. model.get_submodule({layer!r})" if isinstance(layer, str) else ""
            raise TypeError(
                f"layer must be a torch.nn.Module, got {type(layer).__name__} {layer!r:.80}; "
                f"pass the module itself{hint}."
            )
        if isinstance(forward_func, nn.Module) and not any(
            m is layer for m in forward_func.modules()
        ):
            raise LayerError(
                f"layer {type(layer).__name__} is not a submodule of forward_func "
                f"{type(forward_func).__name__}; pass a module of the model, e.g. "
                "model.features[29]."
            )
        if reshape_transform is not None and not callable(reshape_transform):
            raise TypeError(
                f"reshape_transform must be callable or None, got "
                f"{type(reshape_transform).__name__} {reshape_transform!r:.80}; pass a function "
                "of the layer's output, e.g. lambda t: t.permute(0, 3, 1, 2)."
            )
        if not acts.models_found(forward_func, layer):
            warnings.warn(
                f"forward_func {getattr(forward_func, '__name__', type(forward_func).__name__)!r} "
                f"is a function in which captum-nmf finds no model holding layer "
                f"{type(layer).__name__}: eval mode, the device and the weights fingerprint that "
                "guards slide runs' resume cover the layer alone. Pass the model (or a method of "
                "it) as forward_func, or a function that names the model (a closure or global "
                "variable, a functools.partial argument).",
                CaptumNMFWarning,
                stacklevel=2,
            )
        LayerAttribution.__init__(self, forward_func, layer, device_ids)
        self.n_concepts = n_concepts
        self.random_state = random_state
        self.negative = negative
        self.init = init
        self.max_iter = max_iter
        self.tol = tol
        self.forget_factor = forget_factor
        self.reshape_transform = reshape_transform
        self._layer_name = acts.layer_name(forward_func, layer)

    @property
    def multiplies_by_inputs(self) -> bool:
        """Concept weights are not multiplied by the inputs."""
        return False

    # ------------------------------------------------------------------ helpers
    def _new_solver(self) -> NMF:
        return NMF(
            self.n_concepts,
            init=self.init,
            max_iter=self.max_iter,
            tol=self.tol,
            random_state=self.random_state,
            forget_factor=self.forget_factor,
        )

    def _activations(
        self,
        inputs: Inputs,
        additional_forward_args: Any,
        attribute_to_layer_input: bool,
        *,
        autocast: torch.dtype | None = None,
        channels_last: bool = False,
        return_output: bool = False,
        transient: bool = False,
        deferred: bool = False,
    ) -> Any:
        """Checked activations (and with ``return_output`` the output) of one forward.

        ``transient``: the caller is done with them before the model's next
        forward, so the layer's own tensor may be used (see :func:`acts.capture`).
        ``deferred``: return ``(act, output, pending)`` where ``pending`` (an
        :class:`acts.PendingCheck`, or None when the values were checked now)
        must be finished before any result computed from ``act`` is used.
        """
        captured = acts.capture(
            self.forward_func,
            self.layer,
            inputs,
            additional_forward_args=additional_forward_args,
            attribute_to_layer_input=attribute_to_layer_input,
            device_ids=self.device_ids,
            reshape_transform=self.reshape_transform,
            name=self._layer_name,
            autocast=autocast,
            channels_last=channels_last,
            return_output=return_output,
            transient=transient,
        )
        act, output = captured if return_output else (captured, None)
        act, pending = acts.start_check(act, negative=self.negative, name=self._layer_name)
        if deferred:
            return act, output, pending
        if pending is not None:
            pending.finish()
        return (act, output) if return_output else act

    def check_fitted(self, before: str = "attribute") -> None:
        """Raise unless the concepts are fitted or loaded.

        Args:
            before (str, optional): the call that needs them, for the message.
                        Default: ``"attribute"``

        Raises:
            NotFittedError: before ``fit`` or ``load`` (a ``ValueError`` and an
                        ``AttributeError``, as scikit-learn's).
        """
        if not hasattr(self, "concepts_"):
            raise NotFittedError(
                "This NMFConceptAttribution instance is not fitted yet. Call 'fit' or "
                f"'NMFConceptAttribution.load' before '{before}'."
            )

    def check_channels(self, n_channels: int) -> None:
        """Raise unless the layer's channel count equals the concepts'.

        Args:
            n_channels (int): the channels (C) the layer produced.

        Raises:
            NotFittedError: before ``fit`` or ``load``.
            ConceptModelMismatchError: ``n_channels`` differs from ``n_channels_in_``.
        """
        self.check_fitted()
        if n_channels != self.n_channels_in_:
            raise ConceptModelMismatchError(
                f"The concepts expect {self.n_channels_in_} channels from layer "
                f"{self.layer_name_!r} but layer {self._layer_name!r} produced {n_channels}; "
                "fit or load concepts for this layer."
            )

    def model_fingerprint(self, *, cached: bool = True) -> str:
        """SHA-256 of the model's weights, the layer and the concepts; cached until one changes.

        Whole-slide runs record it to refuse resuming with another model. The
        digest is recomputed only when a state-dict tensor is replaced, moved
        or modified in place, or the concepts or the layer change. Edits that
        torch does not count (through ``.data`` or a NumPy view) are not seen
        by the cache: a slide run that computes chunks passes ``cached=False``.

        Args:
            cached (bool, optional): reuse the cached digest while nothing it
                        covers was replaced or changed in place.
                        Default: True

        Returns:
            *str*: hex digest.

        Raises:
            NotFittedError: before ``fit`` or ``load``.
        """
        return persistence.model_fingerprint(self, cached=cached)

    def _check_rank(self, c: int) -> None:
        """``fit`` needs K <= C."""
        if self.n_concepts > c:
            label = repr(self._layer_name) if self._layer_name else "the hooked layer"
            raise ValueError(
                f"n_concepts={self.n_concepts} exceeds the {c} channels of layer {label}; "
                f"choose n_concepts <= {c}."
            )

    # ---------------------------------------------------------------------- fit
    def fit(
        self,
        inputs: Tensor | Iterable[Any] | Dataset[Any],
        *,
        additional_forward_args: Any = None,
        batch_inputs: Callable[[Any], Any] | None = None,
        attribute_to_layer_input: bool = False,
        max_locations_per_batch: int | None = None,
        n_epochs: int = 1,
        batch_size: int = 32,
        progress: bool = True,
        engine: Engine = "local",
        workers: int | None = None,
        address: str | None = None,
        distributed: bool | None = None,
        autocast: torch.dtype | None = None,
        channels_last: bool = False,
    ) -> NMFConceptAttribution:
        r"""Learn the K concept vectors from the layer's activations on ``inputs``.

        A tensor is one batch, factorised in memory. Any other iterable (a
        ``DataLoader``, a list, a generator) is streamed: each batch's
        activations go into :meth:`NMF.partial_fit` and are released, so only
        the K x C statistics are kept, whatever the number of batches. A
        map-style ``torch.utils.data.Dataset`` (e.g.
        :class:`captum_nmf.wsi.SlideTiles`) is streamed through a
        ``DataLoader`` with ``batch_size`` and the dataset's ``collate_fn``
        attribute when it has one (with pinned memory when the model is on a
        GPU). Batches are moved to the model's device.

        **Distributed fitting.** Workers compute the sufficient statistics of
        their batches for the current concepts, the statistics are summed and
        one update is applied per step (synchronous data parallelism): with
        W workers this is the stream whose chunks are the unions of W batches,
        and it ends within about 1 % of the single-process objective.

        * Under ``torchrun`` (a ``torch.distributed`` process group with more
          than one rank is initialised) this happens automatically
          (``distributed=None``): every rank calls ``fit`` with its own shard
          (e.g. a ``DataLoader`` with a ``DistributedSampler``; a map-style
          ``Dataset`` is split between ranks by striding, a tensor is one batch
          per rank), the statistics are all-reduced each step, and every rank
          ends with the same concepts. Pass ``distributed=False`` to fit each
          rank on its own data only.
        * ``engine="ray"`` deals the batches of ``inputs`` (a picklable
          map-style ``Dataset``, or a list or tuple of batches) round-robin to
          ``workers`` Ray actors, each holding a copy of the model (on a GPU
          when the cluster has them).

        Args:
            inputs (Tensor or Iterable): an N x ... batch, or an iterable of
                        batches that are tensors or ``(tensor, ...)`` tuples
                        (only the first element is fed to the model, so a
                        ``DataLoader`` of ``(image, label)`` works as is;
                        see ``batch_inputs`` for other batches). Unlike
                        ``attribute``'s ``inputs`` (Captum's convention), a
                        tuple of tensors is a sequence of batches here: one
                        batch of a model with two inputs is ``[(x, ref)]``
                        with ``batch_inputs=lambda b: (b[0], b[1])``.
            additional_forward_args (Any, optional): extra arguments passed to
                        ``forward_func`` after the inputs, as in Captum.
                        Default: None
            batch_inputs (Callable, optional): turns one batch into the
                        model's inputs, a tensor or a tuple of tensors with
                        the tiles along dimension 0, as ``attribute``'s
                        ``inputs``: e.g. ``lambda b: (b[0], b[1])`` for a
                        model with two per-sample inputs, or
                        ``lambda b: b["image"]`` for dict batches. With Ray,
                        it is sent to the actors (cloudpickle).
                        Default: None (the batch, or its first element)
            attribute_to_layer_input (bool, optional): factorise the layer's
                        input instead of its output; ``attribute`` must then
                        use the same value.
                        Default: False
            max_locations_per_batch (int, optional): keep at most this many
                        randomly chosen locations per batch of ``batch_size``
                        tiles (a ``DataLoader``'s own batch size; else the
                        largest batch seen), and proportionally fewer from a
                        smaller batch, so that every tile weighs the same
                        (seeded by ``random_state``; worker w > 0 of a
                        distributed fit uses ``random_state + w * 1000003``).
                        At least ``n_concepts``. None keeps all.
                        Default: None
            n_epochs (int, optional): passes over a re-iterable ``inputs``.
                        Default: 1
            batch_size (int, optional): batch size used when ``inputs`` is a
                        map-style ``Dataset``; ignored otherwise.
                        Default: 32
            progress (bool, optional): show a tqdm progress bar (on rank 0
                        under ``torch.distributed``).
                        Default: True
            engine (str, optional): ``"local"`` (this process, or the ranks of
                        ``torch.distributed``) or ``"ray"`` (Ray actors).
                        Default: ``"local"``
            workers (int, optional): number of Ray actors with
                        ``engine="ray"``; None uses one per GPU of the cluster,
                        or one per CPU without GPUs.
                        Default: None
            address (str, optional): Ray cluster to join with
                        ``engine="ray"`` (``"HOST:PORT"``, ``"ray://..."`` or
                        ``"auto"``); None runs Ray embedded on this machine.
                        Default: None
            distributed (bool, optional): all-reduce the statistics over the
                        ``torch.distributed`` process group; None does it when
                        one with more than one rank is initialised.
                        Default: None
            autocast (torch.dtype, optional): run the forward under
                        ``torch.autocast`` with this dtype (e.g.
                        ``torch.bfloat16``); activations are factorised in float32.
                        Default: None
            channels_last (bool, optional): give the model channels-last copies
                        of 4-D batches (convert the model yourself with
                        ``model.to(memory_format=torch.channels_last)`` for the
                        full effect; it is never changed here).
                        Default: False

        Returns:
            *NMFConceptAttribution*: ``self``, fitted.

        Raises:
            ValueError: no locations to fit (empty tensor or iterable), K
                        larger than the layer's channels, bad
                        ``max_locations_per_batch``/``n_epochs``/``engine``/
                        ``workers``/``autocast``, several epochs over a one-shot
                        iterator, or ``distributed=True`` without a process group.
            TypeError: a batch is neither a tensor nor a tuple starting with
                        one (without ``batch_inputs``), ``batch_inputs`` is not
                        callable or returns something other than tensors,
                        ``inputs`` is not a map-style ``Dataset``, list or
                        tuple with ``engine="ray"``, or a bad option type.
            ImportError: ``engine="ray"`` without Ray installed.
            ConnectionError: nothing answers at ``address`` (before any work).
            NegativeActivationError: negative activations with ``negative="raise"``.
            NonFiniteActivationError: NaN or Inf activations.
            LayerError: the layer did not run or its output is not N x C x H x W.
            ValueError: ``max_locations_per_batch`` below ``n_concepts``, or
                        inputs from ``batch_inputs`` of different lengths.
        """
        batch_inputs = check_batch_inputs(batch_inputs)
        max_locations = check_int("max_locations_per_batch", max_locations_per_batch, optional=True)
        k = check_int("n_concepts", self.n_concepts, hint="pass e.g. n_concepts=6.")
        if max_locations is not None and max_locations < k:
            raise ValueError(
                f"max_locations_per_batch={max_locations} is below n_concepts={k}: a batch "
                f"could not start the fit. Pass max_locations_per_batch >= {k} (e.g. 4096), "
                "or None to keep every location."
            )
        check_int("n_epochs", n_epochs, hint="pass e.g. n_epochs=1.")
        _warn_padded_shards(inputs)
        if batch_inputs is None and _tensor_tuple(inputs) and _takes_several(self.forward_func):
            warnings.warn(
                f"fit reads a tuple of {len(cast(tuple[Tensor, ...], inputs))} tensors as that "
                "many batches, each given to the model alone, not as one batch of several "
                "inputs as attribute((x, ref)) would (Captum's convention); for that, pass "
                "[(x, ref)] with batch_inputs=lambda b: (b[0], b[1]). A list of batches "
                "says batches without this warning.",
                CaptumNMFWarning,
                stacklevel=2,
            )
        runner = select_engine(engine, workers=workers, address=address, distributed=distributed)
        device = acts.model_device(self.forward_func, self.layer)
        acts.check_device_options(
            autocast, channels_last, device_type=device.type if device is not None else "cpu"
        )
        # the previous concepts stay in place until the new ones are ready: other threads
        # explaining with them meanwhile are not stopped; a fit that raises leaves the
        # instance unfitted
        try:
            rows = BatchRows(
                self,
                additional_forward_args=additional_forward_args,
                attribute_to_layer_input=attribute_to_layer_input,
                max_locations=max_locations,
                autocast=autocast,
                channels_last=channels_last,
                batch_size=_full_batch(inputs, batch_size),
                batch_inputs=batch_inputs,
            )
            options = FitOptions(
                batch_size=batch_size,
                n_epochs=n_epochs,
                seed=_seed(self.random_state),
                progress=progress,
                pin_memory=device is not None and device.type == "cuda",
            )
            try:
                solver = runner.fit(self._new_solver(), rows, inputs, options)
            except TypeError as exc:
                if batch_inputs is not None or not _tensor_tuple(inputs):
                    raise
                n = len(cast(tuple[Tensor, ...], inputs))
                raise TypeError(  # Captum's attribute reads a tuple as one multi-input batch
                    f"{exc} (fit reads a tuple of {n} tensors as {n} "
                    "batches, each a tensor given to the model alone; for one batch of a "
                    "model with several inputs, as attribute((x, ref)) reads it, pass "
                    "[(x, ref)] with batch_inputs=lambda b: (b[0], b[1]))"
                ) from exc
            try:
                concepts = solver.components
            except NotFittedError as exc:
                if getattr(solver, "n_samples_seen_", 0):  # rows came, too few of them non-zero
                    raise ValueError(
                        f"Cannot fit NMFConceptAttribution: {exc} The layer's activations were 0 "
                        "at almost every location (blank tiles?); pass tiles with content."
                    ) from None
                raise ValueError(
                    "Cannot fit NMFConceptAttribution on 0 samples (received an empty batch or "
                    "iterator); pass at least one non-empty batch."
                ) from None
        except BaseException:
            for name in _FITTED_ATTRIBUTES:
                self.__dict__.pop(name, None)
            raise
        self.nmf_ = solver
        self.concepts_: Tensor = concepts
        self.n_channels_in_ = int(solver.n_features_in_)
        self.layer_name_ = self._layer_name
        self.attribute_to_layer_input_ = bool(attribute_to_layer_input)
        self.n_samples_seen_ = int(solver.n_samples_seen_)
        self.reconstruction_err_ = float(solver.reconstruction_err_)
        self._concept_names: list[str] | None = None  # new concepts: default names again
        self.stability_ = None  # and no stability record yet
        # what they were fitted from: the model's weights (checked when loaded onto a model)
        digest = persistence.weights_digest(self.forward_func, self.layer)
        self.provenance_: dict[str, Any] = {} if digest is None else {"weights_sha256": digest}
        return self

    # --------------------------------------------------------------- attribute
    def attribute(
        self,
        inputs: Inputs,
        additional_forward_args: Any = None,
        attribute_to_layer_input: bool = False,
        *,
        autocast: torch.dtype | None = None,
        channels_last: bool = False,
    ) -> Tensor:
        r"""Concept intensities at every location of the layer.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): inputs of ``forward_func``;
                        dimension 0 is the batch (N).
            additional_forward_args (Any, optional): extra arguments passed to
                        ``forward_func`` after the inputs.
                        Default: None
            attribute_to_layer_input (bool, optional): must equal the value
                        used in ``fit``.
                        Default: False
            autocast (torch.dtype, optional): run the forward under
                        ``torch.autocast`` with this dtype (e.g.
                        ``torch.bfloat16``, on the inputs' device type); the
                        activations are solved in float32. Meant for GPUs and
                        worth checking against float32: on EfficientNet-Lite0's
                        last layer (8 H&E tiles, CPU) bfloat16 activations
                        differed from float32 by 9 % (relative Frobenius norm;
                        0.5 % on a two-convolution net), and the forward was
                        7x slower on a CPU without bfloat16 instructions.
                        Default: None
            channels_last (bool, optional): give the model channels-last copies
                        of 4-D inputs. The model is never converted; do it
                        yourself (``model.to(memory_format=torch.channels_last)``)
                        for the full speed-up.
                        Default: False

        Returns:
            *Tensor* of **attributions**:
            - **attributions** (*Tensor*): N x K x h x w non-negative concept
                        weights (h x w = the layer's spatial size), in the
                        activations' floating dtype, on the inputs' device.
                        ``attributions[n, k, i, j]`` is how much concept ``k``
                        is present at location ``(i, j)`` of input ``n``.

        Raises:
            NotFittedError: before ``fit`` or ``load``.
            ValueError: ``attribute_to_layer_input`` differs from ``fit``, or
                        ``autocast`` is not supported on the inputs' device.
            TypeError: ``autocast`` is not a dtype or ``channels_last`` not a bool.
            ConceptModelMismatchError: the layer's channel count differs from
                        the concepts'.
            NegativeActivationError: negative activations with ``negative="raise"``.
            NonFiniteActivationError: NaN or Inf activations.
            LayerError: the layer did not run or its output is not N x C x H x W.
        """
        self.check_fitted()
        if bool(attribute_to_layer_input) != self.attribute_to_layer_input_:
            raise ValueError(
                f"attribute_to_layer_input={attribute_to_layer_input} but the concepts were fitted "
                f"with attribute_to_layer_input={self.attribute_to_layer_input_}; use the same "
                "value."
            )
        # the layer's own tensor is solved before another thread's forward of this model can
        # reuse it (a model may write into a buffer it keeps): the model's lock spans both
        with acts.model_lock(self.forward_func, self.layer):
            act, _, pending = self._activations(
                inputs,
                additional_forward_args,
                attribute_to_layer_input,
                autocast=autocast,
                channels_last=channels_last,
                transient=True,
                deferred=True,
            )
            # the solve is queued before the value check is read back (on a GPU its kernels
            # are not launched while the device waits), and the check is read before the
            # maps are looked at or returned; solved from the maps' own layout, no row copy
            with acts.reported_first(pending):
                self.check_channels(int(act.shape[1]))
                maps = self.nmf_._transform_maps(act, pending)
        device = (inputs[0] if isinstance(inputs, tuple) else inputs).device
        return maps.to(device)

    def features(
        self,
        inputs: Inputs,
        additional_forward_args: Any = None,
        *,
        return_output: bool = False,
        autocast: torch.dtype | None = None,
        channels_last: bool = False,
    ) -> Tensor | tuple[Tensor, Any]:
        r"""The checked layer activations that :meth:`attribute` factorises.

        Whole-slide stitching averages the same feature vectors over
        overlapping tiles before solving for concept weights (a slide run
        captures them itself, holding the model's lock until they are stitched,
        so it does not go through this method).
        The negative-activation policy is applied; the model runs in eval mode
        and once, even with ``return_output=True``.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): as :meth:`attribute`.
            additional_forward_args (Any, optional): as :meth:`attribute`.
                        Default: None
            return_output (bool, optional): also return ``forward_func``'s
                        output for the same forward pass.
                        Default: False
            autocast (torch.dtype, optional): as :meth:`attribute`; the
                        activations and the output come back in float32.
                        Default: None
            channels_last (bool, optional): as :meth:`attribute`.
                        Default: False

        Returns:
            *Tensor* or *tuple*: the N x C x h x w activations (on the model's
            device), and with ``return_output=True`` also the model's output.

        Raises:
            NegativeActivationError: negative activations with ``negative="raise"``.
            NonFiniteActivationError: NaN or Inf activations.
            LayerError: the layer did not run or its output is not N x C x H x W.
            TypeError, ValueError: bad ``autocast`` or ``channels_last``, as
                        :meth:`attribute`.
        """
        to_input = bool(getattr(self, "attribute_to_layer_input_", False))
        found: Tensor | tuple[Tensor, Any] = self._activations(
            inputs,
            additional_forward_args,
            to_input,
            autocast=autocast,
            channels_last=channels_last,
            return_output=return_output,
        )
        return found

    def assign(
        self,
        inputs: Inputs,
        additional_forward_args: Any = None,
        attribute_to_layer_input: bool = False,
    ) -> Tensor:
        r"""The concept (cluster) of every location: the argmax of :meth:`attribute`.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): as :meth:`attribute`.
            additional_forward_args (Any, optional): as :meth:`attribute`.
                        Default: None
            attribute_to_layer_input (bool, optional): as :meth:`attribute`.
                        Default: False

        Returns:
            *Tensor*: N x h x w ``int64`` concept indices in ``[0, K)``, and -1
            where every concept weight is 0 (e.g. an all-zero feature vector).

        Raises:
            NotFittedError: before ``fit`` or ``load``; other errors as :meth:`attribute`.
        """
        return self.labels(
            self.attribute(inputs, additional_forward_args, attribute_to_layer_input)
        )

    @staticmethod
    def labels(maps: Tensor) -> Tensor:
        """Concept (cluster) of every location of N x K x h x w maps, as :meth:`assign`.

        Returns:
            *Tensor*: N x h x w ``int64`` argmax over K, -1 where every weight is 0.
        """
        winner = torch.argmax(maps, dim=1)
        return torch.where(maps.amax(dim=1) > 0, winner, torch.full_like(winner, -1))


def _full_batch(inputs: Any, batch_size: int) -> int | None:
    """Tiles of a full batch of ``inputs`` when known: a loader's, a tensor's, or ``batch_size``."""
    if isinstance(inputs, DataLoader):
        return inputs.batch_size
    if isinstance(inputs, Tensor):  # one batch, in memory: all of it is the full batch
        return int(inputs.shape[0]) if inputs.ndim else None
    if is_map_dataset(inputs):
        return int(batch_size) if isinstance(batch_size, int) else None
    return None


def _tensor_tuple(inputs: Any) -> bool:
    """Whether ``inputs`` is a tuple of two or more tensors (Captum: one multi-input batch)."""
    return (
        isinstance(inputs, tuple) and len(inputs) > 1 and all(isinstance(x, Tensor) for x in inputs)
    )


def _takes_several(forward_func: Any) -> bool:
    """Whether ``forward_func`` takes more than one positional input (``forward(x, ref=None)``)."""
    while isinstance(forward_func, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        forward_func = forward_func.module  # their forward takes *inputs: the model's does not
    target = forward_func.forward if isinstance(forward_func, nn.Module) else forward_func
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # a builtin or C function: nothing to tell
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    kinds = [p.kind for p in params]
    return sum(k in positional for k in kinds) > 1 or inspect.Parameter.VAR_POSITIONAL in kinds


def _seed(random_state: Any) -> int:
    """The integer seed of the fit's subsampling: the seed itself, or one drawn from a RandomState.

    Raises:
        TypeError, ValueError: a ``random_state`` the solver refuses too
                    (:func:`~captum_nmf._core.nmf_input.check_random_state_param`).
    """
    check_random_state_param(random_state)
    if random_state is None:
        return 0
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(2**31 - 1))
    return int(random_state)


def _warn_padded_shards(inputs: Any) -> None:
    """Warn when a DataLoader's DistributedSampler repeats tiles to even out its shards."""
    sampler = getattr(inputs, "sampler", None) if isinstance(inputs, DataLoader) else None
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return
    extra = sampler.total_size - len(sampler.dataset)  # type: ignore[arg-type]
    if extra > 0:
        warnings.warn(
            f"the DataLoader's DistributedSampler pads its {sampler.num_replicas} shards by "
            f"repeating {extra} tile(s) (drop_last=False): they count twice in the concepts. "
            "Pass DistributedSampler(..., drop_last=True), or the Dataset itself (split "
            "between ranks without repeats).",
            CaptumNMFWarning,
            stacklevel=3,
        )
