"""Probe prompts and SFT pairs: loading, validation, and the shipped offline dataset.

Probes (JSONL or Parquet): ``id``, ``prompt``, ``category``, optional ``harmful`` (bool).
Pairs (JSONL or Parquet): ``id``, ``prompt``, ``response``, ``category``, ``label``
(e.g. ``refusal`` / ``compliance``), optional ``harmful``.
Malformed rows are reported with their line numbers; ids must be unique; a prompt that is both
a probe and a training pair is an error (it would leak the training signal into the probe
set: the SMDA release had three such leaks).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import polars as pl

from .errors import ConfigError, EmptyInputError, InvalidValueError

PROBE_FIELDS = {"id": str, "prompt": str, "category": str}
PAIR_FIELDS = {"id": str, "prompt": str, "response": str, "category": str, "label": str}


class DataError(InvalidValueError):
    """A probe or pair file is malformed (names the file and line)."""


@dataclass(frozen=True)
class Dataset:
    probes: pl.DataFrame
    pairs: pl.DataFrame


def shipped_path(name: str) -> Path:
    """Path of a file of the dataset shipped with policytrace (``probes.jsonl``, ``pairs.jsonl``)."""
    return Path(str(resources.files("policytrace").joinpath("data", name)))


def _read_rows(path: Path, required: dict, kind: str) -> list[dict]:
    if not path.exists():
        raise ConfigError(f"{kind} file not found: {path}")
    rows: list[dict] = []
    if path.suffix.lower() == ".parquet":
        frame = pl.read_parquet(path)
        rows = frame.to_dicts()
        where = [f"row {i}" for i in range(len(rows))]
    elif path.suffix.lower() in (".jsonl", ".json"):
        where = []
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
                where.append(f"line {lineno}")
    else:
        raise ConfigError(f"{kind} file must be .jsonl or .parquet: {path}")
    if not rows:
        raise EmptyInputError(f"{kind} file {path} has no rows")
    seen: dict[str, str] = {}
    for row, at in zip(rows, where):
        for key, typ in required.items():
            if key not in row or row[key] is None:
                raise DataError(f"{path} {at}: missing field '{key}'")
            if not isinstance(row[key], typ):
                raise DataError(f"{path} {at}: field '{key}' must be a string, got {row[key]!r}")
            if typ is str and not row[key].strip():
                raise DataError(f"{path} {at}: field '{key}' is empty")
        if "harmful" in row and row["harmful"] is not None and not isinstance(row["harmful"], bool):
            raise DataError(f"{path} {at}: field 'harmful' must be true/false, got {row['harmful']!r}")
        if row["id"] in seen:
            raise DataError(f"{path} {at}: duplicate id '{row['id']}' (first at {seen[row['id']]})")
        seen[row["id"]] = at
    return rows


def _frame(rows: list[dict], fields: dict) -> pl.DataFrame:
    """The validated rows as a frame: the required string fields, then the optional flag."""
    columns = {key: [r[key] for r in rows] for key in fields} | {"harmful": [r.get("harmful") for r in rows]}
    return pl.DataFrame(columns, schema={key: pl.Utf8 for key in fields} | {"harmful": pl.Boolean})


def load_probes(path: str | Path) -> pl.DataFrame:
    return _frame(_read_rows(Path(path), PROBE_FIELDS, "probe"), PROBE_FIELDS)


def load_pairs(path: str | Path) -> pl.DataFrame:
    return _frame(_read_rows(Path(path), PAIR_FIELDS, "pair"), PAIR_FIELDS)


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


def load_dataset(probes: str | Path | None = None, pairs: str | Path | None = None) -> Dataset:
    """Load (and cross-check) probes and pairs; ``None`` means the shipped files."""
    p = load_probes(probes if probes is not None else shipped_path("probes.jsonl"))
    q = load_pairs(pairs if pairs is not None else shipped_path("pairs.jsonl"))
    check_overlap(p, q)
    return Dataset(p, q)
