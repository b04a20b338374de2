"""One frame of a run's pairs to select and bin by: ``pairs.parquet`` (the attributions and the
curator's ranking) joined with the pair's own fields (category, label, flag) and every scalar
column of the user's pair file the run does not already have (a source, a taxonomy, ...)."""

from __future__ import annotations

import polars as pl

from ...errors import InvalidValueError
from ..rundir import RunDir
from ..sources import read_records
from ..stages import BaseState

SCALARS = (str, int, float, bool)


def pair_table(rd: RunDir, state: BaseState) -> pl.DataFrame:
    pairs = rd.read_parquet("pairs.parquet")
    own = state.inputs.pairs
    flag = state.inputs.behaviour.flag
    keep = [c for c in ("category", "label", flag) if c in own.columns and c not in pairs.columns]
    if keep:
        pairs = pairs.join(own.select(pl.col("id").alias("pair_id"), *keep), on="pair_id", how="left")
    cfg = state.cfg
    source = cfg.data.pairs or state.inputs.behaviour.shipped("pairs")
    rows = read_records(source, "pair", cfg.data.split).rows
    key = cfg.data.id_column
    run_ids = set(pairs["pair_id"].to_list())
    extra: dict[str, dict[str, object]] = {}
    for r in rows:
        rid = str(r.get(key))
        if rid not in run_ids:
            continue
        for c, v in r.items():
            if c in pairs.columns or c == key or not isinstance(v, SCALARS):
                continue
            extra.setdefault(c, {})[rid] = v
    for c, values in sorted(extra.items()):
        if c in pairs.columns:
            continue
        col = [values.get(i) for i in pairs["pair_id"].to_list()]
        try:
            pairs = pairs.with_columns(pl.Series(c, col, strict=False))
        except (TypeError, pl.exceptions.PolarsError):
            pairs = pairs.with_columns(pl.Series(c, [None if v is None else str(v) for v in col], dtype=pl.Utf8))
    if pairs.height == 0:
        raise InvalidValueError(f"{rd.path} holds no pairs")
    return pairs
