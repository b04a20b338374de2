"""Run folders end to end on a tiny model: outputs, resumption, determinism, report, errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import polars as pl
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sae_lens")

from policytrace.errors import ConfigError, RunFolderError  # noqa: E402
from policytrace.pipeline import config as cfgmod  # noqa: E402
from policytrace.pipeline.report import write_report  # noqa: E402
from policytrace.pipeline.run import execute  # noqa: E402

from _tiny import tiny_config, write_tiny_data, write_tiny_model  # noqa: E402

OUTPUTS = ["config.toml", "policy.parquet", "features.parquet", "probes.parquet", "pairs.parquet",
           "pair_features.parquet", "interference.parquet"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny")
    model = write_tiny_model(root / "model")
    probes, pairs = write_tiny_data(root)
    return model, probes, pairs, root / "cache"


def _digest(folder: Path) -> dict:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in OUTPUTS}


def _run(cfg, folder, **kw):
    return execute(cfgmod.resolve(cfg), folder, log=lambda m: None, progress=False, **kw)


@pytest.mark.parametrize("method,delta_x", [("exact", "reencode"), ("first_order", "gated")])
def test_run_writes_every_output(tiny, tmp_path, method, delta_x):
    cfg = tiny_config(*tiny, decompose={"method": method, "delta_x": delta_x})
    m = _run(cfg, tmp_path / "run")
    assert m["status"] == "complete"
    for name in OUTPUTS:
        assert (tmp_path / "run" / name).exists(), name
    pairs = pl.read_parquet(tmp_path / "run" / "pairs.parquet")
    assert pairs.height == 12
    assert {"pair_id", "group", "score", "score_x", "score_y", "dy_mean", "interference", "label"} <= set(pairs.columns)
    pf = pl.read_parquet(tmp_path / "run" / "pair_features.parquet")
    k = pl.read_parquet(tmp_path / "run" / "policy.parquet").height
    assert pf.height == 12 * k
    assert pf.null_count().sum_horizontal()[0] == 0
    assert not pf.select(pl.all().exclude("pair_id").is_nan().any()).row(0).__contains__(True)
    report = write_report(tmp_path / "run")
    text = report.read_text()
    assert "<svg" in text and "policytrace report" in text and "http" not in text.split("<body>")[1][:200]


def test_finished_run_is_not_recomputed(tiny, tmp_path):
    cfg = tiny_config(*tiny)
    _run(cfg, tmp_path / "r")
    before = (tmp_path / "r" / "pairs.parquet").stat().st_mtime_ns
    assert _run(cfg, tmp_path / "r")["status"] == "complete"
    assert (tmp_path / "r" / "pairs.parquet").stat().st_mtime_ns == before


def test_same_config_same_outputs(tiny, tmp_path):
    cfg = tiny_config(*tiny)
    _run(cfg, tmp_path / "a")
    _run(cfg, tmp_path / "b")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


def test_run_folder_of_another_config_is_refused(tiny, tmp_path):
    _run(tiny_config(*tiny), tmp_path / "r")
    with pytest.raises(RunFolderError, match="different configuration"):
        _run(tiny_config(*tiny, update={"lr": 1e-3}), tmp_path / "r")


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        cfgmod.resolve({"modle": {}})
    with pytest.raises(ConfigError, match="unknown config key 'update.lrate'"):
        cfgmod.resolve({"update": {"lrate": 1}})
    with pytest.raises(ConfigError, match="unknown preset"):
        cfgmod.resolve({"preset": "nope"})
    with pytest.raises(ConfigError, match="policy.lam"):
        cfgmod.resolve({"policy": {"lam": -1}})
    with pytest.raises(ConfigError, match="probe.batch_size' must be an integer"):
        cfgmod.resolve({"probe": {"batch_size": "8"}})
    assert cfgmod.resolve({"preset": "smda-paper"}).policy.lam == 5.0


def test_sae_model_mismatch(tiny, tmp_path):
    from sae_lens.saes import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = TopKSAE(TopKSAEConfig(d_in=16, d_sae=32, k=4, metadata=SAEMetadata(model_name="x", hook_name="y")))
    sae.save_model(str(tmp_path / "sae"))
    cfg = tiny_config(*tiny, sae={"path": str(tmp_path / "sae")})
    with pytest.raises(ConfigError, match="do not match"):
        _run(cfg, tmp_path / "run")


def test_report_refuses_unfinished_folder(tmp_path):
    with pytest.raises(RunFolderError, match="manifest.json is missing"):
        write_report(tmp_path)
