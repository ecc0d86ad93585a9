"""Input adapters of a fit: a tensor, an iterable of batches or a map-style Dataset, as batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any, cast

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate
from tqdm.auto import tqdm

from captum_nmf._utils.validation import check_int
from captum_nmf.engines.base import FitOptions, RowSource

__all__ = [
    "BatchInputs",
    "DatasetBatches",
    "batch_dataset",
    "check_batch_inputs",
    "epochs",
    "first_tensor",
    "is_map_dataset",
    "item_batches",
    "item_ids",
    "model_inputs",
    "one_pass",
    "rows_of",
    "on_device",
    "tile_dataset",
]

_EMPTY = (
    "Cannot fit NMFConceptAttribution on 0 samples (received no batches); pass at least one "
    "non-empty batch."
)


BatchInputs = Callable[[Any], Any]
"""Turns one batch into the model's inputs: a Tensor or a tuple of Tensors."""


def first_tensor(batch: Any) -> Tensor:
    """The model input of a batch: the batch itself, or the first element of a tuple or list.

    The rest of a tuple (labels, ids) is not given to the model; a model with
    several per-sample inputs, or a batch of another shape (a dict), is read
    through a ``batch_inputs`` function (:func:`model_inputs`).

    Raises:
        TypeError: the batch is neither a tensor nor a sequence starting with one.
    """
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    keys = sorted(map(str, batch))[:5] if isinstance(batch, dict) else None
    hint = (
        f"pass batch_inputs=lambda b: b[{keys[0]!r}] to feed the model that entry"
        if keys
        else "pass a DataLoader whose collate_fn returns (images, ...)"
    )
    listed = f" with keys {keys}" if keys is not None else ""
    raise TypeError(
        "fit expects a Tensor or an iterable of Tensor / (Tensor, ...) batches whose first "
        f"element is the model's input, got a batch of type {type(batch).__name__}{listed}; "
        f"{hint}. For a model with several per-sample inputs, pass e.g. "
        "batch_inputs=lambda b: (b[0], b[1])."
    )


def check_batch_inputs(batch_inputs: Any) -> BatchInputs | None:
    """``batch_inputs`` when it is None or callable.

    Raises:
        TypeError: anything else.
    """
    if batch_inputs is None or callable(batch_inputs):
        return cast("BatchInputs | None", batch_inputs)
    raise TypeError(
        f"batch_inputs must be a function of one batch returning the model's inputs, got "
        f"{type(batch_inputs).__name__}; pass e.g. batch_inputs=lambda b: (b[0], b[1]), or None "
        "to feed the model each batch's first tensor."
    )


def model_inputs(batch: Any, batch_inputs: BatchInputs | None = None) -> tuple[Tensor, ...]:
    """The model's inputs of ``batch`` as a tuple: ``batch_inputs(batch)``, else its first tensor.

    Every input is a tensor whose dimension 0 is the batch's tiles, as for
    Captum's ``inputs``; the first one's length is the number of tiles.

    Raises:
        TypeError: ``batch_inputs`` returned something other than a tensor or
                    a non-empty tuple or list of tensors; without it, as
                    :func:`first_tensor`.
        ValueError: the inputs have no batch dimension or disagree on its length.
    """
    if batch_inputs is None:
        return (first_tensor(batch),)
    got = batch_inputs(batch)
    inputs = tuple(got) if isinstance(got, (tuple, list)) else (got,)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        listed = isinstance(got, (tuple, list))
        kinds = f" of {[type(t).__name__ for t in inputs]}" if listed else ""
        raise TypeError(
            f"batch_inputs returned a {type(got).__name__}{kinds} for a batch; "
            "it must return the model's inputs as a Tensor or a tuple of Tensors (e.g. "
            "lambda b: (b[0], b[1])). Pass other arguments as additional_forward_args."
        )
    sizes = [tuple(t.shape[:1]) for t in inputs]
    if any(len(size) == 0 for size in sizes) or len(set(sizes)) > 1:
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise ValueError(
            f"batch_inputs returned inputs of shapes {shapes}: every input must have the "
            "batch's tiles along dimension 0, with one length. Pass arguments that are not "
            "per tile as additional_forward_args."
        )
    return inputs


def on_device(
    inputs: tuple[Tensor, ...], device: torch.device | None
) -> Tensor | tuple[Tensor, ...]:
    """``inputs`` on ``device``, as Captum takes them: the one tensor, or the tuple.

    Pinned ones are copied without blocking; ``device=None`` leaves them where they are.
    """
    if device is not None:
        inputs = tuple(
            t if t.device == device else t.to(device, non_blocking=t.is_pinned()) for t in inputs
        )
    return inputs if len(inputs) > 1 else inputs[0]


def one_pass(
    source: Any,
    batch_size: int,
    *,
    device: torch.device | None,
    seed: int = 0,
    progress: bool = False,
) -> Iterable[Any]:
    """The batches of one pass over ``source``: slices of a tensor, or one epoch of a loader.

    Args:
        source (Tensor, iterable of batches or map-style Dataset): the tiles.
        batch_size (int): tiles per batch of a tensor or a Dataset.
        device (torch.device or None): the model's device (pinned batches for CUDA).
        seed (int, optional): as for :func:`epochs`.
                    Default: 0
        progress (bool, optional): as for :func:`epochs`.
                    Default: False

    Returns:
        *Iterable*: the batches.
    """
    if isinstance(source, Tensor):
        return [source[i : i + batch_size] for i in range(0, source.shape[0], batch_size)]
    options = FitOptions(
        batch_size=batch_size,
        n_epochs=1,
        seed=seed,
        progress=progress,
        pin_memory=device is not None and device.type == "cuda",
    )
    return epochs(source, options)[0]


def tile_dataset(source: Any) -> Any:
    """The ``SlideTiles``-like dataset behind ``source`` (itself or its DataLoader's), or None.

    Such a dataset locates its tiles (``locate``, ``grids``); its item i is ``(image, i)``.
    """
    for candidate in (source, getattr(source, "dataset", None)):
        if candidate is not None and hasattr(candidate, "locate") and hasattr(candidate, "grids"):
            return candidate
    return None


def batch_dataset(batch: Any, dataset: Any) -> Any:
    """``dataset`` when ``batch`` carries its tiles' indices (``(images, indices)``), else None.

    A loader over a ``SlideTiles`` with a collate of its own may yield bare
    images: their stream positions are not the dataset's indices, so nothing
    may be looked up in the dataset for them.
    """
    carries = isinstance(batch, (tuple, list)) and len(batch) > 1
    return dataset if carries else None


def item_ids(batch: Any, dataset: Any, seen: int, n: int) -> list[int]:
    """The source position of each tile of ``batch``: ``SlideTiles`` says; else stream order.

    Returns:
        *list[int]*: one index per tile of the batch.
    """
    if batch_dataset(batch, dataset) is not None:
        return [int(i) for i in batch[1]]  # SlideTiles: item i is (image, i)
    return list(range(seen, seen + n))


def is_map_dataset(inputs: Any) -> bool:
    """Whether ``inputs`` is a map-style (indexable, sized) ``torch.utils.data.Dataset``."""
    return isinstance(inputs, Dataset) and not isinstance(inputs, IterableDataset)


def epochs(
    inputs: Iterable[Any] | Dataset[Any],
    options: FitOptions,
    *,
    shard: tuple[int, int] | None = None,
) -> list[Iterable[Any]]:
    """The batches of each epoch; a map-style Dataset goes through a DataLoader.

    Args:
        inputs (Iterable or Dataset): the batches, or the dataset to batch.
        options (FitOptions): batch size, epochs, pinning.
        shard (tuple[int, int], optional): ``(rank, world)``: this rank's items
                    of a map-style dataset (strided).
                    Default: None

    Raises:
        TypeError, ValueError: a bad ``batch_size``, or several epochs over a
                    one-shot iterator.
    """
    if isinstance(inputs, Dataset) and is_map_dataset(inputs):
        batch_size = check_int("batch_size", options.batch_size, hint="pass e.g. batch_size=32.")
        n = len(inputs)  # type: ignore[arg-type]
        sampler = None if shard is None else range(shard[0], n, shard[1])
        inputs = DataLoader(
            inputs,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=getattr(inputs, "collate_fn", None),
            pin_memory=options.pin_memory,
        )
    batches = cast("Iterable[Any]", inputs)  # a DataLoader now, or the caller's iterable
    if iter(batches) is batches and options.n_epochs > 1:
        raise ValueError(
            f"n_epochs={options.n_epochs} needs a re-iterable input (a DataLoader or list), "
            "got a one-shot iterator; pass n_epochs=1 or a DataLoader."
        )
    return [batches] * options.n_epochs


class DatasetBatches:
    """``(start, stop)`` -> the collated batch of those items of a map-style dataset (picklable)."""

    def __init__(
        self, dataset: Dataset[Any], collate_fn: Callable[[list[Any]], Any] | None
    ) -> None:
        self.dataset = dataset
        self.collate_fn = collate_fn if collate_fn is not None else default_collate

    def __call__(self, item: tuple[int, int]) -> Any:
        """The collated items ``start`` to ``stop - 1``."""
        start, stop = item
        return self.collate_fn([self.dataset[i] for i in range(start, stop)])


def item_batches(inputs: Any, batch_size: int) -> tuple[list[Any], Callable[[Any], Any] | None]:
    """Items to send to remote workers, and what turns one into a batch there.

    A map-style dataset becomes ``(start, stop)`` index ranges loaded by a
    :class:`DatasetBatches`; a list or tuple of batches is sent as it is.

    Raises:
        TypeError: ``inputs`` is neither, or a bad ``batch_size`` type.
        ValueError: no batches, or ``batch_size < 1``.
    """
    if is_map_dataset(inputs):
        batch_size = check_int("batch_size", batch_size, hint="pass e.g. batch_size=32.")
        n = len(inputs)
        items: list[Any] = [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
        load: Callable[[Any], Any] | None = DatasetBatches(
            inputs, getattr(inputs, "collate_fn", None)
        )
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
        raise ValueError(_EMPTY)
    return items, load


def rows_of(
    epoch_list: list[Iterable[Any]],
    rows: RowSource,
    generator: torch.Generator,
    *,
    progress: bool,
) -> Iterator[Tensor]:
    """Rows of every non-empty batch of every epoch, with a progress bar per epoch."""
    for epoch, batches in enumerate(epoch_list):
        total = len(batches) if isinstance(batches, Sized) else None
        bar = tqdm(
            batches,
            total=total,
            disable=not progress,
            desc=f"fit concepts (epoch {epoch + 1}/{len(epoch_list)})",
            unit="batch",
        )
        for batch in bar:
            found = rows(batch, generator)
            if found is not None:
                yield found
            del found  # not alive during the next batch's forward
