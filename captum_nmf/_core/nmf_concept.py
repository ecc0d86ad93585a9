"""``NMFConceptAttribution``: NMF concepts of a layer, behind Captum's layer interface."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sized
from pathlib import Path
from typing import Any, Literal

import torch
from captum.attr import LayerAttribution
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate
from tqdm.auto import tqdm

from captum_nmf._core import distributed as dist_fit
from captum_nmf._core.nmf import NMF, InitName
from captum_nmf._utils import activations as acts
from captum_nmf._utils.ray_engine import check_engine
from captum_nmf.exceptions import (
    ConceptModelFormatError,
    ConceptModelMismatchError,
    LayerError,
    LayerNameMismatchWarning,
    NotFittedError,
)
from captum_nmf.io import load_tensors, save_tensors

__all__ = ["NMFConceptAttribution"]

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


class NMFConceptAttribution(LayerAttribution):  # type: ignore[misc]
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
        forward_func (Callable): the model or any function of it.
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
        if isinstance(n_concepts, bool) or not isinstance(n_concepts, int):
            raise TypeError(
                f"n_concepts must be an int >= 1, got {n_concepts!r} "
                f"({type(n_concepts).__name__}); pass e.g. n_concepts=6."
            )
        if n_concepts < 1:
            raise ValueError(f"n_concepts must be >= 1, got {n_concepts}; pass e.g. n_concepts=6.")
        acts.validate_negative(negative)
        if not isinstance(layer, nn.Module):
            raise TypeError(f"layer must be a torch.nn.Module, got {type(layer).__name__}.")
        if isinstance(forward_func, nn.Module) and not any(
            m is layer for m in forward_func.modules()
        ):
            raise LayerError(
                f"layer {type(layer).__name__} is not a submodule of forward_func "
                f"{type(forward_func).__name__}; pass a module of the model, e.g. "
                "model.features[29]."
            )
        if reshape_transform is not None and not callable(reshape_transform):
            raise TypeError("reshape_transform must be callable or None.")
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
    ) -> Any:
        """Checked activations (and with ``return_output`` the output) of one forward."""
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
        )
        act, output = captured if return_output else (captured, None)
        act = acts.check_activations(act, negative=self.negative, name=self._layer_name)
        return (act, output) if return_output else act

    def _check_fitted(self) -> None:
        if not hasattr(self, "concepts_"):
            raise NotFittedError(
                "This NMFConceptAttribution instance is not fitted yet. Call 'fit' or "
                "'NMFConceptAttribution.load' before 'attribute'."
            )

    def _check_channels(self, c: int, k: int) -> None:
        label = repr(self._layer_name) if self._layer_name else "the hooked layer"
        if k > c:
            raise ValueError(
                f"n_concepts={k} exceeds the {c} channels of layer {label}; choose "
                f"n_concepts <= {c}."
            )

    @staticmethod
    def _split_batch(batch: Any) -> Tensor:
        if isinstance(batch, Tensor):
            return batch
        if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
            return batch[0]
        raise TypeError(
            "fit expects a Tensor or an iterable of Tensor / (Tensor, ...) batches, got a batch "
            f"of type {type(batch).__name__}."
        )

    # ---------------------------------------------------------------------- fit
    def fit(
        self,
        inputs: Tensor | Iterable[Any] | Dataset[Any],
        *,
        additional_forward_args: Any = None,
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
                        ``DataLoader`` of ``(image, label)`` works as is).
            additional_forward_args (Any, optional): extra arguments passed to
                        ``forward_func`` after the inputs, as in Captum.
                        Default: None
            attribute_to_layer_input (bool, optional): factorise the layer's
                        input instead of its output; ``attribute`` must then
                        use the same value.
                        Default: False
            max_locations_per_batch (int, optional): keep at most this many
                        randomly chosen locations per batch (seeded by
                        ``random_state``; worker w > 0 of a distributed fit
                        uses ``random_state + w * 1000003``). None keeps all.
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
                        one, ``inputs`` is not a map-style ``Dataset``, list or
                        tuple with ``engine="ray"``, or a bad option type.
            ImportError: ``engine="ray"`` without Ray installed.
            ConnectionError: nothing answers at ``address`` (before any work).
            NegativeActivationError: negative activations with ``negative="raise"``.
            NonFiniteActivationError: NaN or Inf activations.
            LayerError: the layer did not run or its output is not N x C x H x W.
        """
        if max_locations_per_batch is not None and (
            isinstance(max_locations_per_batch, bool)
            or not isinstance(max_locations_per_batch, int)
            or max_locations_per_batch < 1
        ):
            raise ValueError(
                f"max_locations_per_batch must be a positive int or None, got "
                f"{max_locations_per_batch!r}."
            )
        if isinstance(n_epochs, bool) or not isinstance(n_epochs, int) or n_epochs < 1:
            raise ValueError(f"n_epochs must be an int >= 1, got {n_epochs!r}.")
        use_dist = self._check_engine(engine, workers, address, distributed)
        device = _model_device(self.forward_func, self.layer)
        acts.check_device_options(
            autocast, channels_last, device_type=device.type if device is not None else "cpu"
        )
        for name in _FITTED_ATTRIBUTES:  # a fit that raises leaves the instance unfitted
            self.__dict__.pop(name, None)
        rows_of = _BatchRows(
            self,
            additional_forward_args=additional_forward_args,
            attribute_to_layer_input=attribute_to_layer_input,
            max_locations=max_locations_per_batch,
            autocast=autocast,
            channels_last=channels_last,
        )
        seed = 0 if self.random_state is None else int(self.random_state)
        solver = self._new_solver()
        if engine == "ray":
            self._fit_ray(
                solver, inputs, rows_of, batch_size, n_epochs, workers, address, seed, progress
            )
        elif use_dist:
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            if isinstance(inputs, Tensor):  # one batch per rank
                epochs: list[Iterable[Any]] = [[inputs]]
            else:
                epochs = self._epochs(inputs, batch_size, n_epochs, device, shard=(rank, world))
            gen = dist_fit.worker_generator(seed, rank)
            shard = _nonempty_rows(epochs, rows_of, gen, progress=progress and rank == 0)
            dist_fit.fit_torch_distributed(solver, shard, n_components=self.n_concepts)
        else:
            in_memory = isinstance(inputs, Tensor)
            # One batch, factorised exactly in memory: more epochs add nothing.
            epochs = [[inputs]] if in_memory else self._epochs(inputs, batch_size, n_epochs, device)
            gen = dist_fit.worker_generator(seed, 0)
            for rows in _nonempty_rows(epochs, rows_of, gen, progress=progress):
                if in_memory:
                    solver.fit(rows)
                else:
                    solver.partial_fit(rows)
        if not hasattr(solver, "_h"):
            raise ValueError(
                "Cannot fit NMFConceptAttribution on 0 samples (received an empty batch or "
                "iterator); pass at least one non-empty batch."
            )
        self.nmf_ = solver
        self.concepts_: Tensor = solver._h.clone()
        self.n_channels_in_ = int(solver.n_features_in_)
        self.layer_name_ = self._layer_name
        self.attribute_to_layer_input_ = bool(attribute_to_layer_input)
        self.n_samples_seen_ = int(solver.n_samples_seen_)
        self.reconstruction_err_ = float(solver.reconstruction_err_)
        return self

    @staticmethod
    def _check_engine(
        engine: str, workers: int | None, address: str | None, use: bool | None
    ) -> bool:
        """Validate the engine options; return whether to all-reduce over torch.distributed."""
        check_engine(engine, workers, address)
        if use is not None and not isinstance(use, bool):
            raise TypeError(f"distributed must be a bool or None, got {use!r}.")
        dist = torch.distributed
        group = dist.is_available() and dist.is_initialized()
        if engine == "ray":
            if use:
                raise ValueError(
                    "distributed=True all-reduces over torch.distributed and engine='ray' uses "
                    "Ray actors; choose one: engine='local' under torchrun, or engine='ray'."
                )
            return False
        if use and not group:
            raise ValueError(
                "distributed=True needs an initialised torch.distributed process group; launch "
                "with torchrun and call torch.distributed.init_process_group(), or pass "
                "distributed=None."
            )
        if use is None:
            return bool(group) and dist.get_world_size() > 1
        return use

    def _epochs(
        self,
        inputs: Iterable[Any] | Dataset[Any],
        batch_size: int,
        n_epochs: int,
        device: torch.device | None,
        *,
        shard: tuple[int, int] | None = None,
    ) -> list[Iterable[Any]]:
        """The batches of each epoch (a map-style Dataset goes through a DataLoader)."""
        if isinstance(inputs, Dataset) and not isinstance(inputs, IterableDataset):
            _check_batch_size(batch_size)
            n = len(inputs)  # type: ignore[arg-type]
            sampler = None if shard is None else range(shard[0], n, shard[1])
            inputs = DataLoader(
                inputs,
                batch_size=batch_size,
                sampler=sampler,
                collate_fn=getattr(inputs, "collate_fn", None),
                pin_memory=device is not None and device.type == "cuda",
            )
        if iter(inputs) is inputs and n_epochs > 1:
            raise ValueError(
                f"n_epochs={n_epochs} needs a re-iterable input (a DataLoader or list), "
                "got a one-shot iterator; pass n_epochs=1 or a DataLoader."
            )
        return [inputs] * n_epochs

    def _fit_ray(
        self,
        solver: NMF,
        inputs: Any,
        rows_of: _BatchRows,
        batch_size: int,
        n_epochs: int,
        workers: int | None,
        address: str | None,
        seed: int,
        progress: bool,
    ) -> None:
        load: Callable[[Any], Any] | None
        if isinstance(inputs, Dataset) and not isinstance(inputs, IterableDataset):
            _check_batch_size(batch_size)
            n = len(inputs)  # type: ignore[arg-type]
            items: list[Any] = [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
            load = _DatasetBatches(inputs, getattr(inputs, "collate_fn", None))
        elif isinstance(inputs, (list, tuple)):
            items, load = list(inputs), None
        else:
            raise TypeError(
                f"engine='ray' needs a map-style torch.utils.data.Dataset or a list/tuple of "
                f"batches as inputs, got {type(inputs).__name__}; pass the DataLoader's "
                "dataset (picklable), list(tensor.split(batch_size)) for one tensor, or "
                "engine='local'."
            )
        if not items:
            raise ValueError(
                "Cannot fit NMFConceptAttribution on 0 samples (received no batches); pass "
                "at least one non-empty batch."
            )
        dist_fit.fit_ray(
            solver,
            rows_of,
            items,
            load=load,
            n_epochs=n_epochs,
            workers=workers,
            address=address,
            seed=seed,
            progress=progress,
        )

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
        self._check_fitted()
        if bool(attribute_to_layer_input) != self.attribute_to_layer_input_:
            raise ValueError(
                f"attribute_to_layer_input={attribute_to_layer_input} but the concepts were fitted "
                f"with attribute_to_layer_input={self.attribute_to_layer_input_}; use the same "
                "value."
            )
        act = self._activations(
            inputs,
            additional_forward_args,
            attribute_to_layer_input,
            autocast=autocast,
            channels_last=channels_last,
        )
        n, c, h, w = act.shape
        if c != self.n_channels_in_:
            raise ConceptModelMismatchError(
                f"The concepts expect {self.n_channels_in_} channels from layer "
                f"{self.layer_name_!r} but layer {self._layer_name!r} produced {c}; fit or load "
                "concepts for this layer."
            )
        weights = self.nmf_.transform(acts.maps_to_rows(act))
        maps = acts.rows_to_maps(weights.to(act.dtype), (n, h, w))
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

        Whole-slide stitching averages these feature vectors over overlapping
        tiles before solving for concept weights (``self.nmf_.transform``).
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
        return self._activations(
            inputs,
            additional_forward_args,
            to_input,
            autocast=autocast,
            channels_last=channels_last,
            return_output=return_output,
        )

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

    # ---------------------------------------------------------------- persist
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save the concepts as a ``.safetensors`` file with JSON-able metadata.

        The file holds the K x C concepts and string metadata: format and
        library versions, K, C, layer name, negative-activation policy,
        whether the layer input was used, and the solver settings. It is
        written atomically. Nothing about the model itself is stored.

        Args:
            path (str or PathLike): destination ending in ``.safetensors``.

        Returns:
            *Path*: the path written.

        Raises:
            NotFittedError: before ``fit``.
            ValueError: ``path`` does not end in ``.safetensors``.
        """
        self._check_fitted()
        seed = self.random_state if isinstance(self.random_state, int) else None
        solver = {
            "init": self.init,
            "max_iter": self.max_iter,
            "tol": self.tol,
            "random_state": seed,
            "forget_factor": self.forget_factor,
        }
        metadata = {
            "n_concepts": str(self.concepts_.shape[0]),
            "n_channels": str(self.n_channels_in_),
            "layer_name": self.layer_name_ or "",
            "negative": self.negative,
            "attribute_to_layer_input": json.dumps(self.attribute_to_layer_input_),
            "solver": json.dumps(solver, sort_keys=True),
            "n_samples_seen": str(self.n_samples_seen_),
            "reconstruction_err": repr(self.reconstruction_err_),
            "torch_version": torch.__version__,
        }
        return save_tensors(path, {"concepts": self.concepts_}, metadata)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        forward_func: Callable[..., Any],
        layer: nn.Module,
        *,
        device_ids: list[int] | None = None,
        strict: bool = False,
        reshape_transform: Callable[[Tensor], Tensor] | None = None,
    ) -> NMFConceptAttribution:
        """Bind concepts saved by :meth:`save` to a model's layer.

        Nothing is unpickled: the file must be a captum_nmf ``.safetensors``
        file. The layer's channel count is checked now when the layer declares
        it (convolutions, batch norms) and otherwise at the first ``attribute``.

        Args:
            path (str or PathLike): the ``.safetensors`` file.
            forward_func (Callable): the model or any function of it.
            layer (torch.nn.Module): the layer to bind the concepts to.
            device_ids (list[int], optional): as in the constructor.
                        Default: None
            strict (bool, optional): raise instead of warn when the layer's
                        name differs from the one saved.
                        Default: False
            reshape_transform (Callable, optional): as in the constructor.
                        Default: None

        Returns:
            *NMFConceptAttribution*: a fitted instance.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ConceptModelFormatError: a pickle-based, corrupt, unknown or newer file.
            ConceptModelMismatchError: the layer has another channel count (or
                        another name with ``strict=True``).
        """
        tensors, meta = load_tensors(path, required=("concepts",))
        try:
            k, c = int(meta["n_concepts"]), int(meta["n_channels"])
            solver = json.loads(meta["solver"])
            negative = meta["negative"]
            to_input = bool(json.loads(meta["attribute_to_layer_input"]))
            saved_name = meta["layer_name"] or None
        except (KeyError, ValueError, TypeError) as exc:
            raise ConceptModelFormatError(f"{path} has incomplete metadata ({exc!r}).") from exc
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
                negative=negative,  # type: ignore[arg-type]
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
        declared = _declared_channels(layer, attribute_to_layer_input=to_input)
        name = attr._layer_name
        if declared is not None and declared != c:
            raise ConceptModelMismatchError(
                f"Concept model expects {c} channels from {saved_name!r} but layer {name!r} "
                f"has {declared}; load concepts fitted on this layer."
            )
        if saved_name and name and saved_name != name:
            msg = f"Concepts were fitted on layer {saved_name!r} and are bound to layer {name!r}."
            if strict:
                raise ConceptModelMismatchError(msg + " Pass strict=False to allow it.")
            warnings.warn(msg, LayerNameMismatchWarning, stacklevel=2)
        attr.nmf_ = nmf
        attr.concepts_ = concepts.clone()
        attr.n_channels_in_ = c
        attr.layer_name_ = saved_name
        attr.attribute_to_layer_input_ = to_input
        attr.n_samples_seen_ = int(meta.get("n_samples_seen", "0"))
        attr.reconstruction_err_ = float(meta.get("reconstruction_err", "nan"))
        return attr


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


def _declared_channels(layer: nn.Module, *, attribute_to_layer_input: bool) -> int | None:
    """Channel count a layer declares statically (convolutions, batch norms), else None."""
    if isinstance(layer, nn.modules.conv._ConvNd):
        return int(layer.in_channels if attribute_to_layer_input else layer.out_channels)
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        return int(layer.num_features)
    return None


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}.")


def _model_device(forward_func: Callable[..., Any], layer: nn.Module) -> torch.device | None:
    """Device of the model's first parameter or buffer (None when it has neither)."""
    for root in acts.models_of(forward_func, layer):
        for tensor in (*root.parameters(), *root.buffers()):
            return tensor.device
    return None


class _BatchRows:
    """The feature rows ``fit`` streams from one batch: forward, checks, subsampling.

    Picklable (Ray actors get a copy of it, and so of the model).
    """

    def __init__(
        self,
        attr: NMFConceptAttribution,
        *,
        additional_forward_args: Any,
        attribute_to_layer_input: bool,
        max_locations: int | None,
        autocast: torch.dtype | None,
        channels_last: bool,
    ) -> None:
        self.attr = attr
        self.additional_forward_args = additional_forward_args
        self.attribute_to_layer_input = attribute_to_layer_input
        self.max_locations = max_locations
        self.autocast = autocast
        self.channels_last = channels_last

    def __call__(self, batch: Any, generator: torch.Generator) -> Tensor | None:
        attr = self.attr
        x = attr._split_batch(batch)
        if x.shape[0] == 0:
            return None
        device = _model_device(attr.forward_func, attr.layer)
        if device is not None and x.device != device:
            x = x.to(device, non_blocking=x.is_pinned())
        act = attr._activations(
            x,
            self.additional_forward_args,
            self.attribute_to_layer_input,
            autocast=self.autocast,
            channels_last=self.channels_last,
        )
        attr._check_channels(act.shape[1], attr.n_concepts)
        rows = acts.maps_to_rows(act)
        if self.max_locations is not None and rows.shape[0] > self.max_locations:
            keep = torch.randperm(rows.shape[0], generator=generator)[: self.max_locations]
            rows = rows[keep.to(rows.device)]
        return rows

    def to(self, device: torch.device) -> None:
        """Move the model (when ``forward_func`` is a module or one's method) to ``device``."""
        owner = acts.module_of(self.attr.forward_func)
        if owner is not None:
            owner.to(device)


class _DatasetBatches:
    """``(start, stop)`` -> the collated batch of those items of a map-style dataset."""

    def __init__(
        self, dataset: Dataset[Any], collate_fn: Callable[[list[Any]], Any] | None
    ) -> None:
        self.dataset = dataset
        self.collate_fn = collate_fn if collate_fn is not None else default_collate

    def __call__(self, item: tuple[int, int]) -> Any:
        start, stop = item
        return self.collate_fn([self.dataset[i] for i in range(start, stop)])


def _nonempty_rows(
    epochs: list[Iterable[Any]], rows_of: _BatchRows, generator: torch.Generator, *, progress: bool
) -> Iterator[Tensor]:
    """Rows of every non-empty batch of every epoch, with a progress bar per epoch."""
    for epoch, batches in enumerate(epochs):
        total = len(batches) if isinstance(batches, Sized) else None
        bar = tqdm(
            batches,
            total=total,
            disable=not progress,
            desc=f"fit concepts (epoch {epoch + 1}/{len(epochs)})",
            unit="batch",
        )
        for batch in bar:
            rows = rows_of(batch, generator)
            if rows is not None:
                yield rows
