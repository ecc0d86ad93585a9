"""What a fitted concept set offers besides attribution: concept names, saving and loading."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from torch import Tensor, nn

from captum_nmf._core import persistence
from captum_nmf._core.names import check_concept_names, default_concept_names, renamed

if TYPE_CHECKING:
    from captum_nmf._core.nmf_concept import NMFConceptAttribution

__all__ = ["ConceptSetMixin"]

_T = TypeVar("_T", bound="ConceptSetMixin")


class ConceptSetMixin:
    """Names, :meth:`save` and :meth:`load` of :class:`NMFConceptAttribution`.

    A mixin so that the estimator's module holds the estimator; it relies on
    ``check_fitted`` and ``concepts_`` of the class it is mixed into.
    """

    concepts_: Tensor
    _concept_names: list[str] | None
    #: The concepts' stability record (``ConceptStability.to_dict()`` of
    #: :mod:`captum_nmf.compare.stability`, attached with its ``attach``), saved
    #: with the concepts; None until one is attached, and after a new fit.
    stability_: dict[str, Any] | None = None
    #: What the concepts were fitted from, saved with them: ``"weights_sha256"`` of
    #: the model (set by ``fit``; :meth:`load` warns when a model with other weights
    #: is given, and refuses it with ``strict=True``), and whatever else a caller
    #: records (the command line adds the tiling and the input normalisation).
    #: Empty for concepts fitted before it existed.
    provenance_: dict[str, Any] = {}  # noqa: RUF012 - replaced, never mutated, per instance

    def check_fitted(self, before: str = "attribute") -> None:
        """Raise unless the concepts are fitted (the estimator's own check)."""
        raise NotImplementedError  # pragma: no cover - overridden by the estimator

    @property
    def concept_names(self) -> list[str]:
        """The concepts' names, ``"concept 0"``, ... unless set (saved with the concepts).

        Assign a full list, or rename some with :meth:`rename`. Names are
        unique, non-empty, printable and at most 64 characters; they appear in
        figure legends, QuPath classes, overlay descriptions, summaries and tables.

        Raises:
            NotFittedError: before ``fit`` or ``load``.
        """
        self.check_fitted("concept_names")
        names = getattr(self, "_concept_names", None)
        return list(names) if names else default_concept_names(int(self.concepts_.shape[0]))

    @concept_names.setter
    def concept_names(self, names: list[str]) -> None:
        self.check_fitted("concept_names")
        self._concept_names = check_concept_names(names, int(self.concepts_.shape[0]))

    def rename(self: _T, mapping: dict[int, str]) -> _T:
        """Rename concepts, e.g. ``rename({3: "tumour epithelium"})``.

        Args:
            mapping (dict[int, str]): concept index to its new name.

        Returns:
            *NMFConceptAttribution*: ``self``.

        Raises:
            NotFittedError: before ``fit`` or ``load``.
            IndexError: an index that is not a concept.
            ValueError: an empty, non-printable, too long or duplicate name
                        (nothing is renamed then).
        """
        self._concept_names = renamed(self.concept_names, mapping)
        return self

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save the concepts as a ``.safetensors`` file with JSON-able metadata.

        The file holds the K x C concepts and string metadata: format and
        library versions, K, C, layer name, negative-activation policy,
        whether the layer input was used, the solver settings and
        :attr:`provenance_` (the SHA-256 of the model's weights). It is
        written atomically. The model itself is not stored.

        Args:
            path (str or PathLike): destination ending in ``.safetensors``.

        Returns:
            *Path*: the path written.

        Raises:
            NotFittedError: before ``fit``.
            ValueError: ``path`` does not end in ``.safetensors``.
        """
        return persistence.save_concepts(cast("NMFConceptAttribution", self), path)

    @classmethod
    def load(
        cls: type[_T],
        path: str | os.PathLike[str],
        forward_func: Callable[..., Any],
        layer: nn.Module,
        *,
        device_ids: list[int] | None = None,
        strict: bool = False,
        reshape_transform: Callable[[Tensor], Tensor] | None = None,
    ) -> _T:
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
                        name differs from the one saved, or the model's weights
                        from those the concepts were fitted on
                        (``provenance_["weights_sha256"]``).
                        Default: False
            reshape_transform (Callable, optional): as in the constructor.
                        Default: None

        Returns:
            *NMFConceptAttribution*: a fitted instance.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ConceptModelFormatError: a pickle-based, corrupt, unknown or newer file.
            ConceptModelMismatchError: the layer has another channel count (or,
                        with ``strict=True``, another name, or the model other weights).

        Warns:
            LayerNameMismatchWarning: the layer has another name.
            ModelMismatchWarning: the model's weights differ from those fitted on.
        """
        loaded = persistence.load_concepts(
            cast("type[NMFConceptAttribution]", cls),
            path,
            forward_func,
            layer,
            device_ids=device_ids,
            strict=strict,
            reshape_transform=reshape_transform,
        )
        return cast(_T, loaded)
