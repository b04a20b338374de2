"""Probe and pair files: the shipped dataset, row validation with line numbers, duplicate ids,
probe/pair leaks, and Parquet read the same as JSONL."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from policytrace.pipeline import data
from policytrace.errors import ConfigError, DataError, EmptyInputError, InvalidValueError

from _helpers import Re, expect

PROBE = {"id": "p1", "prompt": "Tell me a story.", "category": "benign", "harmful": False}
PAIR = {
    "id": "q1",
    "prompt": "Write a poem.",
    "response": "Roses are red.",
    "category": "benign",
    "label": "compliance",
    "harmful": False,
}


def write_jsonl(path: Path, rows) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def probe(i: int, **kw) -> dict:
    return {**PROBE, "id": f"p{i}", "prompt": f"Probe prompt number {i}.", **kw}


def pair(i: int, **kw) -> dict:
    return {**PAIR, "id": f"q{i}", "prompt": f"Pair prompt number {i}.", **kw}


def at_line(n: int) -> Re:
    return Re(rf"(line {n}\b|:{n}:)")


# --------------------------------------------------------------------------------------
# the shipped dataset
# --------------------------------------------------------------------------------------


def test_shipped_dataset_loads():
    ds = data.load_dataset()
    p, q = ds.probes, ds.pairs
    assert p.height >= 120 and q.height >= 200
    assert p.columns == ["id", "prompt", "category", "harmful"]
    assert q.columns == ["id", "prompt", "response", "category", "label", "harmful"]
    assert p["id"].n_unique() == p.height and q["id"].n_unique() == q.height
    cats = set(p["category"]) | set(q["category"])
    assert len(cats) >= 6 and "religious_stereotyping" in cats
    assert "religious_stereotyping" in set(p["category"]) and "religious_stereotyping" in set(q["category"])
    assert set(p["harmful"].drop_nulls()) == {True, False}
    assert {"refusal", "compliance"} <= set(q["label"])
    for frame, cols in ((p, ("id", "prompt", "category")), (q, ("id", "prompt", "response", "category", "label"))):
        for c in cols:
            assert frame[c].null_count() == 0
            assert all(s.strip() for s in frame[c])


def test_shipped_dataset_has_no_probe_pair_overlap():
    ds = data.load_dataset()
    fold = lambda s: " ".join(s.lower().split())  # noqa: E731
    probes = {fold(s) for s in ds.probes["prompt"]}
    pairs = {fold(s) for s in ds.pairs["prompt"]}
    assert not probes & pairs
    data.check_overlap(ds.probes, ds.pairs)  # does not raise


def test_shipped_paths_and_explicit_paths_agree():
    ds = data.load_dataset()
    p = data.load_probes(data.shipped_path("probes.jsonl"))
    q = data.load_pairs(str(data.shipped_path("pairs.jsonl")))
    assert p.equals(ds.probes) and q.equals(ds.pairs)


# --------------------------------------------------------------------------------------
# malformed rows
# --------------------------------------------------------------------------------------


def test_bad_json_reports_line(tmp_path):
    f = write_jsonl(tmp_path / "probes.jsonl", [probe(1), probe(2), '{"id": "p3", "prompt": '])
    e = expect(DataError, lambda: data.load_probes(f), at_line(3), "probes.jsonl", "JSON")
    assert isinstance(e, InvalidValueError) and isinstance(e, ValueError)


def test_line_numbers_count_blank_lines(tmp_path):
    f = write_jsonl(tmp_path / "probes.jsonl", [probe(1), "", "   ", probe(2), "not json"])
    expect(DataError, lambda: data.load_probes(f), at_line(5))
    f = write_jsonl(tmp_path / "pairs.jsonl", [pair(1), "", {k: v for k, v in pair(2).items() if k != "label"}])
    expect(DataError, lambda: data.load_pairs(f), at_line(3), "label")


def test_non_object_row(tmp_path):
    f = write_jsonl(tmp_path / "probes.jsonl", [probe(1), "[1, 2, 3]"])
    expect(DataError, lambda: data.load_probes(f), at_line(2))


@pytest.mark.parametrize("field", ["id", "prompt", "category"])
def test_probe_missing_field(tmp_path, field):
    bad = {k: v for k, v in probe(2).items() if k != field}
    f = write_jsonl(tmp_path / "probes.jsonl", [probe(1), bad])
    expect(DataError, lambda: data.load_probes(f), at_line(2), field)
    f = write_jsonl(tmp_path / "probes.jsonl", [probe(1), {**probe(2), field: None}])
    expect(DataError, lambda: data.load_probes(f), at_line(2), field)


@pytest.mark.parametrize("field", ["id", "prompt", "response", "category", "label"])
def test_pair_missing_field(tmp_path, field):
    bad = {k: v for k, v in pair(2).items() if k != field}
    f = write_jsonl(tmp_path / "pairs.jsonl", [pair(1), pair(3), bad])
    expect(DataError, lambda: data.load_pairs(f), at_line(3), field)


@pytest.mark.parametrize("value", [5, 1.5, True, ["a"], {"a": 1}])
@pytest.mark.parametrize("field", ["id", "prompt"])
def test_non_string_field(tmp_path, field, value):
    f = write_jsonl(tmp_path / "probes.jsonl", [probe(1), probe(2), {**probe(3), field: value}])
    expect(DataError, lambda: data.load_probes(f), at_line(3), field)
    f = write_jsonl(tmp_path / "pairs.jsonl", [{**pair(1), field: value}])
    expect(DataError, lambda: data.load_pairs(f), at_line(1), field)


@pytest.mark.parametrize("value", ["yes", "true", 1, 0, [True]])
def test_non_bool_harmful(tmp_path, value):
    f = write_jsonl(tmp_path / "probes.jsonl", [probe(1), {**probe(2), "harmful": value}])
    expect(DataError, lambda: data.load_probes(f), at_line(2), "harmful")
    f = write_jsonl(tmp_path / "pairs.jsonl", [pair(1), {**pair(2), "harmful": value}])
    expect(DataError, lambda: data.load_pairs(f), at_line(2), "harmful")


def test_harmful_optional(tmp_path):
    rows = [probe(1), {k: v for k, v in probe(2).items() if k != "harmful"}, {**probe(3), "harmful": None}, probe(4, harmful=True)]
    p = data.load_probes(write_jsonl(tmp_path / "probes.jsonl", rows))
    assert p["harmful"].to_list() == [False, None, None, True]
    assert p.schema["harmful"] == pl.Boolean


@pytest.mark.parametrize("value", ["", "   ", "\n\t"])
@pytest.mark.parametrize("field", ["prompt", "id", "category"])
def test_empty_string_field(tmp_path, field, value):
    f = write_jsonl(tmp_path / "probes.jsonl", [probe(1), {**probe(2), field: value}])
    expect(DataError, lambda: data.load_probes(f), at_line(2), field)


def test_empty_response(tmp_path):
    f = write_jsonl(tmp_path / "pairs.jsonl", [pair(1), {**pair(2), "response": " "}])
    expect(DataError, lambda: data.load_pairs(f), at_line(2), "response")


def test_extra_fields_are_ignored(tmp_path):
    f = write_jsonl(tmp_path / "probes.jsonl", [{**probe(1), "source": "x", "n": 3}])
    assert data.load_probes(f).columns == ["id", "prompt", "category", "harmful"]


# --------------------------------------------------------------------------------------
# duplicate ids, empty and missing files
# --------------------------------------------------------------------------------------


def test_duplicate_ids_name_both_lines(tmp_path):
    rows = [probe(1), probe(2), probe(3), {**probe(4), "id": "p2"}]
    f = write_jsonl(tmp_path / "probes.jsonl", rows)
    e = expect(DataError, lambda: data.load_probes(f), "p2", at_line(2), at_line(4))
    assert "duplicate" in str(e)
    rows = [pair(1), pair(7), "", {**pair(9), "id": "q7"}]
    f = write_jsonl(tmp_path / "pairs.jsonl", rows)
    expect(DataError, lambda: data.load_pairs(f), "q7", at_line(2), at_line(4))


def test_empty_file(tmp_path):
    for content in ("", "\n\n  \n"):
        f = tmp_path / "probes.jsonl"
        f.write_text(content)
        expect(EmptyInputError, lambda: data.load_probes(f), "probes.jsonl")
        g = tmp_path / "pairs.jsonl"
        g.write_text(content)
        expect(EmptyInputError, lambda: data.load_pairs(g), "pairs.jsonl")


def test_missing_file(tmp_path):
    expect(ConfigError, lambda: data.load_probes(tmp_path / "nope.jsonl"), "nope.jsonl")
    expect(ConfigError, lambda: data.load_pairs(tmp_path / "nope.parquet"), "nope.parquet")
    expect(ConfigError, lambda: data.load_dataset(probes=tmp_path / "nope.jsonl"), "nope.jsonl")


@pytest.mark.parametrize("suffix", [".csv", ".txt", ""])
def test_wrong_suffix(tmp_path, suffix):
    f = write_jsonl(tmp_path / f"probes{suffix}", [probe(1)])
    expect(ConfigError, lambda: data.load_probes(f), ".jsonl", ".parquet")


def test_json_suffix_reads_as_jsonl(tmp_path):
    f = write_jsonl(tmp_path / "probes.JSON", [probe(1), probe(2)])
    assert data.load_probes(f)["id"].to_list() == ["p1", "p2"]


# --------------------------------------------------------------------------------------
# probe / pair leaks
# --------------------------------------------------------------------------------------


def test_overlap_case_and_space_folded(tmp_path):
    probes = [probe(1, prompt="Tell me a story about dragons."), probe(2), probe(3, prompt="How do I bake bread?")]
    pairs = [
        pair(1),
        pair(2, prompt="  tell ME a   story\tabout\ndragons. "),
        pair(3),
        pair(4, prompt="HOW DO I BAKE BREAD?"),
    ]
    fp = write_jsonl(tmp_path / "probes.jsonl", probes)
    fq = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    for fn in (
        lambda: data.load_dataset(fp, fq),
        lambda: data.check_overlap(data.load_probes(fp), data.load_pairs(fq)),
    ):
        e = expect(DataError, fn, Re(r"\bq2\b"), Re(r"\bp1\b"), Re(r"\bq4\b"), Re(r"\bp3\b"), Re(r"\b2\b"))
        assert "q1" not in str(e) and "q3" not in str(e)


def test_no_overlap_for_near_misses(tmp_path):
    fp = write_jsonl(tmp_path / "probes.jsonl", [probe(1, prompt="Tell me a story."), probe(2, harmful=True)])
    fq = write_jsonl(tmp_path / "pairs.jsonl", [pair(1, prompt="Tell me a story!"), pair(2, prompt="Tell me a storyy.")])
    ds = data.load_dataset(fp, fq)
    assert ds.probes.height == 2 and ds.pairs.height == 2


def test_overlap_with_shipped_files(tmp_path):
    shipped = data.load_probes(data.shipped_path("probes.jsonl"))
    leaked = shipped["prompt"][5]
    fq = write_jsonl(tmp_path / "pairs.jsonl", [pair(1), pair(2, prompt=leaked.upper())])
    expect(DataError, lambda: data.load_dataset(pairs=fq), Re(r"\bq2\b"), shipped["id"][5])


# --------------------------------------------------------------------------------------
# Parquet
# --------------------------------------------------------------------------------------


def test_parquet_same_as_jsonl(tmp_path):
    for kind, loader in (("probes", data.load_probes), ("pairs", data.load_pairs)):
        src = data.shipped_path(f"{kind}.jsonl")
        rows = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
        pq = tmp_path / f"{kind}.parquet"
        pl.DataFrame(rows).write_parquet(pq)
        assert loader(pq).equals(loader(src)), kind
    ds_pq = data.load_dataset(tmp_path / "probes.parquet", tmp_path / "pairs.parquet")
    ds = data.load_dataset()
    assert ds_pq.probes.equals(ds.probes) and ds_pq.pairs.equals(ds.pairs)


def test_parquet_small_roundtrip_and_optional_harmful(tmp_path):
    rows = [probe(1), probe(2, harmful=True), probe(3, harmful=None)]
    pq = tmp_path / "p.parquet"
    pl.DataFrame(rows).write_parquet(pq)
    js = write_jsonl(tmp_path / "p.jsonl", rows)
    assert data.load_probes(pq).equals(data.load_probes(js))
    pq2 = tmp_path / "nh.PARQUET"
    pl.DataFrame([{k: v for k, v in r.items() if k != "harmful"} for r in rows]).write_parquet(pq2)
    assert data.load_probes(pq2)["harmful"].to_list() == [None, None, None]


def test_parquet_errors_name_rows(tmp_path):
    pq = tmp_path / "probes.parquet"
    pl.DataFrame([probe(1), probe(2), {**probe(3), "id": "p1"}]).write_parquet(pq)
    expect(DataError, lambda: data.load_probes(pq), "p1", Re(r"row 0\b"), Re(r"row 2\b"), "probes.parquet")
    pl.DataFrame([probe(1), {**probe(2), "prompt": None}]).write_parquet(pq)
    expect(DataError, lambda: data.load_probes(pq), Re(r"row 1\b"), "prompt")
    pl.DataFrame([probe(1), {**probe(2), "prompt": "  "}]).write_parquet(pq)
    expect(DataError, lambda: data.load_probes(pq), Re(r"row 1\b"), "prompt")
    pl.DataFrame({"id": ["p1"], "prompt": ["x"], "category": ["c"], "harmful": [1]}).write_parquet(pq)
    expect(DataError, lambda: data.load_probes(pq), Re(r"row 0\b"), "harmful")
    pl.DataFrame({"id": [1], "prompt": ["x"], "category": ["c"]}).write_parquet(pq)
    expect(DataError, lambda: data.load_probes(pq), Re(r"row 0\b"), "id")
    pl.DataFrame({"id": ["p1"], "prompt": ["x"]}).write_parquet(pq)
    expect(DataError, lambda: data.load_probes(pq), "category")


def test_parquet_empty(tmp_path):
    pq = tmp_path / "pairs.parquet"
    pl.DataFrame(schema={k: pl.Utf8 for k in ("id", "prompt", "response", "category", "label")}).write_parquet(pq)
    expect(EmptyInputError, lambda: data.load_pairs(pq), "pairs.parquet")


# --------------------------------------------------------------------------------------
# the user's own layouts (the runs are in test_user_data.py)
# --------------------------------------------------------------------------------------


def test_column_names_are_mapped(tmp_path):
    from policytrace.pipeline.config import DataCfg

    rows = [{"uid": f"q{i}", "question": f"Pair prompt number {i}.", "answer": "Sure.", "topic": "benign",
             "kind": "compliance", "harmful": False} for i in range(3)]
    cfg = DataCfg(id_column="uid", prompt_column="question", response_column="answer", category_column="topic",
                  label_column="kind")
    q = data.load_pairs(write_jsonl(tmp_path / "pairs.jsonl", rows), cfg=cfg)
    assert q.columns == ["id", "prompt", "response", "category", "label", "harmful"]
    assert q["id"].to_list() == ["q0", "q1", "q2"] and set(q["label"]) == {"compliance"}
    expect(DataError, lambda: data.load_pairs(tmp_path / "pairs.jsonl"), "no pair conversation found",
           "data.messages_column")


def test_probes_as_conversations(tmp_path):
    rows = [{**probe(1), "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]},
            {**probe(2), "messages": [{"role": "user", "content": "Hello?"}]}]
    for r in rows:
        del r["prompt"]
    p = data.load_probes(write_jsonl(tmp_path / "probes.jsonl", rows))
    assert p["prompt"].to_list() == ["Hi?", "Hello?"] and p["messages"].to_list()[0][0]["content"] == "Be brief."
    assert data.probe_chat(p)[0] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    one_turn = data.load_probes(write_jsonl(tmp_path / "one.jsonl", rows[1:]))
    assert one_turn.columns == ["id", "prompt", "category", "harmful"]  # a single user turn is a flat probe
    rows[1]["messages"].append({"role": "assistant", "content": "Hi."})
    expect(DataError, lambda: data.load_probes(write_jsonl(tmp_path / "bad.jsonl", rows)), at_line(2), "user turn")


@pytest.mark.parametrize("bad,fragment", [
    ({"messages": [{"role": "user", "content": "Hi"}]}, "end with the assistant turn"),
    ({"messages": [{"role": "assistant", "content": "Hi"}]}, "no user turn"),
    ({"messages": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "x"}]}, "role 'human'"),
    ({"messages": [{"role": "user", "content": ["Hi"]}, {"role": "assistant", "content": "x"}]}, "messages[0]"),
    ({"messages": "Hi"}, "list"),
])
def test_bad_conversations_name_the_row(tmp_path, bad, fragment):
    ok = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    rows = [{k: v for k, v in pair(i).items() if k not in ("prompt", "response")} | (bad if i == 2 else ok)
            for i in (1, 2)]
    expect(DataError, lambda: data.load_pairs(write_jsonl(tmp_path / "pairs.jsonl", rows)), at_line(2), fragment)


def test_mixed_layouts_need_data_format(tmp_path):
    rows = [pair(1), {**pair(2), "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}]}]
    f = write_jsonl(tmp_path / "pairs.jsonl", rows)
    expect(ConfigError, lambda: data.load_pairs(f), "data.format")
    from policytrace.pipeline.config import DataCfg

    assert data.load_pairs(f, cfg=DataCfg(format="flat"))["response"].to_list() == ["Roses are red."] * 2


def test_dataset_dict_folder_needs_a_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    from policytrace.pipeline.config import DataCfg

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([pair(1), pair(2)]),
                               "test": datasets.Dataset.from_list([pair(3)])})
    dd.save_to_disk(str(tmp_path / "dd"))
    expect(ConfigError, lambda: data.load_pairs(tmp_path / "dd"), "data.split", "train", "test")
    assert data.load_pairs(tmp_path / "dd", cfg=DataCfg(split="test"))["id"].to_list() == ["q3"]


def test_manifest_spec_rebuilds_the_behaviour():
    from policytrace.behaviours import BehaviourCfg, from_config, get, resolved_table, spec

    assert spec(resolved_table(BehaviourCfg())) == "refusal" == spec(BehaviourCfg(targets=("Sorry",)))
    own = resolved_table(BehaviourCfg(raising_labels=("harmful_refusal",)))
    recorded = json.loads(json.dumps(spec(own)))  # as the manifest stores it
    assert isinstance(recorded, dict) and get(recorded) == from_config(own)
    assert get(recorded).raising_labels == ("harmful_refusal",) and get(recorded).lowering_labels == ("compliance",)


def test_shard_folder_of_several_splits_needs_a_split(tmp_path):
    from policytrace.pipeline.config import DataCfg

    folder = tmp_path / "data"
    folder.mkdir()
    pl.DataFrame([pair(1), pair(2)]).write_parquet(folder / "train-00000-of-00002.parquet")
    pl.DataFrame([pair(3)]).write_parquet(folder / "train-00001-of-00002.parquet")
    pl.DataFrame([pair(4)]).write_parquet(folder / "test-00000-of-00001.parquet")
    expect(ConfigError, lambda: data.load_pairs(folder), "data.split", "test", "train")
    assert data.load_pairs(folder, cfg=DataCfg(split="train"))["id"].to_list() == ["q1", "q2", "q3"]
    expect(ConfigError, lambda: data.load_pairs(folder, cfg=DataCfg(split="dev")), "'dev'")
