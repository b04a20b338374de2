"""Shared test helpers: random SAE-like problems and conditioning-aware comparisons."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

EPS = np.finfo(float).eps


def sae_like(rng, n, k, density=0.2, magnitude=1.0):
    """Non-negative, heavy-tailed, sparse activations (ReLU/TopK-like)."""
    mask = rng.random((n, k)) < density
    vals = rng.exponential(1.0, size=(n, k)) * magnitude
    return np.where(mask, vals, 0.0)


def problem(rng, n=60, k=8, p=5, density=0.3, noise=0.1, dscale=0.05):
    X = sae_like(rng, n, k, density)
    w = rng.normal(size=k)
    y = X @ w + noise * rng.normal(size=n)
    dX = np.where(X != 0, rng.normal(size=(p, n, k)) * dscale, 0.0)
    dy = rng.normal(size=(p, n)) * dscale
    return X, y, dX, dy


def design_cond(X, scale, intercept, lam):
    Z = X / scale
    if intercept:
        Z = Z - Z.mean(axis=0)
    A = Z.T @ Z + lam * np.eye(Z.shape[1])
    w = np.linalg.eigvalsh(A)
    return float(w.max() / max(w.min(), w.max() * EPS))


def assert_rows_close(a, b, scale, cond, rtol=1e-9, what=""):
    """Row-wise: |a - b|_inf <= rtol |b|_inf + 100 eps cond scale.

    The second term is the rounding error any float64 solver carries on a system of this
    condition number (the reference differences two refits, so it pays it in full)."""
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    scale = np.broadcast_to(np.asarray(scale, dtype=float), (a.shape[0],))
    for i in range(a.shape[0]):
        err = np.abs(a[i] - b[i]).max(initial=0.0)
        tol = rtol * np.abs(b[i]).max(initial=0.0) + 100 * EPS * cond * scale[i] + 1e-300
        assert err <= tol, f"{what} row {i}: err {err:.3e} > tol {tol:.3e} (cond {cond:.2e})"


def stack(dX):
    p, n, k = dX.shape
    return sp.csr_matrix(dX.reshape(p * n, k))


def reach(X, y, scale, intercept, lam, coef, dzmax=0.0, dymax=0.0):
    """Largest magnitude a term A⁻¹Z~ᵀ(...) of the solution can reach: rounding in the design
    (e.g. centring a constant column) is amplified by at most this much."""
    Z = X / scale
    Zc = Z - Z.mean(0) if intercept else Z
    k = Z.shape[1]
    lam_min = np.linalg.eigvalsh(Zc.T @ Zc + lam * np.eye(k)).min()
    zmax = np.abs(Z).max() + dzmax
    r = len(y) * zmax * (np.abs(y).max() + dymax + zmax * np.abs(coef).max()) / max(lam_min, 1e-300)
    return float(min(r, 1e300)) + float(np.abs(coef).max(initial=0.0))


class Re(str):
    """A fragment for :func:`expect` that is a regular expression (``re.search``), not a
    substring."""


def is_panic(e: BaseException) -> bool:
    """pyo3's PanicException (a Rust panic crossing into Python; derives from BaseException)."""
    return type(e).__name__ == "PanicException"


def expect(cls, fn, *fragments):
    """The suite's one error-expecting helper. ``fn()`` must raise ``cls`` (a class or a tuple
    of classes), never pyo3's PanicException, with every fragment in its message: a ``str`` as a
    substring, an :class:`Re` as a regular expression. Returns the exception."""
    import re

    names = cls.__name__ if isinstance(cls, type) else "/".join(c.__name__ for c in cls)
    try:
        fn()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # PanicException derives from BaseException
        assert not is_panic(e), f"pyo3 PanicException escaped: {e!r}"
        assert isinstance(e, cls), f"expected {names}, got {type(e).__module__}.{type(e).__name__}: {e}"
        msg = str(e)
        for frag in fragments:
            if isinstance(frag, Re):
                assert re.search(frag, msg), f"pattern {str(frag)!r} not found in message {msg!r}"
            else:
                assert frag in msg, f"{frag!r} not in message {msg!r}"
        return e
    raise AssertionError(f"expected {names}, nothing was raised")

