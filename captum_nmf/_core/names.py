"""Concept names: defaults, validation, and renaming a concept file in place (atomically)."""

from __future__ import annotations

import json
import numbers
import os
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from captum_nmf.exceptions import ConceptModelFormatError
from captum_nmf.io import load_tensors, save_tensors

__all__ = [
    "MAX_NAME_LENGTH",
    "check_concept_names",
    "default_concept_names",
    "renamed",
    "rename_concept_file",
]

#: The longest concept name accepted (QuPath class names, legends and tables stay readable).
MAX_NAME_LENGTH = 64
_META_KEY = "concept_names"


def default_concept_names(k: int) -> list[str]:
    """``["concept 0", ..., "concept K-1"]``.

    Returns:
        *list[str]*: the default names.
    """
    return [f"concept {j}" for j in range(k)]


def check_concept_names(names: Sequence[str], k: int, *, recorded: bool = False) -> list[str]:
    """Validate a full list of names: K of them, strings, non-empty, printable, short, unique.

    Each name is put in one spelling for what looks the same: accents composed
    (Unicode NFC) and every space character (a no-break space, ...) a plain
    space. Names that still look alike are duplicates: equal once ligatures,
    no-break, full- and half-width forms are replaced by their letters
    (superscripts, subscripts and circled letters look different, and stay so).

    Args:
        names (Sequence[str]): one name per concept.
        k (int): the number of concepts.
        recorded (bool, optional): names read from a saved file: checked by
                    the rules they were saved under (no normalisation, exact
                    duplicates only), so a file an earlier version wrote
                    still loads and can be renamed.
                    Default: False

    Returns:
        *list[str]*: the names, so normalised and stripped of surrounding white space.

    Raises:
        TypeError: ``names`` is not a sequence of strings.
        ValueError: a wrong count, an empty name or one of combining marks only,
                    a control character, a lone surrogate (not encodable as
                    UTF-8), a name longer than :data:`MAX_NAME_LENGTH`, or a
                    duplicate.
    """
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"concept names must be a list of {k} strings, got {names!r}.")
    if len(names) != k:
        raise ValueError(f"concept names must hold {k} names (one per concept), got {len(names)}.")
    out = [_checked_name(name, j, recorded) for j, name in enumerate(names)]
    _check_unique(out, (lambda text: text) if recorded else _look_alike)
    return out


def _checked_name(name: object, j: int, recorded: bool) -> str:
    """One name, stripped (and, unless ``recorded``, put in one spelling), or ValueError."""
    if not isinstance(name, str):
        raise TypeError(f"concept name {j} must be a str, got {name!r}.")
    if recorded:
        text = name.strip()
    else:  # one spelling for what looks the same: composed accents (NFC), plain spaces
        text = "".join(
            " " if unicodedata.category(ch) == "Zs" else ch
            for ch in unicodedata.normalize("NFC", name)
        ).strip()
    if not text:
        raise ValueError(f"concept name {j} is empty; give each concept a visible name.")
    if not recorded and all(unicodedata.category(ch) in ("Mn", "Me", "Zs") for ch in text):
        raise ValueError(
            f"concept name {j} ({text!r}) holds only combining marks; give each concept a "
            "visible name."
        )
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in text):
        raise ValueError(
            f"concept name {j} ({text!r}) holds a control character; use printable text."
        )
    surrogates = [ch for ch in text if unicodedata.category(ch) == "Cs"]
    if surrogates:
        raise ValueError(
            f"concept name {j} ({text!r}) holds a lone surrogate ({surrogates[0]!r}), which "
            "cannot be written as UTF-8 (e.g. text decoded with errors='surrogateescape'); "
            "use valid Unicode text."
        )
    if len(text) > MAX_NAME_LENGTH:
        raise ValueError(
            f"concept name {j} is {len(text)} characters long; at most {MAX_NAME_LENGTH}."
        )
    return text


#: Unicode compatibility forms that look like their letters (``unicodedata.decomposition``
#: tags): ligatures and other <compat> forms, no-break, full- and half-width characters.
_LOOK_ALIKE_TAGS = ("<compat>", "<noBreak>", "<wide>", "<narrow>")


def _look_alike(text: str) -> str:
    """``text`` with the characters that look like other ones replaced by those (NFC)."""
    return unicodedata.normalize(
        "NFC",
        "".join(
            unicodedata.normalize("NFKC", ch)
            if unicodedata.decomposition(ch).startswith(_LOOK_ALIKE_TAGS)
            else ch
            for ch in text
        ),
    )


def _check_unique(names: Sequence[str], key: Callable[[str], str]) -> None:
    """Refuse two names with the same ``key``, naming both."""
    seen: dict[str, int] = {}
    for j, text in enumerate(names):
        same = key(text)
        if same in seen:
            first = names[seen[same]]
            alike = "" if first == text else f" and {first!r}, which look the same,"
            raise ValueError(
                f"concept names must be unique: {text!r}{alike} names concepts {seen[same]} "
                f"and {j}."
            )
        seen[same] = j


def renamed(names: Sequence[str], mapping: Mapping[int, str]) -> list[str]:
    """``names`` with the concepts in ``mapping`` renamed, validated as a whole.

    Returns:
        *list[str]*: the new names.

    Raises:
        IndexError: an index that is not a concept.
        TypeError: a non-int index or a non-str name.
        ValueError: an invalid result (see :func:`check_concept_names`).
    """
    new = list(names)
    for key, name in mapping.items():
        if isinstance(key, bool) or not isinstance(key, numbers.Integral):
            raise TypeError(f"concept indices must be ints, got {key!r}.")
        index = int(key)  # a NumPy integer too
        if not 0 <= index < len(new):
            raise IndexError(
                f"there is no concept {index}: the concepts are numbered 0 to {len(new) - 1}."
            )
        new[index] = _checked_name(name, index, recorded=False)
    # the names kept as they were (an earlier version's file) by the rules they were saved
    # under; the look-alike rule over all of them
    out = [
        text if j in mapping else _checked_name(text, j, recorded=True)
        for j, text in enumerate(new)
    ]
    _check_unique(out, _look_alike)
    return out


def names_from_metadata(meta: Mapping[str, str], k: int, where: str) -> list[str] | None:
    """The names a concept file records (None for files written before names existed).

    Raises:
        ConceptModelFormatError: the recorded names are unreadable or invalid.
    """
    text = meta.get(_META_KEY)
    if text is None:
        return None
    try:  # by the rules it was saved under: an earlier version's file still loads
        return check_concept_names(json.loads(text), k, recorded=True)
    except (ValueError, TypeError) as exc:
        raise ConceptModelFormatError(f"{where} has invalid concept names ({exc}).") from exc


def names_metadata(names: Sequence[str] | None) -> dict[str, str]:
    """The metadata entry for ``names`` (none for default names).

    Returns:
        *dict[str, str]*: ``{"concept_names": json}`` or ``{}``.
    """
    return {} if names is None else {_META_KEY: json.dumps(list(names))}


def rename_concept_file(path: str | os.PathLike[str], mapping: Mapping[int, str]) -> list[str]:
    """Rename concepts in a saved concept file; nothing else in it changes.

    The file is checked (digest, format) and the new names validated before
    anything is written; it is then rewritten atomically, so on any error it
    is left exactly as it was. With an empty ``mapping`` nothing is written:
    the current names are only read.

    Args:
        path (str or PathLike): a ``.safetensors`` file from :meth:`NMFConceptAttribution.save`.
        mapping (Mapping[int, str]): concept index to its new name.

    Returns:
        *list[str]*: every concept's name after the renaming.

    Raises:
        FileNotFoundError: no such file.
        ConceptModelFormatError: not a valid concept file.
        IndexError: an index that is not a concept.
        ValueError: an invalid name (empty, control character, too long, duplicate).
    """
    source = Path(path)
    tensors, meta = load_tensors(source, required=("concepts",))
    k = int(tensors["concepts"].shape[0])
    current = names_from_metadata(meta, k, str(source)) or default_concept_names(k)
    if not mapping:
        return current
    names = renamed(current, mapping)
    keep = {
        key: value
        for key, value in meta.items()
        if key not in ("format", "format_version", "captum_nmf_version", "content_sha256")
    }
    keep.update(names_metadata(names))
    save_tensors(source, tensors, keep)
    return names
