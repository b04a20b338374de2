"""The README's quickstart runs as written."""

import runpy
from pathlib import Path


def test_quickstart_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(Path(__file__).parents[2] / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "selected 5 features" in out
    assert (tmp_path / "quickstart_policy.json").exists()
