"""Bad inputs to the pipeline layer: config values and files, probe / pair files, run folders
and the command line. Each must raise a PolicytraceError subclass (exit status 2 with one
`policytrace: error: ...` line from the CLI) whose message names the key, file, line or flag,
never leak an OSError / RecursionError / ValueError from deeper down.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from policytrace.errors import ConfigError, DataError, PolicytraceError, RunFolderError  # noqa: E402
from policytrace.pipeline import config as cfgmod  # noqa: E402
from policytrace.pipeline.cli import main  # noqa: E402
from policytrace.pipeline.data import load_pairs, load_probes  # noqa: E402
from policytrace.pipeline.report import write_report  # noqa: E402
from policytrace.pipeline.run import execute  # noqa: E402

from _tiny import tiny_config, write_tiny_data, write_tiny_model  # noqa: E402
from _helpers import expect  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model folder and data (read-only), for configs that are valid but for one thing."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bad_inputs")
    model = write_tiny_model(root / "model")
    probes, pairs = write_tiny_data(root)
    return model, probes, pairs, root / "cache"


def _toml(tiny, path: Path) -> Path:
    path.write_text(cfgmod.to_toml(cfgmod.resolve(tiny_config(*tiny))))
    return path


# --------------------------------------------------------------------------------------
# 11. config values
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "user,key",
    [
        ({"sae": {"train_d_sae": 0}}, "sae.train_d_sae"),
        ({"sae": {"train_d_sae": 8, "train_k": 9}}, "sae.train_k"),
        ({"run": {"threads": 2**70}}, "run.threads"),
        ({"run": {"threads": -1}}, "run.threads"),
        ({"policy": {"lam": "GCV"}}, "policy.lam"),
        ({"policy": {"lam": -1.0}}, "policy.lam"),
        ({"policy": {"lamda": 5.0}}, "policy.lamda"),
        ({"polcy": {"lam": 5.0}}, "polcy"),
        ({"features": {"k": "8"}}, "features.k"),
        ({"features": {"k": 8.0}}, "features.k"),
        ({"features": {"k": True}}, "features.k"),
        ({"features": {"threshold": float("nan")}}, "features.threshold"),
        ({"policy": 5}, "policy"),
        # A seed numpy / torch cannot take: refused by the config, not by the run after the
        # model has been loaded (np.random.default_rng(-1), torch.manual_seed(2**70) raise).
        ({"run": {"seed": -1}}, "run.seed"),
        ({"run": {"seed": 2**70}}, "run.seed"),
        ({"sae": {"train_seed": 2**70}}, "sae.train_seed"),
    ],
    ids=["train_d_sae-0", "train_k>train_d_sae", "threads-2**70", "threads-negative", "lam-GCV",
         "lam-negative", "unknown-key", "unknown-table", "k-str", "k-float", "k-bool", "threshold-nan",
         "table-not-a-table", "seed-negative", "seed-2**70", "train_seed-2**70"],
)
def test_config_bad_value(user, key):
    expect(ConfigError, lambda: cfgmod.resolve(user), key)


def test_config_path_is_a_directory(tmp_path):
    expect(ConfigError, lambda: cfgmod.load(tmp_path), str(tmp_path))


def test_config_file_missing(tmp_path):
    expect(ConfigError, lambda: cfgmod.load(tmp_path / "nope.toml"), "nope.toml")


def test_config_file_invalid_utf8(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_bytes(b"[run]\nseed = 1\n# caf\xe9 \xff\n")
    expect(ConfigError, lambda: cfgmod.load(path), "bad.toml")


def test_config_file_invalid_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[run\nseed = 1\n")
    expect(ConfigError, lambda: cfgmod.load(path), "bad.toml")


def test_config_file_big_integer(tmp_path):
    path = tmp_path / "big.toml"
    path.write_text("[run]\nthreads = 99999999999999999999999\n")
    expect(ConfigError, lambda: cfgmod.load(path), "run.threads")


# --------------------------------------------------------------------------------------
# 12. probe and pair files
# --------------------------------------------------------------------------------------

LOADERS = {"probes": load_probes, "pairs": load_pairs}


def _data(tmp_path):
    probes, pairs = write_tiny_data(tmp_path)
    return {"probes": probes, "pairs": pairs}


@pytest.mark.parametrize("kind", ["probes", "pairs"])
def test_jsonl_invalid_utf8_on_line_3(tmp_path, kind):
    src = _data(tmp_path)[kind]
    lines = src.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"id": "', b'"id": "\xff\xfe', 1)
    bad = tmp_path / f"bad-{kind}.jsonl"
    bad.write_bytes(b"".join(lines))
    msg = str(expect(DataError, lambda: LOADERS[kind](bad), bad.name))
    assert re.search(r"(:3\b|line 3\b)", msg), f"line 3 is not named: {msg!r}"


@pytest.mark.parametrize("kind", ["probes", "pairs"])
def test_jsonl_deeply_nested_line(tmp_path, kind):
    # Today json's RecursionError leaks.
    src = _data(tmp_path)[kind]
    lines = src.read_bytes().splitlines(keepends=True)
    lines[1] = b"[" * 100_000 + b"]" * 100_000 + b"\n"
    bad = tmp_path / f"deep-{kind}.jsonl"
    bad.write_bytes(b"".join(lines))
    msg = str(expect(DataError, lambda: LOADERS[kind](bad), bad.name))
    assert re.search(r"(:2\b|line 2\b)", msg), f"line 2 is not named: {msg!r}"


@pytest.mark.parametrize("kind", ["probes", "pairs"])
@pytest.mark.parametrize("content", [b"", None], ids=["empty", "random-bytes"])
def test_parquet_that_is_not_parquet(tmp_path, kind, content):
    import numpy as np

    bad = tmp_path / f"{kind}.parquet"
    bad.write_bytes(np.random.default_rng(3).bytes(500) if content is None else content)
    expect(DataError, lambda: LOADERS[kind](bad), bad.name)


@pytest.mark.parametrize("kind", ["probes", "pairs"])
@pytest.mark.parametrize("name", ["folder.jsonl", "folder"])
def test_directory_as_data_file(tmp_path, kind, name):
    folder = tmp_path / name
    folder.mkdir()
    expect(PolicytraceError, lambda: LOADERS[kind](folder), str(folder))


# --------------------------------------------------------------------------------------
# run folders
# --------------------------------------------------------------------------------------


def _execute(tiny, folder):
    cfg = cfgmod.resolve(tiny_config(*tiny))
    return execute(cfg, folder, log=lambda m: None, progress=False)


def test_run_folder_is_a_regular_file(tiny, tmp_path):
    # Today: FileExistsError from mkdir.
    target = tmp_path / "afile"
    target.write_text("not a folder")
    expect(PolicytraceError, lambda: _execute(tiny, target), str(target))


def test_run_folder_under_a_regular_file(tiny, tmp_path):
    # Today: NotADirectoryError from mkdir.
    (tmp_path / "afile").write_text("not a folder")
    expect(PolicytraceError, lambda: _execute(tiny, tmp_path / "afile" / "run"), str(tmp_path / "afile"))


@pytest.mark.parametrize(
    "content",
    ['{"config_digest": "ab', "[1, 2]", json.dumps({"config_digest": "x", "inputs": [1]}), b"\xff\xfe"],
    ids=["truncated", "list", "inputs-list", "not-utf8"],
)
def test_run_folder_damaged_fingerprint(tiny, tmp_path, content):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "fingerprint.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    expect(RunFolderError, lambda: _execute(tiny, folder), "fingerprint.json")


@pytest.mark.parametrize(
    "content,fragment",
    [('{"version": 2, "sta', "manifest.json"), ("[]", "manifest.json"), (b"\xff", "manifest.json"),
     (json.dumps({"version": 2, "status": "complete", "files": {"pairs.parquet": "abc"}}), "pairs.parquet")],
    ids=["truncated", "list", "not-utf8", "missing-output"],
)
def test_report_on_damaged_run_folder(tmp_path, content, fragment):
    (tmp_path / "manifest.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    expect(RunFolderError, lambda: write_report(tmp_path), fragment)


# --------------------------------------------------------------------------------------
# 13. command line
# --------------------------------------------------------------------------------------


def _cli(capsys, argv):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, err


def test_cli_out_is_an_existing_file(tiny, tmp_path, capsys):
    toml = _toml(tiny, tmp_path / "run.toml")
    target = tmp_path / "afile"
    target.write_text("keep me")
    rc, err = _cli(capsys, ["run", toml, "--out", target, "--quiet", "--no-report"])
    assert rc == 2, err
    assert "policytrace: error:" in err and "--out" in err, err
    assert target.read_text() == "keep me"


def test_cli_out_under_an_existing_file(tiny, tmp_path, capsys):
    # Today: NotADirectoryError escapes main() (a traceback, not exit status 2).
    toml = _toml(tiny, tmp_path / "run.toml")
    (tmp_path / "afile").write_text("keep me")
    rc, err = _cli(capsys, ["run", toml, "--out", tmp_path / "afile" / "run", "--quiet", "--no-report"])
    assert rc == 2, err
    assert "policytrace: error:" in err and "--out" in err, err


def test_cli_config_path_is_a_directory(tmp_path, capsys):
    rc, err = _cli(capsys, ["run", tmp_path, "--out", tmp_path / "out", "--quiet"])
    assert rc == 2, err
    assert "policytrace: error:" in err and str(tmp_path) in err, err
    assert not (tmp_path / "out").exists()


def test_cli_config_invalid_utf8(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_bytes(b"[run]\nseed = 1\n# \xff\n")
    rc, err = _cli(capsys, ["run", path, "--out", tmp_path / "out", "--quiet"])
    assert rc == 2, err
    assert "policytrace: error:" in err and "bad.toml" in err, err


def test_cli_report_on_a_regular_file(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("x")
    rc, err = _cli(capsys, ["report", target])
    assert rc == 2, err
    assert "policytrace: error:" in err and str(target) in err, err
