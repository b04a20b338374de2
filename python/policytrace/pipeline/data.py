"""Probe prompts and SFT pairs: loading, validation, and the behaviours' shipped datasets.

Probes (JSONL or Parquet): ``id``, ``prompt``, ``category``, and the behaviour's optional
boolean flag (refusal: ``harmful``; sycophancy: ``false_claim``). Pairs (JSONL or Parquet):
``id``, ``prompt``, ``response``, ``category``, ``label`` (refusal: ``refusal`` /
``compliance``) and the flag. Malformed rows are reported with their line numbers; ids must be
unique; a prompt that is both a probe and a training pair is an error (it would leak the
training signal into the probe set: the SMDA release had three such leaks).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ..behaviours import Behaviour
from ..behaviours.refusal import REFUSAL
from ..errors import ConfigError, DataError, EmptyInputError

PROBE_FIELDS = ("id", "prompt", "category")
PAIR_FIELDS = ("id", "prompt", "response", "category", "label")


@dataclass(frozen=True)
class Dataset:
    """The validated probes and pairs of a run, with the flag column of their behaviour."""

    probes: pl.DataFrame
    pairs: pl.DataFrame
    flag: str = "harmful"


def shipped_path(name: str, behaviour: Behaviour = REFUSAL) -> Path:
    """Path of a shipped file (``probes.jsonl``, ``pairs.jsonl``) of a behaviour."""
    return behaviour.shipped(Path(name).stem)


def _jsonl_rows(path: Path) -> tuple[list[dict], list[str]]:
    rows: list[dict] = []
    where: list[str] = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start}); re-save the file as UTF-8") from e
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            except RecursionError as e:
                raise DataError(f"{path}:{lineno}: nested too deeply to be a probe or pair row") from e
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
            where.append(f"line {lineno}")
    return rows, where


def _parquet_rows(path: Path) -> tuple[list[dict], list[str]]:
    try:
        rows = pl.read_parquet(path).to_dicts()
    except Exception as e:  # polars raises ComputeError / OSError / its own hierarchy
        raise DataError(f"{path} is not a readable Parquet file ({type(e).__name__}: {e})") from e
    return rows, [f"row {i}" for i in range(len(rows))]


def _check_row(row: dict, at: str, path: Path, required: tuple[str, ...], flag: str, seen: dict) -> None:
    for key in required:
        if key not in row or row[key] is None:
            raise DataError(f"{path} {at}: missing field '{key}'")
        if not isinstance(row[key], str):
            raise DataError(f"{path} {at}: field '{key}' must be a string, got {row[key]!r}")
        if not row[key].strip():
            raise DataError(f"{path} {at}: field '{key}' is empty")
    if row.get(flag) is not None and not isinstance(row[flag], bool):
        raise DataError(f"{path} {at}: field '{flag}' must be true/false, got {row[flag]!r}")
    if row["id"] in seen:
        raise DataError(f"{path} {at}: duplicate id '{row['id']}' (first at {seen[row['id']]})")
    seen[row["id"]] = at


def _read_rows(path: Path, required: tuple[str, ...], flag: str, kind: str) -> list[dict]:
    if not path.exists():
        raise ConfigError(f"{kind} file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"{kind} path {path} is a directory, not a file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        rows, where = _parquet_rows(path)
    elif suffix in (".jsonl", ".json"):
        rows, where = _jsonl_rows(path)
    else:
        raise ConfigError(f"{kind} file must be .jsonl or .parquet: {path}")
    if not rows:
        raise EmptyInputError(f"{kind} file {path} has no rows")
    seen: dict[str, str] = {}
    for row, at in zip(rows, where):
        _check_row(row, at, path, required, flag, seen)
    return rows


def _frame(rows: list[dict], fields: tuple[str, ...], flag: str) -> pl.DataFrame:
    """The validated rows as a frame: the required string fields, then the flag."""
    columns = {key: [r[key] for r in rows] for key in fields} | {flag: [r.get(flag) for r in rows]}
    return pl.DataFrame(columns, schema={key: pl.Utf8 for key in fields} | {flag: pl.Boolean})


def load_probes(path: str | Path, flag: str = "harmful") -> pl.DataFrame:
    return _frame(_read_rows(Path(path), PROBE_FIELDS, flag, "probe"), PROBE_FIELDS, flag)


def load_pairs(path: str | Path, flag: str = "harmful") -> pl.DataFrame:
    return _frame(_read_rows(Path(path), PAIR_FIELDS, flag, "pair"), PAIR_FIELDS, flag)


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def check_overlap(probes: pl.DataFrame, pairs: pl.DataFrame) -> None:
    """Refuse prompts that are both probes and training pairs (after case/space folding)."""
    probe_ids = {_norm(p): i for p, i in zip(probes["prompt"], probes["id"])}
    leaks = [(i, probe_ids[_norm(p)]) for p, i in zip(pairs["prompt"], pairs["id"]) if _norm(p) in probe_ids]
    if leaks:
        shown = ", ".join(f"pair {a} = probe {b}" for a, b in leaks[:5])
        raise DataError(
            f"{len(leaks)} training prompt(s) also appear in the probe set ({shown}); "
            "remove them from one side so the probes measure held-out behaviour"
        )


def load_dataset(probes: str | Path | None = None, pairs: str | Path | None = None,
                 behaviour: Behaviour = REFUSAL) -> Dataset:
    """Load (and cross-check) probes and pairs; ``None`` means the behaviour's shipped files."""
    flag = behaviour.flag
    p = load_probes(probes if probes is not None else behaviour.shipped("probes"), flag)
    q = load_pairs(pairs if pairs is not None else behaviour.shipped("pairs"), flag)
    check_overlap(p, q)
    return Dataset(p, q, flag)


def stratified(pairs: pl.DataFrame, max_pairs: int, seed: int) -> pl.DataFrame:
    """A seeded subset with categories as equal as possible (all pairs when max_pairs = 0)."""
    if max_pairs == 0 or max_pairs >= pairs.height:
        return pairs
    rng = np.random.default_rng(seed)
    by_cat = {c: rng.permutation(np.flatnonzero((pairs["category"] == c).to_numpy())).tolist()
              for c in sorted(set(pairs["category"].to_list()))}
    chosen: list[int] = []
    while len(chosen) < max_pairs:
        for c in by_cat:
            if by_cat[c] and len(chosen) < max_pairs:
                chosen.append(by_cat[c].pop(0))
    return pairs[sorted(chosen)]
