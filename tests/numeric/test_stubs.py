"""The compiled core's stubs (_core.pyi) match the runtime module: names, signatures, result
attributes (mypy.stubtest), and the result objects carry what the stubs promise."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from policytrace import _core

pytest.importorskip("mypy")


def test_stubtest_passes():
    proc = subprocess.run([sys.executable, "-m", "mypy.stubtest", "policytrace._core"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_result_objects_are_typed_and_frozen():
    rng = np.random.default_rng(0)
    X, y = rng.random((20, 3)), rng.random(20)
    fit = _core.fit_policy(X, y, 1.0)
    assert isinstance(fit, _core.FitResult) and fit.coef.shape == (3,) and fit.solver == "cholesky"
    with pytest.raises(AttributeError):
        fit.lam = 2.0
    stats = _core.feature_stats(X, y)
    assert isinstance(stats, _core.FeatureStats) and stats.group_means.shape == (3, 1)  # one group when none is given
    d = _core.Decomposer(fit.coef, fit.intercept, fit.lam, fit.scale, True, X, y)
    dx = (np.zeros(41, np.int64), np.zeros(0, np.int64), np.zeros(0), (40, 3))
    split = d.run(dx, np.zeros((2, 20)), "first_order")
    assert isinstance(split, _core.SplitResult) and split.d_total.shape == (2, 3) and split.n_fallback == 0
    inter = _core.interference(np.ones((2, 3)), np.array([0, 1, 1]), np.array([0, 1]))
    assert isinstance(inter, _core.InterferenceResult) and inter.flag.dtype == np.bool_
