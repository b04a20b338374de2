"""Bad inputs to the numeric layer (no torch): each must raise a PolicytraceError subclass whose
message names the offending argument / field / file, and never hand back NaN or a silently
wrong number (a policy of zeros, an empty selection).

Damaged policy files, NaN/absurd selection arguments, absurd thread counts, lam grids, and
inputs whose spread overflows (or underflows) float64.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import policytrace as pt
from policytrace.errors import InvalidValueError, PolicytraceError

BACKENDS = ("rust", "numpy")
IDS = [10, 11, 12, 13, 14]
from _helpers import expect  # noqa: E402


def _problem(n=40, k=5, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.random((n, k))
    y = X @ rng.normal(size=k) + 0.01 * rng.normal(size=n)
    return X, y


def _r2(pred, y):
    return 1.0 - float(((pred - y) ** 2).sum()) / float(((y - y.mean()) ** 2).sum())


# --------------------------------------------------------------------------------------
# 1, 2. Policy.load of damaged files
# --------------------------------------------------------------------------------------


def _saved(tmp_path: Path, suffix: str) -> Path:
    X, y = _problem()
    return pt.fit_policy(X, y, feature_ids=IDS, threads=1).save(tmp_path / f"policy{suffix}")


def _edit_json(path: Path, **changes) -> Path:
    doc = json.loads(path.read_text())
    for key, value in changes.items():
        if value is KeyError:
            del doc[key]
        else:
            doc[key] = value
    # json.dumps writes NaN / Infinity literals, as a hand-edited or foreign writer would.
    path.write_text(json.dumps(doc))
    return path


def _coef(path):
    return json.loads(path.read_text())["coef"]


def _scale(path):
    return json.loads(path.read_text())["scale"]


@pytest.mark.parametrize(
    "field,edit",
    [
        ("coef", lambda c, s: {"coef": [math.nan] + c[1:]}),
        ("coef", lambda c, s: {"coef": c[:2] + [math.inf] + c[3:]}),
        ("coef", lambda c, s: {"coef": c[:3]}),  # three coefficients for five feature ids
        ("coef", lambda c, s: {"coef": KeyError}),
        ("scale", lambda c, s: {"scale": [0.0] + s[1:]}),
        ("scale", lambda c, s: {"scale": s[:4] + [-1.0]}),
        ("scale", lambda c, s: {"scale": [math.nan] + s[1:]}),
        ("scale", lambda c, s: {"scale": s[:3]}),
    ],
    ids=["coef-nan", "coef-inf", "coef-3-for-5", "coef-missing", "scale-zero", "scale-negative",
         "scale-nan", "scale-3-for-5"],
)
def test_policy_load_damaged_json(tmp_path, field, edit):
    path = _saved(tmp_path, ".json")
    _edit_json(path, **edit(_coef(path), _scale(path)))
    expect(InvalidValueError, lambda: pt.Policy.load(path), field, path.name)


def test_policy_load_json_negative_lam(tmp_path):
    path = _edit_json(_saved(tmp_path, ".json"), lam=-1.0)
    expect(InvalidValueError, lambda: pt.Policy.load(path), "lam")


@pytest.mark.parametrize("ids", [[10.5, 11, 12, 13, 14], [2**70, 11, 12, 13, 14]], ids=["fractional", "2**70"])
def test_policy_load_json_bad_feature_ids(tmp_path, ids):
    # 10.5 must not silently become feature 10; 2**70 must not leak an OverflowError.
    path = _edit_json(_saved(tmp_path, ".json"), feature_ids=ids)
    expect(InvalidValueError, lambda: pt.Policy.load(path), "feature_ids")


def _edit_parquet(path: Path, drop=(), **columns) -> Path:
    table = pq.read_table(path)
    meta = table.schema.metadata
    assert b"policytrace" in meta
    table = table.drop(list(drop)) if drop else table
    for name, values in columns.items():
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, pa.float64()))
    pq.write_table(table.replace_schema_metadata(meta), path)
    return path


def test_policy_load_parquet_without_coef(tmp_path):
    path = _edit_parquet(_saved(tmp_path, ".parquet"), drop=["coef"])
    expect(InvalidValueError, lambda: pt.Policy.load(path), "coef", path.name)


@pytest.mark.parametrize(
    "field,values",
    [("coef", [math.nan, 1.0, 1.0, 1.0, 1.0]), ("coef", [None, 1.0, 1.0, 1.0, 1.0]),
     ("scale", [1.0, 1.0, 0.0, 1.0, 1.0]), ("scale", [1.0, -2.0, 1.0, 1.0, 1.0])],
    ids=["coef-nan", "coef-null", "scale-zero", "scale-negative"],
)
def test_policy_load_damaged_parquet(tmp_path, field, values):
    path = _edit_parquet(_saved(tmp_path, ".parquet"), **{field: values})
    expect(InvalidValueError, lambda: pt.Policy.load(path), field, path.name)


def test_policy_load_random_bytes_parquet(tmp_path):
    path = tmp_path / "policy.parquet"
    path.write_bytes(np.random.default_rng(1).bytes(300))
    expect(PolicytraceError, lambda: pt.Policy.load(path), path.name)


# --------------------------------------------------------------------------------------
# 3, 6. select_features arguments
# --------------------------------------------------------------------------------------


def _groups(n=40):
    return np.arange(n) % 2 == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threshold", [math.nan, math.inf, -1.0, "0.1"], ids=["nan", "inf", "negative", "str"])
def test_select_corr_bad_threshold(backend, threshold):
    X, y = _problem()
    expect(PolicytraceError, lambda: pt.select_features(X, y, method="corr", k=3, threshold=threshold, _backend=backend, threads=1), "threshold")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threshold", [math.nan, "0.1"], ids=["nan", "str"])
def test_select_mean_diff_bad_threshold(backend, threshold):
    X, y = _problem()
    expect(PolicytraceError, lambda: pt.select_features(X, groups=_groups(), method="mean_diff", threshold=threshold,
                                      _backend=backend, threads=1), "threshold")


@pytest.mark.parametrize("k", [True, 2.5, 0, -1, "3"], ids=["True", "2.5", "0", "-1", "str"])
def test_select_bad_k(k):
    X, y = _problem()
    msg = str(expect(PolicytraceError, lambda: pt.select_features(X, y, method="corr", k=k, threads=1)))
    assert re.search(r"\bk\b", msg), f"the error does not name `k`: {msg!r}"


@pytest.mark.parametrize("min_active", [-1, 1.5, math.nan, True, "3"], ids=["-1", "1.5", "nan", "True", "str"])
def test_select_bad_min_active(min_active):
    # NaN compares False against every count: today it silently selects no feature at all.
    X, y = _problem()
    expect(PolicytraceError, lambda: pt.select_features(X, y, method="corr", k=3, min_active=min_active, threads=1), "min_active")


# --------------------------------------------------------------------------------------
# 4. threads
# --------------------------------------------------------------------------------------


def _call_with_threads(fn_name, backend, threads):
    X, y = _problem()
    if fn_name == "fit_policy":
        return pt.fit_policy(X, y, _backend=backend, threads=threads)
    if fn_name == "feature_stats":
        return pt.feature_stats(X, y, _backend=backend, threads=threads)
    if fn_name == "select_features":
        return pt.select_features(X, y, method="corr", k=2, _backend=backend, threads=threads)
    pol = pt.fit_policy(X, y, threads=1)
    dX = np.zeros((2,) + X.shape)
    dy = np.zeros((2, X.shape[0]))
    if fn_name == "decompose":
        return pt.decompose(pol, X, y, dX, dy, _backend=backend, threads=threads)
    return pt.Attributor(pol, X, y, _backend=backend, threads=threads)


FUNCTIONS = ["fit_policy", "feature_stats", "decompose", "select_features", "Attributor"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn_name", FUNCTIONS)
def test_threads_2_pow_70(fn_name, backend):
    expect(PolicytraceError, lambda: _call_with_threads(fn_name, backend, 2**70), "threads")


@pytest.mark.parametrize("threads", ["2", 1.5], ids=["str", "1.5"])
@pytest.mark.parametrize("fn_name", ["fit_policy", "feature_stats", "decompose"])
def test_threads_not_an_integer(fn_name, threads):
    expect(PolicytraceError, lambda: _call_with_threads(fn_name, "rust", threads), "threads")


@pytest.mark.parametrize("value", [str(2**70), "-3", "many"])
def test_threads_environment_variable(monkeypatch, value):
    monkeypatch.setenv("POLICYTRACE_NUM_THREADS", value)
    X, y = _problem()
    expect(PolicytraceError, lambda: pt.fit_policy(X, y), "POLICYTRACE_NUM_THREADS")


# --------------------------------------------------------------------------------------
# 5. inputs whose spread overflows / underflows float64
# --------------------------------------------------------------------------------------


def _scaled_problem(scale):
    rng = np.random.default_rng(7)
    X = rng.random((50, 4)) * scale
    w = rng.normal(size=4)
    y = X @ w / scale
    return X, y


def _fit_is_right_or_typed_error(X, y, **kw):
    """A correct fit (R² of predict against y > 0.9, all finite), or a PolicytraceError naming
    X and the over/underflow. Never a silent policy of zeros."""
    try:
        pol = pt.fit_policy(X, y, threads=1, **kw)
    except PolicytraceError as e:
        msg = str(e)
        assert re.search(r"\bX\b", msg), f"the error does not name `X`: {msg!r}"
        assert "flow" in msg.lower(), f"the error does not name the overflow/underflow: {msg!r}"
        return
    pred = pol.predict(X)
    assert np.isfinite(pol.coef).all() and np.isfinite(pred).all(), (pol.coef, pred[:5])
    r2 = _r2(pred, y)
    assert r2 > 0.9, f"R² = {r2} (coef {pol.coef}, scale {pol.scale}): a silently wrong fit"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("intercept", [True, False], ids=["intercept", "no-intercept"])
@pytest.mark.parametrize("scale", [1e3, 1e160, 1e200], ids=["1e3", "1e160", "1e200"])
def test_fit_huge_inputs_unstandardized(backend, intercept, scale):
    X, y = _scaled_problem(scale)
    _fit_is_right_or_typed_error(X, y, standardize=False, intercept=intercept, _backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1.0, 1e200, 1e-200], ids=["1", "1e200", "1e-200"])
def test_fit_extreme_inputs_standardized(backend, scale):
    # Standardizing divides by each column's spread: computed as sqrt(mean(x²)) it overflows
    # (1e200) or underflows (1e-200) to a "constant" column, and every coefficient is 0.
    X, y = _scaled_problem(scale)
    _fit_is_right_or_typed_error(X, y, standardize=True, _backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_feature_stats_huge_inputs(backend):
    # Pearson correlation is scale-free: X * 1e200 has exactly X's correlations.
    X, y = _scaled_problem(1.0)
    ref, _ = pt.feature_stats(X, y, _backend=backend, threads=1)
    try:
        big, _ = pt.feature_stats(X * 1e200, y, _backend=backend, threads=1)
    except PolicytraceError as e:
        assert re.search(r"\bX\b", str(e)) and "flow" in str(e).lower(), str(e)
        return
    std = big["std"].to_numpy()
    assert np.isfinite(std).all() and (std > 0).all(), f"std {std}"
    np.testing.assert_allclose(std / 1e200, ref["std"].to_numpy(), rtol=1e-9)
    corr = big["corr"].to_numpy()
    assert not big["corr"].is_null().any(), f"corr {corr}"
    np.testing.assert_allclose(corr, ref["corr"].to_numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_select_corr_huge_inputs(backend):
    X, y = _scaled_problem(1.0)
    ref = pt.select_features(X, y, method="corr", k=2, _backend=backend, threads=1)
    try:
        big = pt.select_features(X * 1e200, y, method="corr", k=2, _backend=backend, threads=1)
    except PolicytraceError as e:
        assert re.search(r"\bX\b", str(e)) and "flow" in str(e).lower(), str(e)
        return
    chosen = sorted(big.filter(big["selected"])["feature_id"].to_list())
    assert chosen == sorted(ref.filter(ref["selected"])["feature_id"].to_list()), big


# --------------------------------------------------------------------------------------
# 6. lam / lam_grid
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "grid",
    [[-1.0, 1.0], [1.0, -1e-300], [math.nan, 1.0], [math.inf], [], ["gcv"], "abc"],
    ids=["negative", "tiny-negative", "nan", "inf", "empty", "str-item", "str"],
)
def test_bad_lam_grid(backend, grid):
    X, y = _problem()
    expect(PolicytraceError, lambda: pt.fit_policy(X, y, lam="gcv", lam_grid=grid, _backend=backend, threads=1), "lam_grid")


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_lam_grid_with_fixed_lam(backend):
    # The grid is unused with a fixed lambda, but a negative grid is still a bad argument.
    X, y = _problem()
    expect(PolicytraceError, lambda: pt.fit_policy(X, y, lam=5.0, lam_grid=[-1.0], _backend=backend, threads=1), "lam_grid")


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_dimensional_lam_grid(backend):
    X, y = _problem()
    expect(PolicytraceError, lambda: pt.fit_policy(X, y, lam="gcv", lam_grid=[[1.0, 2.0], [3.0, 4.0]], _backend=backend,
                                 threads=1), "lam_grid")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lam", ["GCV", math.nan, -1.0, True, None], ids=["GCV", "nan", "negative", "True", "None"])
def test_bad_lam(backend, lam):
    X, y = _problem()
    expect(PolicytraceError, lambda: pt.fit_policy(X, y, lam=lam, _backend=backend, threads=1), "lam")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grid", [[1e308], [0.0, 1e308], [1e300, 1.7e308]], ids=["1e308", "0-1e308", "1e300-1.7e308"])
def test_huge_lam_grid_stays_finite(backend, grid):
    # Absurd but valid: the fit shrinks to the intercept, never NaN.
    X, y = _problem()
    pol = pt.fit_policy(X, y, lam="gcv", lam_grid=grid, _backend=backend, threads=1)
    assert np.isfinite(pol.coef).all() and math.isfinite(pol.intercept) and math.isfinite(pol.df)
    assert np.isfinite(pol.predict(X)).all()
