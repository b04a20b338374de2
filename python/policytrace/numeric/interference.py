"""Interference (method step 6, docs/design.md): which feature dominates each pair's policy
shift, how much of the shift lands on features not intended for the pair's group, and the
pair-group x feature aggregate."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import polars as pl

from . import _backend as backends
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
    _backend: str = "rust",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pair: dominant feature index (argmax |d_coef|, -1 if none moved), off-target share
    and interference flag, for a (P, K) ``d_coef`` matrix and group labels."""
    d = np.ascontiguousarray(np.asarray(d_coef, dtype=np.float64))
    if d.ndim != 2:
        raise ShapeError(f"`d_coef` must be (P, K), got {d.shape}")
    table: dict = {}
    fg = group_codes(list(feature_groups), table)
    pg = group_codes(list(pair_groups), table)
    res = backends.backend(_backend).interference(d, fg, pg)
    return np.asarray(res.dominant), np.asarray(res.off_target_share), np.asarray(res.flag, dtype=bool)


def benjamini_hochberg(p: np.ndarray, q: float = 0.05) -> np.ndarray:
    """Which p-values are significant at false-discovery rate ``q`` (Benjamini–Hochberg);
    NaN p-values (untested) are never significant."""
    p = np.asarray(p, dtype=np.float64)
    ok = np.flatnonzero(np.isfinite(p))
    out = np.zeros(len(p), dtype=bool)
    if ok.size == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    m = ok.size
    passed = p[order] <= q * np.arange(1, m + 1) / m
    if passed.any():
        out[order[: int(np.flatnonzero(passed).max()) + 1]] = True
    return out


def against_chance(d_coef: np.ndarray, feature_groups: Sequence[Any], pair_groups: Sequence[Any],
                   n_perm: int = 2000, seed: int = 0, q: float = 0.05) -> dict[str, np.ndarray]:
    """Each pair's off-target share against the share expected when feature groups are
    assigned at random (a permutation of the groups, sizes kept).

    With ``m`` of the ``K`` features in the pair's group and ``w_k = |d_k| / Σ|d|``, the chance
    share is exactly ``1 − m/K`` and its variance ``m(K−m)/(K−1) · var(w)`` (sampling without
    replacement); the one-sided p-value of an excess comes from ``n_perm`` seeded permutations,
    shared by all pairs so it does not depend on how pairs are batched. Returns per pair:
    ``share``, ``chance`` (expected share), ``excess``, ``z``, ``p``, ``significant`` (excess > 0
    and Benjamini–Hochberg at ``q`` across pairs) and ``dominant_chance`` (the chance that the
    dominant feature is not intended, ``1 − m/K``). Pairs without a group get NaN / False."""
    d = np.abs(np.asarray(d_coef, dtype=np.float64))
    if d.ndim != 2:
        raise ShapeError(f"`d_coef` must be (P, K), got {d.shape}")
    P, K = d.shape
    fg = np.asarray(list(feature_groups), dtype=object)
    pg = list(pair_groups)
    if fg.shape != (K,) or len(pg) != P:
        raise ShapeError(f"need {K} feature groups and {P} pair groups, got {fg.shape[0]} and {len(pg)}")
    total = d.sum(axis=1)
    w = np.divide(d, total[:, None], out=np.zeros_like(d), where=total[:, None] > 0)
    intended = np.array([[g is not None and f == g for f in fg] for g in pg], dtype=bool).reshape(P, K)
    m = intended.sum(axis=1)
    valid = np.array([g is not None for g in pg]) & (total > 0)
    share = np.where(valid, 1.0 - (w * intended).sum(axis=1), np.nan)
    chance = np.where(valid, 1.0 - m / K, np.nan)
    var = np.where(valid & (K > 1), m * (K - m) / max(K - 1, 1) * w.var(axis=1), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(var > 0, (share - chance) / np.sqrt(var), np.nan)
    perms = np.argsort(np.random.default_rng(seed).random((n_perm, K)), axis=1)
    p = np.full(P, np.nan)
    for i in np.flatnonzero(valid):
        # a random intended set of size m: the first m features of each permutation
        null_share = 1.0 - np.cumsum(w[i][perms], axis=1)[:, m[i] - 1] if m[i] > 0 else np.ones(n_perm)
        p[i] = (1 + np.count_nonzero(null_share >= share[i] - 1e-12)) / (n_perm + 1)
    significant = benjamini_hochberg(p, q) & (share > chance)
    return {"share": share, "chance": chance, "excess": share - chance, "z": z, "p": p,
            "significant": significant, "dominant_chance": chance}


def group_rates(pair_groups: Sequence[Any], interfered: np.ndarray, chance: np.ndarray, q: float = 0.05):
    """Per pair group: how often the dominant feature is not intended, against the chance rate,
    with a one-sided binomial p-value and Benjamini–Hochberg across groups."""
    from scipy.stats import binomtest

    pg = np.asarray(list(pair_groups), dtype=object)
    rows = []
    for g in sorted({x for x in pg.tolist() if x is not None}, key=str):
        sel = pg == g
        n, k = int(sel.sum()), int(np.asarray(interfered)[sel].sum())
        c = float(np.nanmean(np.asarray(chance)[sel]))
        p = binomtest(k, n, min(max(c, 0.0), 1.0), alternative="greater").pvalue if n else np.nan
        rows.append({"group": g, "n_pairs": n, "interference_rate": k / n if n else np.nan,
                     "chance_rate": c, "excess": (k / n if n else np.nan) - c, "p_value": float(p)})
    frame = pl.DataFrame(rows, schema={"group": pl.Utf8, "n_pairs": pl.Int64, "interference_rate": pl.Float64,
                                       "chance_rate": pl.Float64, "excess": pl.Float64, "p_value": pl.Float64})
    sig = benjamini_hochberg(frame["p_value"].to_numpy(), q) & (frame["excess"].to_numpy() > 0)
    return frame.with_columns(pl.Series("significant", sig))
