"""Hypothesis properties: the Rust core against the float64 numpy reference."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st

import policytrace as pt
from _helpers import assert_rows_close, design_cond, reach, sae_like


@st.composite
def designs(draw, allow_wide=True):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n = draw(st.integers(3, 40))
    k = draw(st.integers(1, 12 if allow_wide else max(1, n - 2)))
    density = draw(st.sampled_from([0.05, 0.2, 0.5, 1.0]))
    magnitude = 10.0 ** draw(st.sampled_from([-6, -2, 0, 3, 6]))
    X = sae_like(rng, n, k, density, magnitude)
    quirk = draw(st.sampled_from(["none", "constant", "duplicate", "zero_rows", "zero_col"]))
    if quirk == "constant":
        X[:, 0] = magnitude * 0.7
    elif quirk == "duplicate" and k > 1:
        X[:, -1] = X[:, 0]
    elif quirk == "zero_rows":
        X[: n // 3] = 0.0
    elif quirk == "zero_col":
        X[:, 0] = 0.0
    y = X @ rng.normal(size=k) / magnitude + rng.normal(size=n)
    sparse = draw(st.booleans())
    return X, y, sparse, rng


@given(
    designs(),
    st.booleans(),
    st.booleans(),
    st.sampled_from([1e-3, 0.5, 5.0, 100.0]),
)
def test_fit_matches_reference(d, intercept, standardize, lam):
    X, y, sparse, _ = d
    Xin = sp.csr_matrix(X) if sparse else X
    a = pt.fit_policy(Xin, y, lam=lam, intercept=intercept, standardize=standardize)
    b = pt.fit_policy(X, y, lam=lam, intercept=intercept, standardize=standardize, _backend="numpy")
    np.testing.assert_allclose(a.scale, b.scale, rtol=1e-13)
    cond = design_cond(X, b.scale, intercept, lam)
    size = reach(X, y, b.scale, intercept, lam, b.coef)
    assert_rows_close(a.coef, b.coef, size, cond, what="coef")
    ys = np.abs(y).max()
    assert abs(a.intercept - b.intercept) <= 1e-9 * max(abs(b.intercept), ys) + 100 * 2.2e-16 * cond * (
        ys + size * np.abs(X / b.scale).max() * X.shape[1]
    )
    assert np.isfinite(a.coef).all() and np.isfinite(a.intercept)


@given(designs(), st.booleans(), st.booleans())
def test_gcv_matches_reference(d, intercept, standardize):
    X, y, sparse, _ = d
    a = pt.fit_policy(X, y, lam="gcv", intercept=intercept, standardize=standardize)
    b = pt.fit_policy(X, y, lam="gcv", intercept=intercept, standardize=standardize, _backend="numpy")
    np.testing.assert_allclose(a.gcv_grid, b.gcv_grid, rtol=1e-12)
    fin = np.isfinite(b.gcv_score)
    np.testing.assert_array_equal(np.isfinite(a.gcv_score), fin)
    # Core: eigendecomposition of ZᵀZ (or ZZᵀ); reference: SVD of Z. Both stable forms of RSS.
    np.testing.assert_allclose(a.gcv_score[fin], b.gcv_score[fin], rtol=1e-6)
    # The chosen lambda is the same grid point unless two GCV values tie within rounding.
    if a.lam != b.lam:
        ia, ib = list(a.gcv_grid).index(a.lam), list(b.gcv_grid).index(b.lam)
        assert abs(b.gcv_score[ia] - b.gcv_score[ib]) <= 1e-7 * abs(b.gcv_score[ib])


@given(designs(), st.booleans(), st.booleans(), st.sampled_from([0.1, 5.0]), st.integers(1, 4),
       st.sampled_from(["exact", "first_order"]), st.sampled_from(["pattern", "anywhere", "zero"]))
def test_decompose_matches_reference(d, intercept, standardize, lam, p, method, where):
    X, y, sparse, rng = d
    n, k = X.shape
    pol = pt.fit_policy(X, y, lam=lam, intercept=intercept, standardize=standardize)
    mag = np.abs(X).max() or 1.0
    dX = rng.normal(size=(p, n, k)) * 0.05 * mag
    if where == "pattern":
        dX = np.where(X != 0, dX, 0.0)
    elif where == "zero":
        dX[:] = 0.0
    dy = rng.normal(size=(p, n)) * 0.05
    dXin = sp.csr_matrix(dX.reshape(p * n, k)) if sparse else dX
    fa = pt.decompose(pol, X, y, dXin, dy, method=method)
    fb = pt.decompose(pol, X, y, dX, dy, method=method, _backend="numpy")
    assert fa.columns == fb.columns == list(pt.numeric.PAIR_FEATURE_COLUMNS)
    cond = design_cond(X + np.abs(dX).max(axis=0), pol.scale, intercept, lam) + design_cond(
        X, pol.scale, intercept, lam
    )
    size = reach(X, y, pol.scale, intercept, lam, pol.coef, np.abs(dX).max() / pol.scale.min(), np.abs(dy).max())
    for col in ("d_coef", "d_coef_x", "d_coef_y", "d_coef_xy", "shapley_x", "shapley_y"):
        a = fa[col].to_numpy().reshape(p, k)
        b = fb[col].to_numpy().reshape(p, k)
        assert np.isfinite(a).all()
        assert_rows_close(a, b, size, cond, what=col)
    if where == "zero":
        # No activation change: x-path is exactly zero (the shift is solved for directly).
        assert np.abs(fa["d_coef_x"].to_numpy()).max() <= 100 * 2.2e-16 * cond * size


@given(designs(), st.booleans(), st.sampled_from([0.1, 5.0]))
def test_exact_identities(d, intercept, lam):
    X, y, _, rng = d
    n, k = X.shape
    pol = pt.fit_policy(X, y, lam=lam, intercept=intercept)
    dX = np.where(X != 0, rng.normal(size=(3, n, k)) * 0.1 * (np.abs(X).max() or 1), 0.0)
    dy = rng.normal(size=(3, n))
    f = pt.decompose(pol, X, y, dX, dy, method="exact")
    tot = f["d_coef"].to_numpy()
    parts = f["d_coef_x"].to_numpy() + f["d_coef_y"].to_numpy() + f["d_coef_xy"].to_numpy()
    np.testing.assert_allclose(parts, tot, rtol=0, atol=4 * np.finfo(float).eps * (np.abs(tot).max() + np.abs(parts).max()))
    sh = f["shapley_x"].to_numpy() + f["shapley_y"].to_numpy()
    np.testing.assert_allclose(sh, tot, rtol=0, atol=8 * np.finfo(float).eps * np.abs(f[["d_coef_x", "d_coef_y", "d_coef_xy"]].to_numpy()).max(initial=1e-300) + 1e-300)
    np.testing.assert_array_equal(f["alignment"].to_numpy(), tot * f["coef"].to_numpy())


@given(designs(), st.booleans(), st.sampled_from([0.1, 5.0]))
def test_feature_stats_match_reference(d, use_y, n_groups):
    X, y, sparse, rng = d
    n = X.shape[0]
    groups = rng.integers(0, 3, n)
    groups[:3] = [0, 1, 2]
    Xin = sp.csr_matrix(X) if sparse else X
    a, la = pt.feature_stats(Xin, y if use_y else None, groups)
    b, lb = pt.feature_stats(X, y if use_y else None, groups, _backend="numpy")
    assert la == lb == [0, 1, 2]
    np.testing.assert_array_equal(a["n_active"].to_numpy(), b["n_active"].to_numpy())
    scale = np.abs(X).max() or 1.0
    for col in ("mean", "std"):
        np.testing.assert_allclose(a[col].to_numpy(), b[col].to_numpy(), rtol=1e-10, atol=1e-13 * scale)
    np.testing.assert_allclose(np.array(a["group_means"].to_list()), np.array(b["group_means"].to_list()), rtol=1e-10, atol=1e-13 * scale)
    ca, cb = a["corr"].to_numpy(), b["corr"].to_numpy()
    both = ~np.isnan(ca) & ~np.isnan(cb)
    # Correlation of a column whose spread is at rounding level is itself rounding noise.
    tight = both & (b["std"].to_numpy() > 1e-8 * scale)
    np.testing.assert_allclose(ca[tight], cb[tight], rtol=1e-8, atol=1e-10)
    assert a["corr"].null_count() == b["corr"].null_count() or not use_y


def test_canonicalizes_scipy_duplicates(rng):
    X = sae_like(rng, 30, 5, 0.5)
    coo = sp.coo_matrix(X)
    # Split each stored value into two duplicates, unsorted.
    r = np.concatenate([coo.row, coo.row])
    c = np.concatenate([coo.col, coo.col])
    v = np.concatenate([coo.data * 0.25, coo.data * 0.75])
    dup = sp.csr_matrix((v, (r, c)), shape=X.shape)
    dup.has_canonical_format = False
    a, _ = pt.feature_stats(dup)
    b, _ = pt.feature_stats(X)
    np.testing.assert_allclose(a["std"].to_numpy(), b["std"].to_numpy(), rtol=1e-12)


def test_first_order_interaction_is_zero(rng):
    from _helpers import problem

    X, y, dX, dy = problem(rng)
    pol = pt.fit_policy(X, y)
    f = pt.decompose(pol, X, y, dX, dy, method="first_order")
    assert (f["d_coef_xy"] == 0).all()
    np.testing.assert_array_equal(f["shapley_x"].to_numpy(), f["d_coef_x"].to_numpy())


def test_rank_deficient_lam0_min_norm(rng):
    X = sae_like(rng, 50, 4, 0.6)
    X[:, 3] = X[:, 1]
    y = X @ np.array([1.0, 2.0, -1.0, 2.0]) + 0.01 * rng.normal(size=50)
    for backend in ("rust", "numpy"):
        pol = pt.fit_policy(X, y, lam=0.0, standardize=False, _backend=backend)
        assert pol.solver == "eigh-pinv"
        # Minimum-norm: the duplicated columns share the weight equally.
        assert abs(pol.coef[1] - pol.coef[3]) < 1e-8 * abs(pol.coef[1])
        lst = np.linalg.lstsq(np.c_[X - X.mean(0)], y - y.mean(), rcond=None)[0]
        np.testing.assert_allclose(pol.coef, lst, rtol=1e-7)


def test_wide_design_uses_dual(rng):
    X = sae_like(rng, 10, 30, 0.5)
    y = rng.normal(size=10)
    pol = pt.fit_policy(X, y, lam=0.5)
    ref = pt.fit_policy(X, y, lam=0.5, _backend="numpy")
    assert pol.dual
    np.testing.assert_allclose(pol.coef, ref.coef, rtol=1e-9, atol=1e-12)


def test_threads_and_repeats_are_bit_identical(rng):
    from _helpers import problem

    X, y, dX, dy = problem(rng, n=400, k=16, p=40)
    runs = []
    for threads in (1, 2, 2):
        pol = pt.fit_policy(sp.csr_matrix(X), y, lam="gcv", threads=threads)
        st_, _ = pt.feature_stats(sp.csr_matrix(X), y, threads=threads)
        fe = pt.decompose(pol, X, y, dX, dy, method="exact", threads=threads)
        fo = pt.decompose(pol, X, y, dX, dy, method="first_order", threads=threads)
        runs.append((pol.coef, st_, fe, fo))
    for r in runs[1:]:
        np.testing.assert_array_equal(r[0], runs[0][0])
        assert r[1].equals(runs[0][1])
        assert r[2].equals(runs[0][2])
        assert r[3].equals(runs[0][3])


def test_core_works_after_fork(rng):
    import multiprocessing as mp

    from _helpers import problem

    X, y, dX, dy = problem(rng, n=200, k=8, p=10)
    pol = pt.fit_policy(X, y, threads=2)
    expect = pt.decompose(pol, X, y, dX, dy, threads=2)["d_coef"].to_numpy()
    ctx = mp.get_context("fork")
    with ctx.Pool(2) as pool:
        res = pool.apply_async(_child, (pol, X, y, dX, dy))
        got = res.get(timeout=60)
    np.testing.assert_array_equal(got, expect)


def _child(pol, X, y, dX, dy):
    return pt.decompose(pol, X, y, dX, dy, threads=2)["d_coef"].to_numpy()
