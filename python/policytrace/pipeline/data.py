"""Probe prompts and SFT pairs: loading, validation, and the behaviours' shipped datasets.

Files come as people store them (:mod:`.sources`: JSONL, Parquet, Arrow, shard folders,
``datasets`` folders) with rows in any of the usual layouts (:mod:`.formats`: flat, chat
``messages``, TRL prompt/completion); ``[data]`` maps the column names. Probes have ``id``,
``category``, the behaviour's flag column and a prompt (or messages); pairs have ``id``,
``category``, ``label``, optionally the flag, and their conversation.

Everything the behaviour must understand is checked here, before any model work: a flag value
or a pair label it does not know stops the load with the values found and the keys that
declare them (``behaviour.on_unknown = "warn"`` turns that into a warning naming how many
pairs go unjudged), and so does data that would leave the suspicion column empty (probes
without the flag, no pair label with a direction). Malformed rows are reported with their line
or row; ids must be unique; a prompt that is both a probe and a training pair is an error (it
would leak the training signal into the probe set: the SMDA release had three such leaks).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ..behaviours import DEFAULT, Behaviour, get as get_behaviour
from ..errors import ConfigError, DataError
from ..model.chat import ChatPair
from .config import DataCfg
from .formats import Conversation, layout, pair_conversation, probe_conversation
from .sources import Records, read_records

PROBE_FIELDS = ("id", "prompt", "category")
PAIR_FIELDS = ("id", "prompt", "response", "category", "label")
MESSAGE = pl.Struct({"role": pl.Utf8, "content": pl.Utf8})


@dataclass(frozen=True)
class Dataset:
    """The validated probes and pairs of a run, with the flag column of their behaviour and
    the warnings their load gave (``behaviour.on_unknown = "warn"``)."""

    probes: pl.DataFrame
    pairs: pl.DataFrame
    flag: str
    warnings: tuple[str, ...] = ()


@dataclass
class _Unknown:
    """Values the behaviour does not know, with their counts and where each first is."""

    count: Counter
    first: dict

    @classmethod
    def empty(cls) -> _Unknown:
        return cls(Counter(), {})

    def add(self, value: object, at: str) -> None:
        key = repr(value)
        self.count[key] += 1
        self.first.setdefault(key, at)

    def listing(self, noun: str) -> str:
        return ", ".join(f"{k} ({n} {noun}{'s' if n > 1 else ''}, first at {self.first[k]})"
                         for k, n in self.count.most_common())


def _behaviour(behaviour: Behaviour | None) -> Behaviour:
    return behaviour if behaviour is not None else get_behaviour(DEFAULT)


def shipped_path(name: str, behaviour: Behaviour | None = None) -> Path:
    """Path of a shipped file (``probes.jsonl``, ``pairs.jsonl``) of a behaviour."""
    return _behaviour(behaviour).shipped(Path(name).stem)


def _field(row: dict, key: str, column: str, where: str) -> str:
    value = row.get(column)
    if value is None:
        raise DataError(f"{where}: missing field '{column}'" + (f" (the {key})" if column != key else ""))
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{column}' must be a string, got {value!r}")
    if not value.strip():
        raise DataError(f"{where}: field '{column}' is empty")
    return value


def _row(raw: dict, where: str, kind: str, cfg: DataCfg, fmt: str, b: Behaviour, flags: _Unknown) -> dict:
    """One validated row: its fields under the pipeline's names, the flag's side, the conversation."""
    keys = ("id", "category", "label") if kind == "pair" else ("id", "category")
    out: dict = {k: _field(raw, k, getattr(cfg, f"{k}_column"), where) for k in keys}
    conv = (pair_conversation if kind == "pair" else probe_conversation)(raw, where, cfg, fmt)
    try:
        out[b.flag] = b.flag_side(raw.get(b.flag))
    except ValueError:
        flags.add(raw.get(b.flag), where)
        out[b.flag] = None
    out["conversation"] = conv
    return out


def _toml(value: object) -> str:
    return json.dumps(value)


def _flag_message(path: Path, b: Behaviour, flags: _Unknown, noun: str) -> str:
    return (f"{path}: field '{b.flag}' has values the {b.name} behaviour does not know: {flags.listing(noun)}; its "
            f"flagged side is {_toml(b.flagged_value)} and the other {_toml(b.unflagged_value)}. Set "
            "behaviour.flagged_value and behaviour.unflagged_value to your values (or behaviour.flag to another column)")


def _label_message(path: Path, b: Behaviour, labels: _Unknown) -> str:
    return (f"{path}: pair labels the {b.name} behaviour does not know: {labels.listing('pair')}; it knows "
            f"{b.known_labels()}. Declare what each label means: behaviour.raising_labels = [...] (training "
            f"meant to raise the {b.score_name}), behaviour.lowering_labels = [...] (meant to lower it), "
            "behaviour.neutral_labels = [...] (no intended direction)")


def _unknown(message: str, warn: list[str] | None, consequence: str) -> None:
    """An error, or with ``behaviour.on_unknown = "warn"`` a warning saying what it costs."""
    if warn is None:
        raise DataError(message + '; or set behaviour.on_unknown = "warn" to go on without them')
    warn.append(f"{message}; {consequence}")


def _rows(records: Records, kind: str, b: Behaviour, cfg: DataCfg, warn: list[str] | None) -> list[dict]:
    """Every row validated; flag values and labels the behaviour does not know are an error
    (a warning into ``warn``)."""
    columns = set().union(*(r.keys() for r in records.rows))
    fmt = layout(columns, cfg, kind, records.path)
    flags, labels, seen, out = _Unknown.empty(), _Unknown.empty(), {}, []
    for raw, at in zip(records.rows, records.where):
        row = _row(raw, f"{records.path} {at}", kind, cfg, fmt, b, flags)
        if row["id"] in seen:
            raise DataError(f"{records.path} {at}: duplicate id '{row['id']}' (first at {seen[row['id']]})")
        seen[row["id"]] = at
        if kind == "pair" and b.label_direction(row["label"]) is None:
            labels.add(row["label"], at)
        out.append(row)
    if flags.count:
        _unknown(_flag_message(records.path, b, flags, kind), warn, f"{sum(flags.count.values())} {kind}s count as "
                 "having no flag")
    if labels.count:
        n = sum(labels.count.values())
        _unknown(_label_message(records.path, b, labels), warn, f"{n} of {len(out)} pairs get no suspicion")
    return out


def _messages_column(convs: list[Conversation]) -> pl.Series:
    return pl.Series("messages", [[{"role": r, "content": c} for r, c in cv.messages] for cv in convs],
                     dtype=pl.List(MESSAGE))


def _frame(rows: list[dict], kind: str, flag: str) -> pl.DataFrame:
    """The rows as a frame: the fields, the flag, and, when some conversation is more than a
    prompt (and a response), the messages (and the trained turns) of every row."""
    convs = [r["conversation"] for r in rows]
    fields = PAIR_FIELDS if kind == "pair" else PROBE_FIELDS
    cols = {k: [r[k] for r in rows] for k in fields if k not in ("prompt", "response")}
    cols["prompt"] = [cv.prompt for cv in convs]
    if kind == "pair":
        cols["response"] = [cv.response for cv in convs]
    frame = pl.DataFrame({k: cols[k] for k in fields}, schema={k: pl.Utf8 for k in fields}).with_columns(
        pl.Series(flag, [r[flag] for r in rows], dtype=pl.Boolean))
    if all(cv.is_flat for cv in convs):
        return frame  # what a flat file always gave
    extra = [_messages_column(convs)]
    if kind == "pair":
        extra.append(pl.Series("train_turns", [list(cv.trained) for cv in convs], dtype=pl.List(pl.Int64)))
    return frame.with_columns(extra)


def _load(path: str | Path, kind: str, behaviour: Behaviour | None, cfg: DataCfg | None,
          warn: list[str] | None = None) -> pl.DataFrame:
    b, cfg = _behaviour(behaviour), cfg if cfg is not None else DataCfg()
    return _frame(_rows(read_records(path, kind, cfg.split), kind, b, cfg, warn), kind, b.flag)


def load_probes(path: str | Path, behaviour: Behaviour | None = None, cfg: DataCfg | None = None) -> pl.DataFrame:
    """A probe file (flag values the behaviour does not know are an error)."""
    return _load(path, "probe", behaviour, cfg)


def load_pairs(path: str | Path, behaviour: Behaviour | None = None, cfg: DataCfg | None = None) -> pl.DataFrame:
    """A pair file (flag values and labels the behaviour does not know are an error)."""
    return _load(path, "pair", behaviour, cfg)


def chat_pair(row: dict) -> ChatPair:
    """A pair row's conversation and trained turns, as the update engine takes them (a row
    without messages, such as a planted pair, is flat)."""
    msgs = row.get("messages")
    if msgs is None:
        return ChatPair.flat(row["prompt"], row["response"], row["id"])
    return ChatPair(row["id"], tuple((m["role"], m["content"]) for m in msgs), tuple(row["train_turns"]))


def probe_chat(frame: pl.DataFrame) -> list[str | list[dict]]:
    """Each probe's prompt, or its conversation when the probes have messages."""
    if "messages" not in frame.columns:
        return frame["prompt"].to_list()
    return [list(m) for m in frame["messages"].to_list()]


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _user_turns(frame: pl.DataFrame) -> list[list[str]]:
    if "messages" not in frame.columns:
        return [[p] for p in frame["prompt"].to_list()]
    return [[m["content"] for m in msgs if m["role"] == "user"] for msgs in frame["messages"].to_list()]


def check_overlap(probes: pl.DataFrame, pairs: pl.DataFrame) -> None:
    """Refuse prompts that are both probes and training pairs (after case/space folding; every
    user turn of a conversation counts)."""
    probe_ids = {_norm(p): i for turns, i in zip(_user_turns(probes), probes["id"]) for p in turns}
    leaks = [(i, probe_ids[_norm(p)]) for turns, i in zip(_user_turns(pairs), pairs["id"]) for p in turns
             if _norm(p) in probe_ids]
    if leaks:
        shown = ", ".join(f"pair {a} = probe {b}" for a, b in leaks[:5])
        raise DataError(
            f"{len(leaks)} training prompt(s) also appear in the probe set ({shown}); "
            "remove them from one side so the probes measure held-out behaviour"
        )


def _judgeable(probes: pl.DataFrame, pairs: pl.DataFrame, b: Behaviour, where: tuple, warn: list[str] | None) -> None:
    """Refuse data that would leave the suspicion column empty: probes without both sides of
    the flag, or no pair whose label has a direction."""
    flag = probes[b.flag]
    if flag.null_count() or flag.n_unique() < 2:
        missing = flag.null_count()
        what = (f"{missing} of {probes.height} probes have no `{b.flag}` value" if missing else
                f"every probe is on the {b.side_name(bool(flag[0]))} side of `{b.flag}`")
        _unknown(f"{where[0]}: {what}; a pair is judged on the flagged or the other probes, so the suspicion "
                 f"column would be empty. Give every probe a `{b.flag}` of {_toml(b.flagged_value)} or "
                 f"{_toml(b.unflagged_value)}, some of each (behaviour.flag names the column)", warn,
                 f"no pair gets a suspicion ({pairs.height} pairs)")
    directed = [lab for lab in pairs["label"].to_list() if b.label_direction(lab)]
    if not directed:
        _unknown(f"{where[1]}: no pair has a label meant to raise or lower the {b.score_name} ({b.known_labels()}), "
                 "so the suspicion column would be empty; declare behaviour.raising_labels / lowering_labels", warn,
                 f"no pair gets a suspicion ({pairs.height} pairs)")


def _source(given: str | Path | None, b: Behaviour, kind: str) -> str | Path:
    if given is not None:
        return given
    shipped = b.shipped(kind)
    if not shipped.exists():
        raise ConfigError(f"the {b.name} behaviour ships no {kind}: set data.{kind} to your file")
    return shipped


def load_dataset(probes: str | Path | None = None, pairs: str | Path | None = None,
                 behaviour: Behaviour | None = None, cfg: DataCfg | None = None,
                 on_unknown: str = "error") -> Dataset:
    """Load (and cross-check) probes and pairs; ``None`` means the behaviour's shipped files.
    ``on_unknown = "warn"``: what the behaviour does not know becomes the dataset's warnings."""
    b = _behaviour(behaviour)
    warn: list[str] | None = [] if on_unknown == "warn" else None
    paths = (_source(probes, b, "probes"), _source(pairs, b, "pairs"))
    p = _load(paths[0], "probe", b, cfg, warn)
    q = _load(paths[1], "pair", b, cfg, warn)
    check_overlap(p, q)
    _judgeable(p, q, b, paths, warn)
    return Dataset(p, q, b.flag, tuple(warn or ()))


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
