"""The policy against scikit-learn, the first-order split against finite differences, and the
paper preset against a direct transcription of the SMDA formulas (REFERENCES.md)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.linear_model import Ridge

import policytrace as pt
from _helpers import problem, sae_like


@pytest.mark.parametrize("backend", ["rust", "numpy"])
def test_no_intercept_no_scaling_matches_sklearn(rng, backend):
    X, y, _, _ = problem(rng, n=120, k=10)
    pol = pt.fit_policy(X, y, lam=5.0, intercept=False, standardize=False, _backend=backend)
    sk = Ridge(alpha=5.0, fit_intercept=False, solver="cholesky").fit(X, y)
    np.testing.assert_allclose(pol.coef, sk.coef_, rtol=1e-10, atol=1e-12)
    assert pol.intercept == 0.0
    np.testing.assert_allclose(pol.predict(X), sk.predict(X), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["rust", "numpy"])
@pytest.mark.parametrize("lam", [0.01, 5.0, 300.0])
def test_intercept_and_scaling_match_sklearn_on_scaled_design(rng, backend, lam):
    X, y, _, _ = problem(rng, n=150, k=12)
    X[:, 2] *= 1e4  # very different column scales
    pol = pt.fit_policy(sp.csr_matrix(X), y, lam=lam, _backend=backend)
    Z = X / X.std(axis=0)
    sk = Ridge(alpha=lam, fit_intercept=True, solver="cholesky").fit(Z, y)
    np.testing.assert_allclose(pol.scale, X.std(axis=0), rtol=1e-12)
    np.testing.assert_allclose(pol.coef, sk.coef_, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(pol.intercept, sk.intercept_, rtol=1e-9)
    np.testing.assert_allclose(pol.predict(X), sk.predict(Z), rtol=1e-9)


def test_gcv_agrees_with_brute_force_leave_structure(rng):
    """GCV's minimizer on a fine grid matches a brute-force GCV computed from hat matrices."""
    X, y, _, _ = problem(rng, n=80, k=6, noise=1.0)
    grid = np.logspace(-3, 3, 13)
    pol = pt.fit_policy(X, y, lam="gcv", lam_grid=grid)
    Z = X / pol.scale
    Zc, yc = Z - Z.mean(0), y - y.mean()
    n = len(y)
    brute = []
    for lam in grid:
        H = Zc @ np.linalg.solve(Zc.T @ Zc + lam * np.eye(Z.shape[1]), Zc.T)
        rss = ((yc - H @ yc) ** 2).sum()
        brute.append(n * rss / (n - np.trace(H) - 1) ** 2)
    np.testing.assert_allclose(pol.gcv_score, brute, rtol=1e-9)
    assert pol.lam == grid[int(np.argmin(brute))]
    frame = pol.gcv_frame()
    assert frame.columns == ["lam", "gcv"] and frame.height == len(grid)


def _exact_paths(pol, X, y, dX, dy):
    f = pt.decompose(pol, X, y, dX, dy, method="exact")
    k = pol.n_features
    return (f["d_coef_x"].to_numpy().reshape(-1, k), f["d_coef_y"].to_numpy().reshape(-1, k))


@pytest.mark.parametrize("intercept,standardize", [(True, True), (False, False), (True, False)])
def test_first_order_equals_central_finite_difference(rng, intercept, standardize):
    X, y, dX, dy = problem(rng, n=90, k=7, p=4, dscale=0.2)
    pol = pt.fit_policy(X, y, lam=2.0, intercept=intercept, standardize=standardize)
    fo = pt.decompose(pol, X, y, dX, dy, method="first_order")
    k = pol.n_features
    fo_x = fo["d_coef_x"].to_numpy().reshape(-1, k)
    fo_y = fo["d_coef_y"].to_numpy().reshape(-1, k)
    errs = []
    for eps in (1e-2, 1e-3):
        xp, yp = _exact_paths(pol, X, y, eps * dX, eps * dy)
        xm, ym = _exact_paths(pol, X, y, -eps * dX, -eps * dy)
        fd_x = (xp - xm) / (2 * eps)
        fd_y = (yp - ym) / (2 * eps)
        errs.append(np.abs(fd_x - fo_x).max() / np.abs(fo_x).max())
        # The y-path is linear in y: the difference quotient is exact.
        np.testing.assert_allclose(fd_y, fo_y, rtol=1e-7, atol=1e-12 * np.abs(fo_y).max())
    # Central differences converge quadratically: 10x smaller step, ~100x smaller error.
    assert errs[1] < 1e-5
    assert errs[1] < errs[0] / 30


def test_exact_tends_to_first_order_and_score_derivative(rng):
    X, y, dX, dy = problem(rng, n=100, k=6, p=3, dscale=0.3)
    pol = pt.fit_policy(X, y, lam=1.0)
    fo = pt.decompose(pol, X, y, dX, dy, method="first_order")
    eps = 1e-3
    scores = []
    for sign in (1, -1):
        a = pt.Attributor(pol, X, y, method="exact")
        a.add(sign * eps * dX, sign * eps * dy)
        scores.append(a.pairs()["score"].to_numpy())
    score_fd = (scores[0] - scores[1]) / (2 * eps)
    score_fo = fo.group_by("pair_id", maintain_order=True).agg(
        __import__("polars").col("alignment").sum()
    )["alignment"].to_numpy()
    np.testing.assert_allclose(score_fd, score_fo, rtol=1e-5)


def test_paper_preset_matches_transcription(rng):
    """intercept=False, standardize=False, lam=5, first order, score = ΔW·W: the formulas of
    the SMDA release, transcribed literally."""
    n, k, p = 150, 12, 6
    X = sae_like(rng, n, k, 0.3)
    Y = X @ rng.normal(size=k) + 0.1 * rng.normal(size=n)
    dXs = [np.where(X > 0, rng.normal(size=(n, k)) * 0.02, 0.0) for _ in range(p)]
    dYs = [rng.normal(size=n) * 0.05 for _ in range(p)]
    lam = 5.0
    pol = pt.fit_policy(X, Y, lam=lam, intercept=False, standardize=False)
    frame = pt.decompose(pol, X, Y, np.stack(dXs), np.stack(dYs), method="first_order")
    # --- transcription (REFERENCES.md, SMDA) ---
    U = X.T @ X + lam * np.eye(k)
    W = np.linalg.solve(U, X.T @ Y)
    np.testing.assert_allclose(pol.coef, W, rtol=1e-10)
    for i, (dX, dY) in enumerate(zip(dXs, dYs)):
        dU = dX.T @ X + X.T @ dX
        dW_X = np.linalg.solve(U, dX.T @ Y - dU @ W)
        dW_Y = np.linalg.solve(U, X.T @ dY)
        dW = dW_X + dW_Y
        c = dW * W
        rows = frame.filter(frame["pair_id"] == i)
        np.testing.assert_allclose(rows["d_coef_x"].to_numpy(), dW_X, rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(rows["d_coef_y"].to_numpy(), dW_Y, rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(rows["d_coef"].to_numpy(), dW, rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(rows["alignment"].to_numpy(), c, rtol=1e-9, atol=1e-16)
        np.testing.assert_allclose(rows["alignment"].sum(), dW @ W, rtol=1e-9)


def test_paper_feature_rule_is_one_call(rng):
    n = 400
    harmful = rng.random(n) < 0.5
    X = sae_like(rng, n, 50, 0.1)
    X[harmful, 7] += 0.5  # a feature that fires more on harmful prompts
    X[~harmful, 11] += 0.3
    sel = pt.select_features(sp.csr_matrix(X), groups=harmful, threshold=0.1)
    chosen = set(sel.filter(sel["selected"])["feature_id"].to_list())
    diff = X[harmful].mean(0) - X[~harmful].mean(0)
    assert chosen == set(np.flatnonzero(np.abs(diff) > 0.1).tolist())
    assert {7, 11} <= chosen
