"""torchrun on CPU (gloo): two processes fill one run folder with the same bytes as one process,
and a run whose rank 1 is SIGKILLed is finished by starting it again with one process."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sae_lens")
TORCHRUN = shutil.which("torchrun")
pytestmark = [pytest.mark.distributed, pytest.mark.skipif(TORCHRUN is None, reason="torchrun not on PATH")]

from policytrace.pipeline import config as cfgmod  # noqa: E402

from _tiny import tiny_config, write_tiny_data, write_tiny_model  # noqa: E402

OUTPUTS = ["base.npz", "policy.parquet", "features.parquet", "probes.parquet", "pairs.parquet",
           "pair_features.parquet", "pair_behaviour.parquet", "interference.parquet", "interference_groups.parquet"]


def _env(**extra) -> dict:
    # the same thread count in every process: float sums then round identically
    return os.environ | {"OMP_NUM_THREADS": "1"} | extra


def _run(toml, out, nproc: int, **env) -> subprocess.CompletedProcess:
    args = ["run", str(toml), "--out", str(out), "--quiet", "--no-report"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "policytrace", *args]
    else:
        cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "-m", "policytrace", *args]
    return subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=900)


def _digests(folder) -> dict:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in OUTPUTS}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    cfg = cfgmod.resolve(tiny_config(write_tiny_model(root / "m"), *write_tiny_data(root), root / "cache",
                                     update={"lr": 1e-2}, run={"pair_batch": 2}))
    toml = root / "run.toml"
    toml.write_text(cfgmod.to_toml(cfg))
    one = _run(toml, root / "one", 1)
    assert one.returncode == 0, one.stderr
    return toml, root / "one"


def test_two_processes_write_the_bytes_of_one(setup, tmp_path):
    toml, one = setup
    two = _run(toml, tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert _digests(tmp_path / "two") == _digests(one)
    markers = sorted(p.name for p in (tmp_path / "two" / "shards").glob("done-*.json"))
    assert len(markers) == 6  # 12 pairs in shards of 2, three per rank


def test_killed_rank_is_finished_by_a_rerun_with_one_process(setup, tmp_path):
    toml, one = setup
    killed = _run(toml, tmp_path / "r", 2, POLICYTRACE_FAULT="before-shard-marker:2", POLICYTRACE_FAULT_RANK="1")
    assert killed.returncode != 0
    assert not (tmp_path / "r" / "pairs.parquet").exists()
    again = _run(toml, tmp_path / "r", 1)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _digests(tmp_path / "r") == _digests(one)


def test_gradient_mode_divides_the_concepts_and_writes_the_bytes_of_one(tmp_path):
    """Gradient mode: rank r computes the concepts c % 2 == r and broadcasts them; the pairs'
    files equal a one-process run's, and each rank's concept marker counts its half."""
    cfg = cfgmod.resolve(tiny_config(write_tiny_model(tmp_path / "m"), *write_tiny_data(tmp_path), tmp_path / "cache",
                                     update={"lr": 1e-3}, run={"pair_batch": 4, "mode": "gradient"},
                                     decompose={"method": "first_order", "delta_x": "gated"},
                                     gradient={"per_feature": True}))
    toml = tmp_path / "run.toml"
    toml.write_text(cfgmod.to_toml(cfg))
    one = _run(toml, tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(toml, tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert _digests(tmp_path / "two") == _digests(tmp_path / "one")
    import json

    counts = [json.loads((tmp_path / "two" / "stages" / f"concepts-rank{r}.json").read_text()) for r in (0, 1)]
    assert counts[0]["of"] == counts[1]["of"] > 2
    assert counts[0]["concepts"] + counts[1]["concepts"] == counts[0]["of"]
    assert abs(counts[0]["concepts"] - counts[1]["concepts"]) <= 1
