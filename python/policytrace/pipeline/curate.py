"""``policytrace curate``: the run's pair file without the pairs whose measured effect most
contradicts their label (the ``suspicion`` ranking of ``pairs.parquet``). The kept pairs are
the user's own rows, as read (same columns, same conversation layout), so the curated file
runs with the same config."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from .._files import write_atomic
from ..errors import InvalidValueError
from . import config as cfgmod
from .rundir import RunDir, parquet_bytes
from .sources import read_records
from .stages import load_inputs


@dataclass(frozen=True)
class Curation:
    kept: pl.DataFrame
    dropped: pl.DataFrame
    """The dropped pairs with their suspicion and reason, most suspicious first."""
    out: Path


def curate(run_dir: str | Path, out: str | Path, drop: int | None = None, threshold: float | None = None) -> Curation:
    """Write the run's pairs minus the ``drop`` most suspicious, or minus those with suspicion
    at or above ``threshold`` (in units of the pairs' robust spread), to ``out`` (.jsonl or
    .parquet)."""
    if (drop is None) == (threshold is None):
        raise InvalidValueError("give exactly one of --drop K or --threshold T")
    out = Path(out)
    if out.suffix.lower() not in (".jsonl", ".parquet"):
        raise InvalidValueError(f"--out {out} must end in .jsonl or .parquet")
    rd = RunDir(run_dir)
    rd.complete()
    ranked = rd.read_parquet("pairs.parquet").sort("suspicion", descending=True, nulls_last=True)
    if drop is not None:
        if not 0 <= drop <= ranked.height:
            raise InvalidValueError(f"--drop {drop} must be between 0 and the run's {ranked.height} pairs")
        dropped = ranked.head(drop)
    else:
        dropped = ranked.filter(pl.col("suspicion") >= threshold)
    rows = _kept_rows(cfgmod.load(rd.file("config.toml")), set(dropped["pair_id"].to_list()))
    kept = pl.DataFrame(rows, infer_schema_length=None)
    if out.suffix.lower() == ".parquet":
        write_atomic(out, parquet_bytes(kept))
    else:
        write_atomic(out, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))
    return Curation(kept, dropped.select("pair_id", "label", "suspicion", "suspicion_reason"), out)


def _kept_rows(cfg: cfgmod.Config, dropped: set[str]) -> list[dict]:
    """The run's pairs as the user's file has them, minus ``dropped``, in the file's order."""
    inputs = load_inputs(cfg)
    run_ids = set(inputs.pairs["id"].to_list())
    source = cfg.data.pairs or inputs.behaviour.shipped("pairs")
    key = cfg.data.id_column
    return [r for r in read_records(source, "pair", cfg.data.split).rows if r[key] in run_ids and r[key] not in dropped]
