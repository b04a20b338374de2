"""Run folders that are killed, damaged or changed between a kill and a resume, tried as a user
would: kills are real SIGKILLs of a `python -m policytrace run` subprocess (at named points,
POLICYTRACE_FAULT), damage is done to the files on disk. Every case ends with byte-identical
outputs or a typed error that names the file or input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sae_lens")

from policytrace.errors import RunFolderError  # noqa: E402
from policytrace.pipeline import config as cfgmod  # noqa: E402
from policytrace.pipeline.report import write_report  # noqa: E402
from policytrace.pipeline.run import execute  # noqa: E402
from policytrace.pipeline.validate import validate  # noqa: E402

from _tiny import tiny_config, write_tiny_data, write_tiny_model  # noqa: E402

OUTPUTS = ["config.toml", "base.npz", "policy.parquet", "policy.json", "features.parquet", "probes.parquet",
           "pairs.parquet", "pair_features.parquet", "interference.parquet"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model, data, a config file and one uninterrupted reference run (subprocess)."""
    root = tmp_path_factory.mktemp("rundir")
    model = write_tiny_model(root / "model")
    probes, pairs = write_tiny_data(root)
    cfg = cfgmod.resolve(tiny_config(model, probes, pairs, root / "cache"))
    toml = root / "run.toml"
    toml.write_text(cfgmod.to_toml(cfg))
    proc = cli(toml, root / "whole")
    assert proc.returncode == 0, proc.stderr
    return {"root": root, "toml": toml, "cfg": cfg, "whole": root / "whole"}


def cli(toml: Path, out: Path, fault: str = "", torch_threads: int = 1) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": str(torch_threads), "POLICYTRACE_FAULT": fault}
    cmd = [sys.executable, "-m", "policytrace", "run", str(toml), "--out", str(out), "--quiet", "--no-report"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def digests(folder: Path) -> dict:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in OUTPUTS}


def temporaries(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*.tmp"))


def resume_in_process(cfg, folder: Path, logs: list | None = None) -> dict:
    torch.set_num_threads(1)
    return execute(cfg, folder, log=(logs.append if logs is not None else lambda m: None), progress=False)


@pytest.mark.parametrize("fault", ["before-shard-marker:2", "before-rename:14"])
def test_sigkill_then_resume_gives_identical_bytes(setup, tmp_path, fault):
    out = tmp_path / "run"
    killed = cli(setup["toml"], out, fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "pairs.parquet").exists()
    if fault.startswith("before-rename"):
        assert temporaries(out), "the kill should leave the temporary of the write it interrupted"
    done = cli(setup["toml"], out)
    assert done.returncode == 0, done.stderr
    assert digests(out) == digests(setup["whole"])
    assert temporaries(out) == []


def test_resume_keeps_the_feature_contexts_the_killed_process_wrote(setup, tmp_path, monkeypatch):
    """The contexts cost minutes of probe, pair and corpus passes on a real model: a resumed run
    reads them back (the base marker vouches for the file) instead of computing them again; a
    damaged contexts file is computed again."""
    from policytrace.pipeline import run as runmod

    out = tmp_path / "run"
    assert cli(setup["toml"], out, "before-shard-marker:2").returncode == -signal.SIGKILL
    written = (out / "feature_contexts.parquet").read_bytes()
    calls = []
    real = runmod.feature_contexts
    monkeypatch.setattr(runmod, "feature_contexts", lambda *a, **k: calls.append(1) or real(*a, **k))
    resume_in_process(setup["cfg"], out)
    assert calls == [] and (out / "feature_contexts.parquet").read_bytes() == written
    assert digests(out) == digests(setup["whole"])
    assert (out / "feature_contexts.parquet").read_bytes() == (setup["whole"] / "feature_contexts.parquet").read_bytes()
    # damaged: recomputed (and the same bytes again)
    (out / "feature_contexts.parquet").write_bytes(written[:-7])
    runmod.write_base(runmod.RunDir(out, lambda m: None), runmod.prepare(setup["cfg"], lambda m: None, False), False)
    assert calls == [1] and (out / "feature_contexts.parquet").read_bytes() == written


def _killed_copy(setup, tmp_path) -> tuple[Path, Path]:
    """A run killed after its first shard, with its own copy of the data files."""
    data = tmp_path / "data"
    data.mkdir()
    cfg = setup["cfg"]
    for kind in ("probes", "pairs"):
        shutil.copy(getattr(cfg.data, kind), data / f"{kind}.jsonl")
    toml = tmp_path / "run.toml"
    text = setup["toml"].read_text()
    for kind in ("probes", "pairs"):
        text = text.replace(json.dumps(getattr(cfg.data, kind)), json.dumps(str(data / f"{kind}.jsonl")))
    toml.write_text(text)
    out = tmp_path / "run"
    assert cli(toml, out, "before-shard-marker:2").returncode == -signal.SIGKILL
    return toml, out


def test_resume_after_the_pairs_file_changed_is_refused(setup, tmp_path):
    toml, out = _killed_copy(setup, tmp_path)
    pairs = tmp_path / "data" / "pairs.jsonl"
    lines = pairs.read_text().splitlines()
    lines[0] = lines[0].replace("i can't help with that", "i cannot help with that at all")
    pairs.write_text("\n".join(lines) + "\n")
    proc = cli(toml, out)
    assert proc.returncode == 2
    assert "pairs changed" in proc.stderr and "new run folder" in proc.stderr


def test_resume_after_the_probes_file_gained_a_row_is_refused(setup, tmp_path):
    toml, out = _killed_copy(setup, tmp_path)
    probes = tmp_path / "data" / "probes.jsonl"
    extra = {"id": "probe-new", "prompt": "tell me story please", "category": "alpha", "harmful": False}
    probes.write_text(probes.read_text() + json.dumps(extra) + "\n")
    proc = cli(toml, out)
    assert proc.returncode == 2 and "probes changed" in proc.stderr


def test_resume_with_other_thread_counts_is_refused(setup, tmp_path):
    toml, out = _killed_copy(setup, tmp_path)
    proc = cli(toml, out, torch_threads=2)
    assert proc.returncode == 2
    assert "1 torch threads per process, this process has" in proc.stderr and "2 torch threads" in proc.stderr
    assert "OMP_NUM_THREADS" in proc.stderr
    done = cli(toml, out)  # the folder's own counts resume it
    assert done.returncode == 0, done.stderr
    same = [n for n in OUTPUTS if n != "config.toml"]  # the copy's config names its own data files
    assert {n: digests(out)[n] for n in same} == {n: digests(setup["whole"])[n] for n in same}


def test_finished_folder_opens_under_other_thread_counts(setup, tmp_path):
    out = _finished_copy(setup, tmp_path)
    proc = cli(setup["toml"], out, torch_threads=2)
    assert proc.returncode == 0, proc.stderr
    assert digests(out) == digests(setup["whole"])


def test_changed_setting_is_named(setup, tmp_path):
    toml, out = _killed_copy(setup, tmp_path)
    toml.write_text(toml.read_text().replace("lr = 0.0001", "lr = 0.0002"))
    proc = cli(toml, out)
    assert proc.returncode == 2 and "update.lr changed" in proc.stderr


def _finished_copy(setup, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(setup["whole"], out)
    return out


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


def test_damaged_finished_folder_is_repaired_on_resume(setup, tmp_path):
    """Truncated base.npz, a deleted shard, NaN written into another shard and a manifest that
    is a JSON list: one resume recomputes what is damaged and ends with the same bytes."""
    out = _finished_copy(setup, tmp_path)
    _truncate(out / "base.npz")
    (out / "shards" / "pairs-00001.parquet").unlink()
    shard = out / "shards" / "pair_features-00002.parquet"
    frame = pl.read_parquet(shard)
    frame.with_columns(pl.lit(float("nan")).alias("d_coef")).write_parquet(shard)
    (out / "manifest.json").write_text("[]")
    logs: list[str] = []
    manifest = resume_in_process(setup["cfg"], out, logs)
    assert manifest["status"] == "complete"
    assert digests(out) == digests(setup["whole"])
    text = "\n".join(logs)
    assert "base.npz" in text and "pairs-00001.parquet" in text and "pair_features-00002.parquet" in text
    assert not pl.read_parquet(out / "pair_features.parquet")["d_coef"].is_nan().any()


def test_truncated_manifest_is_rewritten_on_resume(setup, tmp_path):
    out = _finished_copy(setup, tmp_path)
    _truncate(out / "manifest.json")
    assert resume_in_process(setup["cfg"], out)["status"] == "complete"
    assert digests(out) == digests(setup["whole"])
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


@pytest.mark.parametrize("damage", ["truncated-manifest", "list-manifest", "truncated-pairs", "deleted-pairs",
                                    "truncated-base"])
def test_report_names_the_damaged_file(setup, tmp_path, damage):
    out = _finished_copy(setup, tmp_path)
    target = {"truncated-manifest": "manifest.json", "list-manifest": "manifest.json", "truncated-pairs": "pairs.parquet",
              "deleted-pairs": "pairs.parquet", "truncated-base": "base.npz"}[damage]
    if damage == "list-manifest":
        (out / target).write_text("[1, 2]")
    elif damage.startswith("deleted"):
        (out / target).unlink()
    else:
        _truncate(out / target)
    with pytest.raises(RunFolderError, match=target.replace(".", r"\.")) as e:
        write_report(out)
    assert "policytrace run" in str(e.value)


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_validate_names_a_damaged_shard(setup, tmp_path, damage):
    out = _finished_copy(setup, tmp_path)
    shard = out / "shards" / "deltas-00001.npz"
    if damage == "deleted":
        shard.unlink()
    else:
        _truncate(shard)
    with pytest.raises(RunFolderError, match="shard 1") as info:
        validate(out, subsets=2, baselines=False, removal_k=0, progress=False, log=lambda m: None)
    assert str(shard) in str(info.value)


def test_stale_temporaries_and_sae_folders_are_removed(setup, tmp_path):
    """Leftovers of a dead writer (same host, dead pid) go; those of a live one stay."""
    from policytrace._files import temp_prefix

    out = _finished_copy(setup, tmp_path)
    (out / "manifest.json").unlink()  # as if killed before the merge: the resume passes the SAE cache
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    mine = temp_prefix("pairs.parquet")
    stale = out / (mine.replace(f".{os.getpid()}.", f".{dead_pid}.") + "abc.tmp")
    live = out / (mine + "def.tmp")
    stale.write_bytes(b"half")
    live.write_bytes(b"in progress")
    cache = setup["cfg"].run.cache_path()
    stale_sae = cache / (temp_prefix("sae").replace(f".{os.getpid()}.", f".{dead_pid}.") + "xyz.tmp")
    stale_sae.mkdir(parents=True)
    (stale_sae / "cfg.json").write_text("{")
    resume_in_process(setup["cfg"], out)
    assert not stale.exists() and live.exists()
    assert not stale_sae.exists()
    assert digests(out) == digests(setup["whole"])
    # The damaged npz reader says allow_pickle=False and closes the archive.
    np.load(out / "base.npz", allow_pickle=False).close()


def test_notebook_like_process_reproduces_the_cli_bytes(setup, tmp_path, monkeypatch):
    """The default SAE's corpus is a shipped file: IPython's `get_ipython` in builtins and a
    wrapped os.replace (what notebooks and profilers do) change nothing."""
    import builtins

    real_replace = os.replace
    monkeypatch.setattr(builtins, "get_ipython", lambda: None, raising=False)
    monkeypatch.setattr(os, "replace", lambda a, b: real_replace(a, b))
    cfg = setup["cfg"]
    fresh_cache = dataclasses_replace_cache(cfg, tmp_path / "cache")
    resume_in_process(fresh_cache, tmp_path / "nb")
    assert digests(tmp_path / "nb") == digests(setup["whole"]) | {"config.toml": digests(tmp_path / "nb")["config.toml"]}
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        p.name for p in cfg.run.cache_path().iterdir() if p.name.startswith("sae-"))


def dataclasses_replace_cache(cfg, cache: Path):
    import dataclasses

    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, cache_dir=str(cache)))


def test_files_follow_the_umask(setup):
    mask = os.umask(0)
    os.umask(mask)
    for name in OUTPUTS + ["manifest.json", "fingerprint.json", "shards/done-00000.json"]:
        assert (setup["whole"] / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
