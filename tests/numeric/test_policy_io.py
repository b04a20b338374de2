"""Policy persistence (.json / .parquet), its error paths and atomicity, and the policy's
frames (``to_frame``, ``gcv_frame``)."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import policytrace as pt
from policytrace.errors import FeatureMismatchError, InvalidValueError, PolicytraceError
from policytrace.numeric.policy_io import FORMAT_VERSION

SUFFIXES = (".json", ".parquet")
suffixes = pytest.mark.parametrize("suffix", SUFFIXES)

IDS = np.array([907, 12, 4096, 33, 5, 71, 600, 2])


def _wide_problem():
    """n=6 probes, K=8 features: on the grid, lam=0 leaves no residual degrees of freedom,
    so its GCV score is +inf."""
    rng = np.random.default_rng(3)
    X = rng.exponential(size=(6, 8)) * (rng.random((6, 8)) < 0.7)
    X[:, 0] += 1.0
    y = rng.normal(size=6)
    return X, y


X_W, Y_W = _wide_problem()


@pytest.fixture(scope="module", params=["rust", "numpy"])
def gcv_policy(request):
    pol = pt.fit_policy(
        X_W,
        Y_W,
        lam="gcv",
        lam_grid=[0.0, 1e-3, 0.1, 1.0, 10.0],
        feature_ids=IDS,
        labels=[f"latent {i}: ünïcode \"q\"" for i in IDS],
        _backend=request.param,
        threads=1,
    )
    assert np.isinf(pol.gcv_score).any() and np.isfinite(pol.gcv_score).any()
    return pol


@pytest.fixture(scope="module")
def plain_policy():
    """Fixed lambda, no labels, default ids, no intercept."""
    return pt.fit_policy(X_W, Y_W, lam=0.3, intercept=False, threads=1)


def _bits(v: float) -> bytes:
    return struct.pack("<d", v)


def assert_same_policy(a: pt.Policy, b: pt.Policy) -> None:
    for name in ("coef", "scale", "gcv_grid", "gcv_score"):
        x, y = getattr(a, name), getattr(b, name)
        assert y.dtype == np.float64, name
        assert x.shape == y.shape and x.tobytes() == y.tobytes(), name
    for name in ("intercept", "lam", "df"):
        x, y = getattr(a, name), getattr(b, name)
        assert isinstance(y, float)
        assert _bits(x) == _bits(y), f"{name}: {x!r} != {y!r}"
    assert b.feature_ids.dtype == np.int64
    np.testing.assert_array_equal(a.feature_ids, b.feature_ids)
    assert a.labels == b.labels
    for name in ("fit_intercept", "standardize", "solver", "dual"):
        assert getattr(a, name) == getattr(b, name), name


def no_temp_files(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp") or p.name[0] == "."]


# --------------------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------------------


@suffixes
def test_roundtrip_bit_identical_with_gcv_inf(tmp_path, gcv_policy, suffix):
    path = gcv_policy.save(tmp_path / f"policy{suffix}")
    assert path == tmp_path / f"policy{suffix}"
    loaded = pt.Policy.load(path)
    assert_same_policy(gcv_policy, loaded)
    assert np.isposinf(loaded.gcv_score[0])
    np.testing.assert_array_equal(loaded.predict(X_W), gcv_policy.predict(X_W))
    assert loaded.to_frame().equals(gcv_policy.to_frame())
    assert loaded.gcv_frame().equals(gcv_policy.gcv_frame())
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"policy{suffix}"]


@suffixes
def test_roundtrip_plain_policy(tmp_path, plain_policy, suffix):
    loaded = pt.Policy.load(plain_policy.save(tmp_path / f"p{suffix}"))
    assert_same_policy(plain_policy, loaded)
    assert loaded.labels is None
    assert loaded.fit_intercept is False
    assert loaded.gcv_grid.shape == (0,) and loaded.gcv_score.shape == (0,)
    np.testing.assert_array_equal(loaded.predict(X_W), plain_policy.predict(X_W))


@suffixes
def test_roundtrip_awkward_floats(tmp_path, suffix):
    """Subnormals, signed zero, extreme exponents, a NaN df and values that need 17 digits."""
    coef = np.array([5e-324, -0.0, 1.7976931348623157e308, 0.1 + 0.2, -2.2250738585072014e-308])
    pol = pt.Policy(
        coef=coef,
        intercept=-0.0,
        lam=1e-300,
        scale=np.array([7e-310, 3.0, 1e300, 1.0, 1 / 3]),
        feature_ids=np.array([2**62, -1, 0, 7, 2**40]),
        labels=["a", "", "c", "d", "é"],
        df=float("nan"),
        gcv_grid=np.array([0.0, 1e-300, 1e300]),
        gcv_score=np.array([np.inf, 1.0000000000000002, np.inf]),
    )
    loaded = pt.Policy.load(pol.save(tmp_path / f"odd{suffix}"))
    for name in ("coef", "scale", "gcv_grid", "gcv_score"):
        assert getattr(loaded, name).tobytes() == getattr(pol, name).tobytes(), name
    assert _bits(loaded.intercept) == _bits(-0.0)
    assert loaded.lam == 1e-300 and math.isnan(loaded.df)
    np.testing.assert_array_equal(loaded.feature_ids, pol.feature_ids)
    assert loaded.labels == pol.labels


@suffixes
def test_save_accepts_str_path_and_creates_parents(tmp_path, plain_policy, suffix):
    target = tmp_path / "a" / "b" / f"pol{suffix}"
    out = plain_policy.save(str(target))
    assert out == target and target.is_file()
    assert_same_policy(plain_policy, pt.Policy.load(str(target)))


def test_suffix_is_case_insensitive(tmp_path, plain_policy):
    for name in ("P.JSON", "P.Parquet"):
        assert_same_policy(plain_policy, pt.Policy.load(plain_policy.save(tmp_path / name)))


def test_json_file_is_plain_json(tmp_path, gcv_policy):
    path = gcv_policy.save(tmp_path / "p.json")
    doc = json.loads(path.read_text())
    assert doc["format"] == "policytrace.policy" and doc["version"] == FORMAT_VERSION
    assert doc["feature_ids"] == IDS.tolist()
    assert doc["gcv_score"][0] is None  # inf is written as null
    assert [float(v) for v in doc["coef"]] == gcv_policy.coef.tolist()


def test_parquet_file_layout(tmp_path, gcv_policy):
    table = pq.read_table(gcv_policy.save(tmp_path / "p.parquet"))
    assert table.column_names == ["feature_id", "label", "coef", "scale"]
    meta = json.loads(table.schema.metadata[b"policytrace"])
    assert meta["format"] == "policytrace.policy" and meta["version"] == FORMAT_VERSION


# --------------------------------------------------------------------------------------
# feature ids on load
# --------------------------------------------------------------------------------------


@suffixes
def test_load_with_matching_feature_ids(tmp_path, gcv_policy, suffix):
    path = gcv_policy.save(tmp_path / f"p{suffix}")
    for ids in (IDS, IDS.tolist(), IDS.astype(np.int32), tuple(int(i) for i in IDS)):
        assert_same_policy(gcv_policy, pt.Policy.load(path, feature_ids=ids))


@suffixes
def test_load_with_reordered_feature_ids_names_position(tmp_path, gcv_policy, suffix):
    path = gcv_policy.save(tmp_path / f"p{suffix}")
    ids = IDS.copy()
    ids[[2, 5]] = ids[[5, 2]]
    with pytest.raises(FeatureMismatchError) as ei:
        pt.Policy.load(path, feature_ids=ids)
    msg = str(ei.value)
    assert "order" in msg
    assert f"position 2: stored {IDS[2]}, given {IDS[5]}" in msg
    assert path.name in msg
    with pytest.raises(FeatureMismatchError, match="position 0"):
        pt.Policy.load(path, feature_ids=IDS[::-1])


@suffixes
def test_load_with_different_feature_set(tmp_path, gcv_policy, suffix):
    path = gcv_policy.save(tmp_path / f"p{suffix}")
    other = IDS.copy()
    other[3] = 123456
    with pytest.raises(FeatureMismatchError) as ei:
        pt.Policy.load(path, feature_ids=other)
    assert "123456" in str(ei.value) and str(IDS[3]) in str(ei.value)
    with pytest.raises(FeatureMismatchError, match=rf"missing: \[{IDS[-1]}\]"):
        pt.Policy.load(path, feature_ids=IDS[:-1])  # one missing
    with pytest.raises(FeatureMismatchError, match=r"not in policy: \[999\]"):
        pt.Policy.load(path, feature_ids=np.r_[IDS, 999])  # one extra
    with pytest.raises(FeatureMismatchError):
        pt.Policy.load(path, feature_ids=np.r_[IDS, IDS[0]])  # same set, a duplicate
    with pytest.raises(FeatureMismatchError):
        pt.Policy.load(path, feature_ids=[])


def test_index_of_on_loaded_policy(tmp_path, gcv_policy):
    loaded = pt.Policy.load(gcv_policy.save(tmp_path / "p.parquet"))
    np.testing.assert_array_equal(loaded.index_of([IDS[4], IDS[0]]), [4, 0])
    with pytest.raises(FeatureMismatchError, match="31337"):
        loaded.index_of([IDS[1], 31337])


# --------------------------------------------------------------------------------------
# bad paths and bad files
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["p.csv", "p", "p.json.gz", "p.pq", "p.txt"])
def test_bad_suffix(tmp_path, plain_policy, name):
    with pytest.raises(InvalidValueError, match=r"\.json or \.parquet"):
        plain_policy.save(tmp_path / name)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temp file
    (tmp_path / name).write_text("{}")
    with pytest.raises(InvalidValueError, match=r"\.json or \.parquet"):
        pt.Policy.load(tmp_path / name)


def _rewrite_json(path: Path, **changes) -> None:
    doc = json.loads(path.read_text())
    for k, v in changes.items():
        if v is _DROP:
            doc.pop(k)
        else:
            doc[k] = v
    path.write_text(json.dumps(doc))


_DROP = object()


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"format": "sklearn.ridge"}, "not a policytrace policy"),
        ({"format": _DROP}, "not a policytrace policy"),
        ({"version": FORMAT_VERSION + 1}, "version"),
        ({"version": 0}, "version"),
        ({"version": _DROP}, "version"),
        ({"version": str(FORMAT_VERSION)}, "version"),
    ],
    ids=["other_format", "no_format", "newer", "older", "no_version", "str_version"],
)
def test_json_wrong_format_or_version(tmp_path, plain_policy, changes, match):
    path = plain_policy.save(tmp_path / "p.json")
    _rewrite_json(path, **changes)
    with pytest.raises(InvalidValueError, match=match):
        pt.Policy.load(path)


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, None, "1"], ids=["newer", "null", "str"])
def test_parquet_wrong_version(tmp_path, plain_policy, version):
    path = plain_policy.save(tmp_path / "p.parquet")
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"policytrace"])
    meta["version"] = version
    pq.write_table(table.replace_schema_metadata({b"policytrace": json.dumps(meta)}), path)
    with pytest.raises(InvalidValueError, match="version"):
        pt.Policy.load(path)


def test_parquet_without_policy_metadata(tmp_path):
    path = tmp_path / "frame.parquet"
    pq.write_table(pa.table({"feature_id": [1, 2], "coef": [0.5, 0.25]}), path)
    with pytest.raises(InvalidValueError, match="no policytrace metadata"):
        pt.Policy.load(path)


@pytest.mark.parametrize(
    "name, content",
    [
        ("garbage.json", b"this is not json"),
        ("list.json", b"[1, 2, 3]"),
        ("truncated.json", b'{"format": "policytrace.policy", "version": 1, "coef": [1.0,'),
        ("missing_keys.json", b'{"format": "policytrace.policy", "version": 1}'),
        ("garbage.parquet", b"PAR1 definitely not parquet"),
        ("empty.parquet", b""),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_corrupt_file_raises_invalid_value(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(PolicytraceError) as ei:
        pt.Policy.load(path)
    assert isinstance(ei.value, InvalidValueError) and name in str(ei.value)


def test_load_missing_file(tmp_path):
    with pytest.raises(InvalidValueError, match="absent.json"):
        pt.Policy.load(tmp_path / "absent.json")


# --------------------------------------------------------------------------------------
# atomic save
# --------------------------------------------------------------------------------------


@suffixes
def test_save_overwrite_leaves_no_temp_files(tmp_path, gcv_policy, plain_policy, suffix):
    path = tmp_path / f"p{suffix}"
    plain_policy.save(path)
    gcv_policy.save(path)
    gcv_policy.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert no_temp_files(tmp_path) == []
    assert_same_policy(gcv_policy, pt.Policy.load(path))


@suffixes
def test_failed_replace_keeps_previous_file(
    tmp_path, monkeypatch, gcv_policy, plain_policy, suffix
):
    path = plain_policy.save(tmp_path / f"p{suffix}")
    before = path.read_bytes()

    def boom(src, dst):
        assert Path(src).exists()  # the new content was fully written before the swap
        raise OSError("disk unplugged")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk unplugged"):
        gcv_policy.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert_same_policy(plain_policy, pt.Policy.load(path))


@suffixes
def test_failed_replace_without_previous_file(tmp_path, monkeypatch, gcv_policy, suffix):
    def boom(src, dst):
        raise OSError("no")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        gcv_policy.save(tmp_path / f"p{suffix}")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


@suffixes
def test_failure_while_writing_keeps_previous_file(tmp_path, monkeypatch, gcv_policy, plain_policy, suffix):
    """The disk fills up after the bytes were written but before they are durable: the old
    file stays, and no temporary is left."""
    import policytrace._files as files

    path = plain_policy.save(tmp_path / f"p{suffix}")
    before = path.read_bytes()

    def disk_full(fd):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "fsync", disk_full)
    with pytest.raises(OSError, match="disk full"):
        gcv_policy.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


@suffixes
def test_saved_file_respects_umask(tmp_path, plain_policy, suffix):
    old = os.umask(0o022)
    try:
        path = plain_policy.save(tmp_path / f"p{suffix}")
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


# --------------------------------------------------------------------------------------
# frames
# --------------------------------------------------------------------------------------


def test_to_frame_columns_and_rank(gcv_policy):
    f = gcv_policy.to_frame()
    assert f.columns == ["feature_id", "label", "coef", "coef_raw", "scale", "rank"]
    assert f.schema["feature_id"] == pl.Int64 and f.schema["rank"] == pl.Int64
    assert f.schema["label"] == pl.Utf8
    assert f.height == len(IDS)
    np.testing.assert_array_equal(f["feature_id"].to_numpy(), IDS)
    assert f["label"].to_list() == gcv_policy.labels
    np.testing.assert_array_equal(f["coef"].to_numpy(), gcv_policy.coef)
    np.testing.assert_array_equal(f["coef_raw"].to_numpy(), gcv_policy.coef / gcv_policy.scale)
    np.testing.assert_array_equal(f["scale"].to_numpy(), gcv_policy.scale)
    rank = f["rank"].to_numpy()
    assert sorted(rank.tolist()) == list(range(1, len(IDS) + 1))
    by_rank = np.abs(gcv_policy.coef)[np.argsort(rank)]
    assert (np.diff(by_rank) <= 0).all()  # rank 1 = largest |coef|
    assert rank[np.argmax(np.abs(gcv_policy.coef))] == 1


def test_to_frame_rank_ties_are_stable_and_labels_null():
    pol = pt.Policy(
        coef=np.array([1.0, -3.0, 3.0, 0.0, -1.0]),
        intercept=0.0,
        lam=1.0,
        scale=np.array([1.0, 2.0, 4.0, 1.0, 0.5]),
        feature_ids=np.array([50, 40, 30, 20, 10]),
    )
    f = pol.to_frame()
    assert f["rank"].to_list() == [3, 1, 2, 5, 4]
    assert f["label"].null_count() == f.height and f.schema["label"] == pl.Utf8
    assert f["coef_raw"].to_list() == [1.0, -1.5, 0.75, 0.0, -2.0]


def test_gcv_frame_nulls_for_inf(gcv_policy):
    g = gcv_policy.gcv_frame()
    assert g.columns == ["lam", "gcv"]
    assert g.schema["lam"] == pl.Float64 and g.schema["gcv"] == pl.Float64
    np.testing.assert_array_equal(g["lam"].to_numpy(), gcv_policy.gcv_grid)
    inf = np.isinf(gcv_policy.gcv_score)
    assert g["gcv"].is_null().to_list() == inf.tolist()
    assert g["gcv"].is_nan().fill_null(False).sum() == 0
    np.testing.assert_array_equal(
        g["gcv"].drop_nulls().to_numpy(), gcv_policy.gcv_score[~inf]
    )
    # the selected lambda is the finite minimum
    best = g.drop_nulls().sort("gcv").row(0, named=True)
    assert best["lam"] == gcv_policy.lam


def test_gcv_frame_empty_for_fixed_lambda(plain_policy):
    g = plain_policy.gcv_frame()
    assert g.columns == ["lam", "gcv"] and g.height == 0
    assert g.schema["lam"] == pl.Float64 and g.schema["gcv"] == pl.Float64
