"""One frame of a run's pairs to select and bin by: ``pairs.parquet`` (the attributions and the
curator's ranking) joined with the pair's own fields (category, label, flag) and every scalar
column of the user's pair file the run does not already have (a source, a taxonomy, ...)."""

from __future__ import annotations

import polars as pl

from ...errors import InvalidValueError
from ..rundir import RunDir
from ..sources import read_records
from ..stages import Inputs, load_inputs

SCALARS = (str, int, float, bool)


def pair_table(rd: RunDir, cfg=None, inputs: Inputs | None = None) -> pl.DataFrame:
    """The frame (module docstring) of the finished run in ``rd`` (its config and inputs read
    from the folder unless given; no model is loaded)."""
    from .. import config as cfgmod

    cfg = cfg if cfg is not None else cfgmod.load(rd.file("config.toml"))
    inputs = inputs if inputs is not None else load_inputs(cfg)
    pairs = rd.read_parquet("pairs.parquet")
    own = inputs.pairs
    flag = inputs.behaviour.flag
    keep = [c for c in ("category", "label", flag) if c in own.columns and c not in pairs.columns]
    if keep:
        pairs = pairs.join(own.select(pl.col("id").alias("pair_id"), *keep), on="pair_id", how="left")
    source = cfg.data.pairs or inputs.behaviour.shipped("pairs")
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


def ranked(table: pl.DataFrame, how: dict) -> pl.DataFrame:
    """``table`` with a ``-COLUMN`` column (the negated column) when ``how`` ranks by one, so the
    smallest values can be selected as the top ones."""
    by = how.get("by")
    if isinstance(by, str) and by.startswith("-") and by not in table.columns:
        col = by[1:]
        if col not in table.columns:
            raise InvalidValueError(f"the run's pairs have no column '{col}' (columns: {', '.join(table.columns)})")
        if not table[col].dtype.is_numeric():
            raise InvalidValueError(f"column '{col}' is {table[col].dtype}, not numeric: it cannot rank pairs")
        table = table.with_columns((-pl.col(col)).alias(by))
    return table
