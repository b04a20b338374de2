"""Bad inputs raise the documented policytrace error class, with a message that names the
offending argument (and row / column / pair where there is one); odd-but-valid inputs
(float32, ints, Fortran order, strided views) are accepted and give the float64 result.

Every public-API check runs against both backends ("rust" and "numpy"). Direct calls into
``policytrace._core`` must never surface pyo3's PanicException.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from functools import lru_cache

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import policytrace as pt
from policytrace import _core
from _helpers import expect, is_panic
from policytrace.errors import (
    DTypeError,
    EmptyInputError,
    FeatureMismatchError,
    InvalidValueError,
    LayoutError,
    NonFiniteError,
    PolicytraceError,
    ShapeError,
    SparseFormatError,
)

BACKENDS = ("rust", "numpy")
N, K, P = 24, 5, 3


# --------------------------------------------------------------------------------------
# helpers and shared data
# --------------------------------------------------------------------------------------


def _data():
    """Small integer-valued problem: exact in float32 and int, so conversions are lossless."""
    rng = np.random.default_rng(20240611)
    X = (rng.integers(0, 5, (N, K)) * (rng.random((N, K)) < 0.6)).astype(np.float64)
    X[:, 0] += np.arange(N) % 3  # keep every column alive
    y = rng.integers(-4, 5, N).astype(np.float64)
    dX = np.where(X != 0, rng.integers(-2, 3, (P, N, K)), 0).astype(np.float64)
    dy = rng.integers(-2, 3, (P, N)).astype(np.float64)
    return X, y, dX, dy


X0, Y0, DX0, DY0 = _data()
GROUPS0 = np.where(Y0 > 0, "pos", "neg")


@lru_cache(maxsize=None)
def policy(backend: str) -> pt.Policy:
    return pt.fit_policy(X0, Y0, lam=2.0, _backend=backend, threads=1)


def with_value(a: np.ndarray, idx, value) -> np.ndarray:
    a = np.array(a, dtype=np.float64, copy=True)
    a[idx] = value
    return a


def strided(a: np.ndarray, axis: int = 0) -> np.ndarray:
    """A non-contiguous view equal to ``a`` (every other element of a doubled array)."""
    big = np.repeat(a, 2, axis=axis)
    view = big[(slice(None),) * axis + (slice(None, None, 2),)]
    assert not view.flags.c_contiguous and np.array_equal(view, a)
    return view


def i64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.int64)


def csr_tuple(m) -> tuple:
    m = sp.csr_matrix(m)
    return (i64(m.indptr), i64(m.indices), np.asarray(m.data, np.float64), m.shape)


backends = pytest.mark.parametrize("backend", BACKENDS)
NONFINITE = pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])


# --------------------------------------------------------------------------------------
# NaN / inf
# --------------------------------------------------------------------------------------


@backends
@NONFINITE
def test_nonfinite_X_dense(backend, bad):
    X = with_value(X0, (7, 3), bad)
    frags = ("`X`", "row 7", "column 3")
    expect(NonFiniteError, lambda: pt.fit_policy(X, Y0, _backend=backend, threads=1), *frags)
    expect(NonFiniteError, lambda: pt.feature_stats(X, Y0, _backend=backend, threads=1), *frags)
    expect(
        NonFiniteError,
        lambda: pt.select_features(X, groups=GROUPS0, positive="pos", _backend=backend),
        *frags,
    )
    expect(
        NonFiniteError,
        lambda: pt.decompose(policy(backend), X, Y0, DX0, DY0, _backend=backend, threads=1),
        *frags,
    )
    expect(NonFiniteError, lambda: policy(backend).predict(X), *frags)


@backends
@NONFINITE
def test_nonfinite_X_sparse(backend, bad):
    Xs = sp.csr_matrix(with_value(X0, (11, 2), bad))
    frags = ("`X`", "row 11", "column 2")
    expect(NonFiniteError, lambda: pt.fit_policy(Xs, Y0, _backend=backend, threads=1), *frags)
    expect(NonFiniteError, lambda: pt.feature_stats(Xs.tocsc(), _backend=backend), *frags)
    expect(NonFiniteError, lambda: pt.fit_policy(csr_tuple(Xs), Y0, _backend=backend), *frags)
    expect(
        NonFiniteError,
        lambda: pt.decompose(policy(backend), Xs, Y0, DX0, DY0, _backend=backend, threads=1),
        *frags,
    )


@backends
@NONFINITE
def test_nonfinite_y(backend, bad):
    y = with_value(Y0, 9, bad)
    expect(NonFiniteError, lambda: pt.fit_policy(X0, y, _backend=backend), "`y`", "index 9")
    expect(NonFiniteError, lambda: pt.feature_stats(X0, y, _backend=backend), "`y`", "index 9")
    expect(
        NonFiniteError,
        lambda: pt.select_features(X0, y, method="corr", k=2, _backend=backend),
        "`y`",
        "index 9",
    )
    expect(
        NonFiniteError,
        lambda: pt.decompose(policy(backend), X0, y, DX0, DY0, _backend=backend, threads=1),
        "`y`",
        "index 9",
    )


@backends
@NONFINITE
@pytest.mark.parametrize("form", ["dense", "sparse_stacked", "list_dense", "list_sparse"])
def test_nonfinite_dX(backend, bad, form):
    dX = with_value(DX0, (1, 4, 2), bad)
    if form == "sparse_stacked":
        dX = sp.csr_matrix(dX.reshape(P * N, K))
    elif form == "list_dense":
        dX = list(dX)
    elif form == "list_sparse":
        dX = [sp.csr_matrix(d) for d in dX]
    expect(
        NonFiniteError,
        lambda: pt.decompose(policy(backend), X0, Y0, dX, DY0, _backend=backend, threads=1),
        "`dX`",
        "pair 1",
        "probe 4",
        "column 2",
    )


@backends
@NONFINITE
def test_nonfinite_dy(backend, bad):
    dy = with_value(DY0, (2, 5), bad)
    expect(
        NonFiniteError,
        lambda: pt.decompose(policy(backend), X0, Y0, DX0, dy, _backend=backend, threads=1),
        "`dy`",
        "pair 2",
        "probe 5",
    )
    att = pt.Attributor(policy(backend), X0, Y0, _backend=backend, threads=1)
    expect(NonFiniteError, lambda: att.add(DX0[0], dy[2]), "`dy`", "probe 5")
    assert att.n_pairs == 0


# --------------------------------------------------------------------------------------
# shapes
# --------------------------------------------------------------------------------------


@backends
def test_y_length_mismatch(backend):
    for y in (Y0[:-1], np.r_[Y0, 1.0]):
        expect(ShapeError, lambda: pt.fit_policy(X0, y, _backend=backend), "`y`", str(N))
        expect(ShapeError, lambda: pt.feature_stats(X0, y, _backend=backend), "`y`", str(N))
        expect(
            ShapeError,
            lambda: pt.decompose(policy(backend), X0, y, DX0, DY0, _backend=backend),
            "`y`",
            str(N),
        )
    expect(ShapeError, lambda: pt.fit_policy(X0, Y0[:, None], _backend=backend), "`y`")


@backends
def test_X_dimension_errors(backend):
    expect(ShapeError, lambda: pt.fit_policy(X0[0], Y0, _backend=backend), "`X`", "2-D")
    expect(ShapeError, lambda: pt.fit_policy(X0[None], Y0, _backend=backend), "`X`", "2-D")
    pol = policy(backend)
    expect(ShapeError, lambda: pol.predict(X0[:, :-1]), "`X`", str(K))
    expect(
        ShapeError,
        lambda: pt.decompose(pol, X0[:, :-1], Y0, DX0[:, :, :-1], DY0, _backend=backend),
        "`X`",
        str(K),
    )


@backends
@pytest.mark.parametrize(
    "dX",
    [
        pytest.param(DX0[:, :-1], id="dense_wrong_n"),
        pytest.param(DX0[:, :, :-1], id="dense_wrong_k"),
        pytest.param(DX0[0, 0], id="dense_1d"),
        pytest.param(DX0[None], id="dense_4d"),
        pytest.param(sp.csr_matrix(DX0.reshape(P * N, K)[:, :-1]), id="sparse_wrong_k"),
        pytest.param(sp.csr_matrix(DX0.reshape(P * N, K)[:-1]), id="sparse_rows_not_multiple"),
    ],
)
def test_dX_shape_mismatch(backend, dX):
    expect(
        ShapeError,
        lambda: pt.decompose(policy(backend), X0, Y0, dX, DY0, _backend=backend, threads=1),
        "`dX`",
    )


@backends
def test_dX_list_item_shape_mismatch(backend):
    dX = [DX0[0], DX0[1][:-1], DX0[2]]
    expect(
        ShapeError,
        lambda: pt.decompose(policy(backend), X0, Y0, dX, DY0, _backend=backend),
        "`dX[1]`",
        f"({N}, {K})",
    )


@backends
@pytest.mark.parametrize(
    "dy",
    [
        pytest.param(DY0[:, :-1], id="wrong_n"),
        pytest.param(DY0[:-1], id="wrong_P"),
        pytest.param(DY0[0], id="1d_for_3_pairs"),
        pytest.param(DY0[None], id="3d"),
    ],
)
def test_dy_shape_mismatch(backend, dy):
    expect(
        ShapeError,
        lambda: pt.decompose(policy(backend), X0, Y0, DX0, dy, _backend=backend, threads=1),
        "`dy`",
        f"({P}, {N})",
    )


@backends
def test_feature_ids_and_labels_length(backend):
    expect(
        ShapeError,
        lambda: pt.fit_policy(X0, Y0, feature_ids=range(K - 1), _backend=backend),
        "`feature_ids`",
        str(K),
    )
    expect(
        ShapeError,
        lambda: pt.fit_policy(X0, Y0, feature_ids=np.arange(2 * K).reshape(2, K), _backend=backend),
        "`feature_ids`",
    )
    expect(
        ShapeError,
        lambda: pt.feature_stats(X0, feature_ids=range(K + 1), _backend=backend),
        "`feature_ids`",
        str(K),
    )
    expect(
        ShapeError,
        lambda: pt.fit_policy(X0, Y0, labels=["a"] * (K + 1), _backend=backend),
        "`labels`",
        str(K),
    )
    expect(
        FeatureMismatchError,
        lambda: pt.fit_policy(X0, Y0, feature_ids=[3, 3, 4, 5, 6], _backend=backend),
        "`feature_ids`",
        "duplicate",
    )


@backends
def test_pair_and_group_lengths(backend):
    pol = policy(backend)
    expect(
        ShapeError,
        lambda: pt.decompose(pol, X0, Y0, DX0, DY0, pair_ids=["a", "b"], _backend=backend),
        "`pair_ids`",
    )
    att = pt.Attributor(pol, X0, Y0, _backend=backend, threads=1)
    expect(ShapeError, lambda: att.add(DX0, DY0, pair_ids=range(P + 1)), "`pair_ids`")
    expect(ShapeError, lambda: att.add(DX0, DY0, pair_groups=["g"] * (P - 1)), "`pair_groups`")
    assert att.n_pairs == 0
    expect(
        ShapeError,
        lambda: pt.Attributor(pol, X0, Y0, probe_groups=[0] * (N - 1), _backend=backend),
        "`probe_groups`",
    )
    expect(
        ShapeError,
        lambda: pt.Attributor(pol, X0, Y0, feature_groups=[0] * (K + 1), _backend=backend),
        "`feature_groups`",
    )
    expect(
        ShapeError, lambda: pt.feature_stats(X0, groups=GROUPS0[:-1], _backend=backend), "`groups`"
    )


# --------------------------------------------------------------------------------------
# empty inputs
# --------------------------------------------------------------------------------------


@backends
@pytest.mark.parametrize(
    "X",
    [
        pytest.param(np.zeros((0, K)), id="dense_0_rows"),
        pytest.param(np.zeros((N, 0)), id="dense_0_cols"),
        pytest.param(sp.csr_matrix((0, K)), id="sparse_0_rows"),
        pytest.param(sp.csr_matrix((N, 0)), id="sparse_0_cols"),
        pytest.param((i64([0]), i64([]), np.zeros(0), (0, K)), id="triple_0_rows"),
    ],
)
def test_empty_X(backend, X):
    n = X[3][0] if isinstance(X, tuple) else X.shape[0]
    expect(EmptyInputError, lambda: pt.fit_policy(X, np.zeros(n), _backend=backend), "`X`")
    expect(EmptyInputError, lambda: pt.feature_stats(X, _backend=backend), "`X`")


@backends
@pytest.mark.parametrize(
    "dX",
    [pytest.param(np.zeros((0, N, K)), id="dense"), pytest.param([], id="empty_list")],
)
def test_zero_pairs(backend, dX):
    expect(
        EmptyInputError,
        lambda: pt.decompose(policy(backend), X0, Y0, dX, np.zeros((0, N)), _backend=backend),
        "`dX`",
        "no pairs",
    )


@backends
def test_zero_pairs_sparse(backend):
    expect(
        EmptyInputError,
        lambda: pt.decompose(
            policy(backend), X0, Y0, sp.csr_matrix((0, K)), np.zeros((0, N)), _backend=backend
        ),
        "`dX`",
    )


@backends
def test_empty_lam_grid(backend):
    expect(
        EmptyInputError,
        lambda: pt.fit_policy(X0, Y0, lam="gcv", lam_grid=[], _backend=backend),
        "lam_grid",
    )


# --------------------------------------------------------------------------------------
# lambda, method, backend
# --------------------------------------------------------------------------------------


@backends
@pytest.mark.parametrize("lam", [-1.0, -1e-12, np.nan, np.inf, -np.inf, float("nan")])
def test_bad_lam_number(backend, lam):
    expect(InvalidValueError, lambda: pt.fit_policy(X0, Y0, lam=lam, _backend=backend), "`lam`")


@backends
@pytest.mark.parametrize("lam", ["GCV", "auto", "", "5", " gcv"])
def test_bad_lam_string(backend, lam):
    expect(
        InvalidValueError,
        lambda: pt.fit_policy(X0, Y0, lam=lam, _backend=backend),
        "`lam`",
        f"'{lam}'",
    )


@backends
@pytest.mark.parametrize("value", [-1.0, np.nan, np.inf])
def test_bad_lam_grid_value(backend, value):
    expect(
        InvalidValueError,
        lambda: pt.fit_policy(X0, Y0, lam="gcv", lam_grid=[1.0, value], _backend=backend),
        "lam",
    )


@backends
@pytest.mark.parametrize("lam", [None, 1j, [1.0]], ids=["None", "complex", "list"])
def test_lam_of_wrong_type(backend, lam):
    expect(InvalidValueError, lambda: pt.fit_policy(X0, Y0, lam=lam, _backend=backend), "lam")


@backends
def test_unknown_method_strings(backend):
    pol = policy(backend)
    expect(
        InvalidValueError,
        lambda: pt.decompose(pol, X0, Y0, DX0, DY0, method="Exact", _backend=backend),
        "`method`",
        "'Exact'",
    )
    expect(
        InvalidValueError,
        lambda: pt.Attributor(pol, X0, Y0, method="second_order", _backend=backend),
        "`method`",
    )
    expect(
        InvalidValueError,
        lambda: pt.select_features(X0, Y0, method="pearson", k=2, _backend=backend),
        "`method`",
        "'pearson'",
    )


@pytest.mark.parametrize("bad", ["torch", "Rust", "", "numpy "])
def test_unknown_backend_strings(bad):
    frags = ("`backend`", f"'{bad}'")
    expect(InvalidValueError, lambda: pt.fit_policy(X0, Y0, _backend=bad), *frags)
    expect(InvalidValueError, lambda: pt.feature_stats(X0, _backend=bad), *frags)
    expect(
        InvalidValueError,
        lambda: pt.select_features(X0, groups=GROUPS0, positive="pos", _backend=bad),
        *frags,
    )
    expect(
        InvalidValueError,
        lambda: pt.decompose(policy("rust"), X0, Y0, DX0, DY0, _backend=bad),
        *frags,
    )
    expect(InvalidValueError, lambda: pt.Attributor(policy("rust"), X0, Y0, _backend=bad), *frags)
    expect(
        InvalidValueError,
        lambda: pt.interference(np.ones((2, 3)), [0, 1, 2], [0, 1], _backend=bad),
        *frags,
    )


@backends
def test_negative_threads(backend):
    expect(
        InvalidValueError,
        lambda: pt.fit_policy(X0, Y0, _backend=backend, threads=-1),
        "`threads`",
    )


# --------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------

BAD_DTYPES = pytest.mark.parametrize(
    "convert",
    [
        pytest.param(lambda a: a.astype(np.complex128), id="complex128"),
        pytest.param(lambda a: a.astype(np.complex64), id="complex64"),
        pytest.param(lambda a: a.astype(object), id="object"),
        pytest.param(lambda a: a.astype(str), id="str"),
        pytest.param(lambda a: a.astype(bytes), id="bytes"),
    ],
)


@backends
@BAD_DTYPES
def test_bad_dtype_X(backend, convert):
    X = convert(X0)
    expect(DTypeError, lambda: pt.fit_policy(X, Y0, _backend=backend), "`X`", str(X.dtype))
    expect(DTypeError, lambda: pt.feature_stats(X, _backend=backend), "`X`")
    pol = policy(backend)
    expect(DTypeError, lambda: pt.decompose(pol, X, Y0, DX0, DY0, _backend=backend), "`X`")
    expect(DTypeError, lambda: policy(backend).predict(X), "`X`")


@backends
def test_bad_dtype_X_sparse(backend):
    Xs = sp.csr_matrix(X0.astype(np.complex128))
    expect(DTypeError, lambda: pt.fit_policy(Xs, Y0, _backend=backend), "`X`", "complex")
    expect(DTypeError, lambda: pt.feature_stats(Xs, _backend=backend), "`X`", "complex")
    e = expect(DTypeError, lambda: pt.fit_policy(Xs, Y0, _backend=backend))
    assert isinstance(e, TypeError)  # documented: dtype errors are TypeErrors too


@backends
@BAD_DTYPES
def test_bad_dtype_y(backend, convert):
    y = convert(Y0)
    expect(DTypeError, lambda: pt.fit_policy(X0, y, _backend=backend), "`y`")
    expect(DTypeError, lambda: pt.feature_stats(X0, y, _backend=backend), "`y`")
    pol = policy(backend)
    expect(DTypeError, lambda: pt.decompose(pol, X0, y, DX0, DY0, _backend=backend), "`y`")


@backends
@BAD_DTYPES
def test_bad_dtype_dX_dy(backend, convert):
    pol = policy(backend)
    dX, dy = convert(DX0), convert(DY0)
    expect(DTypeError, lambda: pt.decompose(pol, X0, Y0, dX, DY0, _backend=backend), "`dX`")
    expect(
        DTypeError,
        lambda: pt.decompose(pol, X0, Y0, [DX0[0], convert(DX0[1]), DX0[2]], DY0, _backend=backend),
        "`dX[1]`",
    )
    expect(DTypeError, lambda: pt.decompose(pol, X0, Y0, DX0, dy, _backend=backend), "`dy`")


@backends
def test_bad_dtype_dX_sparse(backend):
    pol = policy(backend)
    dXs = sp.csr_matrix(DX0.reshape(P * N, K).astype(np.complex128))
    expect(DTypeError, lambda: pt.decompose(pol, X0, Y0, dXs, DY0, _backend=backend), "`dX`")
    expect(
        DTypeError,
        lambda: pt.decompose(pol, X0, Y0, [sp.csr_matrix(d.astype(complex)) for d in DX0], DY0,
                             _backend=backend),
        "`dX[0]`",
    )


# --------------------------------------------------------------------------------------
# float32 / int / non-contiguous inputs are accepted and give the float64 answer
# --------------------------------------------------------------------------------------

X_VARIANTS = [
    pytest.param(lambda a: a.astype(np.float32), id="float32"),
    pytest.param(lambda a: a.astype(np.int64), id="int64"),
    pytest.param(lambda a: a.astype(np.int16), id="int16"),
    pytest.param(np.asfortranarray, id="fortran"),
    pytest.param(lambda a: strided(a, 0), id="strided_rows"),
    pytest.param(lambda a: strided(a, a.ndim - 1), id="strided_cols"),
    pytest.param(lambda a: np.asfortranarray(a.astype(np.float32)), id="fortran_float32"),
    pytest.param(lambda a: sp.csr_matrix(a.astype(np.float32)), id="sparse_float32"),
    pytest.param(lambda a: sp.csc_matrix(a.astype(np.int32)), id="sparse_csc_int32"),
]
V_VARIANTS = [
    pytest.param(lambda a: a.astype(np.float32), id="float32"),
    pytest.param(lambda a: a.astype(np.int32), id="int32"),
    pytest.param(lambda a: strided(a), id="strided"),
    pytest.param(lambda a: a[::-1][::-1], id="reversed_view"),
    pytest.param(list, id="list"),
]


def _policy_arrays(p: pt.Policy):
    return (p.coef, np.array([p.intercept, p.lam, p.df]), p.scale, p.gcv_grid, p.gcv_score)


@backends
@pytest.mark.parametrize("xv", X_VARIANTS)
def test_fit_accepts_converted_X(backend, xv):
    ref = pt.fit_policy(X0, Y0, lam="gcv", _backend=backend, threads=1)
    got = pt.fit_policy(xv(X0), Y0, lam="gcv", _backend=backend, threads=1)
    if sp.issparse(xv(X0)):  # dense vs sparse kernels may round differently
        for a, b in zip(_policy_arrays(got), _policy_arrays(ref)):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(ref.predict(xv(X0)), ref.predict(X0), rtol=1e-12, atol=1e-15)
    else:
        for a, b in zip(_policy_arrays(got), _policy_arrays(ref)):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ref.predict(xv(X0)), ref.predict(X0))


@backends
@pytest.mark.parametrize("yv", V_VARIANTS)
def test_fit_accepts_converted_y(backend, yv):
    ref = pt.fit_policy(X0, Y0, lam=1.5, _backend=backend, threads=1)
    got = pt.fit_policy(X0, yv(Y0), lam=1.5, _backend=backend, threads=1)
    for a, b in zip(_policy_arrays(got), _policy_arrays(ref)):
        np.testing.assert_array_equal(a, b)


@backends
@pytest.mark.parametrize("xv", X_VARIANTS[:7])
def test_feature_stats_accept_converted_inputs(backend, xv):
    ref, lv_ref = pt.feature_stats(X0, Y0, groups=GROUPS0, _backend=backend, threads=1)
    got, lv = pt.feature_stats(xv(X0), Y0.astype(np.float32), groups=list(GROUPS0),
                               _backend=backend, threads=1)
    assert lv == lv_ref
    assert got.equals(ref)


@backends
@pytest.mark.parametrize(
    "conv",
    [
        pytest.param(lambda a: a.astype(np.float32), id="float32"),
        pytest.param(lambda a: a.astype(np.int64), id="int64"),
        pytest.param(np.asfortranarray, id="fortran"),
        pytest.param(lambda a: strided(a, a.ndim - 1), id="strided"),
    ],
)
@pytest.mark.parametrize("method", ["exact", "first_order"])
def test_decompose_accepts_converted_inputs(backend, conv, method):
    pol = policy(backend)
    ref = pt.decompose(pol, X0, Y0, DX0, DY0, method=method, _backend=backend, threads=1)
    got = pt.decompose(pol, conv(X0), conv(Y0), conv(DX0), conv(DY0), method=method,
                       _backend=backend, threads=1)
    assert got.equals(ref)
    got_list = pt.decompose(pol, X0, Y0, [conv(d) for d in DX0], DY0, method=method,
                            _backend=backend, threads=1)
    assert got_list.equals(ref)


@backends
def test_decompose_accepts_sparse_fit_data(backend):
    """The refit check compares values, not layouts: sparse X of the fit data is fine."""
    pol = policy(backend)
    ref = pt.decompose(pol, X0, Y0, DX0, DY0, _backend=backend, threads=1)
    got = pt.decompose(pol, sp.csr_matrix(X0), Y0, DX0, DY0, _backend=backend, threads=1)
    np.testing.assert_allclose(got["d_coef"].to_numpy(), ref["d_coef"].to_numpy(), atol=1e-12)


# --------------------------------------------------------------------------------------
# malformed sparse triples through the public API
# --------------------------------------------------------------------------------------

Y2 = np.array([1.0, 2.0])
TRIPLES = {
    "indptr_too_short": (i64([0, 2]), i64([0, 1]), np.array([1.0, 2.0]), (2, 4)),
    "indptr_too_long": (i64([0, 1, 2, 2]), i64([0, 1]), np.array([1.0, 2.0]), (2, 4)),
    "indptr_not_from_0": (i64([1, 1, 2]), i64([0, 1]), np.array([1.0, 2.0]), (2, 4)),
    "indptr_end_past_data": (i64([0, 1, 5]), i64([0, 1]), np.array([1.0, 2.0]), (2, 4)),
    "indices_data_differ": (i64([0, 1, 2]), i64([0, 1, 2]), np.array([1.0, 2.0]), (2, 4)),
    "negative_shape": (i64([0, 1, 2]), i64([0, 1]), np.array([1.0, 2.0]), (2, -4)),
}


@backends
@pytest.mark.parametrize("name", sorted(TRIPLES))
def test_malformed_triple_public(backend, name):
    T = TRIPLES[name]
    expect(SparseFormatError, lambda: pt.fit_policy(T, Y2, _backend=backend), "`X`")
    expect(SparseFormatError, lambda: pt.feature_stats(T, _backend=backend), "`X`")


@backends
def test_triple_without_shape_needs_one(backend):
    T = (i64([0, 1, 2]), i64([0, 1]), np.array([1.0, 2.0]))
    expect(ShapeError, lambda: pt.fit_policy(T, Y2, _backend=backend), "`X`", "shape")


@backends
def test_triple_unsorted_is_canonicalized(backend):
    T = (i64([0, 2, 3]), i64([3, 1, 2]), np.array([1.0, 2.0, 3.0]), (2, 4))
    dense = np.array([[0.0, 2.0, 0.0, 1.0], [0.0, 0.0, 3.0, 0.0]])
    a, _ = pt.feature_stats(T, _backend=backend)
    b, _ = pt.feature_stats(dense, _backend=backend)
    assert a.equals(b)


@backends
def test_malformed_triple_decreasing_indptr(backend):
    T = (i64([0, 2, 1]), i64([0, 1]), np.array([1.0, 2.0]), (2, 4))
    expect(SparseFormatError, lambda: pt.fit_policy(T, Y2, _backend=backend), "`X`")


@backends
def test_malformed_triple_float_indices(backend):
    T = (i64([0, 1, 2]), np.array([0.5, 1.0]), np.array([1.0, 2.0]), (2, 4))
    expect((SparseFormatError, DTypeError), lambda: pt.feature_stats(T, _backend=backend), "`X`")


@pytest.mark.parametrize(
    "indices, idx", [([0, 7], "7"), ([0, -1], "-1")], ids=["past_ncols", "negative"]
)
def test_triple_column_index_out_of_range_rust(indices, idx):
    T = (i64([0, 1, 2]), i64(indices), np.array([1.0, 2.0]), (2, 4))
    for fn in (lambda: pt.fit_policy(T, Y2), lambda: pt.feature_stats(T)):
        expect(SparseFormatError, fn, "`X`", "row 1", idx)


_OOB_SCRIPT = textwrap.dedent(
    """
    import numpy as np, policytrace as pt
    T = (np.array([0, 1, 2]), np.array({indices}), np.array([1.0, 2.0]), (2, 4))
    pol = pt.fit_policy(np.arange(24.0).reshape(6, 4) % 5, np.arange(6.0), threads=1)
    try:
        {call}
        print("RESULT none")
    except pt.errors.SparseFormatError as e:
        print("RESULT SparseFormatError", "`X`" in str(e))
    except BaseException as e:
        print("RESULT", type(e).__name__)
    """
)


def _run_isolated(call: str, indices) -> subprocess.CompletedProcess:
    """Run in a child: a corrupted heap must not take the test session down with it."""
    code = _OOB_SCRIPT.format(call=call, indices=list(indices))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(
            "pt.fit_policy(T, np.array([1.0, 2.0]), _backend='numpy', threads=1)", id="fit"
        ),
        pytest.param("pt.feature_stats(T, _backend='numpy', threads=1)", id="feature_stats"),
        pytest.param("pol.predict(T)", id="predict"),
    ],
)
def test_triple_column_index_out_of_range_isolated(call):
    for indices in ([0, 7], [0, -1]):
        res = _run_isolated(call, indices)
        assert res.returncode == 0, f"child died (rc {res.returncode}): {res.stderr[-500:]}"
        assert "RESULT SparseFormatError True" in res.stdout, res.stdout + res.stderr[-500:]


# --------------------------------------------------------------------------------------
# feature selection rules
# --------------------------------------------------------------------------------------


@backends
def test_select_features_rules(backend):
    three = np.array(["a", "b", "c"] * (N // 3))
    expect(
        InvalidValueError,
        lambda: pt.select_features(X0, groups=three, method="mean_diff", _backend=backend),
        "two probe groups",
        "got 3",
    )
    expect(
        InvalidValueError,
        lambda: pt.select_features(X0, Y0, method="mean_diff", _backend=backend),
        "`groups`",
    )
    expect(
        InvalidValueError,
        lambda: pt.select_features(X0, groups=GROUPS0, positive="nope", _backend=backend),
        "`positive`",
    )
    expect(
        InvalidValueError,
        lambda: pt.select_features(X0, method="corr", k=2, _backend=backend),
        "`y`",
    )
    expect(
        InvalidValueError,
        lambda: pt.select_features(X0, Y0, method="corr", _backend=backend),
        "`k`",
    )
    expect(
        InvalidValueError,
        lambda: pt.select_features(X0, Y0, method="corr", k=0, _backend=backend),
        "`k`",
    )
    expect(
        InvalidValueError,
        lambda: pt.select_features(X0, groups=GROUPS0, positive="pos", min_active=-1,
                                   _backend=backend),
        "`min_active`",
    )
    expect(
        InvalidValueError,
        lambda: pt.select_features(X0, groups=GROUPS0, positive="pos", threshold=-0.5,
                                   _backend=backend),
        "`threshold`",
    )
    expect(
        NonFiniteError,
        lambda: pt.select_features(X0, groups=with_value(Y0, 3, np.nan), _backend=backend),
        "`groups`",
    )


# --------------------------------------------------------------------------------------
# Attributor: duplicate pair ids, data that is not the fit data
# --------------------------------------------------------------------------------------


@backends
def test_duplicate_pair_ids_across_batches(backend):
    att = pt.Attributor(policy(backend), X0, Y0, _backend=backend, threads=1)
    att.add(DX0[:2], DY0[:2], pair_ids=["p0", "p1"])
    before = att.pairs()
    expect(
        InvalidValueError,
        lambda: att.add(DX0[1:], DY0[1:], pair_ids=["p2", "p1"]),
        "duplicate pair ids",
        "'p1'",
    )
    # the failed batch left no trace
    assert att.n_pairs == 2
    assert att.pairs().equals(before)
    assert att.pair_features().height == 2 * K
    att.add(DX0[2], DY0[2], pair_ids=["p2"])
    assert att.pairs()["pair_id"].to_list() == ["p0", "p1", "p2"]


@backends
def test_duplicate_pair_ids_within_batch(backend):
    att = pt.Attributor(policy(backend), X0, Y0, _backend=backend, threads=1)
    expect(
        InvalidValueError,
        lambda: att.add(DX0, DY0, pair_ids=[4, 5, 4]),
        "duplicate pair ids",
        "4",
    )
    assert att.n_pairs == 0
    expect(InvalidValueError, lambda: att.pairs(), "no pairs")


@backends
@pytest.mark.parametrize(
    "which",
    ["X_scaled", "X_other", "y_shifted_one", "y_other", "X_rows_permuted_y_not"],
)
def test_decompose_with_other_data_says_refit(backend, which):
    rng = np.random.default_rng(7)
    X, y = X0.copy(), Y0.copy()
    if which == "X_scaled":
        X = X * 1.5 + (np.arange(N) % 2)[:, None]
    elif which == "X_other":
        X = rng.integers(0, 5, (N, K)).astype(float)
    elif which == "y_shifted_one":
        y[3] += 5.0
    elif which == "y_other":
        y = rng.normal(size=N)
    else:
        X = X[::-1]
    pol = policy(backend)
    expect(
        InvalidValueError,
        lambda: pt.decompose(pol, X, y, DX0, DY0, _backend=backend, threads=1),
        "refit",
    )
    expect(InvalidValueError, lambda: pt.Attributor(pol, X, y, _backend=backend), "refit")


@backends
def test_index_of_unknown_ids(backend):
    pol = pt.fit_policy(X0, Y0, feature_ids=[10, 20, 30, 40, 50], _backend=backend)
    np.testing.assert_array_equal(pol.index_of([30, 10]), [2, 0])
    expect(FeatureMismatchError, lambda: pol.index_of([10, 99, 31]), "[99, 31]")
    expect(FeatureMismatchError, lambda: pol.index_of([0]), "[0]")


@backends
def test_policy_argument_must_be_a_policy(backend):
    expect(
        InvalidValueError,
        lambda: pt.decompose({"coef": [1]}, X0, Y0, DX0, DY0, _backend=backend),
        "`policy`",
    )


@pytest.mark.parametrize(
    "backend",
    ["rust", "numpy"],
)
def test_interference_bad_inputs(backend):
    d = np.arange(8.0).reshape(2, 4)
    expect(ShapeError, lambda: pt.interference(d, [0, 1, 2], [0, 1], _backend=backend),
           "feature_group")
    expect(ShapeError, lambda: pt.interference(d, [0, 1, 2, 3], [0], _backend=backend),
           "pair_group")
    expect(NonFiniteError, lambda: pt.interference(with_value(d, (1, 2), np.nan), [0, 1, 2, 3],
                                                   [0, 1], _backend=backend), "d_coef")


@backends
def test_interference_d_coef_must_be_2d(backend):
    expect(ShapeError, lambda: pt.interference(np.ones(4), [0] * 4, [0], _backend=backend),
           "`d_coef`")


# --------------------------------------------------------------------------------------
# direct calls into the compiled core
# --------------------------------------------------------------------------------------

Xc = np.ascontiguousarray(X0)
Yc = np.ascontiguousarray(Y0)


def _core_pol():
    p = policy("rust")
    return _core.Decomposer(p.coef, p.intercept, p.lam, p.scale, True, Xc, Yc, 1)


@pytest.mark.parametrize(
    "y, field",
    [
        (Y0.astype(np.float32), "`y`"),
        (Y0.astype(np.int64), "`y`"),
        (list(Y0), "`y`"),
        (Y0[:, None], "`y`"),
    ],
    ids=["float32", "int64", "list", "2d"],
)
def test_core_wrong_dtype_y(y, field):
    e = expect(DTypeError, lambda: _core.fit_policy(Xc, y), field)
    assert isinstance(e, TypeError)
    expect(DTypeError, lambda: _core.feature_stats(Xc, y), field)


@pytest.mark.parametrize(
    "X", [X0.astype(np.float32), X0.astype(np.int64), X0.astype(complex), X0[0], X0[None]],
    ids=["float32", "int64", "complex", "1d", "3d"],
)
def test_core_wrong_dtype_X(X):
    expect(DTypeError, lambda: _core.fit_policy(X, Yc), "`X`")
    expect(DTypeError, lambda: _core.feature_stats(X), "`X`")


def test_core_non_contiguous():
    frags = "C-contiguous"
    expect(LayoutError, lambda: _core.fit_policy(np.asfortranarray(Xc), Yc), "`X`", frags)
    expect(LayoutError, lambda: _core.fit_policy(strided(Xc, 1), Yc), "`X`", frags)
    expect(LayoutError, lambda: _core.fit_policy(Xc, strided(Yc)), "`y`", frags)
    expect(LayoutError, lambda: _core.feature_stats(strided(Xc, 0)), "`X`", frags)
    expect(LayoutError, lambda: _core.feature_stats(Xc, None, strided(np.zeros(N, np.uint32)), 1),
           "`groups`")
    m = csr_tuple(Xc)
    bad_data = (m[0], m[1], strided(m[2]), m[3])
    expect(LayoutError, lambda: _core.feature_stats(bad_data), "`X.data`", frags)
    bad_indices = (m[0], strided(m[1]), m[2], m[3])
    expect(LayoutError, lambda: _core.feature_stats(bad_indices), "`X.indices`", frags)
    p = policy("rust")
    expect(LayoutError, lambda: _core.Decomposer(strided(p.coef), p.intercept, p.lam, p.scale,
                                                  True, Xc, Yc), "`coef`")
    D = _core_pol()
    dx = csr_tuple(DX0.reshape(P * N, K))
    expect(LayoutError, lambda: D.run(dx, np.asfortranarray(DY0)), "`dy`", frags)
    e = expect(LayoutError, lambda: _core.interference(np.asfortranarray(np.ones((3, 2))),
                                                       i64([0, 1]), i64([0, 1, 0])), "`d_coef`")
    assert isinstance(e, ValueError)


def test_core_wrong_index_dtypes():
    m = csr_tuple(Xc)
    expect(DTypeError, lambda: _core.feature_stats((m[0].astype(np.int32),) + m[1:]),
           "`X.indptr`")
    expect(DTypeError, lambda: _core.feature_stats((m[0], m[1].astype(np.uint64)) + m[2:]),
           "`X.indices`")
    expect(DTypeError, lambda: _core.feature_stats(m[:2] + (m[2].astype(np.float32), m[3])),
           "`X.data`")
    expect(DTypeError, lambda: _core.feature_stats(Xc, None, np.zeros(N, np.int64), 1), "`groups`")
    expect(DTypeError, lambda: _core.interference(np.ones((3, 2)), np.array([0, 1], np.int32),
                                                  i64([0, 1, 0])), "`feature_group`")


CORE_BAD_CSR = {
    # name: (indptr, indices, data, shape, expected message fragment)
    "indptr_decreasing": ([0, 2, 1, 3], [0, 1, 2], [1.0, 2.0, 3.0], (3, 4), "indptr decreases"),
    "indptr_negative": ([0, -1, 2], [0, 1], [1.0, 2.0], (2, 4), "indptr"),
    "indptr_wrong_length": ([0, 2], [0, 1], [1.0, 2.0], (2, 4), "indptr has length 2"),
    "indptr_not_from_0": ([1, 1, 2], [0, 1], [1.0, 2.0], (2, 4), "indptr[0]"),
    "indptr_end_short": ([0, 1, 1], [0, 1], [1.0, 2.0], (2, 4), "indptr[-1]"),
    "indptr_end_long": ([0, 1, 3], [0, 1], [1.0, 2.0], (2, 4), "indptr[-1]"),
    "indices_data_differ": ([0, 1, 2], [0, 1, 2], [1.0, 2.0], (2, 4), "differ in length"),
    "unsorted_indices": ([0, 2, 2], [3, 1], [1.0, 2.0], (2, 4), "unsorted"),
    "duplicate_indices": ([0, 2, 2], [1, 1], [1.0, 2.0], (2, 4), "duplicate"),
    "index_past_ncols": ([0, 1, 2], [0, 4], [1.0, 2.0], (2, 4), "column index 4"),
    "index_negative": ([0, 1, 2], [0, -3], [1.0, 2.0], (2, 4), "column index -3"),
    "index_negative_unsorted": ([0, 2, 2], [2, -3], [1.0, 2.0], (2, 4), "-3"),
    "index_huge": ([0, 1, 1], [2**62], [1.0], (2, 4), "outside 0..4"),
}


@pytest.mark.parametrize("name", sorted(CORE_BAD_CSR))
def test_core_malformed_csr(name):
    indptr, indices, data, shape, frag = CORE_BAD_CSR[name]
    T = (i64(indptr), i64(indices), np.array(data, np.float64), shape)
    expect(SparseFormatError, lambda: _core.feature_stats(T), "`X`", frag)
    expect(SparseFormatError, lambda: _core.fit_policy(T, np.zeros(shape[0]), 1.0), "`X`", frag)
    # the same structure given as a pair batch to a Decomposer names `dX`
    nrows = shape[0]
    small_x = np.ascontiguousarray(np.eye(nrows, 4) + 1.0)
    small_y = np.arange(float(nrows))
    r = _core.fit_policy(small_x, small_y, 1.0)
    D = _core.Decomposer(r.coef, r.intercept, r.lam, r.scale, True, small_x, small_y)
    expect(SparseFormatError, lambda: D.run(T, np.zeros((1, nrows))), "`dX`")


def test_core_csr_tuple_shape_and_arity():
    m = csr_tuple(Xc)
    expect(SparseFormatError, lambda: _core.feature_stats(m[:3]), "`X`")
    expect(SparseFormatError, lambda: _core.feature_stats(m + (None,)), "`X`")
    expect(ShapeError, lambda: _core.feature_stats(m[:3] + ((N, -1),)), "`X`")
    expect(ShapeError, lambda: _core.feature_stats(m[:3] + ((N,),)), "`X`")
    expect(ShapeError, lambda: _core.feature_stats(m[:3] + ("ab",)), "`X`")
    expect(NonFiniteError, lambda: _core.feature_stats(m[:2] + (with_value(m[2], 3, np.nan), m[3])),
           "`X`", "row")


def test_core_other_typed_errors():
    expect(ShapeError, lambda: _core.fit_policy(Xc, Yc[:-1]), "`y`")
    expect(EmptyInputError, lambda: _core.fit_policy(np.zeros((0, K)), np.zeros(0)), "`X`")
    expect(EmptyInputError, lambda: _core.feature_stats(np.zeros((N, 0))), "`X`")
    expect(NonFiniteError, lambda: _core.fit_policy(with_value(Xc, (2, 1), np.inf), Yc), "`X`",
           "row 2", "column 1")
    expect(NonFiniteError, lambda: _core.fit_policy(Xc, with_value(Yc, 4, np.nan)), "`y`", "4")
    expect(InvalidValueError, lambda: _core.fit_policy(Xc, Yc, -1.0), "`lam`")
    expect(InvalidValueError, lambda: _core.fit_policy(Xc, Yc, float("nan")), "`lam`")
    expect(EmptyInputError, lambda: _core.fit_policy(Xc, Yc, None, []), "`lam_grid`")
    expect(InvalidValueError, lambda: _core.feature_stats(Xc, None, np.full(N, 3, np.uint32), 2),
           "`groups`", "3")
    expect(InvalidValueError, lambda: _core.feature_stats(Xc, None, np.zeros(N, np.uint32), 0),
           "`groups`")
    expect(ShapeError, lambda: _core.feature_stats(Xc, None, np.zeros(N - 1, np.uint32), 1),
           "`groups`")
    p = policy("rust")
    expect(InvalidValueError,
           lambda: _core.Decomposer(p.coef, p.intercept, np.nan, p.scale, True, Xc, Yc), "`lam`")
    expect(ShapeError,
           lambda: _core.Decomposer(p.coef, p.intercept, p.lam, p.scale[:-1], True, Xc, Yc),
           "`scale`")
    expect(InvalidValueError,
           lambda: _core.Decomposer(p.coef, p.intercept, p.lam, p.scale * 0, True, Xc, Yc),
           "`scale`")
    expect(InvalidValueError,
           lambda: _core.Decomposer(p.coef + 1.0, p.intercept, p.lam, p.scale, True, Xc, Yc),
           "refit")
    D = _core_pol()
    dx = csr_tuple(DX0.reshape(P * N, K))
    # Dense float64/float32 ΔX is read as it is; other dtypes are refused, naming the forms.
    expect(DTypeError, lambda: D.run(np.zeros((N, K), dtype=np.int64), DY0[:1]), "`dX`", "CSR", "float32")
    expect(DTypeError, lambda: D.run([[0.0] * K] * N, DY0[:1]), "`dX[0]`", "CSR")
    expect(InvalidValueError, lambda: D.run(dx, DY0, "second_order"), "`method`")
    expect(DTypeError, lambda: D.run(dx, DY0.astype(np.float32)), "`dy`")
    expect(DTypeError, lambda: D.run(dx, DY0[0]), "`dy`")
    expect(ShapeError, lambda: D.run(dx, np.ascontiguousarray(DY0[:, :-1])), "`dy`")
    expect(ShapeError, lambda: D.run(dx, DY0[:-1]), "`dX`")
    expect(ShapeError, lambda: D.run(csr_tuple(DX0.reshape(P * N, K)[:, :-1]), DY0), "`dX`")
    expect(NonFiniteError, lambda: D.run(dx, with_value(DY0, (1, 2), np.nan)), "`dy`")
    expect(ShapeError, lambda: _core.interference(np.ones((3, 2)), i64([0, 1, 2]), i64([0, 1, 0])),
           "`feature_group`")
    expect(ShapeError, lambda: _core.interference(np.ones((3, 2)), i64([0, 1]), i64([0, 1])),
           "`pair_group`")


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda T: _core.feature_stats(T), id="feature_stats"),
        pytest.param(lambda T: _core.fit_policy(T, np.zeros(1), 1.0), id="fit_policy"),
    ],
)
@pytest.mark.parametrize(
    "T",
    [
        pytest.param((i64([]), i64([]), np.zeros(0), (2**64 - 1, 3)), id="nrows_usize_max"),
        pytest.param((i64([0, 0]), i64([]), np.zeros(0), (1, 2**62)), id="ncols_2^62"),
        pytest.param((i64([0, 1]), i64([0]), np.ones(1), (1, 2**64 - 1)), id="ncols_usize_max"),
    ],
)
def test_core_absurd_csr_shape_no_panic(call, T):
    expect(PolicytraceError, lambda: call(T))


# --------------------------------------------------------------------------------------
# fuzz: garbage into the core is either accepted or a typed error
# --------------------------------------------------------------------------------------


def _maybe_corrupt(draw, a: np.ndarray) -> object:
    how = draw(st.sampled_from(["keep"] * 6 + ["int32", "float32", "strided", "2d", "list"]))
    if how in ("int32", "float32"):
        with np.errstate(all="ignore"):
            return a.astype(how)
    if how == "strided":
        return np.repeat(a, 2)[::2]
    if how == "2d":
        return a[:, None]
    if how == "list":
        return a.tolist()
    return a


@st.composite
def garbage_csr(draw):
    nrows = draw(st.integers(-2, 12))
    ncols = draw(st.integers(-2, 12))
    nnz = draw(st.integers(0, 24))
    plausible = draw(st.booleans())
    n_ptr = max(nrows, 0) + 1 if plausible else draw(st.integers(0, 15))
    indptr = draw(hnp.arrays(np.int64, n_ptr, elements=st.integers(-3, 30)))
    if plausible and n_ptr:
        indptr = np.sort(indptr)
        indptr[0] = 0
        indptr[-1] = nnz if draw(st.booleans()) else indptr[-1]
        indptr = np.clip(indptr, 0, None)
    n_idx = nnz if plausible else draw(st.integers(0, 24))
    indices = draw(hnp.arrays(np.int64, n_idx, elements=st.integers(-3, 15)))
    if plausible and draw(st.booleans()) and n_ptr > 1:
        # canonical rows: sorted, unique per row
        for r in range(n_ptr - 1):
            a, b = int(indptr[r]), int(indptr[r + 1])
            if 0 <= a <= b <= n_idx:
                indices[a:b] = np.sort(indices[a:b])
    any_float = st.floats(allow_nan=True, allow_infinity=True)
    data = draw(hnp.arrays(np.float64, nnz, elements=any_float))
    shape = draw(st.sampled_from(["ok", "ok", "ok", "short", "list", "float"]))
    shp = {
        "ok": (nrows, ncols),
        "short": (nrows,),
        "list": [nrows, ncols],
        "float": (float(nrows), ncols),
    }[shape]
    parts = [_maybe_corrupt(draw, a) for a in (indptr, indices, data)]
    arity = draw(st.sampled_from([4, 4, 4, 3, 5]))
    return tuple((parts + [shp, None])[:arity])


@st.composite
def garbage_dense(draw):
    n = draw(st.integers(0, 7))
    k = draw(st.integers(0, 7))
    finite = st.floats(min_value=-1e300, max_value=1e300)
    a = draw(hnp.arrays(np.float64, (n, k), elements=st.one_of(finite, st.sampled_from(
        [np.nan, np.inf, -np.inf, 0.0]))))
    how = draw(st.sampled_from(["keep"] * 5 + ["fortran", "strided", "float32", "1d", "complex"]))
    if how == "fortran":
        return np.asfortranarray(a)
    if how == "strided":
        return np.repeat(a, 2, axis=1)[:, ::2]
    if how == "float32":
        with np.errstate(over="ignore"):
            return a.astype(np.float32)
    if how == "1d":
        return a.ravel()
    if how == "complex":
        return a.astype(np.complex128)
    return a


def _accepted_or_typed(fn):
    try:
        fn()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        assert not is_panic(e), f"panic: {e!r}"
        assert isinstance(e, PolicytraceError), f"{type(e).__module__}.{type(e).__name__}: {e}"


@lru_cache(maxsize=None)
def _small_decomposer():
    x = np.ascontiguousarray([[1.0, 0.0, 2.0], [0.0, 3.0, 1.0]])
    y = np.array([1.0, -1.0])
    r = _core.fit_policy(x, y, 0.5, None, True, True, 1)
    return _core.Decomposer(r.coef, r.intercept, r.lam, r.scale, True, x, y, 1)


@settings(max_examples=150)
@given(
    x=st.one_of(garbage_csr(), garbage_dense()),
    y_len=st.integers(0, 14),
    y_nan=st.booleans(),
    lam=st.sampled_from([None, 0.0, 1e-8, 1.0, 1e8, -1.0, float("nan"), float("inf")]),
    grid=st.one_of(st.none(), st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=4)),
    flags=st.tuples(st.booleans(), st.booleans()),
    n_groups=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_core_fuzz_never_panics(x, y_len, y_nan, lam, grid, flags, n_groups, seed):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=y_len)
    if y_nan and y_len:
        y[rng.integers(y_len)] = np.nan
    groups = rng.integers(0, max(n_groups, 1) + 1, size=y_len).astype(np.uint32)
    _accepted_or_typed(lambda: _core.feature_stats(x, threads=1))
    _accepted_or_typed(lambda: _core.feature_stats(x, y, groups, n_groups, 1))
    _accepted_or_typed(lambda: _core.fit_policy(x, y, lam, grid, flags[0], flags[1], 1))
    _accepted_or_typed(lambda: _core.fit_policy(x, y, lam, None, flags[0], flags[1], 1))
    # the same garbage as a batch of pairs for a 2-probe, 3-feature base fit
    dy = rng.normal(size=(y_len // 2, 2))
    if y_nan and dy.size:
        dy.flat[0] = np.inf
    method = "exact" if flags[0] else "first_order"
    _accepted_or_typed(lambda: _small_decomposer().run(x, dy, method, 1))
