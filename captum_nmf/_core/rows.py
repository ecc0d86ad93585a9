"""The rows a fit streams from one batch of an attribution: forward, checks, subsampling."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from captum_nmf._utils import activations as acts
from captum_nmf.engines.batches import BatchInputs, model_inputs, on_device
from captum_nmf.exceptions import LayerError

if TYPE_CHECKING:
    from captum_nmf._core.nmf_concept import NMFConceptAttribution

__all__ = ["BatchRows"]


class BatchRows:
    """Batch -> the (subsampled) feature rows of an attribution's layer; a ``RowSource``.

    Picklable: Ray actors get a copy of it, and so of the model.
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
        batch_size: int | None = None,
        batch_inputs: BatchInputs | None = None,
    ) -> None:
        self.attr = attr
        self.batch_inputs = batch_inputs
        self.additional_forward_args = additional_forward_args
        self.attribute_to_layer_input = attribute_to_layer_input
        self.max_locations = max_locations
        self.autocast = autocast
        self.channels_last = channels_last
        self.widest = batch_size or 0  # the tiles of a full batch: known, or the most seen

    def quota(self, n_tiles: int) -> int | None:
        """Rows kept of a batch of ``n_tiles``: ``max_locations`` for a full batch, in proportion.

        A batch of fewer tiles (the last one, a shard's last, one that lost
        unreadable tiles) keeps proportionally fewer rows, so that every tile
        weighs the same in the fit; a full batch is the one of ``batch_size``
        tiles when that is known, else the largest seen so far.
        """
        if self.max_locations is None:
            return None
        self.widest = max(self.widest, n_tiles)
        return max(1, round(self.max_locations * n_tiles / self.widest))

    def __call__(self, batch: Any, generator: torch.Generator) -> Tensor | None:
        """The rows of ``batch`` (on the model's device), or None for an empty batch."""
        attr = self.attr
        inputs = model_inputs(batch, self.batch_inputs)
        x = inputs[0]
        if x.shape[0] == 0:
            return None
        try:
            act = attr._activations(
                on_device(inputs, acts.model_device(attr.forward_func, attr.layer)),
                self.additional_forward_args,
                self.attribute_to_layer_input,
                autocast=self.autocast,
                channels_last=self.channels_last,
            )
        except TypeError as exc:
            if self.batch_inputs is not None or not _holds_more(batch):
                raise
            raise TypeError(  # e.g. "forward() missing 1 required positional argument"
                f"{exc} (fit gave the model the first of the batch's {len(batch)} elements; if "
                "the model takes several per-sample inputs, pass e.g. "
                "batch_inputs=lambda b: (b[0], b[1]))"
            ) from exc
        except LayerError as exc:
            if x.ndim != 3 or len(inputs) > 1:
                raise
            raise LayerError(  # a 3-D batch may be one C x H x W image of a stream of samples
                f"{exc} The batch has shape {tuple(x.shape)}: if the source yields single "
                "images (an IterableDataset or generator of samples), wrap it in "
                "torch.utils.data.DataLoader(source, batch_size=32)."
            ) from exc
        attr._check_rank(act.shape[1])
        rows = acts.maps_to_rows(act)
        limit = self.quota(int(x.shape[0]))
        if limit is not None and rows.shape[0] > limit:
            keep = torch.randperm(rows.shape[0], generator=generator)[:limit]
            rows = rows[keep.to(rows.device)]
        return rows

    def to(self, device: torch.device) -> None:
        """Move the model (when ``forward_func`` is a module or one's method) to ``device``."""
        owner = acts.module_of(self.attr.forward_func)
        if owner is not None:
            owner.to(device)


def _holds_more(batch: Any) -> bool:
    """Whether ``batch`` is a tuple or list with tensors after the first (the model's input)."""
    return isinstance(batch, (tuple, list)) and any(isinstance(t, Tensor) for t in batch[1:])
