"""Safe persistence of concept models: safetensors tensors plus string metadata.

A concept model file is a ``.safetensors`` file (a JSON header and raw tensor
bytes), so loading one cannot run code. Pickle-based files (``.pt``, ``.pth``,
``.pkl``, torch zip archives) are refused before anything is read from them.
Writes are atomic: the file is written next to its destination and moved into
place with an atomic rename (:meth:`pathlib.Path.replace`), so an interrupted
save never leaves half a file (:func:`atomic_write`, used for every file the
library writes). Files get the mode the process's umask gives a new file.

Every file written by :func:`save_tensors` carries a SHA-256 digest of its
metadata and tensor bytes (``content_sha256``); :func:`load_tensors` recomputes
it and refuses a file whose bytes changed (a flipped bit, a truncated copy).
Files written before the digest existed load as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
from collections.abc import Callable, Generator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from captum_nmf._version import __version__
from captum_nmf.exceptions import ConceptModelFormatError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FORMAT_VERSIONS",
    "atomic_write",
    "atomic_write_all",
    "claim_outputs",
    "write_owned_files",
    "content_digest",
    "default_file_mode",
    "format_version",
    "load_tensors",
    "save_tensors",
    "sha256_bytes",
    "sha256_file",
]

FORMAT_NAME = "captum-nmf/concepts"
FORMAT_VERSION = 1  # of the concepts format (FORMAT_NAME)
# Each file format has its own version: bump one when its layout changes, and
# only files of that format written by a newer library are refused. Formats not
# listed here are at version 1.
FORMAT_VERSIONS: dict[str, int] = {FORMAT_NAME: FORMAT_VERSION}
_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".joblib", ".ckpt")
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80
_DIGEST_KEY = "content_sha256"
_INTEGRITY_KEY = "integrity"  # written since the digest is required: names its key


def format_version(format_name: str) -> int:
    """The version this library writes (and reads up to) of the file format ``format_name``.

    Args:
        format_name (str): e.g. ``"captum-nmf/concepts"``.

    Returns:
        *int*: its entry of :data:`FORMAT_VERSIONS`, or 1 for a format not listed.
    """
    return FORMAT_VERSIONS.get(format_name, 1)


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file under the current umask (``0o666 & ~umask``).

    Returns:
        *int*: permission bits, e.g. ``0o644`` under umask ``022``.
    """
    umask = None
    with contextlib.suppress(OSError, ValueError):  # Linux: read it without changing it
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("Umask:"):
                umask = int(line.split()[1], 8)
                break
    if umask is None:  # elsewhere: set and restore (brief, process-wide)
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike[str],
    mode: str = "w",
    *,
    encoding: str | None = "utf-8",
    newline: str | None = None,
) -> Generator[IO[Any], None, None]:
    """Write a file atomically: into a hidden sibling, flushed, then renamed into place.

    The destination is either the old file or the complete new one, never a
    partial file; on any error (a full disk, an exception in the ``with``
    body) the temporary file is removed and the destination is untouched. The
    new file gets :func:`default_file_mode`.

    Args:
        path (str or PathLike): destination file; its directory must exist.
        mode (str, optional): ``"w"`` (text) or ``"wb"`` (bytes).
                    Default: ``"w"``
        encoding (str or None, optional): text encoding (ignored for ``"wb"``).
                    Default: ``"utf-8"``
        newline (str or None, optional): as in :func:`open` (``""`` for CSV).
                    Default: None

    Yields:
        *IO*: the open temporary file.

    Raises:
        ValueError: ``mode`` is not ``"w"`` or ``"wb"``.
        OSError: the file could not be written or renamed.
    """
    with atomic_write_all([path], mode, encoding=encoding, newline=newline) as (handle,):
        yield handle


@contextlib.contextmanager
def atomic_write_all(
    paths: Sequence[str | os.PathLike[str]],
    mode: str = "w",
    *,
    encoding: str | None = "utf-8",
    newline: str | None = None,
) -> Generator[list[IO[Any]], None, None]:
    """Write several files that belong together: all are complete before any is replaced.

    Every file is written into a hidden sibling and flushed to disk; only
    when the ``with`` body and every write succeeded are they renamed into
    place, in the order given (put the file that records the others last).
    An error while writing leaves every destination as it was. A destination
    that is a symbolic link is followed: the file it points to is replaced
    and the link stays (a ``current.safetensors`` link to a versioned file).

    Args:
        paths (sequence of str or PathLike): destination files.
        mode (str, optional): ``"w"`` (text) or ``"wb"`` (bytes).
                    Default: ``"w"``
        encoding (str or None, optional): text encoding (ignored for ``"wb"``).
                    Default: ``"utf-8"``
        newline (str or None, optional): as in :func:`open`.
                    Default: None

    Yields:
        *list[IO]*: the open temporary files, in the order of ``paths``.

    Raises:
        ValueError: ``mode`` is not ``"w"`` or ``"wb"``.
        OSError: a file could not be written or renamed.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}.")
    binary = mode == "wb"
    # a link is followed (as sed --follow-symlinks): its target is replaced, the link stays
    targets = [Path(os.path.realpath(p)) if Path(p).is_symlink() else Path(p) for p in paths]
    tmps: list[Path] = []
    try:
        with contextlib.ExitStack() as stack:
            handles = []
            for target in targets:
                tmp, fh = _exclusive_temporary(target, binary, encoding, newline)
                tmps.append(tmp)
                handles.append(stack.enter_context(fh))
            yield handles
            for fh in handles:
                fh.flush()
                os.fsync(fh.fileno())
        for tmp, target in zip(tmps, targets, strict=True):
            tmp.chmod(default_file_mode())
            tmp.replace(target)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


_TEMPORARY_SEQUENCE = itertools.count()  # next() of a count is atomic under the GIL


def temporary_path(target: Path) -> Path:
    """A fresh name for a temporary file beside ``target``: ``.{name}.{pid}-{n}.tmp``.

    The pid and a per-process sequence number keep two threads (or processes)
    writing one destination from sharing a temporary file.
    """
    return target.with_name(f".{target.name}.{os.getpid()}-{next(_TEMPORARY_SEQUENCE)}.tmp")


def _exclusive_temporary(
    target: Path, binary: bool, encoding: str | None, newline: str | None
) -> tuple[Path, IO[Any]]:
    """A new temporary file beside ``target``, created exclusively (never one in use)."""
    while True:
        tmp = temporary_path(target)
        try:
            if binary:
                return tmp, tmp.open("xb")
            return tmp, tmp.open("x", encoding=encoding, newline=newline)
        except FileExistsError:  # left by a killed process of the same pid: another name
            continue


def sha256_bytes(data: bytes) -> str:
    """SHA-256 of ``data``.

    Returns:
        *str*: hex digest.
    """
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str], *, block: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in blocks.

    Returns:
        *str*: hex digest.
    """
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def claim_outputs(
    directory: str | os.PathLike[str],
    record: str,
    names: Sequence[str],
    legacy: Callable[[dict[str, Any]], Sequence[str]],
    adopted: Sequence[str] = (),
) -> list[Path]:
    """Check that writing ``names`` into ``directory`` replaces only files captum-nmf wrote.

    A folder of tables (an analysis, a K sweep) is ours through its JSON
    ``record``, written last, whose ``"files"`` maps each file written with
    it to its SHA-256. Files written before that key existed are named by
    ``legacy(record)`` and taken as ours without a digest.

    Args:
        directory (str or PathLike): the output folder (it may not exist yet).
        record (str): the record's file name, e.g. ``"analysis.json"``.
        names (Sequence[str]): the files about to be written (the record among them).
        legacy (Callable): the files a record without ``"files"`` names.
        adopted (Sequence[str], optional): when there is no record yet, files
                    taken as ours without a digest (an earlier version's
                    outputs, recognised by the caller): replaced, never removed.
                    Default: ``()``

    Returns:
        *list[Path]*: files of the previous write that this one does not
        write again (stale: to remove once the new files are in); only
        files the record lists with their digest (checked above), never a
        name that an older record without a file list only implies.

    Raises:
        FileExistsError: a file about to be written is not one the record
                    lists (someone else's), or was edited since it was
                    written (its digest differs), or the record itself is
                    not one of ours (unreadable, or without a file list).
    """
    out = Path(directory)
    path = out / record
    recorded: dict[str, str | None] = {}
    if not path.exists():
        recorded = {str(n): None for n in adopted}
    else:
        try:
            recorded = _recorded_files(path, legacy)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise FileExistsError(
                f"{path} is not a record captum-nmf wrote ({exc}); choose another folder, or "
                "move the file away."
            ) from None
    for name in dict.fromkeys([*names, *recorded]):
        target = out / name
        if name == record or not target.exists():
            continue
        if name not in recorded:
            raise FileExistsError(
                f"{target} was not written by captum-nmf (its {record} does not list it); "
                "choose another folder, or move the file away."
            )
        digest = recorded[name]
        if digest is not None and sha256_file(target) != digest:
            raise FileExistsError(
                f"{target} was edited since captum-nmf wrote it; move it away (or choose "
                "another folder) to write new results."
            )
    # stale: recorded with a digest (written by a record that lists its files) and still
    # unchanged; a name an old record only implies may be a file of the user's: kept
    return [
        out / n
        for n, digest in recorded.items()
        if n not in names and n != record and digest is not None and (out / n).exists()
    ]


def write_owned_files(
    directory: str | os.PathLike[str],
    record: str,
    files: Mapping[str, bytes],
    content: dict[str, Any],
    legacy: Callable[[dict[str, Any]], Sequence[str]],
    adopted: Sequence[str] = (),
) -> Path:
    """Write ``files`` and their JSON ``record`` into ``directory``, replacing only our own.

    :func:`claim_outputs` checks the folder first (``adopted``: as there);
    ``content`` is written as
    ``record`` with ``"files"`` (each file's SHA-256) added, last, all of them
    atomically and together (:func:`atomic_write_all`); then the files of the
    previous write that this one has not are removed.

    Returns:
        *Path*: the directory.

    Raises:
        FileExistsError: as :func:`claim_outputs` (nothing is written).
    """
    out = Path(directory)
    stale = claim_outputs(out, record, [*files, record], legacy, adopted)
    blobs = dict(files)
    blobs[record] = json.dumps(
        {**content, "files": {n: sha256_bytes(b) for n, b in files.items()}}, indent=2
    ).encode("utf-8")  # the record last
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write_all([out / n for n in blobs], "wb", encoding=None) as handles:
        for handle, blob in zip(handles, blobs.values(), strict=True):
            handle.write(blob)
    for path in stale:  # a file of the last write that this one has not
        path.unlink(missing_ok=True)
    return out


def _recorded_files(
    path: Path, legacy: Callable[[dict[str, Any]], Sequence[str]]
) -> dict[str, str | None]:
    """The files a record lists, with their digests (None for a record without a file list)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    files = data.get("files")  # AttributeError: not a JSON object
    if files is None:  # written before the file list: its fixed names
        return {str(n): None for n in legacy(data)}
    return {str(n): str(d) for n, d in dict(files).items()}


def content_digest(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> str:
    """SHA-256 over the metadata (without the digest itself) and every tensor's bytes.

    Tensors are taken in name order with their dtype and shape, so the digest
    does not depend on how a file lays them out.

    Returns:
        *str*: hex digest.
    """
    digest = hashlib.sha256()
    meta = {k: v for k, v in metadata.items() if k != _DIGEST_KEY}
    digest.update(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


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
    blob = tensor_file_bytes(tensors, metadata, format_name=format_name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target, "wb") as fh:
        fh.write(blob)
    return target


def tensor_file_bytes(
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, str],
    *,
    format_name: str = FORMAT_NAME,
) -> bytes:
    """The bytes :func:`save_tensors` writes (for a file written together with others).

    Returns:
        *bytes*: a ``.safetensors`` file with the format, versions and content digest.

    Raises:
        TypeError: a metadata value is not a string.
    """
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise TypeError(f"metadata[{key!r}] must be a str, got {type(value).__name__}.")
    header = {
        **metadata,
        "format": format_name,
        "format_version": str(format_version(format_name)),
        "captum_nmf_version": __version__,
        # names the digest's key, under the digest: a damaged key name cannot pass for a
        # file written before digests existed
        _INTEGRITY_KEY: _DIGEST_KEY,
    }
    data = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    header[_DIGEST_KEY] = content_digest(data, header)
    return bytes(safetensors_bytes(data, metadata=header))


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file starts with its JSON header's length (8 bytes, little-endian), then ``{``.

    The length's first byte can be anything (0x80 included, a pickle's first
    byte), so the pickle and zip checks only apply to files that are not laid
    out like this.
    """
    if len(head) < 9:
        return False
    length = int.from_bytes(head[:8], "little")
    return 0 < length <= size - 8 and head[8:9] == b"{"


def _read_one_version(source: Path, kind: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of ``source``, both of one version of the file.

    safetensors opens the file more than once: a file replaced meanwhile by
    another writer's atomic save could give one version's header and the next
    one's tensors. The file's identity (inode, size, modification time) is
    compared before and after, and the read done again when it changed; it is
    memory-mapped, not read into memory twice.

    Raises:
        ConceptModelFormatError: not a readable safetensors file.
    """
    for _ in range(8):
        before = _identity(source)
        try:
            with safe_open(str(source), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            if _identity(source) != before:  # replaced while being read: read the new one
                continue
            raise ConceptModelFormatError(
                f"{source} is not a valid .safetensors {kind} file ({exc})."
            ) from exc
        if _identity(source) == before:
            return tensors, metadata
    raise ConceptModelFormatError(
        f"{source} was replaced 8 times while being read; stop the other writer, then read it."
    )


def _identity(path: Path) -> tuple[int, int, int, int]:
    info = path.stat()
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


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
                    corrupt (unparsable, or its content digest does not match),
                    not a captum_nmf concept model, written by a newer format
                    version, or lacks a required tensor.
    """
    source = Path(path)
    kind = "concept model" if format_name == FORMAT_NAME else format_name
    if not source.is_file():
        raise FileNotFoundError(f"{kind[:1].upper()}{kind[1:]} file not found: {source}")
    with source.open("rb") as fh:
        head = fh.read(9)
    if source.suffix.lower() in _PICKLE_SUFFIXES or (
        not _looks_like_safetensors(head, source.stat().st_size)
        and (head.startswith(_ZIP_MAGIC) or (head[:1] and head[0] == _PICKLE_PROTO))
    ):
        raise ConceptModelFormatError(
            f"captum_nmf models are .safetensors files; refusing to unpickle {source}. "
            "Re-save the concepts with NMFConceptAttribution.save(...)."
        )
    tensors, metadata = _read_one_version(source, kind)
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
    known = format_version(format_name)
    if version > known:
        raise ConceptModelFormatError(
            f"{source} uses {kind} format {version}, written by captum_nmf "
            f"{metadata.get('captum_nmf_version', '?')}; this is captum_nmf {__version__} "
            f"(format {known}). Upgrade captum-nmf to read it."
        )
    recorded = metadata.get(_DIGEST_KEY)
    if recorded is None and _INTEGRITY_KEY in metadata:
        raise ConceptModelFormatError(
            f"{source} is corrupt: it was written with a content digest "
            f"({metadata[_INTEGRITY_KEY]!r}), which is missing from its metadata (a damaged "
            "key). Restore it from a copy or write it again."
        )
    if recorded is not None and content_digest(tensors, metadata) != recorded:
        raise ConceptModelFormatError(
            f"{source} is corrupt: its SHA-256 content digest does not match the one recorded "
            "when it was written (changed or damaged bytes). Restore it from a copy or write "
            "it again."
        )
    missing = [name for name in required if name not in tensors]
    if missing:
        raise ConceptModelFormatError(f"{source} lacks the tensor(s) {missing}.")
    return tensors, metadata
