"""Interference (method step 6, docs/design.md): which feature dominates each pair's policy
shift, how much of the shift lands on features not intended for the pair's group, and the
pair-group x feature aggregate."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import polars as pl

from . import _backend
from ..errors import ShapeError


def group_codes(labels: Sequence[Any], table: dict) -> np.ndarray:
    """Codes into a shared label table; None means no group (-1, never intended)."""
    out = np.empty(len(labels), dtype=np.int64)
    for i, lab in enumerate(labels):
        if lab is None:
            out[i] = -1
        else:
            out[i] = table.setdefault(lab, len(table))
    return out


def summarize_interference(pair_features: pl.DataFrame, pairs: pl.DataFrame, feature_groups: pl.DataFrame) -> pl.DataFrame:
    """Pair group x feature aggregate from a (pair, feature) frame, the pair summaries (with
    ``group`` and ``dominant_feature``) and a ``feature_id`` -> ``feature_group`` frame."""
    return (
        pair_features.join(pairs.select("pair_id", "group", "dominant_feature"), on="pair_id")
        .filter(pl.col("group").is_not_null())
        .join(feature_groups.select("feature_id", "feature_group"), on="feature_id")
        .group_by("group", "feature_id", "feature_group")
        .agg(
            pl.len().alias("n_pairs"),
            pl.col("d_coef").mean().alias("mean_d_coef"),
            pl.col("d_coef").abs().mean().alias("mean_abs_d_coef"),
            (pl.col("dominant_feature") == pl.col("feature_id")).sum().alias("n_dominant"),
        )
        .with_columns((pl.col("group") == pl.col("feature_group")).alias("intended"))
        .sort("group", "mean_abs_d_coef", descending=[False, True])
    )


def interference(
    d_coef: np.ndarray,
    feature_groups: Sequence[Any],
    pair_groups: Sequence[Any],
    backend: str = "rust",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pair: dominant feature index (argmax |d_coef|, -1 if none moved), off-target share
    and interference flag, for a (P, K) ``d_coef`` matrix and group labels."""
    d = np.ascontiguousarray(np.asarray(d_coef, dtype=np.float64))
    if d.ndim != 2:
        raise ShapeError(f"`d_coef` must be (P, K), got {d.shape}")
    table: dict = {}
    fg = group_codes(list(feature_groups), table)
    pg = group_codes(list(pair_groups), table)
    res = _backend.backend(backend).interference(d, fg, pg)
    return np.asarray(res.dominant), np.asarray(res.off_target_share), np.asarray(res.flag, dtype=bool)
