"""Feature statistics over the probe x SAE-latent activation matrix and feature selection
(method step 2, docs/design.md)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import polars as pl
import scipy.sparse as sp

from . import _backend as backends
from ._inputs import as_codes, as_matrix, as_vector, to_scipy
from ..errors import InvalidValueError, ShapeError

METHODS = ("mean_diff", "corr")


def feature_stats(
    X: Any,
    y: Any = None,
    groups: Any = None,
    feature_ids: Sequence[int] | None = None,
    _backend: str = "rust",
    threads: int | None = None,
) -> tuple[pl.DataFrame, list]:
    """Per-feature statistics in one pass over the non-zeros.

    Returns ``(frame, levels)``: one row per feature with ``feature_id, column, n_active,
    frac_active, mean, std, corr`` (Pearson with ``y``; null where undefined), ``group``
    (the probe group where the feature's mean activation is highest) and ``group_means``
    (a fixed-size array aligned with ``levels``, the sorted distinct group labels).
    """
    frame, levels, _ = _feature_stats(X, y, groups, feature_ids, _backend, threads)
    return frame, levels


def _feature_stats(X, y, groups, feature_ids, _backend, threads):
    xa = as_matrix("X", X)
    n, f = xa[3] if isinstance(xa, tuple) else xa.shape
    ya = None if y is None else as_vector("y", y, length=n)
    if groups is None:
        codes, levels = None, [None]
    else:
        codes, levels = as_codes("groups", groups, n)
    ids = np.arange(f, dtype=np.int64) if feature_ids is None else np.asarray(feature_ids, np.int64)
    if ids.shape != (f,):
        raise ShapeError(f"`feature_ids` must have one id per column ({f}), got {ids.shape}")
    res = backends.backend(_backend).feature_stats(
        xa, ya, codes, len(levels) if codes is not None else 0, backends.threads(threads)
    )
    gm = np.asarray(res.group_means).reshape(f, -1)
    frame = pl.DataFrame(
        {
            "feature_id": ids,
            "column": np.arange(f, dtype=np.int64),
            "n_active": np.asarray(res.n_active, dtype=np.int64),
            "frac_active": np.asarray(res.n_active, dtype=np.float64) / n,
            "mean": res.mean,
            "std": res.std,
            "corr": res.corr,
        }
    ).with_columns(pl.col("corr").fill_nan(None))
    if codes is not None:
        top = np.argmax(gm, axis=1)
        frame = frame.with_columns(
            pl.Series("group", levels, strict=False).gather(top),
            pl.Series("group_means", gm),
        )
    return frame, levels, gm


def select_features(
    X: Any,
    y: Any = None,
    groups: Any = None,
    method: str = "mean_diff",
    k: int | None = None,
    threshold: float | None = None,
    min_active: int = 1,
    positive: Any = True,
    feature_ids: Sequence[int] | None = None,
    _backend: str = "rust",
    threads: int | None = None,
) -> pl.DataFrame:
    """Score every candidate feature and flag the selected ones.

    ``method="mean_diff"`` (the paper): ``score = mean(X | group == positive) −
    mean(X | other group)`` over a two-level ``groups`` (e.g. the probes' behaviour flag);
    selected where ``|score| > threshold`` (default 0.1). ``method="corr"``: ``score =
    corr(X_f, y)``; selected are the top ``k`` by ``|score|`` (with an optional
    ``threshold`` on ``|corr|``). Either way only features active on at least
    ``min_active`` probes are eligible and ``k`` caps the count.

    Returns a frame of every feature with its statistics, ``score``, ``rank`` (1 = largest
    ``|score|`` among eligible features, null otherwise) and ``selected``, sorted by rank.
    The paper's rule is ``select_features(X, groups=flag, threshold=0.1)`` (flagged probes
    against the others).
    """
    _check_selection_args(method, k, threshold, min_active)
    frame, levels, gm = _feature_stats(X, y, groups, feature_ids, _backend, threads)
    if method == "mean_diff":
        frame, score = _mean_diff_scores(frame, groups, levels, gm, positive)
        threshold = 0.1 if threshold is None else threshold
    else:
        if y is None:
            raise InvalidValueError("method 'corr' needs the behaviour scores `y`")
        if k is None and threshold is None:
            raise InvalidValueError("method 'corr' needs `k` (top-K) or a `threshold` on |corr|")
        score = frame["corr"].fill_null(0.0).to_numpy()
        threshold = 0.0 if threshold is None else threshold
    rank, selected = _rank_and_select(score, frame["n_active"].to_numpy() >= min_active, threshold, k)
    return (
        frame.with_columns(
            pl.Series("score", score),
            pl.Series("rank", rank).replace(-1, None),
            pl.Series("selected", selected),
        )
        .sort("rank", nulls_last=True)
    )


def _check_selection_args(method: str, k: int | None, threshold: float | None, min_active: int) -> None:
    if method not in METHODS:
        raise InvalidValueError(f"`method` '{method}' is not one of {METHODS}")
    if isinstance(min_active, bool) or not isinstance(min_active, (int, np.integer)) or min_active < 0:
        raise InvalidValueError(f"`min_active` = {min_active!r} must be an integer >= 0")
    if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1):
        raise InvalidValueError(f"`k` = {k!r} must be an integer >= 1")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number))):
        raise InvalidValueError(f"`threshold` = {threshold!r} must be a number >= 0")
    if threshold is not None and not (math.isfinite(threshold) and threshold >= 0):
        # NaN would compare False everywhere and silently select nothing.
        raise InvalidValueError(f"`threshold` = {threshold} must be a finite number >= 0")


def _mean_diff_scores(frame: pl.DataFrame, groups: Any, levels: list, gm: np.ndarray, positive: Any):
    """mean(X | positive group) − mean(X | the other), with both means added to the frame."""
    if groups is None:
        raise InvalidValueError("method 'mean_diff' needs `groups` (e.g. the probes' behaviour flag)")
    if len(levels) != 2:
        raise InvalidValueError(f"method 'mean_diff' needs exactly two probe groups, got {len(levels)}: {levels[:6]}")
    if positive not in levels:
        raise InvalidValueError(f"`positive` = {positive!r} is not a group; groups: {levels}")
    pi = levels.index(positive)
    frame = frame.with_columns(pl.Series("mean_pos", gm[:, pi]), pl.Series("mean_neg", gm[:, 1 - pi]))
    return frame, gm[:, pi] - gm[:, 1 - pi]


def _rank_and_select(score: np.ndarray, eligible: np.ndarray, threshold: float, k: int | None):
    """Rank eligible features by |score| (ties by column) and select those above the threshold,
    at most ``k``, best first."""
    mag = np.abs(score)
    order = np.lexsort((np.arange(len(mag)), -mag))
    order = order[eligible[order]]
    rank = np.full(len(mag), -1, dtype=np.int64)
    rank[order] = np.arange(1, len(order) + 1)
    selected = eligible & (mag > threshold)
    if k is not None:
        passing = order[mag[order] > threshold][:k]
        selected = np.zeros(len(mag), dtype=bool)
        selected[passing] = True
    return rank, selected


def selected_columns(X: Any, selection: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The selected features' columns of ``X`` as a dense (n, K) float64 array, with their ids.

    Columns come in ``selection`` rank order; pass the ids to :func:`fit_policy`.
    """
    chosen = selection.filter(pl.col("selected"))
    m = to_scipy(as_matrix("X", X))
    if m.shape[1] != selection.height:
        raise ShapeError(f"`X` has {m.shape[1]} columns but the selection covers {selection.height}")
    sub = m[:, chosen["column"].to_numpy()]
    dense = sub.toarray() if sp.issparse(sub) else np.asarray(sub)
    return np.ascontiguousarray(dense, dtype=np.float64), chosen["feature_id"].to_numpy()
