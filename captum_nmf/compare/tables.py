"""Presentation of the analyses: the :class:`Table` type and the tables of Fig. 4 and Tables 1-2.

The numbers live in :mod:`captum_nmf.compare.metrics` as arrays; this module only lays them
out (rows, captions, :class:`MeanStd` cells) and renders them as markdown, HTML, CSV or a dict:
markdown and HTML show numbers to 3 decimals, CSV and dict keep full precision.
"""

from __future__ import annotations

import csv
import html
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from captum_nmf._utils.spreadsheet import safe_row

__all__ = [
    "MeanStd",
    "Table",
    "agreement_table",
    "correlation_table",
    "similarity_table",
    "surrogate_table",
]

Array = NDArray[np.float64]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _plain(value: float) -> float | None:
    """A float for JSON: NaN as None."""
    value = float(value)
    return None if math.isnan(value) else value


@dataclass(frozen=True)
class MeanStd:
    """A table cell: the mean ± std of a statistic over ``n`` tiles.

    Shown as ``"0.812 ± 0.040"``, followed by ``" (n=3)"`` when the statistic
    is defined on fewer tiles (``n``) than the table's caption counts
    (``of``): e.g. a concept absent from most tiles. CSV and :meth:`Table.to_dict`
    keep the mean, std and n as numbers at full precision.

    Attributes:
        mean (float): the mean (NaN where never defined).
        std (float): the standard deviation.
        n (int): tiles the statistic is defined on.
        of (int): tiles the table is over.
    """

    mean: float
    std: float
    n: int
    of: int

    def __str__(self) -> str:
        if math.isnan(self.mean):
            return "nan" if self.n == 0 else f"nan (n={self.n})"
        text = f"{self.mean:.3f} ± {self.std:.3f}"
        return text if self.n >= self.of else f"{text} (n={self.n})"

    def to_dict(self) -> dict[str, Any]:
        """``{"mean", "std", "n"}``, NaN as None."""
        return {"mean": _plain(self.mean), "std": _plain(self.std), "n": int(self.n)}


def _pm(mean: float, std: float, n: int, of: int) -> MeanStd:
    return MeanStd(float(mean), float(std), int(n), int(of))


@dataclass(frozen=True)
class Table:
    """A small table with named columns: markdown, HTML, CSV and dict views.

    Attributes:
        columns (list[str]): column names.
        rows (list[list]): rows of values (numbers or text).
        title (str): a caption.
    """

    columns: list[str]
    rows: list[list[Any]]
    title: str = ""

    def with_concept_names(self, names: Sequence[str]) -> Table:
        """The same table with ``concept j`` (in the columns and the cells) shown as ``names[j]``.

        Returns:
            *Table*: a new table.
        """
        mapping = {f"concept {j}": str(n) for j, n in enumerate(names)}
        columns = [mapping.get(c, c) for c in self.columns]
        rows = [[mapping.get(v, v) if isinstance(v, str) else v for v in row] for row in self.rows]
        return Table(columns, rows, self.title)

    def to_markdown(self) -> str:
        """The table as GitHub-flavoured markdown (numbers to 3 decimals)."""
        lines = [f"**{self.title}**", ""] if self.title else []
        lines.append("| " + " | ".join(_cell(c) for c in self.columns) + " |")
        lines.append("|" + "|".join(" --- " for _ in self.columns) + "|")
        lines += ["| " + " | ".join(_cell(_fmt(v)) for v in row) + " |" for row in self.rows]
        return "\n".join(lines)

    def to_html(self) -> str:
        """The table as an HTML ``<table>`` (numbers to 3 decimals, text escaped)."""
        cells = "".join(f"<th>{html.escape(str(c))}</th>" for c in self.columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
            for row in self.rows
        )
        caption = f"<caption>{html.escape(self.title)}</caption>" if self.title else ""
        return f"<table>{caption}<thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"

    def to_csv(self) -> str:
        """The table as CSV text (full precision).

        A column of :class:`MeanStd` cells becomes three: ``<column> mean``,
        ``<column> std`` and ``<column> n``.
        """
        spread = [
            any(isinstance(row[j], MeanStd) for row in self.rows) for j in range(len(self.columns))
        ]
        header: list[str] = []
        for column, wide in zip(self.columns, spread, strict=True):
            header += [f"{column} mean", f"{column} std", f"{column} n"] if wide else [column]
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(safe_row(header))
        for row in self.rows:
            cells: list[Any] = []
            for value, wide in zip(row, spread, strict=True):
                if isinstance(value, MeanStd):
                    cells += [repr(float(value.mean)), repr(float(value.std)), value.n]
                else:
                    cells += [value, "", ""] if wide else [value]
            writer.writerow(safe_row(cells))  # a concept name is never a formula
        return buffer.getvalue()

    def to_dict(self) -> dict[str, Any]:
        """``{"title", "columns", "rows"}`` with JSON-compatible values (NaN as None).

        A :class:`MeanStd` cell becomes ``{"mean", "std", "n"}``.
        """

        def clean(v: Any) -> Any:
            if isinstance(v, MeanStd):
                return v.to_dict()
            if isinstance(v, (float, np.floating)):
                return _plain(float(v))
            if isinstance(v, np.integer):
                return int(v)
            return v

        return {
            "title": self.title,
            "columns": list(self.columns),
            "rows": [[clean(v) for v in row] for row in self.rows],
        }

    def __str__(self) -> str:
        return self.to_markdown()


def _concept_columns(k: int) -> list[str]:
    return ["", *(f"concept {j}" for j in range(k))]


def similarity_table(matrix: Array) -> Table:
    """Fig. 4, left: the K x K cosine similarities of the concept vectors.

    Args:
        matrix (ndarray): K x K similarities.

    Returns:
        *Table*: one row per concept.
    """
    k = matrix.shape[0]
    rows = [[f"concept {i}", *(float(matrix[i, j]) for j in range(k))] for i in range(k)]
    return Table(_concept_columns(k), rows, "Cosine similarity of concept vectors")


def correlation_table(
    mean: Array, std: Array, n_tiles: int, counts: NDArray[Any] | None = None
) -> Table:
    """Fig. 4, right: "mean ± std" of the within-tile weight correlations per pair.

    Args:
        mean (ndarray): K x K mean correlations (NaN where never defined).
        std (ndarray): K x K standard deviations.
        n_tiles (int): the tiles passed, for the caption.
        counts (ndarray, optional): K x K tiles each pair's correlation is
                    defined on (both concepts vary there); a cell over fewer
                    tiles than ``n_tiles`` shows its count.
                    Default: None (every pair over ``n_tiles``)

    Returns:
        *Table*: one row per concept, :class:`MeanStd` cells.
    """
    k = mean.shape[0]
    n = np.full((k, k), n_tiles) if counts is None else counts
    rows = [
        [f"concept {i}", *(_pm(mean[i, j], std[i, j], n[i, j], n_tiles) for j in range(k))]
        for i in range(k)
    ]
    title = f"Correlation of concept weights within tiles (mean ± std over {n_tiles} tiles)"
    return Table(_concept_columns(k), rows, title)


def surrogate_table(
    coefficients: Array,
    metrics: Mapping[str, float],
    *,
    feature: str,
    n_train: int,
    n_test: int,
    grouped: bool,
    test_labels: Sequence[int] = (0, 1),
) -> Table:
    """Table 1: the surrogate's standardised coefficients, then its held-out metrics.

    Args:
        coefficients (ndarray): K coefficients.
        metrics (Mapping[str, float]): metric name to value.
        feature (str): the per-tile concept feature, for the caption.
        n_train (int): training tiles, for the caption.
        n_test (int): held-out tiles, for the caption.
        grouped (bool): whether the split was by group, for the caption.
        test_labels (Sequence[int], optional): the labels among the held-out
                    tiles; with one only, the caption says which metrics are
                    undefined there.
                    Default: ``(0, 1)``

    Returns:
        *Table*: columns ``term`` and ``value``.
    """
    rows: list[list[Any]] = [[f"concept {j}", float(c)] for j, c in enumerate(coefficients)]
    rows += [[name, value] for name, value in metrics.items()]
    split = ", split by group)" if grouped else ")"
    title = (
        f"Surrogate logistic regression on per-tile concept '{feature}' "
        f"({n_train} train / {n_test} held-out tiles{split}"
    )
    if len(test_labels) < 2:
        title += (
            f"; the held-out tiles all have label {test_labels[0]}: roc_auc and the metrics "
            "that need the other label are undefined (nan)"
        )
    return Table(["term", "value"], rows, title)


def agreement_table(
    overall: Mapping[str, Array],
    by_label: Sequence[tuple[int, int, Mapping[str, Array]]],
    name: str,
) -> Table:
    """Table 2: IoU with the map's positive region, and correlation per predicted label.

    Args:
        overall (Mapping[str, ndarray]): ``iou_mean``/``iou_std``/``iou_n`` (K each) over
                    all ``n`` tiles.
        by_label (Sequence[tuple[int, int, Mapping]]): per predicted label, its value, its
                    number of tiles and its ``corr_mean``/``corr_std``/``corr_n`` (K each).
        name (str): what the concepts were compared with.

    Returns:
        *Table*: one row per concept, :class:`MeanStd` cells (a cell over fewer
        tiles than its column shows its count).
    """
    total = sum(count for _, count, _ in by_label)
    columns = ["concept", f"IoU with {name} > 0"]
    columns += [f"corr. with {name} (label {v}, {count} tiles)" for v, count, _ in by_label]
    rows = []
    for j in range(len(overall["iou_mean"])):
        iou = _pm(overall["iou_mean"][j], overall["iou_std"][j], overall["iou_n"][j], total)
        row: list[Any] = [f"concept {j}", iou]
        row += [
            _pm(stats["corr_mean"][j], stats["corr_std"][j], stats["corr_n"][j], count)
            for _, count, stats in by_label
        ]
        rows.append(row)
    return Table(columns, rows, f"Agreement of concepts with {name} (mean ± std over tiles)")


def _cell(text: str) -> str:
    """A markdown table cell: a ``|`` in a concept name would end the cell."""
    return str(text).replace("|", "\\|")
