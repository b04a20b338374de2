"""Reading probe and pair files as people store them, into plain rows with their locations.

A path is a JSONL file (``.jsonl`` or ``.json``, one object a line), a Parquet file, an Arrow
IPC file (``.arrow``, ``.feather``, ``.ipc``; the file or the stream form), a folder of Parquet
or Arrow shards (read in name order, as the hub's ``data/train-00000-of-00004.parquet``; one
split's when the folder holds several, ``data.split``), or a folder written by ``datasets``'
``save_to_disk`` (a Dataset, or one split of a DatasetDict).
Only the last needs the ``datasets`` package, imported then and reading the local folder
alone. Every row keeps where it came from ("line 3", "row 7", "train-00001.parquet row 7"), so
an error names the file and the row.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from ..errors import ConfigError, DataError, EmptyInputError

JSONL = (".jsonl", ".json")
PARQUET = (".parquet",)
ARROW = (".arrow", ".feather", ".ipc")
SHARD = re.compile(r"^(\w+?)-\d+-of-\d+\.")
SUFFIXES = "a .jsonl, .parquet or .arrow file, a folder of .parquet or .arrow shards, or a datasets save_to_disk folder"


@dataclass(frozen=True)
class Records:
    """A file's rows (plain dicts) and where each is, for messages."""

    rows: list[dict]
    where: list[str]
    path: Path


def _jsonl(path: Path) -> Records:
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
    return Records(rows, where, path)


def _parquet_rows(path: Path) -> list[dict]:
    try:
        return pl.read_parquet(path).to_dicts()
    except Exception as e:  # polars raises ComputeError / OSError / its own hierarchy
        raise DataError(f"{path} is not a readable Parquet file ({type(e).__name__}: {e})") from e


def _arrow_rows(path: Path) -> list[dict]:
    import pyarrow as pa

    errors = []
    for opener in (pa.ipc.open_file, pa.ipc.open_stream):  # datasets' own .arrow files are streams
        try:
            with pa.memory_map(str(path)) as source:
                return opener(source).read_all().to_pylist()
        except (pa.ArrowInvalid, OSError) as e:
            errors.append(str(e))
    raise DataError(f"{path} is not a readable Arrow IPC file ({'; '.join(errors)})")


def _table(path: Path, rows: list[dict], label: str = "") -> Records:
    return Records(rows, [f"{label}row {i}" for i in range(len(rows))], path)


def _split_of(path: Path) -> str | None:
    """The split a hub-style shard belongs to: ``train`` of ``train-00000-of-00004.parquet``."""
    m = SHARD.match(path.name)
    return m.group(1) if m else None


def _shard_files(folder: Path, kind: str, split: str) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PARQUET + ARROW)
    if not files:
        raise ConfigError(f"{kind} path {folder} is a directory without .parquet or .arrow shards and not a "
                          f"datasets save_to_disk folder; name {SUFFIXES}")
    # Shards of several splits side by side must not be read as one set of pairs.
    splits = sorted({s for s in map(_split_of, files) if s is not None})
    if split:
        files = [f for f in files if _split_of(f) == split]
        if not files:
            raise ConfigError(f"{kind} folder {folder} has no shards of split {split!r} (data.split); found {splits}")
    elif len(splits) > 1:
        raise ConfigError(f"{kind} folder {folder} holds shards of the splits {splits}: set data.split to one of them")
    return files


def _shards(folder: Path, kind: str, split: str) -> Records:
    files = _shard_files(folder, kind, split)
    rows: list[dict] = []
    where: list[str] = []
    for f in files:
        part = _parquet_rows(f) if f.suffix.lower() in PARQUET else _arrow_rows(f)
        rows += part
        where += [f"{f.name} row {i}" for i in range(len(part))]
    return Records(rows, where, folder)


def is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _saved_dataset(folder: Path, kind: str, split: str) -> Records:
    try:
        import datasets
    except ImportError as e:
        raise ConfigError(f"{kind} folder {folder} was written by datasets' save_to_disk; reading it needs the "
                          "datasets package: pip install datasets (or the model extra)") from e
    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as e:  # a damaged folder fails inside pyarrow or datasets in many ways
        raise DataError(f"{folder} is not a readable datasets folder ({type(e).__name__}: {e})") from e
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        if not split and len(names) == 1:
            split = names[0]
        if split not in ds:
            raise ConfigError(f"{kind} folder {folder} holds the splits {names}: set data.split to one of them")
        ds = ds[split]
    return _table(folder, ds.to_list())


def read_records(path: str | Path, kind: str, split: str = "") -> Records:
    """The rows of a probe or pair file or folder (module docstring), never empty."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{kind} file not found: {path}")
    suffix = path.suffix.lower()
    if path.is_dir():
        records = _saved_dataset(path, kind, split) if is_saved_dataset(path) else _shards(path, kind, split)
    elif suffix in JSONL:
        records = _jsonl(path)
    elif suffix in PARQUET:
        records = _table(path, _parquet_rows(path))
    elif suffix in ARROW:
        records = _table(path, _arrow_rows(path))
    else:
        raise ConfigError(f"{kind} file must be .jsonl or .parquet (or .arrow, a folder of shards, a datasets "
                          f"folder): {path}")
    if not records.rows:
        raise EmptyInputError(f"{kind} file {path} has no rows")
    return records


def source_files(path: str | Path) -> list[Path]:
    """The files a probe or pair path reads, in order (for its digest)."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    return sorted((p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")),
                  key=lambda p: p.relative_to(path).as_posix())
