"""Saving and loading a :class:`~policytrace.numeric.policy.Policy` as JSON or Parquet.

Floats round-trip exactly (JSON writes ``repr``-exact doubles; Parquet stores float64), files
are written atomically (``policytrace._files``), and a loaded policy is checked before it is
returned: a file that parses but holds NaN coefficients, non-positive scales or a feature list
of the wrong length is refused with :class:`InvalidValueError` naming the field, never handed to
``predict`` to produce NaN.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import polars as pl

from .._files import write_atomic
from ..errors import FeatureMismatchError, InvalidValueError, PolicytraceError
from .policy import Policy

FORMAT_VERSION = 1
FORMAT_NAME = "policytrace.policy"
SUFFIXES = (".json", ".parquet")


def _meta(policy: Policy) -> dict:
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "intercept": policy.intercept,
        "lam": policy.lam,
        "fit_intercept": policy.fit_intercept,
        "standardize": policy.standardize,
        "solver": policy.solver,
        "dual": policy.dual,
        "df": policy.df,
        "gcv_grid": policy.gcv_grid.tolist(),
        "gcv_score": [s if math.isfinite(s) else None for s in policy.gcv_score.tolist()],
    }


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InvalidValueError(f"policy path must end in .json or .parquet, got '{path.name}'")
    return suffix


def save_policy(policy: Policy, path: str | os.PathLike) -> Path:
    path = Path(path)
    if _suffix(path) == ".json":
        doc = _meta(policy) | {
            "feature_ids": [int(f) for f in policy.feature_ids],
            "labels": policy.labels,
            "coef": policy.coef.tolist(),
            "scale": policy.scale.tolist(),
        }
        data = json.dumps(doc, indent=1).encode()
    else:
        import pyarrow.parquet as pq

        table = policy.to_frame().drop("rank", "coef_raw").to_arrow()
        table = table.replace_schema_metadata({b"policytrace": json.dumps(_meta(policy))})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        data = buf.getvalue()
    return write_atomic(path, data)


def load_policy(path: str | os.PathLike, feature_ids: Sequence[int] | None = None) -> Policy:
    path = Path(path)
    _suffix(path)
    if not path.is_file():
        raise InvalidValueError(f"policy file not found: {path}")
    try:
        pol = _read(path)
    except PolicytraceError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, OSError, UnicodeDecodeError) as e:
        raise InvalidValueError(f"{path} is not a readable policytrace policy: {e!r}") from e
    if feature_ids is not None:
        check_order(pol.feature_ids, np.asarray(feature_ids, dtype=np.int64), str(path))
    return pol


def _read_json(path: Path) -> tuple[dict, Any, Any, Any, Any]:
    doc = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise InvalidValueError(f"{path} is not a policytrace policy file")
    for key in ("feature_ids", "labels", "coef", "scale"):
        if key not in doc:
            raise InvalidValueError(f"{path} has no `{key}`: not a complete policytrace policy file")
    return doc, doc["feature_ids"], doc["labels"], doc["coef"], doc["scale"]


def _read_parquet(path: Path) -> tuple[dict, Any, Any, Any, Any]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises its own hierarchy
        raise InvalidValueError(f"{path} is not a readable Parquet file: {e}") from e
    raw = (table.schema.metadata or {}).get(b"policytrace")
    if raw is None:
        raise InvalidValueError(f"{path} has no policytrace metadata")
    frame = pl.from_arrow(table)
    missing = [c for c in ("feature_id", "coef", "scale", "label") if c not in frame.columns]
    if missing:
        raise InvalidValueError(f"{path} lacks the column(s) {missing}: not a policytrace policy file")
    labels = frame["label"].to_list()
    labels = None if all(v is None for v in labels) else labels
    return json.loads(raw), frame["feature_id"].to_list(), labels, frame["coef"], frame["scale"]


def _read(path: Path) -> Policy:
    meta, ids, labels, coef, scale = _read_json(path) if path.suffix.lower() == ".json" else _read_parquet(path)
    if meta.get("version") != FORMAT_VERSION:
        raise InvalidValueError(
            f"{path} has policy format version {meta.get('version')}; this policytrace "
            f"reads version {FORMAT_VERSION}. Refit the policy with this version."
        )
    pol = Policy(
        coef=np.asarray(coef, dtype=np.float64),
        feature_ids=_ids(ids, path),
        intercept=float(meta["intercept"]),
        lam=float(meta["lam"]),
        scale=np.asarray(scale, dtype=np.float64),
        labels=labels,
        fit_intercept=bool(meta["fit_intercept"]),
        standardize=bool(meta["standardize"]),
        solver=meta["solver"],
        dual=bool(meta["dual"]),
        df=float(meta["df"]),
        gcv_grid=np.asarray(meta["gcv_grid"], dtype=np.float64),
        gcv_score=np.asarray([np.inf if v is None else v for v in meta["gcv_score"]], dtype=np.float64),
    )
    check_loaded(pol, str(path))
    return pol


def _ids(ids: Any, path: Path) -> np.ndarray:
    """Feature ids as int64, refusing fractions and out-of-range values (never truncated)."""
    values = list(ids)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        bad = next(v for v in values if not (isinstance(v, int) and not isinstance(v, bool)))
        raise InvalidValueError(f"{path}: `feature_ids` holds {bad!r}; feature ids are integers (SAE latent indices)")
    if any(not -(2**63) <= v < 2**63 for v in values):
        raise InvalidValueError(f"{path}: `feature_ids` holds a value outside int64; the file is damaged")
    return np.asarray(values, dtype=np.int64)


def check_loaded(pol: Policy, where: str) -> None:
    """Refuse a policy no fit could have produced (what a damaged or hand-edited file holds)."""
    k = pol.feature_ids.shape[0]
    for name, arr in (("coef", pol.coef), ("scale", pol.scale)):
        if arr.ndim != 1 or arr.shape[0] != k:
            raise InvalidValueError(
                f"{where}: `{name}` has {arr.size} values for {k} feature ids; the file is damaged"
            )
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            raise InvalidValueError(
                f"{where}: `{name}` of feature {int(pol.feature_ids[bad[0]])} is {arr[bad[0]]}; "
                "the file is damaged (refit and save the policy again)"
            )
    nonpos = np.flatnonzero(pol.scale <= 0)
    if nonpos.size:
        raise InvalidValueError(
            f"{where}: `scale` of feature {int(pol.feature_ids[nonpos[0]])} is {pol.scale[nonpos[0]]}; "
            "scales must be > 0 (the file is damaged)"
        )
    if not (math.isfinite(pol.intercept) and math.isfinite(pol.lam) and pol.lam >= 0):
        raise InvalidValueError(f"{where}: intercept {pol.intercept} / lam {pol.lam} must be finite, lam >= 0")
    if pol.labels is not None and len(pol.labels) != k:
        raise InvalidValueError(f"{where}: {len(pol.labels)} labels for {k} features; the file is damaged")
    if len(np.unique(pol.feature_ids)) != k:
        raise InvalidValueError(f"{where}: `feature_ids` repeat; the file is damaged")


def check_order(stored: np.ndarray, given: np.ndarray, where: str) -> None:
    if given.shape == stored.shape and (given == stored).all():
        return
    if len(np.unique(given)) != len(given):
        dup = sorted({int(v) for v in given if (given == v).sum() > 1})[:10]
        raise FeatureMismatchError(f"{where}: the given feature ids repeat {dup}")
    if set(given.tolist()) == set(stored.tolist()) and len(given) == len(stored):
        first = int(np.flatnonzero(given != stored)[0])
        raise FeatureMismatchError(
            f"{where}: features are in a different order (position {first}: stored "
            f"{int(stored[first])}, given {int(given[first])}); reorder X's columns to "
            "policy.feature_ids"
        )
    extra = sorted(set(given.tolist()) - set(stored.tolist()))[:10]
    missing = sorted(set(stored.tolist()) - set(given.tolist()))[:10]
    raise FeatureMismatchError(
        f"{where}: feature ids differ from the policy's (not in policy: {extra}, "
        f"missing: {missing})"
    )
