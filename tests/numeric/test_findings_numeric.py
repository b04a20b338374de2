"""Interference against chance, Benjamini–Hochberg and mediation: exact formulas against Monte
Carlo and hand-computed cases."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

import policytrace as pt
from policytrace.numeric.interference import against_chance, benjamini_hochberg, group_rates
from policytrace.numeric.mediation import mediation

from _helpers import problem


@given(st.integers(0, 10_000), st.integers(4, 12), st.integers(1, 3))
def test_chance_share_and_variance_match_permutations(seed, k, n_groups):
    rng = np.random.default_rng(seed)
    d = rng.normal(size=(3, k)) * rng.exponential(size=(1, k))
    fg = [f"g{j % n_groups}" for j in range(k)]
    res = against_chance(d, fg, ["g0", "g1" if n_groups > 1 else "g0", "g0"], n_perm=10, seed=seed)
    w = np.abs(d) / np.abs(d).sum(axis=1, keepdims=True)
    for i, g in enumerate(["g0", "g1" if n_groups > 1 else "g0", "g0"]):
        # brute force over 20,000 random group assignments with the same group sizes
        perms = np.argsort(rng.random((20_000, k)), axis=1)
        labels = np.asarray(fg)[perms]
        shares = 1 - (w[i][None, :] * (labels == g)).sum(axis=1)
        m = fg.count(g)
        assert res["chance"][i] == pytest.approx(1 - m / k)
        assert shares.mean() == pytest.approx(res["chance"][i], abs=4 * shares.std() / np.sqrt(20_000) + 1e-12)
        var = m * (k - m) / (k - 1) * w[i].var()
        assert shares.var() == pytest.approx(var, rel=0.1, abs=1e-12)


def test_p_values_are_calibrated_under_the_null():
    rng = np.random.default_rng(0)
    d = rng.normal(size=(400, 16))
    fg = [f"g{j % 4}" for j in range(16)]
    res = against_chance(d, fg, [f"g{i % 4}" for i in range(400)], n_perm=999, seed=1)
    assert 0.02 < np.mean(res["p"] < 0.05) < 0.09
    assert res["significant"].sum() <= 2  # FDR control: almost nothing survives under the null


def test_systematic_off_target_shift_is_significant():
    """Pairs that move every feature except their own group's: far beyond chance."""
    rng = np.random.default_rng(0)
    fg = [f"g{j % 8}" for j in range(64)]
    d = rng.normal(size=(50, 64)) * 0.01
    d[:, [j for j in range(64) if j % 8]] += 1.0
    res = against_chance(d, fg, ["g0"] * 50, n_perm=999, seed=2)
    assert res["significant"].all() and (res["excess"] > 0.1).all()
    assert (res["p"] == 1 / 1000).all()


def test_few_moved_features_off_target_are_weak_evidence():
    """A pair moving 6 of 16 features, none in its own group of 4, happens by chance with
    probability C(10,4)/C(16,4) = 0.115: not significant."""
    fg = [f"g{j % 4}" for j in range(16)]
    d = np.zeros((1, 16))
    d[0, [1, 2, 3, 5, 6, 7]] = 1.0
    res = against_chance(d, fg, ["g0"], n_perm=20_000, seed=3)
    assert res["p"][0] == pytest.approx(210 / 1820, abs=0.01) and not res["significant"][0]


def test_a_single_dominant_feature_off_target_is_chance_level():
    fg = ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    d = np.zeros((1, 12))
    d[0, 5] = 1.0
    res = against_chance(d, fg, ["a"], n_perm=999, seed=0)
    assert res["share"][0] == 1.0 and res["chance"][0] == pytest.approx(2 / 3)
    assert res["p"][0] == pytest.approx(2 / 3, abs=0.05) and not res["significant"][0]


def test_pairs_without_group_or_shift_are_not_tested():
    res = against_chance(np.array([[0.0, 0.0], [1.0, 2.0]]), ["a", "b"], ["a", None], n_perm=9)
    assert np.isnan(res["p"]).all() and not res["significant"].any()


def test_benjamini_hochberg_hand_computed():
    p = np.array([0.01, 0.04, 0.03, 0.2, np.nan])
    # sorted 0.01, 0.03, 0.04, 0.2 against 0.0125, 0.025, 0.0375, 0.05: only the first passes
    assert benjamini_hochberg(p, 0.05).tolist() == [True, False, False, False, False]
    assert benjamini_hochberg(np.array([0.01, 0.02, 0.03]), 0.05).all()


def test_group_rates_binomial():
    frame = group_rates(["a"] * 10 + ["b"] * 10, np.array([True] * 10 + [False] * 10), np.full(20, 0.5))
    a = frame.filter(pl.col("group") == "a").row(0, named=True)
    assert a["interference_rate"] == 1.0 and a["chance_rate"] == 0.5 and a["p_value"] == pytest.approx(0.5**10)
    assert a["significant"] and not frame.filter(pl.col("group") == "b")["significant"][0]


@given(st.integers(0, 10_000))
def test_mediation_identities(seed):
    rng = np.random.default_rng(seed)
    X, y, dX, dy = problem(rng, n=30, k=5, p=4)
    pol = pt.fit_policy(X, y, lam=1.0)
    att = pt.Attributor(pol, X, y, method="first_order", probe_groups=[i % 3 for i in range(30)])
    att.add(dX, dy)
    pairs, pf, beh = att.pairs(), att.pair_features(), att.pair_behaviour()
    w = pol.coef / pol.scale
    for i in range(4):
        mediated = (dX[i] @ w).mean()
        assert pairs["pred_dy_mean"][i] == pytest.approx(mediated, rel=1e-10, abs=1e-14)
        assert pairs["direct_dy"][i] == pytest.approx(dy[i].mean() - mediated, rel=1e-10, abs=1e-14)
        assert pf.filter(pl.col("pair_id") == i)["mediated_dy"].sum() == pytest.approx(mediated, rel=1e-9, abs=1e-14)
        pred = dX[i] @ w
        r2 = 1 - ((dy[i] - pred) ** 2).sum() / (dy[i] ** 2).sum()
        assert pairs["mediated_r2"][i] == pytest.approx(r2, rel=1e-9)
    b = beh.filter(pl.col("pair_id") == 0)
    assert (b["dy_mean"] - b["mediated_dy"] - b["direct_dy"]).abs().max() < 1e-12


def test_mediated_share_is_null_without_a_change():
    X = np.eye(4) + 1.0
    med = mediation(np.zeros((1, 4)), np.zeros((1, 4)), np.zeros((1, 4)), np.ones(4), np.ones(4))
    assert np.isnan(med.share[0]) and np.isnan(med.r2[0]) and X.shape == (4, 4)
