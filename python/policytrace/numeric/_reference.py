"""A plain float64 numpy transcription of the numeric core, for cross-checking.

This module is deliberately the obvious implementation of the method's steps 2, 3, 5 and 6 (docs/design.md §1):
statistics column by column, the policy by solving the normal equations, the exact
decomposition by three literal refits per pair, the first-order split by the paper's formula
pair by pair. Private and for the tests: the numeric functions take ``_backend="numpy"`` to run
on it, and the tests hold the Rust core to it. Function signatures mirror ``policytrace._core``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .mediation import sums_of
from ..errors import EmptyInputError, InvalidValueError, NonFiniteError, ShapeError, SolverError

from .._core import GCV_GRID_HI, GCV_GRID_LO, GCV_GRID_POINTS, PIVOT_RATIO_MIN, REFIT_TOLERANCE  # the core's own


@dataclass(frozen=True)
class FeatureStats:
    """Twin of ``_core.FeatureStats``."""

    n_active: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    corr: np.ndarray
    group_means: np.ndarray
    group_counts: np.ndarray


@dataclass(frozen=True)
class FitResult:
    """Twin of ``_core.FitResult``."""

    coef: np.ndarray
    intercept: float
    lam: float
    scale: np.ndarray
    solver: str
    dual: bool
    df: float
    gcv_grid: np.ndarray
    gcv_score: np.ndarray


@dataclass(frozen=True)
class SplitResult:
    """Twin of ``_core.SplitResult``."""

    d_total: np.ndarray
    d_x: np.ndarray
    d_y: np.ndarray
    pred_dy: np.ndarray
    n_fallback: int
    predicted: np.ndarray
    mean_dx: np.ndarray


@dataclass(frozen=True)
class InterferenceResult:
    """Twin of ``_core.InterferenceResult``."""

    dominant: np.ndarray
    off_target_share: np.ndarray
    flag: np.ndarray


def _dense(x) -> np.ndarray:
    if isinstance(x, tuple):
        indptr, indices, data, shape = x
        return sp.csr_matrix((data, indices, indptr), shape=shape).toarray()
    return np.asarray(x, dtype=np.float64)


def feature_stats(x, y=None, groups=None, n_groups=0, threads=0) -> FeatureStats:
    """Column statistics with scipy.sparse: sums by matrix products, variances about the mean."""
    if isinstance(x, tuple):
        Xs = sp.csr_matrix((x[2], x[1], x[0]), shape=x[3])
    else:
        Xs = sp.csr_matrix(np.asarray(x, dtype=np.float64))
    n, f = Xs.shape
    if n == 0 or f == 0:
        raise EmptyInputError(f"`X` has shape {Xs.shape}")
    cols = Xs.indices
    mean = np.asarray(Xs.sum(axis=0)).ravel() / n
    stored = np.bincount(cols, minlength=f)
    n_active = np.bincount(cols, weights=(Xs.data != 0), minlength=f).astype(np.uint64)
    # second moments in power-of-two units of each column's largest |x| (no overflow at 1e200)
    unit = pow2_unit(_col_max_abs(Xs, f))
    ss = np.bincount(cols, weights=((Xs.data - mean[cols]) / unit[cols]) ** 2, minlength=f)
    var_u = np.maximum((ss + (n - stored) * (mean / unit) ** 2) / n, 0.0)
    std = np.sqrt(var_u) * unit
    if y is not None:
        yc = y - y.mean()
        yu = pow2_unit(np.abs(y).max(initial=0.0))
        sy_u = np.sqrt(((yc / yu) ** 2).mean())
        sy = sy_u * yu
        cov = (Xs.T @ (yc / yu)) / unit / n  # in units of (unit * yu)
        denom = np.sqrt(var_u) * sy_u
        flat = _is_constant(std, mean) | bool(_is_constant(np.array([sy]), np.array([y.mean()]))[0])
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = np.where((denom > 0) & np.isfinite(denom) & ~flat, cov / denom, np.nan)
        corr = np.clip(corr, -1.0, 1.0)
    else:
        corr = np.full(f, np.nan)
    if groups is None:
        codes, g = np.zeros(n, dtype=np.int64), 1
    else:
        codes, g = np.asarray(groups, dtype=np.int64), n_groups
    counts = np.bincount(codes, minlength=g)
    if (counts == 0).any():
        raise InvalidValueError(f"group {int(np.flatnonzero(counts == 0)[0])} has no probes")
    onehot = sp.csr_matrix((np.ones(n), (np.arange(n), codes)), shape=(n, g))
    gm = np.asarray((Xs.T @ onehot).todense()) / counts
    return FeatureStats(n_active, mean, std, corr, gm, counts.astype(np.uint64))


def _col_max_abs(Xs: sp.csr_matrix, f: int) -> np.ndarray:
    out = np.zeros(f)
    np.maximum.at(out, Xs.indices, np.abs(Xs.data))
    return out


def pow2_unit(max_abs: np.ndarray) -> np.ndarray:
    """The power of two at or below each |value| (1 for 0 and non-finite): squares are summed in
    this unit so 1e200 or 1e-200 neither overflows nor underflows (as in the core)."""
    m = np.asarray(max_abs, dtype=np.float64)
    ok = np.isfinite(m) & (m >= np.finfo(float).tiny)
    _, e = np.frexp(np.where(ok, m, 1.0))
    return np.where(ok, np.ldexp(1.0, e - 1), 1.0)


def robust_std(X: np.ndarray, axis: int = 0) -> np.ndarray:
    u = pow2_unit(np.abs(X).max(axis=axis, initial=0.0))
    return (X / u).std(axis=axis) * u


def robust_rms(X: np.ndarray) -> np.ndarray:
    u = pow2_unit(np.abs(X).max(axis=0, initial=0.0))
    return np.sqrt(((X / u) ** 2).mean(axis=0)) * u


def column_scale(X: np.ndarray) -> np.ndarray:
    sd = robust_std(X)
    return np.where(_is_constant(sd, X.mean(axis=0)), 1.0, sd)


def spd_solve(A: np.ndarray, B: np.ndarray) -> tuple[np.ndarray, str]:
    """Cholesky when the pivots are healthy, else the eigendecomposition pseudo-inverse."""
    if not np.isfinite(A).all():
        raise SolverError("the normal equations hold a non-finite value; the inputs overflow float64 "
                          "(rescale X or y, or standardize)")
    k = A.shape[0]
    try:
        L = np.linalg.cholesky(A)
        d = np.abs(np.diag(L))
        if k == 0 or (d.max() > 0 and (d.min() / d.max()) ** 2 > PIVOT_RATIO_MIN):
            return np.linalg.solve(L.T, np.linalg.solve(L, B)), "cholesky"
    except np.linalg.LinAlgError:
        pass
    w, U = np.linalg.eigh(A)
    tol = np.abs(w).max(initial=0.0) * max(k, 1) * np.finfo(float).eps
    inv = np.where(w > tol, 1.0 / np.where(w > tol, w, 1.0), 0.0)
    return U @ (inv[:, None] * (U.T @ B)) if B.ndim == 2 else U @ (inv * (U.T @ B)), "eigh-pinv"


def _is_constant(sd, mean):
    return ~((sd > 0) & (sd > 1e-12 * np.abs(mean)) & np.isfinite(sd))


def _design(X, y, scale, intercept):
    Z = X / scale
    if intercept:
        zm, ym = Z.mean(axis=0), y.mean()
        Zc = Z - zm
        # Columns constant up to rounding are exactly zero once centred (as in the core).
        Zc[:, _is_constant(robust_rms(Zc), zm)] = 0.0
        return Zc, y - ym, zm, ym
    return Z, y, np.zeros(Z.shape[1]), 0.0


def ridge(X: np.ndarray, y: np.ndarray, lam: float, scale: np.ndarray, intercept: bool):
    """β(X, y) with fixed scales: the literal normal equations of the method's step 3."""
    Zc, yc, zm, ym = _design(X, y, scale, intercept)
    k = Zc.shape[1]
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported by spd_solve
        A, rhs = Zc.T @ Zc + lam * np.eye(k), Zc.T @ yc
    b, solver = spd_solve(A, rhs)
    b0 = ym - zm @ b if intercept else 0.0
    return b, b0, solver


def gcv_curve(Zc: np.ndarray, yc: np.ndarray, grid, intercept: bool):
    """GCV from the SVD of the centred design (an independent route from the core's eigh)."""
    n, k = Zc.shape
    U, s, _ = np.linalg.svd(Zc, full_matrices=False)
    w = s**2
    tol = w.max(initial=0.0) * max(n, k) * np.finfo(float).eps
    keep = w > tol
    U, w = U[:, keep], w[keep]
    uy = U.T @ yc
    scores, dfs = [], []
    for lam in grid:
        shrink = w / (w + lam) if lam > 0 else np.ones_like(w)
        fitted = U @ (shrink * uy)
        rss = float(((yc - fitted) ** 2).sum())
        df = float(shrink.sum())
        denom = n - df - (1.0 if intercept else 0.0)
        scores.append(n * rss / denom**2 if denom > 1e-12 * n else np.inf)
        dfs.append(df)
    return np.array(scores), np.array(dfs)


def fit_policy(x, y, lam=None, lam_grid=None, intercept=True, standardize=True, threads=0) -> FitResult:
    X = _dense(x)
    y = np.asarray(y, dtype=np.float64)
    n, k = X.shape
    if n == 0 or k == 0:
        raise EmptyInputError(f"`X` has shape {X.shape}")
    if y.shape != (n,):
        raise ShapeError(f"`y` must have length {n}, got {y.shape}")
    scale = column_scale(X) if standardize else np.ones(k)
    Zc, yc, _, _ = _design(X, y, scale, intercept)
    grid, scores = np.array([]), np.array([])
    if lam is None:
        if lam_grid is None:
            t = float((Zc**2).sum() / k)
            t = t if t > 0 and np.isfinite(t) else 1.0
            grid = t * np.exp(np.linspace(np.log(GCV_GRID_LO), np.log(GCV_GRID_HI), GCV_GRID_POINTS))
        else:
            grid = np.asarray(lam_grid, dtype=np.float64)
            if grid.size == 0:
                raise EmptyInputError("`lam_grid` is empty")
        if (~np.isfinite(grid) | (grid < 0)).any():
            raise InvalidValueError("`lam` grid values must be finite and non-negative")
        scores, _ = gcv_curve(Zc, yc, grid, intercept)
        finite = np.isfinite(scores)
        if not finite.any():
            raise InvalidValueError("GCV is undefined on every grid point")
        best = min(np.flatnonzero(finite), key=lambda i: (scores[i], -grid[i]))
        lam = float(grid[best])
    elif not np.isfinite(lam) or lam < 0:
        raise InvalidValueError(f"`lam` = {lam} is not a finite non-negative number")
    b, b0, solver = ridge(X, y, lam, scale, intercept)
    _, dfs = gcv_curve(Zc, yc, [lam], intercept)
    return FitResult(coef=b, intercept=float(b0), lam=float(lam), scale=scale, solver=solver, dual=n < k,
                     df=float(dfs[0]), gcv_grid=grid, gcv_score=scores)


class Decomposer:
    """Reference twin of ``policytrace._core.Decomposer``."""

    def __init__(self, coef, intercept, lam, scale, fit_intercept, x, y, threads=0):
        self.X = _dense(x)
        self.y = np.asarray(y, dtype=np.float64)
        self.coef = np.asarray(coef, dtype=np.float64)
        self.lam, self.scale, self.intercept = float(lam), np.asarray(scale, float), bool(fit_intercept)
        if not (np.isfinite(self.coef).all() and np.isfinite(intercept)):
            raise NonFiniteError("`coef` holds a non-finite value")
        if self.X.shape[1] != self.coef.shape[0]:
            raise ShapeError(f"`X` must have {self.coef.shape[0]} columns, got {self.X.shape[1]}")
        if not (np.isfinite(self.lam) and self.lam >= 0):
            raise InvalidValueError(f"`lam` = {lam} is not a finite non-negative number")
        b, _, _ = ridge(self.X, self.y, self.lam, self.scale, self.intercept)
        Zc, yc, _, _ = _design(self.X, self.y, self.scale, self.intercept)
        worst = np.abs(Zc @ (b - self.coef)).max(initial=0.0)
        size = np.abs(yc).max(initial=0.0)
        trace = float((Zc**2).sum()) + self.lam * Zc.shape[1]
        cond = trace / self.lam if self.lam > 0 else np.inf
        if worst > (REFIT_TOLERANCE + 100 * np.finfo(float).eps * cond) * size and worst > 1e-300:
            raise InvalidValueError(
                f"refitting the policy on these X, y moves its fitted values by up to {worst:.3e}; "
                "pass the X and y the policy was fit on"
            )
        self.b = b

    @property
    def shape(self):
        return self.X.shape

    def run(self, dx, dy, method="exact", threads=None) -> SplitResult:
        n, k = self.X.shape
        D = sp.csr_matrix((dx[2], dx[1], dx[0]), shape=dx[3]) if isinstance(dx, tuple) else dx
        P = D.shape[0] // n
        out = {key: np.zeros((P, k)) for key in ("d_total", "d_x", "d_y")}
        pred = np.zeros(P)
        fallback = 0
        X, y, lam, s, ic, b = self.X, self.y, self.lam, self.scale, self.intercept, self.b
        Zc, yc, _, _ = _design(X, y, s, ic)
        A = Zc.T @ Zc + lam * np.eye(k)
        r = yc - Zc @ b
        for p in range(P):
            dX = D[p * n : (p + 1) * n].toarray()
            dyp = np.asarray(dy[p], dtype=np.float64)
            dZ = dX / s
            pred[p] = (dZ @ b).mean()
            if method == "exact":
                bt, _, st = ridge(X + dX, y + dyp, lam, s, ic)
                bx, _, _ = ridge(X + dX, y, lam, s, ic)
                by, _, _ = ridge(X, y + dyp, lam, s, ic)
                fallback += st == "eigh-pinv"
                out["d_total"][p], out["d_x"][p], out["d_y"][p] = bt - b, bx - b, by - b
            elif method == "first_order":
                dZc = dZ - dZ.mean(axis=0) if ic else dZ
                dyc = dyp - dyp.mean() if ic else dyp
                out["d_x"][p] = spd_solve(A, dZc.T @ r - Zc.T @ (dZc @ b))[0]
                out["d_y"][p] = spd_solve(A, Zc.T @ dyc)[0]
                out["d_total"][p] = out["d_x"][p] + out["d_y"][p]
            else:
                raise InvalidValueError(f"`method` '{method}' is not 'exact' or 'first_order'")
        predicted, mean_dx = sums_of(D, n, self.coef, self.scale)
        return SplitResult(out["d_total"], out["d_x"], out["d_y"], pred, fallback, predicted, mean_dx)


def interference(d_coef, feature_group, pair_group):
    d = np.abs(np.asarray(d_coef, dtype=np.float64))
    fg = np.asarray(feature_group)
    pg = np.asarray(pair_group)
    if d.ndim != 2 or fg.shape != (d.shape[1],):
        raise ShapeError(f"`feature_group` must have length {d.shape[-1]}, got {fg.shape}")
    if pg.shape != (d.shape[0],):
        raise ShapeError(f"`pair_group` must have length {d.shape[0]}, got {pg.shape}")
    if d.shape[1] == 0 and d.shape[0] > 0:
        raise EmptyInputError("`d_coef` has no features (columns)")
    if not np.isfinite(d).all():
        raise NonFiniteError(f"`d_coef` holds a non-finite value at feature {int(np.argwhere(~np.isfinite(d))[0][1])}")
    intended = (fg[None, :] == pg[:, None]) & (pg[:, None] != -1)
    top = d.max(axis=1, keepdims=True, initial=0.0)
    unit = np.where(top > 0, top, 1.0)  # sums in units of the largest shift cannot overflow
    total = (d / unit).sum(axis=1)
    off = np.where(intended, 0.0, d / unit).sum(axis=1)
    share = np.divide(off, total, out=np.zeros_like(total), where=total > 0)
    dom = np.where(total > 0, d.argmax(axis=1), -1)
    flag = np.array([dm >= 0 and not intended[i, dm] for i, dm in enumerate(dom)], dtype=bool)
    return InterferenceResult(dom.astype(np.int64), share, flag)
