"""Cells, tables and charts: the plain data the report's templates lay out (no markup).

Each :class:`Cell` keeps its raw value (what a numeric column sorts by) beside the text shown, so
formatting is decided here, once, and escaping once, by Jinja. docs/design.md, module table.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import polars as pl

MISSING = "–"
PAIR_LINK = {"pair_id": "pair"}
FEATURE_LINK = {"feature_id": "feature", "dominant_feature": "feature"}


@dataclass(frozen=True)
class Cell:
    value: Any
    """The raw value (None when missing): numeric columns sort by it."""
    text: str
    """What the cell shows."""
    numeric: bool = False
    flag: bool = False
    """A true boolean, shown highlighted (e.g. a significant test)."""
    anchor: str | None = None
    """Id of the drill-down panel this cell opens (``pair-<id>``, ``feature-<id>``)."""


@dataclass(frozen=True)
class Table:
    columns: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    id: str | None = None
    filterable: bool = False

    @property
    def height(self) -> int:
        return len(self.rows)

    def values(self, column: str) -> list:
        """The raw values of one column, top to bottom (what tests compare)."""
        j = self.columns.index(column)
        return [r[j].value for r in self.rows]

    def texts(self, column: str) -> list[str]:
        j = self.columns.index(column)
        return [r[j].text for r in self.rows]


@dataclass(frozen=True)
class Bars:
    """Horizontal bars around zero, one per label."""

    labels: tuple[str, ...]
    values: tuple[float, ...]


@dataclass(frozen=True)
class Scatter:
    x: tuple[float, ...]
    y: tuple[float, ...]
    groups: tuple[str, ...]
    title_x: str
    title_y: str


@dataclass(frozen=True)
class Heatmap:
    values: tuple[tuple[float, ...], ...]
    rows: tuple[str, ...]
    cols: tuple[str, ...]


@dataclass(frozen=True)
class Curve:
    """Values over the layers of the mediation curve (linear x), one line per series, the best
    layer marked; the y axis spans ``lo``..``hi`` and points beyond are drawn at the edge."""

    xs: tuple[float, ...]
    series: tuple[tuple[str, tuple[float, ...]], ...]
    mark: float | None
    title_x: str
    title_y: str
    lo: float = -1.0
    hi: float = 1.5


@dataclass(frozen=True)
class LinePath:
    """The GCV score over the λ grid, with the λ used marked."""

    xs: tuple[float, ...]
    ys: tuple[float, ...]
    mark: float
    title_x: str
    title_y: str

    @property
    def drawable(self) -> bool:
        """A path needs two finite points; with λ given there is none."""
        return sum(1 for x, y in zip(self.xs, self.ys) if math.isfinite(y) and x > 0) >= 2


@dataclass(frozen=True)
class Link:
    text: str
    anchor: str


def slug(x) -> str:
    """An id-safe form of a pair or feature id (the part after ``pair-`` / ``feature-``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(x))


def anchor(kind: str, value) -> str:
    return f"{kind}-{slug(value)}"


def finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fmt(v, floats: int = 3) -> str:
    """How one value is shown: floats to ``floats`` significant digits, missing and non-finite
    as a dash, booleans as yes/no."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return MISSING
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{floats}g}"
    return str(v)


def _cell(v, numeric: bool, link: str | None, floats: int) -> Cell:
    if link is not None and v is not None:
        return Cell(v, str(v), numeric, anchor=anchor(link, v))
    return Cell(v, fmt(v, floats), numeric, flag=v is True)


def table(frame: pl.DataFrame, links: dict | None = None, tid: str | None = None, filterable: bool = False,
          floats: int = 3) -> Table:
    """A frame as a table; ``links`` maps a column to the panel kind its values open. Numeric
    is decided by the column's dtype, so a missing value does not turn a number column to text."""
    links = links or {}
    numeric = [frame.schema[c].is_numeric() for c in frame.columns]
    rows = tuple(tuple(_cell(v, n, links.get(c), floats) for c, v, n in zip(frame.columns, r, numeric))
                 for r in frame.iter_rows())
    return Table(tuple(frame.columns), rows, tid, filterable and tid is not None)
