"""The README's quickstart runs as written."""

import runpy
from pathlib import Path

import numpy as np

import policytrace as pt


def test_quickstart_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    g = runpy.run_path(str(Path(__file__).parents[2] / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "selected 5 features" in out
    # the mean-difference rule finds exactly the five latents the script plants
    assert sorted(g["feature_ids"].tolist()) == [7, 19, 33, 100, 150]
    # the saved policy is the fitted one, bit for bit
    saved, fitted = pt.Policy.load(tmp_path / "quickstart_policy.json"), g["policy"]
    for name in ("coef", "scale", "feature_ids"):
        assert getattr(saved, name).tobytes() == getattr(fitted, name).tobytes(), name
    assert (saved.intercept, saved.lam) == (fitted.intercept, fitted.lam)
    np.testing.assert_array_equal(saved.feature_ids, g["feature_ids"])
