"""Gradient mode's concepts are exactly the first-order decomposition, as linear functionals."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

import policytrace as pt
from policytrace.numeric.concepts import concepts

from _helpers import problem


@given(st.integers(0, 10_000), st.booleans(), st.booleans(), st.sampled_from([0.1, 2.0, "gcv"]))
def test_concepts_equal_the_first_order_decomposition(seed, intercept, standardize, lam):
    rng = np.random.default_rng(seed)
    X, y, dX, dy = problem(rng, n=40, k=6, p=3)
    pol = pt.fit_policy(X, y, lam=lam, intercept=intercept, standardize=standardize)
    flag = rng.random(40) < 0.5
    flag[:2] = [True, False]
    cs = {c.name: c for c in concepts(pol, X, y, flag, per_feature=True)}
    att = pt.Attributor(pol, X, y, method="first_order")
    att.add(dX, dy)
    pairs, pf = att.pairs(), att.pair_features()
    for i in range(3):
        scale = max(abs(pairs["score"][i]), 1e-12)
        assert cs["score_x"].apply(dX[i], dy[i]) == pytest.approx(pairs["score_x"][i], rel=1e-7, abs=1e-9 * scale)
        assert cs["score_y"].apply(dX[i], dy[i]) == pytest.approx(pairs["score_y"][i], rel=1e-7, abs=1e-9 * scale)
        assert cs["dy_mean"].apply(dX[i], dy[i]) == pytest.approx(dy[i].mean(), rel=1e-12)
        assert cs["mediated_dy"].apply(dX[i], dy[i]) == pytest.approx(pairs["pred_dy_mean"][i], rel=1e-9, abs=1e-15)
        assert cs["dy_on_flagged"].apply(dX[i], dy[i]) == pytest.approx(dy[i][flag].mean(), rel=1e-12)
        rows = pf.filter(pl.col("pair_id") == i)
        for fid, dx_k, dy_k in zip(rows["feature_id"], rows["d_coef_x"], rows["d_coef_y"]):
            tol = 1e-9 * max(np.abs(rows["d_coef"].to_numpy()).max(), 1e-12)
            assert cs[f"d_coef_x:{fid}"].apply(dX[i], dy[i]) == pytest.approx(dx_k, rel=1e-7, abs=tol)
            assert cs[f"d_coef_y:{fid}"].apply(dX[i], dy[i]) == pytest.approx(dy_k, rel=1e-7, abs=tol)
