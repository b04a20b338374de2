"""Mediation across layers (``sae.layers``, issue 20 item 2): the config's checks, the base pass
reading every layer in one forward (float64: each layer's activations are a one-layer pass's),
a one-layer run's bytes with and without the key, each layer's curve point against a direct
computation and against a one-layer run at that layer (engine and gradient modes), and the
report's view of the curve."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import polars as pl
import pytest

from policytrace.errors import ConfigError
from policytrace.numeric.frames import LAYERS_SCHEMA, PAIR_LAYERS_SCHEMA
from policytrace.numeric.mediation import layer_summary, pair_mediated
from policytrace.pipeline import config as cfgmod


# -- config (no torch) ------------------------------------------------------------------------

def test_an_empty_layer_list_is_a_one_layer_config():
    base = cfgmod.resolve({})
    empty = cfgmod.resolve({"sae": {"layers": []}})
    assert cfgmod.digest(empty) == cfgmod.digest(base)
    assert cfgmod.to_toml(empty) == cfgmod.to_toml(base)
    assert "sae.layers" not in cfgmod.identity(base) and "layers" not in cfgmod.to_toml(base)
    listed = cfgmod.resolve({"sae": {"layers": [4, 8]}})
    assert cfgmod.digest(listed) != cfgmod.digest(base)
    assert cfgmod.identity(listed)["sae.layers"] == [4, 8]
    # the resolved TOML reads back as it was
    assert cfgmod.resolve(__import__("tomllib").loads(cfgmod.to_toml(listed))) == listed
    assert listed.sae.curve_layers == (4, 8, 10) and listed.sae.extra_layers == (4, 8)
    assert base.sae.curve_layers == ()


@pytest.mark.parametrize("sae,match", [
    ({"layers": [-1, 3]}, "'sae.layers' holds a negative layer"),
    ({"layers": [3, 5, 3]}, "'sae.layers' lists layer 3 more than once"),
    ({"paths": ["a"]}, "'sae.paths' needs sae.layers"),
    ({"layers": [3], "path": "x"}, "'sae.paths' must name one SAE folder per entry"),
    ({"layers": [3], "paths": ["a"]}, "'sae.paths' needs sae.path"),
    ({"layers": [3, 10], "path": "x", "paths": ["a", "b"]}, "'sae.paths' names another SAE for sae.layer = 10"),
    ({"layers": [3], "release": "r", "id": "i"}, "'sae.layers' needs SAE folders"),
])
def test_bad_layer_lists_name_the_key(sae, match):
    with pytest.raises(ConfigError, match=match):
        cfgmod.resolve({"sae": sae})


def test_trajectory_mode_refuses_layers():
    with pytest.raises(ConfigError, match="'sae.layers'.*not 'trajectory'"):
        cfgmod.resolve({"sae": {"layers": [3]}, "run": {"mode": "trajectory"}})


def test_a_curve_point_is_the_direct_computation():
    rng = np.random.default_rng(0)
    dX, dy = rng.normal(size=(5, 7, 3)), rng.normal(size=(5, 7))
    coef, scale = rng.normal(size=3), rng.uniform(0.5, 2.0, size=3)
    med = np.array([pair_mediated(dX[i], dy[i], coef, scale)[0] for i in range(5)])
    direct = np.array([np.mean([(dX[i, j] / scale) @ coef for j in range(7)]) for i in range(5)])
    np.testing.assert_allclose(med, direct, rtol=1e-13)
    r2 = pair_mediated(dX[0], dy[0], coef, scale)[1]
    assert r2 == pytest.approx(1 - (((dy[0] - (dX[0] / scale) @ coef) ** 2).sum() / (dy[0] ** 2).sum()))
    dy_mean = dy.mean(1)
    point = layer_summary(dy_mean, med)
    assert point["mediated_share"] == pytest.approx(med.sum() / dy_mean.sum(), rel=1e-13)
    assert point["mediated_r2"] == pytest.approx(1 - ((dy_mean - med) ** 2).sum() / (dy_mean ** 2).sum(), rel=1e-13)
    assert math.isnan(layer_summary(np.zeros(3), np.ones(3))["mediated_share"])


# -- runs on a tiny random model --------------------------------------------------------------

torch = pytest.importorskip("torch")
pytest.importorskip("sae_lens")

from _tiny import tiny_config, write_tiny_data, write_tiny_model  # noqa: E402

LAYERS = [0, 2]  # beside the main layer 1 of the tiny config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("layers")
    return write_tiny_model(root / "model", layers=3), *write_tiny_data(root), root / "cache"


def _cfg(tiny, **over):
    model, probes, pairs, cache = tiny
    base = dict(model={"name": str(model), "dtype": "float64"}, features={"contexts": 0})
    for k, v in over.items():
        base[k] = base.get(k, {}) | v
    return cfgmod.resolve(tiny_config(model, probes, pairs, cache, **base))


def _quiet(_msg):
    pass


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_the_multi_layer_pass_reads_what_one_layer_passes_read(tiny, pooling):
    from policytrace.model.loading import load_model_cfg
    from policytrace.model.probe import ProbeRunner, TargetSet
    from policytrace.model.sites import HookSite
    from policytrace.pipeline.stages import load_inputs
    from policytrace.model.chat import encode_prompts
    from policytrace.pipeline.data import probe_chat

    cfg = _cfg(tiny, probe={"pooling": pooling, "batch_size": 5})
    inputs = load_inputs(cfg)
    lm = load_model_cfg(cfg.model)
    assert next(lm.model.parameters()).dtype == torch.float64
    targets = TargetSet.from_strings(lm.tokenizer, cfg.behaviour.targets)
    toks = encode_prompts(lm.tokenizer, probe_chat(inputs.probes), inputs.probes["id"].to_list(), 512)

    def runner(layer):
        return ProbeRunner.from_config(lm.model, lm.tokenizer, HookSite(layer), targets, cfg.probe)

    H, y, extra = runner(1).run_sites(toks, [HookSite(0), HookSite(2)])
    assert H.dtype == np.float64 and len(extra) == 2
    for layer, got in ((1, H), (0, extra[0]), (2, extra[1])):
        alone, y_alone = runner(layer).run(toks)
        np.testing.assert_array_equal(got, alone)
        np.testing.assert_array_equal(y, y_alone)
    # and under other weights (the per-pair pass)
    params = {k: v + 1e-3 for k, v in dict(lm.model.named_parameters()).items() if "mlp" in k}
    H, _, extra = runner(1).run_sites(toks, [HookSite(2)], params=params)
    np.testing.assert_array_equal(extra[0], runner(2).run(toks, params=params)[0])
    np.testing.assert_array_equal(H, runner(1).run(toks, params=params)[0])


def _digests(folder):
    skip = {"manifest.json", "report.html"}
    out = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name not in skip and not f.name.startswith("done-") and "concepts-rank" not in f.name:
            out[f.relative_to(folder).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def test_a_one_layer_run_is_the_same_with_and_without_the_key(tiny, tmp_path):
    from policytrace.pipeline.run import execute

    a = execute(_cfg(tiny), tmp_path / "a", log=_quiet, progress=False)
    b = execute(_cfg(tiny, sae={"layers": []}), tmp_path / "b", log=_quiet, progress=False)
    assert a["config_digest"] == b["config_digest"] and a["files"] == b["files"]
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    assert not (tmp_path / "a" / "layers.parquet").exists() and "layers" not in a["stages"]
    assert not list((tmp_path / "a" / "shards").glob("pair_layers-*"))


def _pairs_of(folder):
    return pl.read_parquet(folder / "pairs.parquet").sort("pair_id")


@pytest.mark.parametrize("mode", ["engine", "gradient"])
def test_each_layer_of_the_curve_is_a_one_layer_run_at_that_layer(tiny, tmp_path, mode):
    from policytrace.pipeline.run import execute

    over = {"run": {"mode": mode}}
    if mode == "gradient":
        over["decompose"] = {"method": "first_order"}
    m = execute(_cfg(tiny, sae={"layers": LAYERS}, **over), tmp_path / "multi", log=_quiet, progress=False)
    curve = pl.read_parquet(tmp_path / "multi" / "layers.parquet")
    by_pair = pl.read_parquet(tmp_path / "multi" / "pair_layers.parquet")
    assert curve["layer"].to_list() == [0, 1, 2] and curve["main"].to_list() == [False, True, False]
    assert curve["best"].sum() == 1 and m["stages"]["layers"]["best_layer"] == curve.filter("best")["layer"][0]
    assert {"layers.parquet", "pair_layers.parquet"} <= set(m["files"])
    assert list(curve.schema.items()) == list(LAYERS_SCHEMA.items())
    assert list(by_pair.schema.items()) == list(PAIR_LAYERS_SCHEMA.items())
    shards = sorted((tmp_path / "multi" / "shards").glob("pair_layers-*.parquet"))
    assert len(shards) == 3 and all(pl.read_parquet_schema(p) == dict(PAIR_LAYERS_SCHEMA) for p in shards)
    multi_pairs = _pairs_of(tmp_path / "multi")
    for layer in (0, 1, 2):
        one = tmp_path / f"one-{layer}"
        execute(_cfg(tiny, sae={"layer": layer}, **over), one, log=_quiet, progress=False)
        pairs = _pairs_of(one)
        mine = by_pair.filter(pl.col("layer") == layer).sort("pair_id")
        # the layer's features and policy are those of a one-layer run there (same SAE, same rules),
        # so each pair's mediated change is that run's pred_dy_mean
        tol = 1e-12 if mode == "engine" else 1e-9
        np.testing.assert_allclose(mine["mediated_dy"].to_numpy(), pairs["pred_dy_mean"].to_numpy(), rtol=tol,
                                   atol=1e-15)
        np.testing.assert_allclose(mine["dy_mean"].to_numpy(), pairs["dy_mean"].to_numpy(), rtol=tol, atol=1e-15)
        row = curve.filter(pl.col("layer") == layer)
        share = pairs["pred_dy_mean"].sum() / pairs["dy_mean"].sum()
        assert row["mediated_share"][0] == pytest.approx(share, rel=1e-9)
        base = json.loads((one / "manifest.json").read_text())["stages"]["base"]
        assert row["r2_heldout"][0] == pytest.approx(base["fidelity"]["r2_heldout"], rel=1e-12)
        assert row["probe_fvu"][0] == pytest.approx(base["probe_fvu"], rel=1e-12)
        assert row["n_features"][0] == base["n_features"]
        if mode == "engine":
            np.testing.assert_allclose(mine["mediated_r2"].to_numpy(), pairs["mediated_r2"].to_numpy(), rtol=1e-9)
        else:
            assert mine["mediated_r2"].null_count() == mine.height
    # the main layer's outputs are the one-layer run's
    np.testing.assert_allclose(multi_pairs["score"].to_numpy(), _pairs_of(tmp_path / "one-1")["score"].to_numpy(),
                               rtol=1e-9)


def test_a_layer_beyond_the_model_names_the_key(tiny, tmp_path):
    from policytrace.pipeline.run import execute

    with pytest.raises(ConfigError, match="'sae.layers' holds layer 3, beyond this model's 3 decoder blocks"):
        execute(_cfg(tiny, sae={"layers": [0, 3]}), tmp_path / "r", log=_quiet, progress=False)


def test_named_saes_per_layer_and_the_report(tiny, tmp_path):
    """sae.paths: the default SAEs' folders named by hand give the default run's curve, and the
    folder's report shows it."""
    from policytrace.pipeline.report import write_report
    from policytrace.pipeline.run import execute

    execute(_cfg(tiny, sae={"layers": LAYERS}), tmp_path / "default", log=_quiet, progress=False)
    by_layer = {}  # the default SAEs' folders, by the layer their hook name says (model.layers.<l>)
    for f in sorted(tiny[3].glob("sae-*")):
        hook = json.loads((f / "cfg.json").read_text())["metadata"]["hook_name"]
        by_layer[int(hook.split(".")[2])] = str(f)
    assert set(by_layer) >= {0, 1, 2}
    sae = {"path": by_layer[1], "layers": LAYERS, "paths": [by_layer[0], by_layer[2]]}
    m = execute(_cfg(tiny, sae=sae), tmp_path / "named", log=_quiet, progress=False)
    a = pl.read_parquet(tmp_path / "default" / "layers.parquet").drop("sae_fvu")
    b = pl.read_parquet(tmp_path / "named" / "layers.parquet").drop("sae_fvu")
    assert a.equals(b)
    fp = json.loads((tmp_path / "named" / "fingerprint.json").read_text())
    assert fp["inputs"]["sae_layers"].startswith("0:")
    page = write_report(tmp_path / "named").read_text()
    assert 'id="layers"' in page and 'id="layers-table"' in page
    assert f"layer <b>{m['stages']['layers']['best_layer']}</b>" in page
