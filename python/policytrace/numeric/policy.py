"""The symbolic policy: a ridge regression of the behaviour score on SAE features.

``fit_policy`` solves ``argmin ||y − b0 − Z b||² + lam ||b||²`` with ``Z = X / scale``
(method step 3, docs/design.md). ``coef`` is in the policy's own (scaled) units; ``coef_raw = coef / scale``
is per unit of raw activation.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import polars as pl

from . import _backend as backends
from ._inputs import as_matrix, as_vector, to_scipy
from ..errors import FeatureMismatchError, InvalidValueError, ShapeError



@dataclass(frozen=True, eq=False)
class Policy:
    """A fitted symbolic policy. Fields are read-only; build one with :func:`fit_policy`."""

    coef: np.ndarray
    intercept: float
    lam: float
    scale: np.ndarray
    feature_ids: np.ndarray
    labels: list[str] | None = None
    fit_intercept: bool = True
    standardize: bool = True
    solver: str = "cholesky"
    dual: bool = False
    df: float = float("nan")
    gcv_grid: np.ndarray = field(default_factory=lambda: np.zeros(0))
    gcv_score: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def n_features(self) -> int:
        return int(self.coef.shape[0])

    @property
    def coef_raw(self) -> np.ndarray:
        """Coefficients per unit of raw feature activation."""
        return self.coef / self.scale

    def predict(self, X: Any) -> np.ndarray:
        """Predicted behaviour score for probes ``X`` (n, K), columns in ``feature_ids`` order."""
        m = to_scipy(as_matrix("X", X, ncols=self.n_features))
        return np.asarray(m @ self.coef_raw).ravel() + self.intercept

    def to_frame(self) -> pl.DataFrame:
        """One row per feature: id, label, coef (scaled units), coef_raw, scale, rank by |coef|."""
        order = np.argsort(-np.abs(self.coef), kind="stable")
        rank = np.empty(self.n_features, dtype=np.int64)
        rank[order] = np.arange(1, self.n_features + 1)
        return pl.DataFrame(
            {
                "feature_id": self.feature_ids,
                "label": self.labels if self.labels is not None else [None] * self.n_features,
                "coef": self.coef,
                "coef_raw": self.coef_raw,
                "scale": self.scale,
                "rank": rank,
            },
            schema_overrides={"label": pl.Utf8},
        )

    def gcv_frame(self) -> pl.DataFrame:
        """The GCV curve (empty when lambda was given)."""
        return pl.DataFrame({"lam": self.gcv_grid, "gcv": self.gcv_score}).with_columns(
            pl.col("gcv").replace(float("inf"), None)
        )

    def index_of(self, feature_ids: Sequence[int]) -> np.ndarray:
        """Column positions of ``feature_ids`` in this policy; unknown ids raise."""
        pos = {int(f): i for i, f in enumerate(self.feature_ids)}
        missing = [int(f) for f in feature_ids if int(f) not in pos]
        if missing:
            raise FeatureMismatchError(f"feature ids not in the policy: {missing[:10]}")
        return np.array([pos[int(f)] for f in feature_ids], dtype=np.int64)

    # --- persistence (policy_io.py) ----------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``.json`` or ``.parquet`` (by suffix) atomically; floats round-trip exactly."""
        from .policy_io import save_policy

        return save_policy(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, feature_ids: Sequence[int] | None = None) -> "Policy":
        """Read a saved policy, checking what it holds (finite coefficients, positive scales,
        one coefficient per feature id). With ``feature_ids``, check they are exactly the
        stored features in the stored order (a reordered or different set raises
        :class:`FeatureMismatchError`; reorder the columns of X instead)."""
        from .policy_io import load_policy

        return load_policy(path, feature_ids)


def _lam_value(lam: Any) -> float | None:
    """A fixed λ as a float, or None for "gcv"."""
    if isinstance(lam, str):
        if lam != "gcv":
            raise InvalidValueError(f"`lam` must be a number or 'gcv', got '{lam}'")
        return None
    if isinstance(lam, (bool, complex)) or not isinstance(lam, (int, float, np.integer, np.floating)):
        raise InvalidValueError(f"`lam` must be a number >= 0 or 'gcv', got {lam!r}")
    value = float(lam)
    if not math.isfinite(value) or value < 0:
        raise InvalidValueError(f"`lam` = {lam} must be a finite number >= 0")
    return value


def _lam_grid(lam_grid: Any) -> list[float] | None:
    if lam_grid is None:
        return None
    try:
        grid = np.asarray(lam_grid, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InvalidValueError(f"`lam_grid` must be numbers: {e}") from e
    if grid.ndim != 1:
        raise InvalidValueError(f"`lam_grid` must be a flat list of numbers, got shape {grid.shape}")
    bad = np.flatnonzero(~(np.isfinite(grid) & (grid >= 0)))
    if bad.size:
        raise InvalidValueError(f"`lam_grid`[{bad[0]}] = {grid[bad[0]]} must be a finite number >= 0")
    return [float(v) for v in grid]


def _feature_ids(feature_ids: Any, k: int) -> np.ndarray:
    if feature_ids is None:
        return np.arange(k, dtype=np.int64)
    ids = np.asarray(feature_ids)
    if ids.ndim != 1 or ids.shape[0] != k:
        raise ShapeError(f"`feature_ids` must have one id per column ({k}), got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise InvalidValueError("`feature_ids` must be integers (SAE latent indices)")
    if len(np.unique(ids)) != k:
        raise FeatureMismatchError("`feature_ids` has duplicates")
    return ids.astype(np.int64)


def fit_policy(
    X: Any,
    y: Any,
    lam: float | str = 5.0,
    intercept: bool = True,
    standardize: bool = True,
    feature_ids: Sequence[int] | None = None,
    labels: Sequence[str] | None = None,
    lam_grid: Sequence[float] | None = None,
    _backend: str = "rust",
    threads: int | None = None,
) -> Policy:
    """Fit the symbolic policy.

    Args:
        X: (n, K) dense array or scipy.sparse matrix of the selected features' activations.
        y: (n,) behaviour scores.
        lam: ridge penalty, or ``"gcv"`` to pick it by generalized cross-validation over
            ``lam_grid`` (default: 25 log-spaced values from 1e-6 to 1e3 times the mean
            eigenvalue of ZᵀZ).
        intercept: fit an unpenalized intercept (centres Z and y).
        standardize: divide each column by its population std (1 for constant columns);
            the scales are then fixed for every decomposition.
        feature_ids: SAE latent index of each column (default 0..K-1).
        labels: a human-readable label per feature.
        threads: worker threads (default: all cores or POLICYTRACE_NUM_THREADS).
    """
    xa = as_matrix("X", X)
    n, k = xa[3] if isinstance(xa, tuple) else xa.shape
    ya = as_vector("y", y, length=n)
    ids = _feature_ids(feature_ids, k)
    if labels is not None and len(labels) != k:
        raise ShapeError(f"`labels` must have one label per feature ({k}), got {len(labels)}")
    lam_value, grid = _lam_value(lam), _lam_grid(lam_grid)
    if grid is not None and lam_value is not None:
        raise InvalidValueError("`lam_grid` is only used with lam='gcv'; drop it or set lam='gcv'")
    res = backends.backend(_backend).fit_policy(
        xa, ya, lam_value, grid, intercept, standardize, backends.threads(threads)
    )
    return Policy(
        coef=np.asarray(res.coef),
        intercept=float(res.intercept),
        lam=float(res.lam),
        scale=np.asarray(res.scale),
        feature_ids=ids,
        labels=list(labels) if labels is not None else None,
        fit_intercept=intercept,
        standardize=standardize,
        solver=str(res.solver),
        dual=bool(res.dual),
        df=float(res.df),
        gcv_grid=np.asarray(res.gcv_grid),
        gcv_score=np.asarray(res.gcv_score),
    )
