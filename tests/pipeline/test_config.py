"""Configuration tables: documented once, strict, typed; the README table is generated."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from policytrace._tables import field_docs, undocumented
from policytrace.errors import ConfigError
from policytrace.pipeline import config as cfgmod

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_field_has_a_docstring():
    for name, cls in cfgmod.TABLES.items():
        assert not undocumented(cls), f"[{name}] fields without a docstring: {undocumented(cls)}"
        assert all(len(d) > 10 for d in field_docs(cls).values())


def test_readme_table_is_generated_from_the_tables():
    text = README.read_text()
    begin, end = "<!-- config-table:begin -->", "<!-- config-table:end -->"
    assert begin in text and end in text, "README lacks the generated configuration table markers"
    table = text.split(begin, 1)[1].split(end, 1)[0].strip()
    assert table == cfgmod.markdown_table().strip(), (
        "README's configuration table is stale: paste `python -m policytrace.pipeline.config --markdown`")


def test_presets_are_configs_and_resolve():
    for name, preset in cfgmod.PRESETS.items():
        assert isinstance(preset, cfgmod.Config)
        cfg = cfgmod.resolve({"preset": name})
        assert cfg.preset == name
    paper = cfgmod.resolve({"preset": "smda-paper"})
    assert paper.policy.lam == 5.0 and paper.policy.intercept is False and paper.behaviour.targets == ("I can't",)
    assert paper.decompose.method == "first_order" and paper.decompose.delta_x == "gated"


def test_behaviour_targets_are_filled_in():
    assert cfgmod.resolve({}).behaviour.targets == ("I can't", "I'm sorry", "I cannot")
    syc = cfgmod.resolve({"behaviour": {"name": "sycophancy"}}).behaviour
    assert "You're right" in syc.targets and "Actually" in syc.anti_targets
    own = cfgmod.resolve({"behaviour": {"targets": ["Sorry"]}}).behaviour
    assert own.targets == ("Sorry",)


@pytest.mark.parametrize("user,key", [
    ({"modle": {}}, "modle"),
    ({"update": {"lrate": 1}}, "update.lrate"),
    ({"update": {"lr": 0}}, "update.lr"),
    ({"update": {"lr": float("nan")}}, "update.lr"),
    ({"update": {"optimizer": "rmsprop"}}, "update.optimizer"),
    ({"update": {"params": 3}}, "update.params"),
    ({"probe": {"batch_size": "8"}}, "probe.batch_size"),
    ({"probe": {"pooling": "median"}}, "probe.pooling"),
    ({"probe": {"pooling": "eot"}}, "probe.eot_token"),
    ({"policy": {"lam": -1}}, "policy.lam"),
    ({"policy": {"lam": "GCV"}}, "policy.lam"),
    ({"features": {"threshold": float("nan")}}, "features.threshold"),
    ({"features": {"k": 0}}, "features.k"),
    ({"sae": {"train_d_sae": 0}}, "sae.train_d_sae"),
    ({"sae": {"train_k": 65, "train_d_sae": 64}}, "sae.train_k"),
    ({"sae": {"release": "x"}}, "sae.id"),
    ({"data": {"max_pairs": -1}}, "data.max_pairs"),
    ({"run": {"threads": 2**70}}, "run.threads"),
    ({"run": {"pair_batch": -1}}, "run.pair_batch"),
    ({"behaviour": {"name": "flattery"}}, "behaviour.name"),
    ({"behaviour": {"targets": "I can't"}}, "behaviour.targets"),
    ({"preset": "nope"}, "preset"),
    ({"update": 5}, "update"),
])
def test_bad_config_names_the_key(user, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        cfgmod.resolve(user)


def test_toml_round_trip(tmp_path):
    cfg = cfgmod.resolve({"preset": "smda-paper", "update": {"params": ["model.layers.1*"]}, "data": {"max_pairs": 3}})
    path = tmp_path / "c.toml"
    path.write_text(cfgmod.to_toml(cfg))
    assert cfgmod.load(path) == cfg
    assert cfgmod.digest(cfgmod.load(path)) == cfgmod.digest(cfg)
    # threads and the cache location do not change outputs, so not the digest either
    other = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, threads=3, cache_dir="/x"))
    assert cfgmod.digest(other) == cfgmod.digest(cfg)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        cfgmod.load(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="is a directory"):
        cfgmod.load(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text("[update\nlr = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        cfgmod.load(bad)
    bin_ = tmp_path / "bin.toml"
    bin_.write_bytes(b"\xff\xfe[update]")
    with pytest.raises(ConfigError, match="UTF-8"):
        cfgmod.load(bin_)


def _other_values(value):
    """Candidate values of the same type that differ from ``value``."""
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value + 2, 1, 2, 16]
    if isinstance(value, float):
        return [value * 2 + 0.25, 0.5, 2.0, 0.9]
    if isinstance(value, tuple):
        return [value + ("extra",), (), ("q_proj",)]
    return ["x", "refusal", "sycophancy", "cpu:1", "<|im_end|>", "mlp", 5.0]


def _variants(cls, name):
    """A valid table with field ``name`` changed (choices of a Literal are tried first)."""
    import typing

    default = cls()
    if cls.TABLE == "sae" and name in ("release", "id"):  # named together or not at all
        return dataclasses.replace(default, release="some-release", id="some-id")
    hint = typing.get_type_hints(cls)[name]
    choices = [a for a in typing.get_args(hint) if typing.get_origin(hint) is typing.Literal]
    for v in choices + _other_values(getattr(default, name)):
        if v == getattr(default, name):
            continue
        try:
            return dataclasses.replace(default, **{name: v})
        except ConfigError:
            continue
    return None


@pytest.mark.parametrize("table,name", [(t, f.name) for t, c in cfgmod.TABLES.items() for f in dataclasses.fields(c)])
def test_every_setting_counts_for_the_run_identity_unless_marked(table, name):
    from policytrace._tables import added_later, output_neutral

    cls = cfgmod.TABLES[table]
    changed = _variants(cls, name)
    if changed is None:
        pytest.skip(f"no other valid value for {table}.{name} is tried here")
    base = cfgmod.Config()
    other = dataclasses.replace(base, **{table: changed})
    same = name in output_neutral(cls)
    assert (cfgmod.digest(other) == cfgmod.digest(base)) is same, f"{table}.{name}"
    # a field added later (ADDED_LATER) is left out of the identity while it holds its default
    assert (f"{table}.{name}" in cfgmod.identity(base)) is not (same or name in added_later(cls))
    assert (f"{table}.{name}" in cfgmod.identity(other)) is not same


def test_identity_keeps_the_digest_of_earlier_folders():
    # 0.2.0 hashed every table with [run] cut down to seed, pair_batch and mode; the opt-out
    # identity hashes the same values the same way (a folder whose settings are unchanged still
    # resumes; 0.3.0's new default run.pair_batch = 0 is a changed setting, named as such).
    import hashlib
    import json

    for user in ({}, {"preset": "demo"}, {"run": {"seed": 3, "threads": 2}}, {"preset": "smda-paper"}):
        cfg = cfgmod.resolve(user)
        d = cfg.to_dict()
        d["run"] = {k: v for k, v in d["run"].items() if k in ("seed", "pair_batch", "mode")}
        assert cfgmod.digest(cfg) == hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def test_an_explicit_empty_target_list_names_the_key():
    with pytest.raises(ConfigError, match="behaviour.targets' is an empty list"):
        cfgmod.resolve({"behaviour": {"targets": []}})
    assert cfgmod.resolve({"behaviour": {}}).behaviour.targets  # left out: the behaviour's own
    # a resolved config (a run folder's config.toml) reads back as it was
    cfg = cfgmod.resolve({})
    assert cfgmod.resolve(__import__("tomllib").loads(cfgmod.to_toml(cfg))) == cfg
