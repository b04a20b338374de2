"""The user's own data, labels and behaviours (README, "Your own data"), end to end on the tiny
model: the same pairs in every storage format and row layout give byte-identical run folders;
labels and flag values the behaviour does not know stop the load with the values and the keys
to set, and once declared fill the suspicion of every pair; a behaviour declared only in TOML
and one from the user's own module run end to end."""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path

import polars as pl
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sae_lens")

from policytrace.errors import ConfigError, DataError  # noqa: E402
from policytrace.pipeline import config as cfgmod  # noqa: E402
from policytrace.pipeline.run import execute  # noqa: E402

from _helpers import expect  # noqa: E402
from _tiny import tiny_config, write_tiny_data, write_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DATA_OUTPUTS = ["policy.parquet", "features.parquet", "probes.parquet", "pairs.parquet", "pair_features.parquet",
                "pair_behaviour.parquet", "interference.parquet", "interference_groups.parquet", "pair_data.parquet",
                "base.npz"]
SYSTEM = "you are a safe assistant"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("userdata")
    model = write_tiny_model(root / "model")
    probes, pairs = write_tiny_data(root)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    return {"root": root, "model": model, "probes": probes, "pairs": pairs, "rows": rows, "cache": root / "cache"}


def _run(tiny, pairs: Path, folder: Path, **over) -> Path:
    cfg = cfgmod.resolve(tiny_config(tiny["model"], tiny["probes"], pairs, tiny["cache"], update={"lr": 1e-2}, **over))
    execute(cfg, folder, log=lambda m: None, progress=False)
    return folder


def _digests(folder: Path) -> dict:
    names = DATA_OUTPUTS + sorted(p.relative_to(folder).as_posix() for p in (folder / "shards").glob("deltas-*"))
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _meta(r: dict) -> dict:
    return {k: r[k] for k in ("id", "category", "label", "harmful")}


def _turns(conv: list[tuple[str, str]]) -> list[dict]:
    return [{"role": role, "content": text} for role, text in conv]


# -- the same flat pairs in every format ---------------------------------------------------


def _flat_layouts(r: dict) -> dict[str, dict]:
    user, reply = [("user", r["prompt"])], [("assistant", r["response"])]
    return {"messages": _meta(r) | {"messages": _turns(user + reply)},
            "trl": _meta(r) | {"prompt": r["prompt"], "completion": r["response"]},
            "trl_chat": _meta(r) | {"prompt": _turns(user), "completion": _turns(reply)}}


def _multi_turn(r: dict) -> list[tuple[str, str]]:
    return [("system", SYSTEM), ("user", "how do bake bread"), ("assistant", "sure here is the answer"),
            ("user", r["prompt"]), ("assistant", r["response"])]


def _store(folder: Path, rows: list[dict], how: str) -> Path:
    """``rows`` as a JSONL file, three Parquet shards, an Arrow file or a save_to_disk folder."""
    if how == "jsonl":
        return _jsonl(folder.with_suffix(".jsonl"), rows)
    if how == "shards":
        folder.mkdir()
        size = -(-len(rows) // 3)
        for i in range(3):  # read back in name order
            pl.DataFrame(rows[i * size:(i + 1) * size]).write_parquet(folder / f"train-{i:05d}-of-00003.parquet")
        return folder
    if how == "arrow":
        import pyarrow as pa

        path = folder.with_suffix(".arrow")
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, pa.Table.from_pylist(rows).schema) as w:
            w.write_table(pa.Table.from_pylist(rows))
        return path
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    return folder


@pytest.fixture(scope="module")
def flat_reference(tiny):
    return _digests(_run(tiny, tiny["pairs"], tiny["root"] / "flat"))


@pytest.mark.parametrize("layout,how", [("messages", "jsonl"), ("trl", "jsonl"), ("trl_chat", "jsonl"),
                                        ("flat", "shards"), ("flat", "arrow"), ("flat", "save_to_disk"),
                                        ("messages", "save_to_disk")])
def test_flat_pairs_in_any_format_give_the_same_run(tiny, flat_reference, tmp_path, layout, how):
    rows = tiny["rows"] if layout == "flat" else [_flat_layouts(r)[layout] for r in tiny["rows"]]
    pairs = _store(tmp_path / "pairs", rows, how)
    assert _digests(_run(tiny, pairs, tmp_path / "run")) == flat_reference
    _run(tiny, pairs, tmp_path / "run")  # the folder's fingerprint of the data holds: nothing to redo


@pytest.fixture(scope="module")
def chat_reference(tiny):
    rows = [_meta(r) | {"messages": _turns(_multi_turn(r))} for r in tiny["rows"]]
    folder = _run(tiny, _jsonl(tiny["root"] / "chat.jsonl", rows), tiny["root"] / "chat")
    return folder, _digests(folder)


@pytest.mark.parametrize("layout,how", [("trl_chat", "jsonl"), ("messages", "shards"), ("messages", "save_to_disk")])
def test_multi_turn_pairs_with_a_system_prompt_in_any_format_give_the_same_run(tiny, chat_reference, tmp_path,
                                                                                layout, how):
    conv = {r["id"]: _multi_turn(r) for r in tiny["rows"]}
    rows = [_meta(r) | ({"messages": _turns(conv[r["id"]])} if layout == "messages" else
                        {"prompt": _turns(conv[r["id"]][:4]), "completion": _turns(conv[r["id"]][4:])})
            for r in tiny["rows"]]
    pairs = _store(tmp_path / "pairs", rows, how)
    assert _digests(_run(tiny, pairs, tmp_path / "run")) == chat_reference[1]


def test_multi_turn_run_trains_the_last_turn_and_shows_it(tiny, chat_reference, flat_reference):
    folder = chat_reference[0]
    data = pl.read_parquet(folder / "pair_data.parquet")
    r = data.row(0, named=True)
    assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert "".join(r["tokens"]).startswith(f"<|im_start|>system\n{SYSTEM}")
    trained = "".join(p for p, m in zip(r["tokens"], r["loss_mask"]) if m)
    assert trained.strip() == r["response"] + "<|im_end|>"
    # the context changed what each pair does: not the flat run's numbers
    assert _digests(folder)["pairs.parquet"] != flat_reference["pairs.parquet"]


def test_all_turns_mode_trains_both_assistant_turns(tiny, tmp_path):
    rows = [_meta(r) | {"messages": _turns(_multi_turn(r))} for r in tiny["rows"][:4]]
    from policytrace.pipeline.data import load_pairs

    frame = load_pairs(_jsonl(tmp_path / "p.jsonl", rows), cfg=cfgmod.DataCfg(train_turns="all"))
    assert frame["train_turns"].to_list() == [[2, 4]] * 4


# -- labels and flags the behaviour does not know ------------------------------------------


def _held_out(tiny, tmp_path) -> Path:
    """The issue's held-out set: labels harmful_refusal / harmless_compliance, no flag column."""
    rows = [{k: v for k, v in r.items() if k != "harmful"} | {"label": f"harmful_{r['label']}" if r["harmful"]
                                                              else f"harmless_{r['label']}"} for r in tiny["rows"]]
    return _jsonl(tmp_path / "heldout.jsonl", rows)


def test_unknown_labels_stop_at_load_naming_values_and_keys(tiny, tmp_path):
    pairs = _held_out(tiny, tmp_path)
    cfg = cfgmod.resolve(tiny_config(tmp_path / "no-model-here", tiny["probes"], pairs, tiny["cache"]))
    # the model folder does not exist: the data error comes first, before any model work
    msg = str(expect(DataError, lambda: execute(cfg, tmp_path / "run", log=lambda m: None, progress=False), "'harmful_refusal'", "'harmless_compliance'", "6 pairs", "heldout.jsonl", "line 1", "behaviour.raising_labels", "behaviour.lowering_labels", "behaviour.neutral_labels", "behaviour.on_unknown"))
    assert "refusal" in msg and not (tmp_path / "run" / "pairs.parquet").exists()


def test_declared_labels_fill_the_suspicion_of_every_pair(tiny, tmp_path):
    pairs = _held_out(tiny, tmp_path)
    folder = _run(tiny, pairs, tmp_path / "run", behaviour={
        "targets": ["i can't", "sorry"], "raising_labels": ["harmful_refusal"], "lowering_labels": ["harmless_compliance"]})
    out = pl.read_parquet(folder / "pairs.parquet")
    assert out.height == 12 and out["suspicion"].null_count() == 0
    assert not any("no intended direction" in r for r in out["suspicion_reason"])
    written = tomllib.loads((folder / "config.toml").read_text())["behaviour"]
    assert written["raising_labels"] == ["harmful_refusal"] and written["flag"] == "harmful"


def test_warn_mode_names_how_many_pairs_go_unjudged(tiny, tmp_path):
    rows = [r | {"label": "other"} if i < 3 else r for i, r in enumerate(tiny["rows"])]
    pairs = _jsonl(tmp_path / "p.jsonl", rows)
    logged: list[str] = []
    cfg = cfgmod.resolve(tiny_config(tiny["model"], tiny["probes"], pairs, tiny["cache"],
                                     behaviour={"targets": ["i can't", "sorry"], "on_unknown": "warn"}))
    manifest = execute(cfg, tmp_path / "run", log=logged.append, progress=False)
    warned = [m for m in logged if m.startswith("WARNING") and "'other'" in m]
    assert warned and "3 of 12 pairs get no suspicion" in warned[0]
    assert any("'other'" in w for w in manifest["stages"]["base"]["warnings"])
    out = pl.read_parquet(tmp_path / "run" / "pairs.parquet")
    assert out["suspicion"].null_count() == 3


def test_string_flag_values_are_declared_once(tiny, tmp_path):
    probes = [json.loads(line) for line in tiny["probes"].read_text().splitlines()]
    kind = lambda r: {k: v for k, v in r.items() if k != "harmful"} | {"kind": "unsafe" if r["harmful"] else "benign"}  # noqa: E731
    fp = _jsonl(tmp_path / "probes.jsonl", [kind(r) for r in probes])
    fq = _jsonl(tmp_path / "pairs.jsonl", [kind(r) for r in tiny["rows"]])
    from policytrace.behaviours import BehaviourCfg, from_config
    from policytrace.pipeline.data import load_dataset

    b = from_config(BehaviourCfg(flag="kind", flagged_value="unsafe", unflagged_value="benign"))
    ds = load_dataset(fp, fq, b)
    assert ds.probes["kind"].to_list() == [p["harmful"] for p in probes]
    bad = from_config(BehaviourCfg(flag="kind", flagged_value="unsafe", unflagged_value="safe"))
    expect(DataError, lambda: load_dataset(fp, fq, bad), "'benign'", "behaviour.flagged_value", "behaviour.unflagged_value", "line 2")


def test_data_that_would_leave_suspicion_empty_is_refused(tiny, tmp_path):
    from policytrace.pipeline.data import load_dataset

    probes = [{k: v for k, v in json.loads(line).items() if k != "harmful"}
              for line in tiny["probes"].read_text().splitlines()]
    fp = _jsonl(tmp_path / "probes.jsonl", probes)
    expect(DataError, lambda: load_dataset(fp, tiny["pairs"]), "18 of 18 probes have no `harmful`", "suspicion", "behaviour.on_unknown")
    assert "no pair gets a suspicion" in load_dataset(fp, tiny["pairs"], on_unknown="warn").warnings[0]
    neutral = _jsonl(tmp_path / "pairs.jsonl", [r | {"label": "chat"} for r in tiny["rows"]])
    from policytrace.behaviours import BehaviourCfg, from_config

    b = from_config(BehaviourCfg(neutral_labels=("chat",)))
    expect(DataError, lambda: load_dataset(tiny["probes"], neutral, b), "no pair has a label meant to raise or lower")


def test_gradient_mode_trains_conversations_on_the_engines_mask(tiny, chat_reference):
    """Gradient mode reads chat pairs through the same loss mask as the engine: each pair's
    batched gradient products equal those of the engine's own masked gradient."""
    import math

    import torch

    from policytrace.gradients.batched import WholeProducts, per_example
    from policytrace.gradients.per_pair import _unscaled_step
    from policytrace.pipeline.data import chat_pair
    from policytrace.pipeline.modes.gradient import train_example
    from policytrace.pipeline.stages import prepare

    cfg = cfgmod.resolve(tiny_config(tiny["model"], tiny["probes"], tiny["root"] / "chat.jsonl", tiny["cache"],
                                     run={"mode": "gradient"}, model={"name": str(tiny["model"]), "dtype": "float64"},
                                     data={"train_turns": "all"}))
    state = prepare(cfg, lambda m: None, progress=False)
    engine, rows = state.model.engine, state.inputs.pairs
    shapes = {n: tuple(engine.base[n].shape) for n in engine.trainable}
    concepts = torch.randn(2, sum(math.prod(s) for s in shapes.values()), dtype=torch.float64,
                           generator=torch.Generator().manual_seed(0))
    sink = WholeProducts(concepts, engine.trainable, shapes, "sgd", engine.cfg.lr, rows.height)
    examples = [train_example(engine, r) for r in rows.iter_rows(named=True)]
    assert any(sum(e.trained) < len(e) - e.trained.index(True) for e in examples)  # gaps: several turns
    per_example(engine.model, engine.trainable, sink, examples, state.model.lm.tokenizer.pad_token_id, "cpu")
    for i, r in enumerate(rows.iter_rows(named=True)):
        g = engine.gradient_pair(chat_pair(r))
        want = -engine.cfg.lr * torch.stack([sum((concepts[c, off:off + v.numel()] @ _unscaled_step(engine, v).reshape(-1))
                                                 for off, v in _offsets(engine, g)) for c in range(2)])
        assert torch.allclose(sink.result()[i], want, rtol=1e-10, atol=0), r["id"]


def _offsets(engine, g):
    off = 0
    for n in engine.trainable:
        yield off, g[n]
        off += g[n].numel()


# -- behaviours without writing a line of the package ------------------------------------


def _hedging_config(tiny) -> dict:
    """examples/hedging/hedging.toml as shipped, on the tiny model (whose vocabulary needs its
    own target words; every other [behaviour] key is the file's)."""
    user = tomllib.loads((REPO / "examples" / "hedging" / "hedging.toml").read_text())
    base = tiny_config(tiny["model"], REPO / "examples" / "hedging" / "probes.jsonl",
                       REPO / "examples" / "hedging" / "pairs.jsonl", tiny["cache"])
    user["behaviour"]["targets"], user["behaviour"]["anti_targets"] = ["i", "sorry"], ["sure"]
    return user | {k: base[k] for k in ("model", "sae", "run")} | {
        "data": user["data"] | base["data"], "features": base["features"]}


def test_toml_only_behaviour_end_to_end(tiny, tmp_path):
    cfg = cfgmod.resolve(_hedging_config(tiny))
    assert cfg.behaviour.name == "hedging" and cfg.preset == "demo"
    manifest = execute(cfg, tmp_path / "run", log=lambda m: None, progress=False)
    out = pl.read_parquet(tmp_path / "run" / "pairs.parquet")
    assert out.height == 24 and out["suspicion"].null_count() == 0
    assert set(out["label"]) == {"hedged", "direct"} and not manifest["stages"]["pairs"].get("empty_columns")
    spec = manifest["stages"]["base"]["behaviour"]
    from policytrace.behaviours import get

    b = get(spec)  # what a report reads back from the manifest
    assert b.name == "hedging" and b.sides == ("open question", "settled question") and b.raising_label == "hedged"
    assert any("open question" in r or "settled question" in r for r in out["suspicion_reason"])
    from policytrace.pipeline.report import write_report

    assert "hedging log-odds" in write_report(tmp_path / "run").read_text()


def test_declared_behaviour_names_what_it_lacks(tiny):
    expect(ConfigError, lambda: cfgmod.resolve({"behaviour": {"name": "verbosity", "targets": ["Sure"]}}), "'verbosity'", "behaviour.flag", "behaviour.raising_labels", "behaviour.module")
    cfg = cfgmod.resolve({"behaviour": {"name": "verbosity", "targets": ["Sure"], "flag": "long",
                                        "raising_labels": ["verbose"]}})
    from policytrace.pipeline.stages import load_inputs

    expect(ConfigError, lambda: load_inputs(cfg), "ships no probes", "data.probes")


PLUGIN = '''
from dataclasses import dataclass

import numpy as np

from policytrace.behaviours import Behaviour


@dataclass(frozen=True)
class AllProbes(Behaviour):
    """Judges every pair on the flagged probes, whatever its direction."""

    def judged_on_flagged(self, direction):
        return True


STRICT = AllProbes(name="strict_refusal", targets=("i can't", "sorry"), flag="harmful",
                   raising_labels=("refusal",), lowering_labels=("compliance",))
'''


@pytest.mark.parametrize("form", ["dotted", "file", "instance"])
def test_behaviour_module_from_the_users_code(tiny, tmp_path, monkeypatch, form):
    (tmp_path / "my_behaviours.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    module = {"dotted": "my_behaviours:AllProbes", "file": f"{tmp_path / 'my_behaviours.py'}:AllProbes",
              "instance": "my_behaviours:STRICT"}[form]
    beh = {"module": module, "name": "strict_refusal", "targets": ["i can't", "sorry"], "flag": "harmful",
           "raising_labels": ["refusal"], "lowering_labels": ["compliance"]}
    cfg = cfgmod.resolve(tiny_config(tiny["model"], tiny["probes"], tiny["pairs"], tiny["cache"], behaviour=beh))
    execute(cfg, tmp_path / "run", log=lambda m: None, progress=False)
    out = pl.read_parquet(tmp_path / "run" / "pairs.parquet")
    assert out["suspicion"].null_count() == 0
    # its own rule: compliance pairs are judged on the harmful probes too
    compliance = out.filter(pl.col("label") == "compliance")["suspicion_reason"].to_list()
    assert all("on harmful probes" in r for r in compliance)


def test_behaviour_module_from_the_cli(tiny, tmp_path, monkeypatch, capsys):
    from policytrace.pipeline.cli import main

    (tmp_path / "my_behaviours.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tiny["model"], tiny["probes"], tiny["pairs"], tiny["cache"])
    lines = [f'[model]\nname = "{tiny["model"]}"', f'[data]\nprobes = "{tiny["probes"]}"\npairs = "{tiny["pairs"]}"',
             '[behaviour]\nmodule = "my_behaviours:STRICT"',
             "[sae]\n" + "\n".join(f"{k} = {v}" for k, v in cfg["sae"].items()),
             f'[run]\npair_batch = 4\nthreads = 1\ncache_dir = "{tiny["cache"]}"', "[features]\nk = 8\nmin_active = 1"]
    (tmp_path / "strict.toml").write_text("\n\n".join(lines) + "\n")
    assert main(["run", str(tmp_path / "strict.toml"), "--out", str(tmp_path / "run"), "--quiet", "--no-report"]) == 0
    assert tomllib.loads((tmp_path / "run" / "config.toml").read_text())["behaviour"]["name"] == "strict_refusal"
    (tmp_path / "bad.toml").write_text('[behaviour]\nmodule = "no_such_module:X"\n')
    assert main(["run", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "r2")]) == 2
    assert "behaviour.module" in capsys.readouterr().err


def test_baselines_read_chat_pairs_through_their_mask(tiny, chat_reference):
    from policytrace.pipeline.stages import prepare
    from policytrace.pipeline.validate.baselines import gradient_baselines, projection_baselines

    cfg = cfgmod.resolve(tiny_config(tiny["model"], tiny["probes"], tiny["root"] / "chat.jsonl", tiny["cache"]))
    state = prepare(cfg, lambda m: None, progress=False)
    two = state.inputs.pairs.head(2)
    assert "messages" in two.columns
    grads = gradient_baselines(state, 1e-2, two)
    proj = projection_baselines(state, two, max_new_tokens=2)
    for frame in (grads, proj):
        assert frame.height == 2 and all(frame[c].is_finite().all() for c in frame.columns if c != "pair_id")


@pytest.mark.slow
def test_validate_on_chat_pairs_and_a_declared_behaviour(tiny, chat_reference, tmp_path):
    """validate retrains, plants and scores with the same masks: chat pairs (planted ones are
    flat) and the hedging behaviour's generic planting."""
    import shutil

    from policytrace.pipeline.cli import main

    shutil.copytree(chat_reference[0], tmp_path / "chat")
    assert main(["validate", str(tmp_path / "chat"), "--subsets", "3", "--planted", "2", "--removal-k", "0",
                 "--quiet"]) == 0
    assert set(pl.read_parquet(tmp_path / "chat" / "planted.parquet")["kind"]) == {"planted_refusal",
                                                                                   "planted_compliance"}
    execute(cfgmod.resolve(_hedging_config(tiny)), tmp_path / "hedging", log=lambda m: None, progress=False)
    assert main(["validate", str(tmp_path / "hedging"), "--subsets", "3", "--planted", "2", "--removal-k", "0",
                 "--no-baselines", "--quiet"]) == 0
    planted = pl.read_parquet(tmp_path / "hedging" / "planted.parquet")
    assert set(planted["kind"]) == {"planted_hedged", "planted_direct"} and planted["auc"].is_between(0, 1).all()
