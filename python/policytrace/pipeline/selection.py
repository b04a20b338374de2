"""Which pairs an action is about (repair, curation), chosen from a finished run's pairs, and the
random selections of the same kind that a causal check compares it with.

A :class:`Selection` is made one way: the top K (or top fraction) by a named column, every pair
at or above a threshold of a column, an explicit id list, or whole bins of a pair column (a
category, a source, a taxonomy). :func:`matched_random` draws pairs at random within the same
bins, as many from each bin as the selection holds there, so a control differs from the
selection only in which pairs of a kind were taken.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

from ..errors import InvalidValueError


@dataclass(frozen=True)
class Selection:
    """The selected pair ids (in the order chosen) and how they were chosen."""

    ids: tuple[str, ...]
    how: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)


def _column(pairs: pl.DataFrame, name: str) -> pl.Series:
    if name not in pairs.columns:
        raise InvalidValueError(f"the run's pairs have no column '{name}' (columns: {', '.join(pairs.columns)})")
    return pairs[name]


def _numeric(pairs: pl.DataFrame, name: str) -> pl.Series:
    col = _column(pairs, name)
    if not col.dtype.is_numeric():
        raise InvalidValueError(f"column '{name}' is {col.dtype}, not numeric: it cannot rank pairs")
    return col


def _nonempty(ids: list[str], how: dict) -> Selection:
    if not ids:
        raise InvalidValueError(f"the selection {how} holds no pair; nothing to act on")
    return Selection(tuple(ids), how)


def select(pairs: pl.DataFrame, *, top: int | None = None, fraction: float | None = None, by: str = "suspicion",
           threshold: float | None = None, ids: list[str] | None = None, bins: list[str] | None = None,
           bin_column: str = "category", id_column: str = "pair_id") -> Selection:
    """One selection of ``pairs`` (a run's ``pairs.parquet`` frame, joined with whatever pair
    columns ``bins`` name): exactly one of ``top``, ``fraction``, ``threshold``, ``ids``, ``bins``.
    Ranking by ``by`` is descending, nulls last, ties broken by pair id."""
    given = {k: v for k, v in dict(top=top, fraction=fraction, threshold=threshold, ids=ids, bins=bins).items()
             if v is not None}
    if len(given) != 1:
        raise InvalidValueError(f"give exactly one way to select pairs (top, fraction, threshold, ids, bins); got "
                                f"{sorted(given) or 'none'}")
    all_ids = _column(pairs, id_column).cast(pl.Utf8)
    if ids is not None:
        return _by_ids(all_ids, list(ids))
    if bins is not None:
        return _by_bins(pairs, all_ids, list(bins), bin_column)
    ranked = pairs.with_columns(all_ids.alias("_id"), _numeric(pairs, by).alias("_by")).sort(
        ["_by", "_id"], descending=[True, False], nulls_last=True)
    if threshold is not None:
        chosen = ranked.filter(pl.col("_by") >= threshold)["_id"].to_list()
        return _nonempty(chosen, {"threshold": threshold, "by": by})
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise InvalidValueError(f"fraction {fraction} must be in (0, 1]")
        k = max(1, int(round(fraction * pairs.height)))
    else:
        k = top
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= pairs.height:
        raise InvalidValueError(f"top {k} must be between 1 and the run's {pairs.height} pairs")
    return _nonempty(ranked.head(k)["_id"].to_list(), {"top": k, "by": by, **({"fraction": fraction} if fraction else {})})


def _by_ids(all_ids: pl.Series, ids: list[str]) -> Selection:
    known = set(all_ids.to_list())
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise InvalidValueError(f"{len(unknown)} selected ids are not pairs of the run: {unknown[:10]}")
    if len(set(ids)) != len(ids):
        raise InvalidValueError("the id list names a pair twice")
    return _nonempty(ids, {"ids": len(ids)})


def _by_bins(pairs: pl.DataFrame, all_ids: pl.Series, bins: list[str], column: str) -> Selection:
    values = _column(pairs, column).cast(pl.Utf8)
    unknown = sorted(set(bins) - set(values.to_list()))
    if unknown:
        raise InvalidValueError(f"bins {unknown} are not values of column '{column}' "
                                f"(values: {sorted(set(values.drop_nulls().to_list()))[:20]})")
    chosen = [i for i, v in zip(all_ids.to_list(), values.to_list()) if v in set(bins)]
    return _nonempty(chosen, {"bins": bins, "column": column})


def matched_random(pairs: pl.DataFrame, sel: Selection, seed: int, strata: str = "category",
                   id_column: str = "pair_id") -> Selection:
    """As many pairs as ``sel`` holds in each value of ``strata``, drawn at random (``seed``)
    from that stratum's other pairs (from all of them when too few others remain)."""
    ids = _column(pairs, id_column).cast(pl.Utf8).to_list()
    strat = _column(pairs, strata).cast(pl.Utf8).to_list()
    rng = np.random.default_rng(seed)
    chosen, selected = [], set(sel.ids)
    by_stratum: dict[str | None, list[str]] = {}
    for i, s in zip(ids, strat):
        by_stratum.setdefault(s, []).append(i)
    need: dict[str | None, int] = {}
    for i, s in zip(ids, strat):
        if i in selected:
            need[s] = need.get(s, 0) + 1
    for s in sorted(need, key=str):
        others = [i for i in by_stratum[s] if i not in selected]
        pool = others if len(others) >= need[s] else by_stratum[s]
        chosen += [pool[j] for j in sorted(rng.choice(len(pool), size=need[s], replace=False))]
    return Selection(tuple(chosen), {"random": seed, "matched_on": strata, "size": len(chosen)})
