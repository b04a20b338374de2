"""Streaming decomposition, pair summaries and interference."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

import policytrace as pt
from _helpers import problem, stack


@pytest.fixture
def setup(rng):
    X, y, dX, dy = problem(rng, n=80, k=6, p=10)
    pol = pt.fit_policy(X, y, lam=1.0, feature_ids=[100, 101, 102, 103, 104, 105])
    return pol, X, y, dX, dy


@pytest.mark.parametrize("method", ["exact", "first_order"])
def test_batches_equal_one_call_for_every_input_form(setup, method):
    pol, X, y, dX, dy = setup
    whole = pt.decompose(pol, X, y, dX, dy, method=method, pair_ids=[f"p{i}" for i in range(10)])
    att = pt.Attributor(pol, X, y, method=method)
    att.add(stack(dX[:3]), dy[:3], pair_ids=["p0", "p1", "p2"])  # stacked CSR
    att.add([sp.csr_matrix(d) for d in dX[3:6]], dy[3:6], pair_ids=["p3", "p4", "p5"])  # list
    att.add(dX[6], dy[6], pair_ids=["p6"])  # one dense pair (n, K)
    att.add(sp.csr_matrix(dX[7]), dy[7:8], pair_ids=["p7"])  # one sparse pair
    att.add(np.asfortranarray(dX[8:]), dy[8:], pair_ids=["p8", "p9"])  # non-contiguous
    assert att.n_pairs == 10
    got = att.pair_features()
    assert got.columns == whole.columns
    assert got["pair_id"].to_list() == whole["pair_id"].to_list()
    for c in whole.columns[2:]:
        # Z~ᵀΔy is one GEMM per batch whose blocking depends on the batch width, so the last
        # bits may differ across batchings (the same batches always give the same bits).
        np.testing.assert_allclose(got[c].to_numpy(), whole[c].to_numpy(), rtol=1e-13, atol=1e-18)
    assert got["feature_id"].to_list()[:6] == [100, 101, 102, 103, 104, 105]


def test_pairs_summary_columns_and_meaning(setup):
    pol, X, y, dX, dy = setup
    att = pt.Attributor(pol, X, y)
    att.add(dX, dy)
    pairs = att.pairs()
    pf = att.pair_features()
    by_pair = pf.group_by("pair_id", maintain_order=True).agg(pl.col("alignment").sum())
    np.testing.assert_allclose(pairs["score"].to_numpy(), by_pair["alignment"].to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(pairs["dy_mean"].to_numpy(), dy.mean(axis=1), rtol=1e-12)
    pred = np.array([((d / pol.scale) @ pol.coef).mean() for d in dX])
    np.testing.assert_allclose(pairs["pred_dy_mean"].to_numpy(), pred, rtol=1e-9, atol=1e-15)
    dom = pf.with_columns(pl.col("d_coef").abs().alias("a")).sort("a", descending=True).group_by(
        "pair_id", maintain_order=True
    ).first()
    expect = dict(zip(dom["pair_id"].to_list(), dom["feature_id"].to_list()))
    assert [expect[p] for p in pairs["pair_id"].to_list()] == pairs["dominant_feature"].to_list()


def test_interference_flags_and_summary(setup):
    pol, X, y, dX, dy = setup
    fgroups = ["harm", "harm", "harm", "safe", "safe", "safe"]
    probe_groups = ["harm" if i % 2 else "safe" for i in range(X.shape[0])]
    att = pt.Attributor(pol, X, y, probe_groups=probe_groups, feature_groups=dict(zip(pol.feature_ids.tolist(), fgroups)))
    pair_groups = ["harm"] * 5 + ["safe"] * 4 + [None]
    att.add(dX, dy, pair_groups=pair_groups)
    pairs = att.pairs()
    d = att.pair_features()["d_coef"].to_numpy().reshape(10, 6)
    for i, row in enumerate(pairs.iter_rows(named=True)):
        a = np.abs(d[i])
        dom = int(np.argmax(a))
        intended = np.array([pair_groups[i] is not None and g == pair_groups[i] for g in fgroups])
        assert row["dominant_feature"] == pol.feature_ids[dom]
        assert row["dominant_group"] == fgroups[dom]
        assert row["interference"] == (not intended[dom])
        np.testing.assert_allclose(row["off_target_share"], a[~intended].sum() / a.sum(), rtol=1e-12)
    # Core and reference agree on the flags.
    for backend in ("rust", "numpy"):
        dom, share, flag = pt.interference(d, fgroups, pair_groups, _backend=backend)
        assert flag.tolist() == pairs["interference"].to_list()
        np.testing.assert_allclose(share, pairs["off_target_share"].to_numpy(), rtol=1e-12)
    summ = att.interference_summary()
    assert set(summ.columns) >= {"group", "feature_id", "feature_group", "n_pairs", "mean_d_coef", "mean_abs_d_coef", "n_dominant", "intended"}
    assert summ.filter(pl.col("group") == "harm")["n_pairs"].to_list() == [5] * 6
    assert summ["n_dominant"].sum() == 9  # every grouped pair has exactly one dominant feature
    beh = att.pair_behaviour()
    assert beh.height == 20
    h = beh.filter((pl.col("pair_id") == 0) & (pl.col("probe_group") == "harm"))["dy_mean"][0]
    np.testing.assert_allclose(h, dy[0, 1::2].mean(), rtol=1e-12)


def test_feature_groups_from_feature_stats(rng):
    X, y, dX, dy = problem(rng, n=90, k=5, p=3)
    cats = np.array(["a", "b", "c"])[np.arange(90) % 3]
    X[cats == "b", 2] += 3.0
    frame, levels = pt.feature_stats(X, y, cats)
    assert levels == ["a", "b", "c"]
    assert frame.filter(pl.col("feature_id") == 2)["group"][0] == "b"
    pol = pt.fit_policy(X, y)
    att = pt.Attributor(pol, X, y, feature_groups=frame)
    att.add(dX, dy, pair_groups=["a", "b", "c"])
    assert att.pairs()["interference"].dtype == pl.Boolean


def test_zero_change_pair_has_no_dominant_feature(setup):
    pol, X, y, dX, dy = setup
    att = pt.Attributor(pol, X, y, feature_groups=["g"] * 6)
    att.add(np.zeros_like(dX[:1]), np.zeros_like(dy[:1]), pair_groups=["g"])
    row = att.pairs().row(0, named=True)
    assert row["dominant_feature"] is None and row["off_target_share"] == 0.0 and row["interference"] is False


def test_keep_false_streams(setup):
    pol, X, y, dX, dy = setup
    att = pt.Attributor(pol, X, y, keep=False)
    f = att.add(dX[:2], dy[:2])
    assert f.height == 12
    with pytest.raises(pt.errors.InvalidValueError):
        att.pairs()


def test_predict_and_to_frame(setup):
    pol, X, y, _, _ = setup
    np.testing.assert_allclose(pol.predict(sp.csr_matrix(X)), pol.predict(X), rtol=1e-12)
    np.testing.assert_allclose(pol.predict(X), (X / pol.scale) @ pol.coef + pol.intercept, rtol=1e-12)
    fr = pol.to_frame()
    assert fr.columns == ["feature_id", "label", "coef", "coef_raw", "scale", "rank"]
    assert fr.sort("rank")["coef"].abs().to_list() == sorted(np.abs(pol.coef).tolist(), reverse=True)


def test_float32_inputs_are_promoted(setup):
    pol, X, y, dX, dy = setup
    a = pt.decompose(pol, X, y, dX.astype(np.float32), dy.astype(np.float32))
    b = pt.decompose(pol, X, y, dX.astype(np.float32).astype(np.float64), dy.astype(np.float32).astype(np.float64))
    assert a.equals(b)
