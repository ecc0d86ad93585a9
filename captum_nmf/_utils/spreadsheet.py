"""CSV cells a spreadsheet shows as text: no formula from a concept name or a path."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["safe_cell", "safe_row"]

#: A text cell starting with one of these is a formula (or starts one) in Excel and
#: LibreOffice: ``=HYPERLINK(...)``, ``@SUM(...)``, ``-ve stroma`` shown as ``#NAME?``.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: Any) -> Any:
    """``value``, or a text cell a spreadsheet would run as a formula with a leading ``'``.

    The apostrophe is what a spreadsheet itself puts before text that would
    otherwise be a formula (OWASP's advice on CSV injection); numbers are
    never changed, and neither is a lone ``-`` (shown as text), so tables
    read back by other programs change only in such names.

    Returns:
        *Any*: ``value`` itself, or ``"'" + value``.
    """
    if isinstance(value, str) and len(value) > 1 and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def safe_row(values: Iterable[Any]) -> list[Any]:
    """:func:`safe_cell` of every value of a row.

    Returns:
        *list*: the row's cells.
    """
    return [safe_cell(v) for v in values]
