"""Safe persistence of concept models: safetensors tensors plus string metadata.

A concept model file is a ``.safetensors`` file (a JSON header and raw tensor
bytes), so loading one cannot run code. Pickle-based files (``.pt``, ``.pth``,
``.pkl``, torch zip archives) are refused before anything is read from them.
Writes are atomic: the file is written next to its destination and moved into
place with an atomic rename (:meth:`pathlib.Path.replace`), so an interrupted
save never leaves half a file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from captum_nmf._version import __version__
from captum_nmf.exceptions import ConceptModelFormatError

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "load_tensors", "save_tensors"]

FORMAT_NAME = "captum-nmf/concepts"
FORMAT_VERSION = 1
_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".joblib", ".ckpt")
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80


def save_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, str],
    *,
    format_name: str = FORMAT_NAME,
) -> Path:
    """Write ``tensors`` and ``metadata`` to a ``.safetensors`` file atomically.

    Args:
        path (str or PathLike): destination; must end in ``.safetensors``.
        tensors (Mapping[str, Tensor]): tensors to store (copied to CPU, contiguous).
        metadata (Mapping[str, str]): string metadata; the format name, format
                    version and library version are added.
        format_name (str, optional): the kind of file, checked by :func:`load_tensors`.
                    Default: ``"captum-nmf/concepts"``

    Returns:
        *Path*: the path written.

    Raises:
        ValueError: ``path`` does not end in ``.safetensors``.
        TypeError: a metadata value is not a string.
    """
    target = Path(path)
    if target.suffix != ".safetensors":
        raise ValueError(
            f"captum_nmf saves .safetensors files, got path {str(target)!r}; "
            f"use e.g. {target.with_suffix('.safetensors').name!r}."
        )
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise TypeError(f"metadata[{key!r}] must be a str, got {type(value).__name__}.")
    header = {
        **metadata,
        "format": format_name,
        "format_version": str(FORMAT_VERSION),
        "captum_nmf_version": __version__,
    }
    data = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        save_file(data, str(tmp), metadata=header)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def load_tensors(
    path: str | os.PathLike[str],
    *,
    required: tuple[str, ...] = (),
    format_name: str = FORMAT_NAME,
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a concept-model file written by :func:`save_tensors`.

    Args:
        path (str or PathLike): the ``.safetensors`` file.
        required (tuple[str, ...], optional): tensor names that must be present.
                    Default: ``()``
        format_name (str, optional): the kind of file expected.
                    Default: ``"captum-nmf/concepts"``

    Returns:
        *tuple[dict[str, Tensor], dict[str, str]]*: CPU tensors and metadata.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConceptModelFormatError: the file is pickle-based (refused unread),
                    corrupt, not a captum_nmf concept model, written by a newer
                    format version, or lacks a required tensor.
    """
    source = Path(path)
    kind = "concept model" if format_name == FORMAT_NAME else format_name
    if not source.is_file():
        raise FileNotFoundError(f"{kind[:1].upper()}{kind[1:]} file not found: {source}")
    with source.open("rb") as fh:
        head = fh.read(8)
    if (
        source.suffix.lower() in _PICKLE_SUFFIXES
        or head.startswith(_ZIP_MAGIC)
        or (head[:1] and head[0] == _PICKLE_PROTO)
    ):
        raise ConceptModelFormatError(
            f"captum_nmf models are .safetensors files; refusing to unpickle {source}. "
            "Re-save the concepts with NMFConceptAttribution.save(...)."
        )
    try:
        with safe_open(str(source), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ConceptModelFormatError(
            f"{source} is not a valid .safetensors {kind} file ({exc})."
        ) from exc
    if metadata.get("format") != format_name:
        raise ConceptModelFormatError(
            f"{source} is a safetensors file but not a {format_name} file "
            f"(format={metadata.get('format')!r}, expected {format_name!r})."
        )
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError as exc:
        raise ConceptModelFormatError(
            f"{source} has an unreadable format_version {metadata.get('format_version')!r}."
        ) from exc
    if version > FORMAT_VERSION:
        raise ConceptModelFormatError(
            f"{source} uses concept-model format {version}, written by captum_nmf "
            f"{metadata.get('captum_nmf_version', '?')}; this is captum_nmf {__version__} "
            f"(format {FORMAT_VERSION}). Upgrade captum-nmf to read it."
        )
    missing = [name for name in required if name not in tensors]
    if missing:
        raise ConceptModelFormatError(f"{source} lacks the tensor(s) {missing}.")
    return tensors, metadata
