"""Every form of ΔX reaches the core as it is and gives the same bits: dense float64 (P, n, K)
and (n, K), dense float32, a stacked CSR with int32 or int64 indices, a list of per-pair CSR or
dense blocks. The mediation sums the core now computes keep the bits of the scipy code the
Python layer used before (``mediation.sums_of``), and bad values are named by pair and probe."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import policytrace as pt
from policytrace.errors import NonFiniteError
from policytrace.numeric._inputs import csr_tuple
from policytrace.numeric.mediation import sums_of

from _helpers import expect, problem


def forms(dX: np.ndarray):
    p, n, k = dX.shape
    flat = dX.reshape(p * n, k)
    c32 = sp.csr_matrix(flat)
    c64 = sp.csr_matrix(flat)
    c64.indptr, c64.indices = c64.indptr.astype(np.int64), c64.indices.astype(np.int64)
    return {
        "dense3": dX,
        "dense_list": [d for d in dX],
        "csr32": c32,
        "csr64": c64,
        "csr_list": [sp.csr_matrix(d) for d in dX],
        "coo_list": [sp.coo_matrix(d) for d in dX],
        "mixed_list": [sp.csr_matrix(d) if i % 2 else d for i, d in enumerate(dX)],
        "fortran": np.asfortranarray(dX),
    }


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), p=st.integers(1, 6), method=st.sampled_from(["exact", "first_order"]))
def test_every_form_gives_the_same_bits(seed, p, method):
    rng = np.random.default_rng(seed)
    X, y, dX, dy = problem(rng, n=40, k=6, p=p)
    pol = pt.fit_policy(X, y, lam=0.5)
    frames = {name: pt.decompose(pol, X, y, f, dy, method=method) for name, f in forms(dX).items()}
    ref = frames.pop("csr32")
    for name, f in frames.items():
        assert f.equals(ref), name


def test_float32_dense_is_read_as_float32():
    rng = np.random.default_rng(3)
    X, y, dX, dy = problem(rng, n=30, k=5, p=3)
    pol = pt.fit_policy(X, y, lam=0.5)
    f32 = dX.astype(np.float32)
    a = pt.decompose(pol, X, y, f32, dy, method="exact")
    b = pt.decompose(pol, X, y, f32.astype(np.float64), dy, method="exact")
    assert a.equals(b)


@pytest.mark.parametrize("method", ["exact", "first_order"])
def test_mediation_sums_keep_the_scipy_bits(method):
    rng = np.random.default_rng(11)
    X, y, dX, dy = problem(rng, n=50, k=7, p=5)
    pol = pt.fit_policy(X, y, lam=0.5)
    att = pt.Attributor(pol, X, y, method=method)
    stacked = sp.csr_matrix(dX.reshape(-1, 7))
    res = att._core.run(csr_tuple(stacked), dy, method, 1)
    predicted, mean_dx = sums_of(stacked, 50, pol.coef, pol.scale)
    assert np.array_equal(np.asarray(res.predicted), predicted)
    assert np.array_equal(np.asarray(res.mean_dx), mean_dx)
    assert res.predicted.shape == (5, 50) and res.mean_dx.shape == (5, 7)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("as_list", [False, True])
def test_non_finite_dense_value_is_named(dtype, as_list):
    rng = np.random.default_rng(5)
    X, y, dX, dy = problem(rng, n=20, k=4, p=3)
    pol = pt.fit_policy(X, y, lam=0.5)
    bad = dX.astype(dtype)
    bad[2, 7, 3] = np.inf
    arg = [d for d in bad] if as_list else bad
    expect(NonFiniteError, lambda: pt.decompose(pol, X, y, arg, dy), "pair 2", "probe 7", "feature column 3")
